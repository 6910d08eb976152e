"""SparseGPT (method="sparsegpt") against a slow pure-PyTorch transcription of the reference
implementation (tests/reference.py), per weight and through the block loop."""

from __future__ import annotations

import copy

import pytest
import torch

import wandapp
from wandapp.testing import assert_masks_equal, assert_nm

import reference
from conftest import calib_ids, tiny_architecture, tiny_model


def hessian(x: torch.Tensor, sequences: int) -> torch.Tensor:
    """H = 2/N sum x x^T over the token rows of x (float64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2 / sequences * x.T @ x


@pytest.mark.parametrize("sparsity", [0.5, 0.58, 0.7, "2:4", "4:8", "1:4"])
@pytest.mark.parametrize("shape, blocksize", [((12, 64), 128), ((7, 200), 48), ((5, 96), 17)])
def test_one_weight_equals_the_transcription(sparsity, shape, blocksize):
    g = torch.Generator().manual_seed(sum(shape) + blocksize)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(3, 50, cols, generator=g, dtype=torch.float64) * torch.rand(cols, generator=g, dtype=torch.float64) * 3
    x[..., 5] = 0  # an input that never fires
    h = hessian(x, 3)
    expected_w, expected_keep = reference.sparsegpt(w, h, sparsity, blocksize=blocksize)
    got_w = w.clone()
    nm = tuple(int(v) for v in sparsity.split(":")) if isinstance(sparsity, str) else None
    if nm is not None and cols % nm[1]:
        pytest.skip("N:M needs in_features divisible by m")
    keep = wandapp.kernels.sparsegpt_prune_(got_w, h, sparsity=0.5 if nm else sparsity, nm=nm, blocksize=blocksize)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-9, atol=1e-9)
    pruned_per_row = (~keep).sum(dim=1)
    assert torch.all(pruned_per_row == wandapp.kernels.pruned_per_row(cols, 0.5 if nm else sparsity, nm))
    assert torch.all(got_w[~keep] == 0)


def test_the_update_beats_masking_alone_on_the_layer_output():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    pruned = w.clone()
    keep = wandapp.kernels.sparsegpt_prune_(pruned, hessian(x, 1).float(), nm=(2, 4))
    error = lambda v: float(((x @ w.T - x @ v.T) ** 2).sum())  # noqa: E731
    assert error(pruned) < 0.75 * error(w * keep)  # measured: 0.52


def reference_block_loop(model, sequences, sparsity):
    """SparseGPT block by block (the reference's llama_sequential): each block's Hessians from its
    dense inputs (recomputed with a full model forward), then every linear layer pruned."""
    masks = {}
    for index, layer in enumerate(model.model.layers):
        linears = reference.block_linears(layer)
        inputs: dict[str, list] = {n: [] for n, _ in linears}
        hooks = [l.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach())) for n, l in linears]
        reference.forward_all(model, sequences, hooks)
        with torch.no_grad():
            for n, l in linears:
                # Each sequence's X^T X in float32, summed over sequences in float64, as the core does.
                h = (2 / len(sequences) * sum((rows.T @ rows).double() for rows in (x.reshape(-1, x.shape[-1]).float() for x in inputs[n]))).float()
                w, keep = reference.sparsegpt(l.weight, h, sparsity)
                l.weight.copy_(w)
                masks[f"model.layers.{index}.{n}"] = keep
    return masks


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_block_loop_equals_the_reference_loop(sparsity):
    model = tiny_model("llama", seed=3, num_hidden_layers=3)
    ref_model = copy.deepcopy(model)
    ids = calib_ids(n=8, seqlen=24, seed=4)
    report = wandapp.prune(model, ids, sparsity=sparsity, method="sparsegpt", nsamples=8, progress=False)
    expected = reference_block_loop(ref_model, [ids[i : i + 1] for i in range(8)], sparsity)
    differing = {n: int((report.masks[n] != expected[n]).sum()) for n in expected}
    assert sum(differing.values()) == 0, {n: d for n, d in differing.items() if d}
    for name, module in model.named_modules():
        if name in expected:
            torch.testing.assert_close(module.weight, ref_model.get_submodule(name).weight, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("method", ["sparsegpt", "sparsegpt+ro"])
@pytest.mark.parametrize("model_type", ["llama", "mixtral", "qwen2_moe"])
def test_sparsegpt_methods_on_dense_and_moe_models(method, model_type):
    model = tiny_architecture(model_type) if model_type != "llama" else tiny_model("llama")
    ids = calib_ids(n=8, seqlen=24)
    report = wandapp.prune(model, ids, sparsity="2:4", method=method, nsamples=8, ro_samples=4, ro_holdout=2, ro_rounds=2, progress=False)
    assert_nm(model, 2, 4)
    assert_masks_equal(model, report.masks)
    assert torch.isfinite(model(ids[:2]).logits).all()
    if method == "sparsegpt+ro":
        # ro_min_improvement is 0 by default: both rounds run.
        assert all(len(b.ro_losses) == 2 and b.ro_stop == "rounds" for b in report.blocks)
        assert all(b.holdout_mse_final <= b.mse_before_ro * (1 + 1e-6) for b in report.blocks)


def test_sparsegpt_lowers_block_error_against_wanda():
    ids = calib_ids(n=16, seqlen=32, seed=5)
    settings = dict(sparsity=0.5, nsamples=16, progress=False)
    wanda = wandapp.prune(tiny_model("llama", seed=6, num_hidden_layers=3), ids, method="wanda", **settings)
    sgpt = wandapp.prune(tiny_model("llama", seed=6, num_hidden_layers=3), ids, method="sparsegpt", **settings)
    assert all(s.mse_final < w.mse_final for s, w in zip(sgpt.blocks, wanda.blocks)), [(s.mse_final, w.mse_final) for s, w in zip(sgpt.blocks, wanda.blocks)]


def test_padding_is_left_out_of_the_hessian():
    model = tiny_model("llama", seed=8)
    plain = calib_ids(n=6, seqlen=20, seed=9)
    junk = calib_ids(n=6, seqlen=12, seed=10)
    padded = {"input_ids": torch.cat([plain, junk], 1), "attention_mask": torch.cat([torch.ones(6, 20), torch.zeros(6, 12)], 1).long()}
    a = wandapp.prune(copy.deepcopy(model), plain, sparsity=0.5, method="sparsegpt", nsamples=6, progress=False)
    b = wandapp.prune(copy.deepcopy(model), [padded], sparsity=0.5, method="sparsegpt", nsamples=6, progress=False)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
