"""Every decoder-only architecture the installed transformers provides that users prune, dense and
mixture-of-experts, on tiny random configs (no download): structure-based discovery, masks equal
to the slow reference, patterns for every method, the replay check, targets/ignore, routed
statistics for experts."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import wandapp
from wandapp.adapters import DecoderAdapter, resolve
from wandapp.errors import InvalidArgumentError, UnsupportedModelError
from wandapp.testing import assert_masks_equal, assert_nm, assert_sparsity

import reference
from conftest import ARCHITECTURES, MOE_TYPES, available, tiny_architecture as tiny

def ids(n: int = 8, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", [t for t in ARCHITECTURES if t != "gpt_oss"])
def test_wanda_masks_equal_the_slow_reference(model_type):
    model = tiny(model_type, seed=3)
    ref_model = copy.deepcopy(model)
    data = ids(n=6, seqlen=20, seed=4)
    report = wandapp.prune(model, data, sparsity="2:4", method="wanda", nsamples=6, progress=False)
    expected = reference.wanda_model(ref_model, [data[i : i + 1] for i in range(6)], "2:4")
    assert set(report.masks) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(report.masks[name], mask), name
    assert torch.equal(torch.cat([p.flatten() for p in model.parameters()]), torch.cat([p.flatten() for p in ref_model.parameters()]))


def never_pruned(model) -> dict[str, torch.Tensor]:
    """Copies of the tensors no method may change: embeddings, norms, the LM head, routers."""
    return {
        name: value.detach().clone() for name, value in model.state_dict().items()
        if "embed" in name or "norm" in name or name.startswith("lm_head.") or any(f"{r}." in name for r in reference.ROUTERS)
    }


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "rgs", "wanda++", "sparsegpt+ro"])
def test_every_method_keeps_the_pattern_and_finite_logits(model_type, method):
    model = tiny(model_type)
    kept = never_pruned(model)
    assert any("norm" in n for n in kept) and any(n.startswith("lm_head.") or "embed" in n for n in kept)
    if model_type in MOE_TYPES:
        assert any(f"{r}." in n for n in kept for r in reference.ROUTERS), "no router found to check"
    data = ids()
    sparsity = 0.5 if method == "rgs" else "2:4"
    # sparsegpt+ro's training steps run under bfloat16 autocast: every architecture's forward takes it.
    autocast = "bfloat16" if method == "sparsegpt+ro" else "off"
    report = wandapp.prune(
        model, data, sparsity=sparsity, method=method, nsamples=8, ro_samples=4, ro_holdout=2, ro_rounds=2, ro_autocast=autocast, progress=False
    )
    assert {b.ro_autocast for b in report.blocks} == ({"bfloat16"} if method == "sparsegpt+ro" else {None})
    if sparsity == 0.5:
        assert_sparsity(model, 0.5)
    else:
        assert_nm(model, 2, 4)
    assert_masks_equal(model, report.masks)
    assert report.pruned_blocks == [0, 1]
    assert torch.isfinite(model(data[:2]).logits).all()
    names = set(report.masks)
    assert not any(n.endswith(("embed_tokens", "lm_head")) or "norm" in n for n in names)
    assert not any(n.endswith(reference.ROUTERS) for n in names), "a router was pruned"
    if model_type in MOE_TYPES:
        assert any("experts." in n for n in names)
    after = model.state_dict()
    for name, value in kept.items():  # bit for bit, also after RO's training steps
        assert torch.equal(after[name], value), f"{method} changed {name}"


@pytest.mark.parametrize("model_type", sorted(MOE_TYPES))
def test_discovery_lists_each_expert_and_no_router(model_type):
    model = tiny(model_type)
    names = [t.name for t in resolve(model).targets(0)]
    experts = [n for n in names if "experts." in n]
    assert len(experts) == 2 * 4 and experts[0].endswith("experts.gate_up_proj[0]") and experts[-1].endswith("experts.down_proj[3]")
    assert not any(n.endswith(reference.ROUTERS) for n in names)
    assert all(t.weight().dim() == 2 for t in resolve(model).targets(0))


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_expert_masks_round_trip_through_a_mask_file(model_type, tmp_path):
    """Wanda only masks, so the saved masks re-applied to the dense model give the pruned one."""
    model = tiny(model_type)
    dense = copy.deepcopy(model)
    report = wandapp.prune(model, ids(), sparsity="2:4", method="wanda", nsamples=8, progress=False)
    wandapp.save_masks(tmp_path / "masks.safetensors", report.masks, report)
    masks = wandapp.load_masks(tmp_path / "masks.safetensors")
    assert set(masks) == set(report.masks) and any(n.endswith("experts.down_proj[3]") for n in masks)
    wandapp.apply_masks(dense, masks)
    for (name, a), b in zip(model.named_parameters(), dense.parameters()):
        assert torch.equal(a, b), name


def test_phi3_fused_projections_are_pruned_per_row():
    model = tiny("phi3")
    names = [t.name.split(".", 3)[-1] for t in resolve(model).targets(0)]
    assert names == ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]


def test_expert_without_tokens_falls_back_to_magnitude():
    """Every token is routed to experts 0 and 1: experts 2 and 3 are pruned by magnitude and the
    report says so; the others have routed statistics."""
    model = tiny("mixtral", seed=5)

    def only_first_two(_module, _args, output):
        logits, weights, indices = output
        return logits, torch.full_like(weights, 0.5), torch.tensor([0, 1]).expand_as(indices)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(only_first_two)
    before = {t.name: t.weight().detach().clone() for t in resolve(model).all_targets()}
    report = wandapp.prune(model, ids(), sparsity="2:4", method="wanda", nsamples=8, progress=False)
    idle = {f"model.layers.{b}.mlp.experts.{p}[{e}]" for b in range(2) for p in ("gate_up_proj", "down_proj") for e in (2, 3)}
    assert set(report.magnitude_fallbacks) == idle
    for name in idle:
        assert torch.equal(report.masks[name], reference.nm_mask(before[name].abs(), 2, 4)), name
    assert "received no calibration token" in str(report)


def test_padding_does_not_change_expert_statistics():
    model = tiny("qwen2_moe", seed=8)
    plain = ids(n=6, seqlen=16, seed=9)
    junk = ids(n=6, seqlen=8, seed=10)
    padded = {
        "input_ids": torch.cat([plain, junk], dim=1),
        "attention_mask": torch.cat([torch.ones(6, 16, dtype=torch.long), torch.zeros(6, 8, dtype=torch.long)], dim=1),
    }
    a = wandapp.prune(copy.deepcopy(model), plain, sparsity="2:4", method="rgs", nsamples=6, progress=False)
    b = wandapp.prune(copy.deepcopy(model), [padded], sparsity="2:4", method="rgs", nsamples=6, progress=False)
    differ = [n for n in a.masks if not torch.equal(a.masks[n], b.masks[n])]
    assert not differ, differ


def test_targets_and_ignore_narrow_the_set():
    model = tiny("qwen2_moe")
    untouched = copy.deepcopy(model)
    report = wandapp.prune(model, ids(), sparsity=0.5, method="wanda", targets=["q_proj", "mlp.experts.down_proj"], ignore=r".*layers\.1\..*", nsamples=8, progress=False)
    assert sorted(report.masks) == ["model.layers.0.mlp.experts.down_proj[%d]" % e for e in range(4)] + ["model.layers.0.self_attn.q_proj"]
    kept = model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(kept, untouched.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, untouched.model.layers[0].mlp.experts.gate_up_proj)
    only_mlp = wandapp.prune(tiny("llama"), ids(), method="wanda", targets=r".*mlp\..*", nsamples=8, progress=False)
    assert all(".mlp." in n for n in only_mlp.masks) and len(only_mlp.masks) == 2 * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["qproj"]), "targets entry 'qproj' matches no"),
        (dict(ignore=["mlp.gate"]), "ignore entry 'mlp.gate' matches no"),  # a router: never a target
        (dict(targets=["q_proj"], ignore=["q_proj"]), "leave nothing to prune"),
        (dict(targets="(unclosed"), "PruneConfig.targets must be"),
    ],
)
def test_bad_targets_are_refused_before_any_change(kwargs, message):
    model = tiny("mixtral")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(")):
        wandapp.prune(model, ids(), method="wanda", nsamples=8, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_replay_check_catches_a_broken_adapter(monkeypatch):
    """An adapter that calls blocks without their rotary embeddings computes something else."""
    model = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    call = DecoderAdapter.call
    monkeypatch.setattr(
        DecoderAdapter, "call", staticmethod(lambda layer, h, kw: call(layer, h, {**kw, "position_embeddings": tuple(t.roll(1, 1) for t in kw["position_embeddings"])}))
    )
    with pytest.raises(UnsupportedModelError, match="replay check failed: decoder block 0"):
        wandapp.prune(model, ids(), method="wanda", nsamples=8, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_replay_check_catches_wrong_attention_types(monkeypatch):
    """Blocks 1 and 2 use a sliding window of 8: replaying them with block 0's full-attention mask
    (an adapter that ignores config.layer_types) differs from block 1 on."""
    from wandapp import adapters

    resolve_all_full = adapters.resolve

    def wrong_kinds(*args, **kwargs):
        adapter = resolve_all_full(*args, **kwargs)
        adapter.kinds = ["full_attention"] * len(adapter.kinds)
        return adapter

    monkeypatch.setattr(sys.modules["wandapp.prune"], "resolve", wrong_kinds)
    model = tiny("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1, num_hidden_layers=3)
    with pytest.raises(UnsupportedModelError, match="decoder block 1"):
        wandapp.prune(model, ids(seqlen=24), method="wanda", nsamples=8, progress=False)


def test_replay_is_exact_on_cpu():
    from wandapp.capture import _Replay, capture_first_block
    from wandapp.data import collect_sequences

    seen = []
    original = _Replay.first_mismatch

    def spy(self, tolerance):
        seen.extend(torch.stack(self.errors).tolist())
        return original(self, tolerance)

    _Replay.first_mismatch = spy
    try:
        for model_type in ("gemma3_text", "mixtral"):
            capture_first_block(resolve(tiny(model_type)), collect_sequences(ids(n=2)), torch.device("cpu"))
    finally:
        _Replay.first_mismatch = original
    assert seen and all(e == 0.0 for e in seen), seen


def test_models_without_decoder_blocks_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        resolve(T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)))
    with pytest.raises(UnsupportedModelError, match="causal LMs"):
        resolve(torch.nn.Linear(2, 2))


def test_a_block_with_nothing_selected_is_skipped_by_every_method():
    """targets/ignore may leave a block empty (README example): it runs unchanged, for the
    gradient-based methods too, and the report says "skipped"."""
    for method in ("rgs", "wanda++"):
        model = tiny("llama")
        before = copy.deepcopy(model.model.layers[0].state_dict())
        report = wandapp.prune(
            model, ids(), method=method, targets=["self_attn.q_proj", "mlp.down_proj"], ignore=r".*\.layers\.0\..*",
            nsamples=8, ro_samples=4, ro_holdout=2, progress=False,
        )
        assert [b.status for b in report.blocks] == ["skipped", "pruned"] and report.pruned_blocks == [1]
        assert all(torch.equal(v, before[k]) for k, v in model.model.layers[0].state_dict().items())
        assert sorted(report.masks) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


def test_routers_are_told_apart_from_layers_with_as_many_outputs():
    """Qwen3-Next-like sizes: k_proj and v_proj have as many outputs as there are experts."""
    if not available("qwen3_next"):
        pytest.skip("no qwen3_next in this transformers")
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING["qwen3_next"](
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=32, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    )
    names = [t.name.split(".", 3)[-1] for t in resolve(AutoModelForCausalLM.from_config(config)).targets(3) if "[" not in t.name]
    assert names == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
    ]  # not mlp.gate (a router) nor mlp.shared_expert_gate (one output)


def test_weight_matrices_of_an_unknown_layout_are_refused_unless_targets_name_what_to_prune():
    """DBRX keeps its experts as 2-D parameters of a custom module: refused, not left dense silently."""
    if not available("dbrx"):
        pytest.skip("no dbrx in this transformers")
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING["dbrx"](
        vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=256,
        attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0), ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match=r"ffn\.experts\.mlp\.w1.*targets="):
        resolve(model)
    names = [t.name.split(".", 3)[-1] for t in resolve(model, targets=r".*").targets(0)]
    assert names == ["norm_attn_norm.attn.Wqkv", "norm_attn_norm.attn.out_proj"]  # the router is never a target


def test_linear_subclasses_with_float_weights_are_pruned():
    """Falcon's FalconLinear is an nn.Linear subclass; quantized (integer) weights are refused."""
    if not available("falcon"):
        pytest.skip("no falcon in this transformers")
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["falcon"](vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    report = wandapp.prune(model, ids(), sparsity="2:4", method="wanda", nsamples=8, progress=False)
    assert len(report.masks) == 2 * 4
    assert_nm(model, 2, 4)
    model.transformer.h[0].mlp.dense_4h_to_h.weight = torch.nn.Parameter(torch.zeros(64, 256, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="quantized"):
        resolve(model)


def test_batching_that_changes_the_computation_is_refused():
    """Bloom's ALiBi bias is laid out [batch x heads, 1, seq]: it cannot be shared by a batch."""
    if not available("bloom"):
        pytest.skip("no bloom in this transformers")
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["bloom"](vocab_size=128, hidden_size=64, n_layer=2, n_head=4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match="batch_size=4 does not work for BloomForCausalLM"):
        wandapp.prune(model, ids(), method="wanda", nsamples=8, batch_size=4, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    report = wandapp.prune(model, ids(), sparsity=0.5, method="wanda", nsamples=8, batch_size=1, progress=False)
    assert report.pruned_blocks == [0, 1]


def test_the_decoder_is_never_taken_from_a_vision_tower():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    assert resolve(model).prefix == "model.language_model.layers"
    report = wandapp.prune(model, ids(), sparsity="2:4", method="wanda", nsamples=8, progress=False)
    assert all(name.startswith("model.language_model.layers.") for name in report.masks)


class _ExpertList(torch.nn.Module):
    """Old-style mixture of experts: a router and a ModuleList of expert MLPs, each run only on
    the tokens routed to it."""

    def __init__(self, hidden: int, experts: int = 4):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = choice == e
            if rows.any():
                out[rows] = expert(flat[rows])
        return out.reshape(x.shape)


def test_experts_stored_as_separate_modules_are_refused_before_any_change():
    model = tiny("llama")
    for layer in model.model.layers:
        layer.mlp = _ExpertList(64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="see only some tokens"):
        wandapp.prune(model, ids(), method="wanda", nsamples=8, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    report = wandapp.prune(model, ids(), method="wanda", ignore=r".*experts.*", nsamples=8, progress=False)
    assert not any("experts" in name or name.endswith("mlp.gate") for name in report.masks)
