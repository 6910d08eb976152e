"""wandapp on an accelerator, against the same computation on CPU. Runs on the device named by
WANDAPP_TEST_DEVICE (bench/gpu.py sets it: "cuda" on the GPU machine, "cpu" in its smoke mode),
else on CUDA when present; skipped otherwise."""

from __future__ import annotations

import os

import pytest
import torch

import wandapp
from wandapp import kernels
from wandapp.testing import assert_nm

from conftest import calib_ids, tiny_architecture, tiny_model

DEVICE = os.environ.get("WANDAPP_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
needs_device = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set WANDAPP_TEST_DEVICE to choose one)")
METHODS = ["magnitude", "wanda", "rgs", "wanda++", "sparsegpt", "sparsegpt+ro"]
FAST = dict(ro_samples=8, ro_holdout=4, ro_rounds=2, progress=False)
#: What the device may change, in float32: its kernels sum in another order (and tile matmuls
#: otherwise), so each activation norm, regional gradient RMS and score agrees with CPU's to this
#: relative tolerance, and a mask bit may differ only where the CPU scores tie to within it at the
#: row's (or N:M group's) boundary between pruned and kept (`near_tie_violations`).
RTOL = 1e-4


def near_tie_violations(scores: torch.Tensor, cpu_mask: torch.Tensor, other_mask: torch.Tensor, group: int | None = None) -> list[tuple[int, int]]:
    """(row, column) of every bit where ``other_mask`` differs from ``cpu_mask`` although the CPU
    score there is not a near-tie: within 2 x RTOL (each side of a swap may move by RTOL) of its
    comparison group's boundary, the midpoint between the highest pruned and the lowest kept CPU
    score of that row (``group=None``) or N:M group of ``group`` columns. RTOL is relative to the
    boundary plus the largest score of the whole tensor (the scale ``assert_close`` allows for
    scores near 0). A group with nothing pruned or nothing kept has no boundary: any bit that
    differs there is a violation."""
    scale = float(scores.abs().max())
    bad = []
    for row, col in (cpu_mask != other_mask).nonzero().tolist():
        lo, hi = (0, scores.shape[1]) if group is None else (col - col % group, col - col % group + group)
        s, keep = scores[row, lo:hi].double(), cpu_mask[row, lo:hi]
        if keep.all() or not keep.any():
            bad.append((row, col))
            continue
        boundary = float((s[~keep].max() + s[keep].min()) / 2)
        if abs(float(s[col - lo]) - boundary) > 2 * RTOL * (abs(boundary) + scale):
            bad.append((row, col))
    return bad


def test_the_near_tie_check_accepts_swaps_at_the_boundary_only():
    """The statement's own check on CPU: scores moved by 1e-6 relative (a device's summation order)
    flip only near-ties and pass; a bit flipped far from the boundary is named."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(32, 64, generator=g)
    scores[:, 1] = scores[:, 0] * (1 + 1e-7)  # near-ties, some of them at a boundary
    moved = scores * (1 + 1e-6 * torch.randn(32, 64, generator=g))
    for mask, group in ((kernels.unstructured_mask, None), (lambda x, _: kernels.nm_mask(x, 2, 4), 4)):
        cpu, other = mask(scores, 0.5), mask(moved, 0.5)
        assert near_tie_violations(scores, cpu, other, group) == []
        far = cpu.clone()
        row, col = 3, int(scores[3, : 4 if group else 64].argmax())
        far[row, col] = ~far[row, col]
        assert (row, col) in near_tie_violations(scores, cpu, far, group)


def tied_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 50, (rows, cols), generator=g).float() / 7
    values[torch.rand(rows, cols, generator=g) < 0.1] = -0.0
    return values


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_same_scores_give_the_same_masks_on_the_device(dtype):
    for seed in range(3):
        scores = tied_scores(64, 256, seed).to(dtype)
        for sparsity in (0.3, 0.5, 0.58):
            assert torch.equal(kernels.unstructured_mask(scores.to(DEVICE), sparsity).cpu(), kernels.unstructured_mask(scores, sparsity))
        for n, m in ((2, 4), (4, 8), (1, 4)):
            assert torch.equal(kernels.nm_mask(scores.to(DEVICE), n, m).cpu(), kernels.nm_mask(scores, n, m))


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_prune_on_the_device(method, dtype):
    model = tiny_model("llama", dtype=dtype).to(DEVICE)
    ids = calib_ids()
    report = wandapp.prune(model, ids, sparsity="2:4", method=method, **FAST)
    assert_nm(model, 2, 4)
    assert report.pruned_blocks == [0, 1] and report.device.startswith(DEVICE)
    assert all(p.device.type == DEVICE and p.dtype == dtype for p in model.parameters())
    assert torch.isfinite(model(ids[:2].to(DEVICE)).logits.float()).all()


def first_block_statistics(device: str, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{linear name: (weight, activation norm, regional gradient RMS)} of block 0 of the tiny LLaMA
    on ``device``, from the core's statistics kernels (sequence by sequence, as the schedule)."""
    model = tiny_model("llama").to(device)
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    acts = {n: kernels.ActivationStats(m.in_features) for n, m in linears.items()}
    grads = {n: kernels.GradientStats(list(m.weight.shape)) for n, m in linears.items()}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].detach())) for n, m in linears.items()]
    hooks.append(layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out)))
    for ids in calib_ids(n=8, seqlen=24, seed=seed).split(1):
        model(ids.to(device), use_cache=False)
        for n in linears:
            acts[n].update(seen[n])
        weights = [m.weight for m in linears.values()]
        for n, g in zip(linears, torch.autograd.grad(seen["out"].float().square().sum().sqrt(), weights)):
            grads[n].update(g)
    for h in hooks:
        h.remove()
    return {n: (m.weight.detach().cpu(), acts[n].norm().cpu(), grads[n].rms().cpu()) for n, m in linears.items()}


