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
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set WANDAPP_TEST_DEVICE to choose one)")
METHODS = ["magnitude", "wanda", "rgs", "wanda++", "sparsegpt", "sparsegpt+ro"]
FAST = dict(ro_samples=8, ro_holdout=4, ro_rounds=2, progress=False)
#: Mask bits that may differ between a model pruned on the device and on CPU: the device sums in
#: another order, and near-ties in the scores can then swap (measured by bench/gpu.py).
MASK_BITS_TOLERANCE = 0.01


def tied_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 50, (rows, cols), generator=g).float() / 7
    values[torch.rand(rows, cols, generator=g) < 0.1] = -0.0
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_same_scores_give_the_same_masks_on_the_device(dtype):
    for seed in range(3):
        scores = tied_scores(64, 256, seed).to(dtype)
        for sparsity in (0.3, 0.5, 0.58):
            assert torch.equal(kernels.unstructured_mask(scores.to(DEVICE), sparsity).cpu(), kernels.unstructured_mask(scores, sparsity))
        for n, m in ((2, 4), (4, 8), (1, 4)):
            assert torch.equal(kernels.nm_mask(scores.to(DEVICE), n, m).cpu(), kernels.nm_mask(scores, n, m))


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


@pytest.mark.parametrize("method", ["wanda", "rgs", "sparsegpt"])
def test_masks_pruned_on_the_device_match_cpu(method):
    ids = calib_ids()
    on_cpu = wandapp.prune(tiny_model("llama"), ids, sparsity=0.5, method=method, progress=False).masks
    on_device = wandapp.prune(tiny_model("llama").to(DEVICE), ids, sparsity=0.5, method=method, progress=False).masks
    differing = sum(int((on_cpu[n] != on_device[n]).sum()) for n in on_cpu)
    total = sum(m.numel() for m in on_cpu.values())
    print(f"{method}: {differing} of {total} mask bits differ between {DEVICE} and cpu ({differing / total:.4%})")
    assert differing <= MASK_BITS_TOLERANCE * total


def test_blocks_run_on_the_device_while_activations_wait_on_cpu():
    model = tiny_model("llama")
    report = wandapp.prune(model, calib_ids(), sparsity="2:4", method="wanda++", device=DEVICE, offload="cpu", **FAST)
    assert report.pruned_blocks == [0, 1] and report.device.startswith(DEVICE)
    assert all(p.device.type == "cpu" for p in model.parameters())  # each block went back home
    assert_nm(model, 2, 4)


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


def test_a_checkpoint_streamed_on_the_device(tmp_path):
    """prune_checkpoint with its blocks on the device: the written checkpoint is 2:4 and loads."""
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate")
    tiny_model("llama").save_pretrained(tmp_path / "src")
    report = wandapp.prune_checkpoint(tmp_path / "src", tmp_path / "dst", calib_ids(), sparsity="2:4", method="wanda++", device=DEVICE, **FAST)
    assert report.pruned_blocks == [0, 1] and report.device.startswith(DEVICE)
    assert_nm(AutoModelForCausalLM.from_pretrained(tmp_path / "dst"), 2, 4)
