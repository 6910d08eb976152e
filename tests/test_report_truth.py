"""The report and the masks describe the weights as they are (issue 22, kind 1).

Every method prunes exactly the count asked for in every row, a weight the method keeps keeps the
method's value (a dead input's weight, which SparseGPT's update never touches, stays as it was),
the report's per-layer sparsity is the measured zero fraction, the masks are ``weight != 0``, and a
kept weight that is nevertheless zero is counted in ``extra_zeros``. The invariants are checked
against the weights themselves, not against what the core returned."""

from __future__ import annotations

import pytest
import torch

import wandapp
from wandapp import _core
from wandapp.kernels import pruned_per_row
from wandapp.testing import assert_masks_equal, assert_sparsity

from conftest import calib_ids, tiny_model

METHODS = ["magnitude", "wanda", "rgs", "wanda++", "sparsegpt", "sparsegpt+ro"]
SETTINGS = dict(nsamples=8, ro_samples=4, ro_holdout=2, ro_rounds=2, progress=False)
DEAD_GATES = ["mlp.gate_proj"]


def with_dead_inputs(dtype=torch.float32):
    """A tiny LLaMA whose block 0 down_proj has 96 of its 128 inputs dead on every token (their
    gate_proj rows are zero: silu(0) x up = 0) and whose block 1 down_proj has no live input at all.
    Prune it with ``ignore=DEAD_GATES``: the zero rows are the dense model's own zeros, not pruning's."""
    model = tiny_model("llama", seed=21, dtype=dtype)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[:96] = 0
        model.model.layers[1].mlp.gate_proj.weight[:] = 0
    return model


def check_truthful(model, report, sparsity):
    """Per matrix: exactly the count asked for per row, masks = weight != 0, sparsity measured."""
    for block in report.blocks:
        for name, layer in block.layers.items():
            w = model.get_submodule(name).weight
            zeros = (w == 0).sum(dim=1)
            need = pruned_per_row(w.shape[1], 0.5 if sparsity == "2:4" else sparsity)
            assert bool((zeros == need).all()), f"{name}: zeros per row {zeros.unique().tolist()}, asked {need}"
            assert torch.equal(report.masks[name], (w != 0).cpu()), name
            assert layer.sparsity == pytest.approx(float((w == 0).float().mean()), abs=0), name
            assert layer.extra_zeros == 0, name
    assert_masks_equal(model, report.masks)
    assert report.achieved_sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_dead_inputs_are_pruned_by_the_count_asked_for(method, sparsity):
    model = with_dead_inputs()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("down_proj")}
    report = wandapp.prune(model, calib_ids(n=8, seqlen=24, seed=22), sparsity=sparsity, method=method, ignore=DEAD_GATES, **SETTINGS)
    check_truthful(model, report, sparsity)
    nm = (2, 4) if sparsity == "2:4" else None
    if method == "sparsegpt":  # the sweep never updates a dead input's weight: kept ones are as they were
        for name, before in dense.items():
            after = model.get_submodule(name).weight
            dead = slice(0, 96) if ".0." in name else slice(None)
            kept = after[:, dead] != 0
            assert kept.any(), f"{name}: every dead weight pruned ({nm})"
            assert torch.equal(after[:, dead][kept], before[:, dead][kept]), name


@pytest.mark.parametrize("method", ["sparsegpt", "sparsegpt+ro", "wanda"])
def test_dead_inputs_in_bfloat16(method):
    model = with_dead_inputs(torch.bfloat16)
    report = wandapp.prune(model, calib_ids(n=8, seqlen=24, seed=23), sparsity=0.5, method=method, ignore=DEAD_GATES, **SETTINGS)
    check_truthful(model, report, 0.5)


def test_weights_already_zero_are_reported_as_extra_zeros():
    """A kept weight that is zero (here: zero in the dense model) makes the layer sparser than
    asked: the report says by how much, and its mask marks it as the zero it is."""
    model = tiny_model("llama", seed=24)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[3, :48] = 0  # 48 of 64 zero: wanda at 0.5 prunes 32, keeps 16 zeros
    report = wandapp.prune(model, calib_ids(n=8, seqlen=24, seed=25), sparsity=0.5, method="wanda", **SETTINGS)
    w = model.get_submodule(name).weight
    layer = report.blocks[0].layers[name]
    assert layer.extra_zeros == 16 and report.extra_zeros == {name: 16}
    assert layer.pruned_per_row == 32
    assert layer.sparsity == pytest.approx(float((w == 0).float().mean()))
    assert torch.equal(report.masks[name], w != 0)
    assert_masks_equal(model, report.masks)
    assert "beyond the pattern" in str(report)
    with pytest.raises(AssertionError, match="row 3 has 48 zeros, expected exactly 32"):
        assert_sparsity(model, 0.5, exact=True)


@pytest.mark.parametrize("method", ["wanda++", "sparsegpt+ro"])
def test_a_kept_weight_set_to_zero_by_the_core_is_reported(method, monkeypatch):
    """Whatever sets a kept weight to exactly zero (RO can, in float16), the report measures it."""
    real = _core.prune_block_

    def zeroing_one_kept_weight(runner, weights, **kwargs):
        result = real(runner, weights, **kwargs)
        with torch.no_grad():
            row, col = (int(v) for v in torch.nonzero(result["masks"][0])[0])
            weights[0][row, col] = 0
        return result

    monkeypatch.setattr(_core, "prune_block_", zeroing_one_kept_weight)
    model = tiny_model("llama", seed=26)
    report = wandapp.prune(model, calib_ids(n=8, seqlen=24, seed=27), sparsity=0.5, method=method, **SETTINGS)
    first = "model.layers.0.self_attn.q_proj"
    assert report.extra_zeros == {first: 1, "model.layers.1.self_attn.q_proj": 1}
    w = model.get_submodule(first).weight
    assert torch.equal(report.masks[first], w != 0)
    assert report.blocks[0].layers[first].sparsity == pytest.approx(float((w == 0).float().mean()))
    assert report.achieved_sparsity > 0.5


def test_assert_masks_equal_notices_masks_that_claim_a_zero_weight_is_kept():
    model = tiny_model("llama", seed=28)
    name = "model.layers.0.mlp.down_proj"
    w = model.get_submodule(name).weight
    mask = torch.ones_like(w, dtype=torch.bool)
    assert_masks_equal(model, {name: mask})
    with torch.no_grad():
        w[2, 5] = 0
    with pytest.raises(AssertionError, match="row 2 col 5 is zero but its mask says kept"):
        assert_masks_equal(model, {name: mask})