@needs_device
@pytest.mark.parametrize("method", ["wanda", "rgs"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_statistics_and_masks_on_the_device_match_cpu(method, sparsity):
    """The statement of RTOL, on the same block inputs: statistics and scores agree to RTOL, and
    every mask bit that differs is a near-tie at its row's (group's) boundary."""
    on_cpu, on_device = first_block_statistics("cpu"), first_block_statistics(DEVICE)
    select = (lambda s: kernels.unstructured_mask(s, 0.5)) if sparsity == 0.5 else (lambda s: kernels.nm_mask(s, 2, 4))
    differing = 0
    for name, (w, norm, grad) in on_cpu.items():
        _, device_norm, device_grad = on_device[name]
        torch.testing.assert_close(device_norm, norm, rtol=RTOL, atol=RTOL * float(norm.abs().max()))
        torch.testing.assert_close(device_grad, grad, rtol=RTOL, atol=RTOL * float(grad.abs().max()))
        score, device_score = ((kernels.wanda_score(w, n) if method == "wanda" else kernels.rgs_score(w, g, n)) for n, g in ((norm, grad), (device_norm, device_grad)))
        torch.testing.assert_close(device_score, score, rtol=RTOL, atol=RTOL * float(score.abs().max()))
        # The device's scores, selected on the device.
        cpu_mask, device_mask = select(score), select(device_score.to(DEVICE)).cpu()
        assert near_tie_violations(score, cpu_mask, device_mask, None if sparsity == 0.5 else 4) == [], name
        differing += int((cpu_mask != device_mask).sum())
    print(f"{method} {sparsity}: {differing} mask bits of block 0 differ between {DEVICE} and cpu, all near-ties")


@needs_device
def test_blocks_run_on_the_device_while_activations_wait_on_cpu():
    model = tiny_model("llama")
    report = wandapp.prune(model, calib_ids(), sparsity="2:4", method="wanda++", device=DEVICE, offload="cpu", **FAST)
    assert report.pruned_blocks == [0, 1] and report.device.startswith(DEVICE)
    assert all(p.device.type == "cpu" for p in model.parameters())  # each block went back home
    assert_nm(model, 2, 4)


@needs_device
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss", "gemma3_text"])
def test_architectures_on_the_device(model_type):
    """Mixture-of-experts (routed statistics, unfused experts) and mixed attention on the device
    in bfloat16; the replay check passes there with the device's own summation order."""
    model = tiny_architecture(model_type).to(DEVICE, torch.bfloat16)
    ids = calib_ids()
    report = wandapp.prune(model, ids, sparsity="2:4", method="wanda++", **FAST)
    assert_nm(model, 2, 4)
    assert report.pruned_blocks == [0, 1]
    assert torch.isfinite(model(ids[:2].to(DEVICE)).logits.float()).all()


@needs_device
def test_a_checkpoint_streamed_on_the_device(tmp_path):
    """prune_checkpoint with its blocks on the device: the written checkpoint is 2:4 and loads."""
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate")
    tiny_model("llama").save_pretrained(tmp_path / "src")
    report = wandapp.prune_checkpoint(tmp_path / "src", tmp_path / "dst", calib_ids(), sparsity="2:4", method="wanda++", device=DEVICE, **FAST)
    assert report.pruned_blocks == [0, 1] and report.device.startswith(DEVICE)
    assert_nm(AutoModelForCausalLM.from_pretrained(tmp_path / "dst"), 2, 4)
