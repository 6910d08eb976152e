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
    # Exactly peft's own merge, then the masks: nothing else changed.
    for name, value in plain.state_dict().items():
        module = name.rsplit(".", 1)[0]
        expected = value * masks[module] if module in masks and name.endswith(".weight") else value
        assert torch.equal(merged.state_dict()[name], expected), name
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
    eval_ids = calib_ids(n=4, seqlen=64, seed=15)
    cost = remask_cost(pm, report.masks, eval_ids.reshape(-1), seqlen=64)
    assert isinstance(pm, peft.PeftModel)  # left as it was

    # The same numbers computed directly: perplexity over the four 64-token windows, the update
    # of each adapted matrix from its factors (scaling * B @ A), its energy on kept weights.
    def ppl(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=eval_ids).logits.double()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), eval_ids[:, 1:].reshape(-1)).exp().item()

    kept = total = 0.0
    for name, module in pm.get_base_model().named_modules():
        if hasattr(module, "lora_A"):
            delta = (module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()) * module.scaling["default"]
            total += (delta**2).sum().item()
            kept += (delta**2)[report.masks[name]].sum().item()
    assert total > 0
    assert cost.update_kept == pytest.approx(kept / total, rel=1e-4)
    assert cost.unmerged == pytest.approx(ppl(pm), rel=1e-4)
    assert cost.merged_sparse == pytest.approx(ppl(merge_sparse(copy.deepcopy(pm), report.masks)), rel=1e-4)
    assert cost.merged_sparse != pytest.approx(cost.unmerged, rel=1e-6)  # re-masking changed the model
    assert "unmerged" in str(cost)


def test_merge_sparse_needs_a_peft_model():
    with pytest.raises(wandapp.InvalidArgumentError, match="PeftModel"):
        merge_sparse(tiny_model("llama"), {})
