"""Pruning before LoRA: the base stays sparse while training and after merge_sparse."""

from __future__ import annotations

import copy

import pytest
import torch

import wandapp
from wandapp.lora import merge_sparse, remask_cost
from wandapp.testing import assert_masks_equal, assert_nm

from conftest import calib_ids, tiny_model

peft = pytest.importorskip("peft")


def lora_model(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, config)


def train(peft_model, ids, steps=5):
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        yield
    peft_model.eval()


def test_lora_keeps_the_pruned_pattern():
    model = tiny_model("llama", seed=11)
    report = wandapp.prune(model, calib_ids(), sparsity="2:4", method="wanda", nsamples=16, progress=False)
    masks = report.masks
    ids = calib_ids(n=4, seqlen=32, seed=12)
    with torch.no_grad():
        before = model(ids).logits.clone()

    pm = lora_model(model)
    for _ in train(pm, ids):
        assert_masks_equal(pm.get_base_model(), masks)  # frozen base: exactly sparse throughout
    with torch.no_grad():
        tuned = pm(ids).logits
    assert (tuned - before).abs().max() > 1e-3, "the adapter did not change the output"

    plain = copy.deepcopy(pm).merge_and_unload()
    with pytest.raises(AssertionError):  # the bug users report: a plain merge is dense
        assert_nm(plain, 2, 4)

    merged = merge_sparse(pm, masks)
    assert_nm(merged, 2, 4)
    assert_masks_equal(merged, masks)
    for name, mask in masks.items():
        w = merged.get_submodule(name).weight
        assert torch.equal((w != 0).sum(dim=1), mask.sum(dim=1)), name  # same per-row counts
    with torch.no_grad():
        assert (merged(ids).logits - before).abs().max() > 1e-4  # the merged model keeps some of the update


def test_remask_cost_reports_both_perplexities():
    model = tiny_model("llama", seed=13)
    report = wandapp.prune(model, calib_ids(), sparsity=0.5, method="wanda", nsamples=16, progress=False)
    pm = lora_model(model)
    ids = calib_ids(n=4, seqlen=32, seed=14)
    for _ in train(pm, ids):
        pass
    cost = remask_cost(pm, report.masks, calib_ids(n=4, seqlen=64, seed=15).reshape(-1), seqlen=64)
    assert cost.unmerged > 1 and cost.merged_sparse > 1
    assert 0.3 < cost.update_kept < 0.7  # half the positions are kept at 50%
    assert "unmerged" in str(cost)
    assert isinstance(pm, peft.PeftModel)  # left as it was


def test_merge_sparse_needs_a_peft_model():
    with pytest.raises(wandapp.InvalidArgumentError, match="PeftModel"):
        merge_sparse(tiny_model("llama"), {})
