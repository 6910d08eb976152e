"""Models handed over inside the usual wrappers (issue 22, kind 3): torch.compile's
OptimizedModule and DataParallel are pruned under the model's own names, exactly as the plain
model; a peft PeftModel is refused before any change, saying what to pass; the mask, testing and
LoRA helpers accept the same wrappers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import wandapp
from wandapp.testing import assert_masks_equal, assert_nm, assert_sparsity

from conftest import calib_ids, tiny_model

IDS = calib_ids(n=4, seqlen=16, seed=41)
RUN = dict(sparsity="2:4", method="wanda", progress=False)

WRAPPERS = {
    "torch.compile": torch.compile,
    "DataParallel": nn.DataParallel,
    "compile(DataParallel)": lambda m: torch.compile(nn.DataParallel(m)),
}


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_a_wrapped_model_is_pruned_under_its_own_names(wrap):
    plain = tiny_model("llama", seed=42)
    model = copy.deepcopy(plain)
    expected = wandapp.prune(plain, IDS, **RUN)
    report = wandapp.prune(WRAPPERS[wrap](model), IDS, **RUN)
    assert report.masks.keys() == expected.masks.keys()
    assert all(torch.equal(report.masks[k], expected.masks[k]) for k in expected.masks)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    fresh = tiny_model("llama", seed=42)
    wandapp.apply_masks(fresh, report.masks)  # the saved masks apply to the plain model
    assert_masks_equal(fresh, report.masks)


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_targets_written_for_the_models_own_names_match(wrap):
    model = WRAPPERS[wrap](tiny_model("llama", seed=43))
    report = wandapp.prune(model, IDS, targets=["model.layers.0.self_attn.q_proj"], **RUN)
    assert list(report.masks) == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_the_helpers_accept_the_wrappers(wrap):
    model = tiny_model("llama", seed=44)
    report = wandapp.prune(model, IDS, **RUN)
    wrapped = WRAPPERS[wrap](model)
    assert_nm(wrapped, 2, 4)
    assert_sparsity(wrapped, 0.5, exact=True)
    assert_masks_equal(wrapped, report.masks)
    dense = WRAPPERS[wrap](tiny_model("llama", seed=44))
    wandapp.apply_masks(dense, report.masks)
    assert_masks_equal(dense, report.masks)


def test_a_peft_model_is_refused_before_any_change_and_the_helpers_read_its_base():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", seed=45)
    report = wandapp.prune(model, IDS, **RUN)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(wandapp.UnsupportedModelError, match="get_peft_model.*merge_and_unload"):
        wandapp.prune(pm, IDS, **RUN)
    with pytest.raises(wandapp.UnsupportedModelError, match="PeftModel"):
        wandapp.prune(torch.compile(pm), IDS, **RUN)
    assert all(torch.equal(v, before[k]) for k, v in pm.state_dict().items())
    for wrapped in (pm, torch.compile(pm)):
        assert_nm(wrapped, 2, 4)  # the LoRA layers stand for their base layers, under the plain names
        assert_masks_equal(wrapped, report.masks)
    merged = wandapp.lora.merge_sparse(torch.compile(pm), report.masks)
    assert_masks_equal(merged, report.masks)


def test_distributed_data_parallel_is_pruned_under_the_models_own_names(tmp_path):
    """DistributedDataParallel needs a process group: one gloo rank (wandapp then runs alone)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = tiny_model("llama", seed=46)
        expected = wandapp.prune(copy.deepcopy(plain), IDS, **RUN)
        report = wandapp.prune(nn.parallel.DistributedDataParallel(plain), IDS, **RUN)
    finally:
        dist.destroy_process_group()
    assert report.masks.keys() == expected.masks.keys()
    assert all(torch.equal(report.masks[k], expected.masks[k]) for k in expected.masks)
