"""Models dispatched by accelerate (python/wandapp/offload.py): blocks offloaded to CPU or disk are
pruned on the device and written back, with the same masks and weights as the model pruned in
memory; the model's forward, its offloaded copies and save_pretrained see the result."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import calib_ids, tiny_model

import wandapp

accelerate = pytest.importorskip("accelerate")
from accelerate.utils.modeling import get_state_dict_offloaded_model  # noqa: E402

FAST = dict(ro_samples=6, ro_holdout=2, ro_rounds=2, progress=False)
IDS = calib_ids(8, 16)


def dispatched(model: torch.nn.Module, offload_dir: str) -> torch.nn.Module:
    """Block 0 offloaded to CPU, blocks 1 and 2 to disk, the rest in memory. ``main_device`` is
    given as a torch.device so that "cpu" entries are offloaded as on a GPU machine."""
    device_map = {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
        "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
    }
    model = accelerate.dispatch_model(model, device_map, main_device=torch.device("cpu"), offload_dir=offload_dir)
    assert all(p.is_meta for layer in model.model.layers for p in layer.parameters())
    return model


def offloaded_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_state_dict_offloaded_model(model).items()}


@pytest.mark.parametrize("method, sparsity", [("wanda", 0.5), ("wanda++", "2:4"), ("sparsegpt", 0.5)])
def test_offloaded_blocks_are_pruned_like_blocks_in_memory(method, sparsity, tmp_path):
    reference = tiny_model(num_hidden_layers=3)
    expected = wandapp.prune(reference, IDS, sparsity=sparsity, method=method, **FAST)

    model = dispatched(tiny_model(num_hidden_layers=3), str(tmp_path))
    report = wandapp.prune(model, IDS, sparsity=sparsity, method=method, **FAST)

    assert report.masks.keys() == expected.masks.keys()
    assert all(torch.equal(report.masks[k], expected.masks[k]) for k in expected.masks)
    state = offloaded_state(model)
    for name, value in reference.state_dict().items():
        assert torch.equal(state[name], value), name
    assert all(p.is_meta for layer in model.model.layers for p in layer.parameters())  # back where they live
    with torch.no_grad():
        assert torch.equal(model(IDS[:2]).logits, reference(IDS[:2]).logits)


def test_cpu_offload_of_the_whole_model(tmp_path):
    reference = tiny_model()
    wandapp.prune(reference, IDS, method="wanda", progress=False)
    model = tiny_model()
    accelerate.cpu_offload(model, execution_device="cpu")
    wandapp.prune(model, IDS, method="wanda", progress=False)
    with torch.no_grad():
        assert torch.equal(model(IDS[:2]).logits, reference(IDS[:2]).logits)


def test_from_pretrained_with_disk_offload_leaves_the_checkpoint_alone(tmp_path):
    """transformers points disk-offloaded weights at the checkpoint's own safetensors file: the
    pruned weights go to new files in the offload folder, and save_pretrained writes them."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "source"
    tiny_model(num_hidden_layers=3).save_pretrained(source)
    checkpoint = next(source.glob("*.safetensors"))
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    reference = AutoModelForCausalLM.from_pretrained(source)
    expected = wandapp.prune(reference, IDS, method="wanda", progress=False)
    report = wandapp.prune(model, IDS, method="wanda", progress=False)
    assert all(torch.equal(report.masks[k], expected.masks[k]) for k in expected.masks)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for name, value in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_a_failure_leaves_the_offloaded_block_as_it_was(tmp_path):
    model = dispatched(tiny_model(num_hidden_layers=3), str(tmp_path))
    original = offloaded_state(model)
    target = model.model.layers[1].mlp.down_proj
    calls = {"n": 0}
    real_forward = target.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("boom")
        return real_forward(x)

    target.forward = flaky
    with pytest.raises(wandapp.PruneError) as info:
        wandapp.prune(model, IDS, sparsity="2:4", method="wanda++", **FAST)
    assert [b.status for b in info.value.report.blocks] == ["pruned", "restored", "untouched"]
    state = offloaded_state(model)
    for name, value in original.items():
        if name.startswith("model.layers.0.") and name.endswith("proj.weight"):
            assert not torch.equal(state[name], value), name
        else:
            assert torch.equal(state[name], value), name
    assert all(p.is_meta for layer in model.model.layers for p in layer.parameters())


def test_the_offload_folder_holds_the_pruned_weights_for_another_reader(tmp_path):
    """accelerate's own .dat files are rewritten: reading the folder afresh (as a second model
    dispatched from it does) gives the pruned weights of the disk-offloaded blocks."""
    reference = tiny_model(num_hidden_layers=3)
    wandapp.prune(reference, IDS, method="wanda", progress=False)
    model = dispatched(tiny_model(num_hidden_layers=3), str(tmp_path))
    wandapp.prune(model, IDS, method="wanda", progress=False)
    on_disk = accelerate.utils.OffloadedWeightsLoader(save_folder=str(tmp_path))
    names = [k for k in on_disk.keys() if k.startswith("model.layers.")]
    assert {k.split(".")[2] for k in names} == {"1", "2"}  # the disk-offloaded blocks
    expected = reference.state_dict()
    for name in names:
        assert torch.equal(on_disk[name], expected[name]), name


def test_at_most_one_blocks_weights_are_loaded_at_a_time(tmp_path):
    """Each block is brought from where accelerate keeps it for its turn only: whenever a linear
    layer of a block computes, no other block has a weight off the meta device."""
    model = dispatched(tiny_model(num_hidden_layers=3), str(tmp_path))
    layers = model.model.layers
    loaded_at_each_call = []

    def count(_module, _args):
        loaded_at_each_call.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))

    for layer in layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(count)
    wandapp.prune(model, IDS, sparsity="2:4", method="wanda++", **FAST)
    assert loaded_at_each_call and max(loaded_at_each_call) == 1


def test_a_model_spread_over_several_accelerators_is_refused_before_any_change(tmp_path):
    """Blocks whose accelerate hooks compute on two different GPUs (a device_map over cuda:0 and
    cuda:1): refused, naming both, before any weight is read or written."""
    model = dispatched(tiny_model(num_hidden_layers=3), str(tmp_path))
    original = offloaded_state(model)
    for index, layer in enumerate(model.model.layers):
        layer._hf_hook.execution_device = torch.device(f"cuda:{index % 2}")
    with pytest.raises(wandapp.DeviceMismatchError, match=r"several accelerators \['cuda:0', 'cuda:1'\].*one GPU"):
        wandapp.prune(model, IDS, method="wanda", progress=False)
    state = offloaded_state(model)
    assert all(torch.equal(state[name], value) for name, value in original.items())
