"""The model comes back as the user left it (issue 22, kind 2): each module's own training flag,
each parameter's requires_grad and gradient, hooks, config flags and gradient checkpointing, after
a successful run, a failed one and Ctrl-C, in memory and offloaded by accelerate."""

from __future__ import annotations

import pytest
import torch

import wandapp
from wandapp import _core

from conftest import calib_ids, tiny_model

SETTINGS = dict(sparsity=0.5, nsamples=4, ro_samples=2, ro_holdout=1, ro_rounds=1, progress=False)


def prepared_for_lora():
    """A train-mode model partly in eval (a frozen attention, the final norm, the LM head), some
    parameters frozen, gradients left from a step, a user's hooks, gradient checkpointing on and
    config flags set: the state a pipeline has just before adding LoRA."""
    model = tiny_model("llama", seed=31, num_hidden_layers=3)
    model.gradient_checkpointing_enable()
    model.train()
    model.model.layers[1].self_attn.eval()
    model.model.norm.eval()
    model.lm_head.eval()
    for p in model.model.layers[2].parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    ids = calib_ids(n=2, seqlen=8, seed=32)
    model(input_ids=ids, labels=ids).loss.backward()  # gradients on the trainable parameters
    calls = []
    model.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    model.model.layers[1].register_forward_pre_hook(lambda *_: None)
    model.config.use_cache = False
    return model, calls


def state(model):
    """Everything a user can observe besides the weights' values."""
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (None if p.grad is None else (id(p.grad), p.grad.clone())) for n, p in model.named_parameters()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks)) for n, m in model.named_modules()},
        "checkpointing": {n: getattr(m, "gradient_checkpointing", None) for n, m in model.named_modules()},
        "config": (model.config.use_cache, model.config._attn_implementation, getattr(model.config, "_experts_implementation", None)),
    }


def assert_same_state(before, after):
    for key in before:
        if key == "grad":
            for name, g in before[key].items():
                a = after[key][name]
                assert (g is None) == (a is None), f"grad of {name}"
                if g is not None:
                    assert g[0] == a[0] and torch.equal(g[1], a[1]), f"grad of {name} changed"
        else:
            assert before[key] == after[key], key


@pytest.mark.parametrize("method", ["wanda", "wanda++", "sparsegpt+ro"])
def test_every_module_and_parameter_comes_back_as_it_was(method):
    model, calls = prepared_for_lora()
    before = state(model)
    wandapp.prune(model, calib_ids(n=4, seqlen=16, seed=33), method=method, **SETTINGS)
    assert_same_state(before, state(model))
    assert model.model.layers[1].self_attn.training is False and model.model.layers[1].mlp.training is True
    n = len(calls)
    model(calib_ids(n=1, seqlen=8))
    assert len(calls) == n + 1  # the user's hook still runs


class Failure(Exception):
    pass


@pytest.mark.parametrize("raised", [Failure, KeyboardInterrupt])
def test_state_comes_back_on_an_error_and_on_ctrl_c(raised, monkeypatch):
    real = _core.prune_block_
    seen = []

    def fails_in_block_1(runner, weights, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise raised("stop")
        return real(runner, weights, **kwargs)

    monkeypatch.setattr(_core, "prune_block_", fails_in_block_1)
    model, _ = prepared_for_lora()
    before = state(model)
    with pytest.raises(wandapp.PruneError) as err:
        wandapp.prune(model, calib_ids(n=4, seqlen=16, seed=34), method="wanda++", **SETTINGS)
    assert err.value.block == 1
    assert_same_state(before, state(model))


def test_an_error_during_the_capture_restores_the_state_too():
    model, _ = prepared_for_lora()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = state(model)
    with pytest.raises(wandapp.NonFiniteError):
        wandapp.prune(model, calib_ids(n=4, seqlen=16, seed=35), method="wanda", **SETTINGS)
    assert_same_state(before, state(model))


def test_an_offloaded_model_comes_back_as_it_was(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, _ = prepared_for_lora()
    for p in model.parameters():
        p.grad = None  # accelerate's offload moves parameters to meta: their gradients cannot stay
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map, main_device=torch.device("cpu"), offload_dir=str(tmp_path))
    before = state(model)
    wandapp.prune(model, calib_ids(n=4, seqlen=16, seed=36), method="wanda", **SETTINGS)
    assert_same_state(before, state(model))
