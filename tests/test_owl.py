"""layer_sparsity="owl" (python/wandapp/owl.py, src/owl.rs) against a float64 transcription of
OWL's own code (Yin et al. 2024: outlier ratios on the dense model, min-max scaled to
[0, 2 lambda], centred) followed by the reference Wanda with per-layer counts."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import calib_ids, tiny_model
from reference import block_linears, forward_all, pruned_per_row, wanda_model

import wandapp
from wandapp import kernels
from wandapp.errors import InvalidArgumentError, SparsityError


def reference_owl(model, sequences, sparsity: float, m: float, lam: float):
    """OWL's pre-pass on the dense model: every block's Wanda scores |W| sqrt(scaler_row) in
    float64, the share above m x their block's mean, then OWL's scaling. Returns (ratios,
    block sparsities, {linear name: pruned per row}) with largest-remainder counts that keep each
    shape's total at the uniform one."""
    sums = {}

    def add(name, x):
        x = x.double().reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + (x**2).sum(dim=0)

    linears = {
        f"model.layers.{i}.{n}": l for i, layer in enumerate(model.model.layers) for n, l in block_linears(layer)
    }
    hooks = [l.register_forward_pre_hook(lambda mod, a, n=n: add(n, a[0])) for n, l in linears.items()]
    forward_all(model, sequences, hooks)
    ratios = []
    for i in range(len(model.model.layers)):
        scores = [
            (l.weight.double().abs() * torch.sqrt(sums[n] / len(sequences))[None, :]).flatten()
            for n, l in linears.items() if n.startswith(f"model.layers.{i}.")
        ]
        scores = torch.cat(scores)
        ratios.append(float((scores > scores.mean() * m).sum()) / scores.numel())
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    block_sparsity = [sparsity - (x - mean) for x in scaled]
    counts = {}
    shapes = {}
    for n, l in linears.items():
        shapes.setdefault(tuple(l.weight.shape), []).append(n)
    for (_, cols), names in shapes.items():
        ideal = [cols * block_sparsity[int(n.split(".")[2])] for n in names]
        total = len(names) * pruned_per_row(cols, sparsity)
        scaled_ideal = [x * total / sum(ideal) for x in ideal]
        k = [math.floor(x) for x in scaled_ideal]
        by_remainder = sorted(range(len(names)), key=lambda j: (-(scaled_ideal[j] - math.floor(scaled_ideal[j])), j))
        for j in by_remainder[: total - sum(k)]:
            k[j] += 1
        counts.update(zip(names, k))
    return ratios, block_sparsity, counts


@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_owl_masks_equal_the_reference_and_the_mean_sparsity_is_exact(sparsity):
    ids = calib_ids(12, 32)
    ratios, block_sparsity, counts = reference_owl(tiny_model(num_hidden_layers=4), list(ids.split(1)), sparsity, 5.0, 0.08)
    assert len(set(counts.values())) > 2, "the test model must give the blocks different sparsities"

    model = tiny_model(num_hidden_layers=4)
    report = wandapp.prune(model, ids, sparsity=sparsity, method="wanda", layer_sparsity="owl", progress=False)
    expected = wanda_model(tiny_model(num_hidden_layers=4), list(ids.split(1)), sparsity, pruned=counts)
    for name, keep in report.masks.items():
        assert torch.equal(keep, expected[name]), name
    for b in report.blocks:
        assert b.outlier_ratio == pytest.approx(ratios[b.index], abs=1e-4)
        assert b.target_sparsity == pytest.approx(block_sparsity[b.index], abs=1e-3)
        for name, layer in b.layers.items():
            assert layer.pruned_per_row == counts[name]
            assert abs(layer.pruned_per_row / layer.shape[1] - b.target_sparsity) <= 1.5 / layer.shape[1] + 1e-3

    uniform = wandapp.prune(tiny_model(num_hidden_layers=4), ids, sparsity=sparsity, method="wanda", progress=False)
    assert report.achieved_sparsity == uniform.achieved_sparsity
    assert sum(b.target_sparsity for b in report.blocks) / 4 == pytest.approx(sparsity, abs=1e-12)


@pytest.mark.parametrize("method", ["wanda++", "sparsegpt"])
def test_owl_counts_hold_for_every_method(method):
    ids = calib_ids(8, 16)
    report = wandapp.prune(
        tiny_model(num_hidden_layers=3), ids, sparsity=0.5, method=method, layer_sparsity="owl", progress=False, ro_rounds=1, ro_samples=4
    )
    for b in report.blocks:
        for name, keep in ((n, report.masks[n]) for n in b.layers):
            pruned = (~keep).sum(dim=1)
            assert torch.all(pruned == b.layers[name].pruned_per_row), name
    uniform = wandapp.prune(tiny_model(num_hidden_layers=3), ids, sparsity=0.5, method="wanda", progress=False)
    assert report.achieved_sparsity == uniform.achieved_sparsity


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sparsity="2:4"), SparsityError, "unstructured"),
        (dict(sparsity=0.05), InvalidArgumentError, "lower owl_lambda"),
        (dict(sparsity=0.95), InvalidArgumentError, "lower owl_lambda"),
        (dict(sparsity=0.5, owl_m=0), InvalidArgumentError, "owl_m"),
        (dict(sparsity=0.5, layer_sparsity="outlier"), InvalidArgumentError, "layer_sparsity"),
    ],
)
def test_owl_refuses_before_touching_weights(kwargs, error, match):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"layer_sparsity": "owl", **kwargs}
    with pytest.raises(error, match=match):
        wandapp.prune(model, calib_ids(4, 16), method="wanda", progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_owl_sparsities_follow_owls_formula():
    g = torch.Generator().manual_seed(3)
    for n in (2, 5, 32):
        ratios = (torch.rand(n, generator=g, dtype=torch.float64) * 0.05).tolist()
        got = kernels.owl_sparsities(ratios, 0.7, 0.08)
        # OWL's code: ratios -> (r - min) / (max - min) * 2 lambda -> - mean + (1 - s); sparsity = 1 - that.
        r = torch.tensor(ratios, dtype=torch.float64)
        r = (r - r.min()) * (1 / (r.max() - r.min()) * 0.08 * 2)
        expected = 1 - (r - r.mean() + (1 - 0.7))
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected, atol=1e-12)
    assert kernels.owl_sparsities([0.1, 0.1, 0.1], 0.5, 0.08) == [0.5, 0.5, 0.5]


def test_allocation_sums_exactly_and_stays_within_one_of_the_ideal():
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=g))
        cols = int(torch.randint(4, 3000, (1,), generator=g))
        s = (0.5 + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.16).tolist()
        total = n * pruned_per_row(cols, 0.5)
        k = kernels.allocate_pruned_per_row(s, cols, total)
        assert sum(k) == total
        scale = total / (cols * sum(s))
        assert all(abs(kj - cols * sj * scale) < 1 for kj, sj in zip(k, s))
