"""wandapp.prune against inputs that broke other pruners: models whose weights are not in memory,
models that overflow, the caller's grad mode, small loaders, and the per-row count rule."""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch

import wandapp
from wandapp.testing import assert_sparsity

from conftest import calib_ids, tiny_config, tiny_model

METHODS = ["magnitude", "wanda", "rgs", "wanda++"]
FAST = dict(ro_samples=8, ro_holdout=4, ro_rounds=2, progress=False)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --- weights that are not in memory (accelerate's offloading: tests/test_offload.py) ------------


def test_a_model_built_on_the_meta_device_is_refused(ids):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama"))
    with pytest.raises(wandapp.UnsupportedModelError, match="meta device.*Load real weights"):
        wandapp.prune(model, ids, progress=False)


def test_a_model_partly_on_meta_is_refused(ids):
    model = tiny_model("llama")
    model.lm_head.to("meta")
    before = {k: v for k, v in state(model).items() if not v.is_meta}
    with pytest.raises(wandapp.UnsupportedModelError, match="lm_head.weight"):
        wandapp.prune(model, ids, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --- overflow in the dense model, found before any weight changes ------------------------


def overflowing(site: str, index: int) -> torch.nn.Module:
    """A float16 model whose block ``index`` overflows at ``site`` (every weight stays finite)."""
    model = tiny_model("llama", num_hidden_layers=3, dtype=torch.float16)
    block = model.model.layers[index]
    with torch.no_grad():
        if site == "mlp":  # silu(gate) * up exceeds 65504: down_proj inputs are +-inf
            block.mlp.gate_proj.weight.mul_(1e4)
            block.mlp.up_proj.weight.mul_(1e4)
        elif site == "attention":  # v_proj overflows: o_proj inputs are inf/NaN
            block.self_attn.v_proj.weight.mul_(2e5)
        else:  # the MLP's output overflows the residual stream: the block's output
            for linear in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                linear.weight.mul_(300)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


@pytest.mark.parametrize(
    "site,index,where",
    [
        ("mlp", 1, r"the input of model\.layers\.1\.mlp\.down_proj \(block 1\)"),
        ("attention", 1, r"the input of model\.layers\.1\.self_attn\.o_proj \(block 1\)"),
        ("residual", 1, r"the input of block 2 "),
        ("residual", 2, r"the output of block 2 "),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_a_dense_model_that_overflows_is_refused_naming_the_block_and_layer(site, index, where, method, ids):
    model = overflowing(site, index)
    before = state(model)
    with pytest.raises(wandapp.NonFiniteError, match=f"sequence 0: {where}.*bfloat16 or float32"):
        wandapp.prune(model, ids, method=method, **FAST)
    assert_unchanged(model, before)


def test_non_finite_embeddings_name_the_sequence(ids):
    model = tiny_model("llama")
    ids = ids.clamp(max=126)
    ids[3, 5] = 127  # the only place token 127 occurs
    with torch.no_grad():
        model.model.embed_tokens.weight[127] = float("inf")
    before = state(model)
    with pytest.raises(wandapp.NonFiniteError, match="sequence 3: the input of block 0 "):
        wandapp.prune(model, ids, **FAST)
    assert_unchanged(model, before)


def test_padding_is_zeroed_at_every_block_input():
    """Padded positions of a block's input reach real tokens only through products with weight 0
    (attention), where an inf would still make NaN; captured inputs and block outputs hold
    zeros there, so padding can never poison a statistic or gradient."""
    from wandapp.adapters import resolve
    from wandapp.block import BlockRunner
    from wandapp.capture import capture_first_block
    from wandapp.data import collect_sequences

    ids = calib_ids(n=2, seqlen=16)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    adapter = resolve(tiny_model("llama"))
    samples = capture_first_block(adapter, collect_sequences([{"input_ids": ids, "attention_mask": mask}]), torch.device("cpu"))
    assert all(torch.all(s.hidden[0, 12:] == 0) and torch.all(s.hidden[0, :12] != 0) for s in samples)
    outputs = BlockRunner(adapter, 0, samples, torch.device("cpu")).outputs()  # the next block's inputs
    assert all(torch.all(out[0, 12:] == 0) and torch.all(out[0, :12] != 0) for out in outputs)


@pytest.mark.parametrize("method", METHODS)
def test_an_overflow_that_appears_only_after_pruning_restores_that_block(method, ids):
    """Block 1's down_proj inputs turn infinite once block 0 is pruned (simulated by a hook):
    block 1 is restored and the error says why; it is never reported pruned with NaN error."""
    model = tiny_model("llama", num_hidden_layers=3)
    pruned_marker = model.model.layers[0].mlp.down_proj.weight

    def blow_up(_module, args):
        if (pruned_marker == 0).any():
            return (args[0] * float("inf"),)

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(blow_up)
    original = state(model)
    with pytest.raises(wandapp.PruneError) as info:
        wandapp.prune(model, ids, sparsity="2:4", method=method, **FAST)
    assert isinstance(info.value.__cause__, wandapp.NonFiniteError)
    assert [b.status for b in info.value.report.blocks] == ["pruned", "restored", "untouched"]
    for name, value in model.state_dict().items():
        if not name.startswith("model.layers.0."):
            assert torch.equal(value, original[name]), name


# --- the caller's grad mode ----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_any_grad_mode_of_the_caller_gives_the_same_result(method, ids):
    plain = tiny_model("llama")
    expected = wandapp.prune(plain, ids, sparsity="2:4", method=method, **FAST).masks
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        model = tiny_model("llama")
        with mode():
            grad_before, inference_before = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
            got = wandapp.prune(model, ids, sparsity="2:4", method=method, **FAST).masks
            assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == (grad_before, inference_before)
        for name in expected:
            assert torch.equal(got[name], expected[name]), (mode.__name__, name)
        for name, value in model.state_dict().items():
            assert torch.equal(value, plain.state_dict()[name]), (mode.__name__, name)


def test_calibration_ids_made_in_inference_mode_are_fine():
    """Inference tensors cannot be saved for backward: RO must not hand them to autograd as they are."""
    with torch.inference_mode():
        ids = calib_ids()
    assert ids.is_inference()
    expected = wandapp.prune(tiny_model("llama"), calib_ids(), method="wanda++", **FAST)
    report = wandapp.prune(tiny_model("llama"), ids, method="wanda++", **FAST)
    assert report.pruned_blocks == [0, 1]
    assert report.masks.keys() == expected.masks.keys()
    assert all(torch.equal(report.masks[k], expected.masks[k]) for k in expected.masks)


def test_buffers_outside_the_blocks_made_in_inference_mode_are_fine(ids):
    """Dynamic RoPE recomputes its inv_freq buffer in the forward: run inside inference_mode, it
    becomes an inference tensor, which pruning never writes."""
    model = tiny_model("llama", max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with torch.inference_mode():
        model(calib_ids(n=1, seqlen=40))
    assert model.model.rotary_emb.inv_freq.is_inference()
    report = wandapp.prune(model, calib_ids(n=8, seqlen=8), method="wanda++", **FAST)
    assert report.pruned_blocks == [0, 1]


def test_a_model_made_in_inference_mode_is_refused_before_any_work(ids):
    with torch.inference_mode():
        model = tiny_model("llama")
    with pytest.raises(wandapp.InvalidArgumentError, match="inference tensors.*outside inference_mode"):
        wandapp.prune(model, ids, method="wanda", progress=False)


# --- defaults that work on small loaders ---------------------------------------------------


@pytest.mark.parametrize("n", [8, 32])
def test_the_obvious_call_works_on_a_small_loader(n):
    ids = calib_ids(n=n, seqlen=12)
    report = wandapp.prune(tiny_model("llama"), ids, progress=False, ro_rounds=1)
    assert report.nsamples == n and report.config["nsamples"] == n
    assert report.config["ro_samples"] == min(32, n)
    assert report.pruned_blocks == [0, 1]


def test_more_than_128_sequences_uses_128(ids):
    report = wandapp.prune(tiny_model("llama"), calib_ids(n=140, seqlen=4), method="wanda", progress=False)
    assert report.nsamples == 128


def test_asking_for_more_than_the_loader_has_says_what_to_change(ids):
    with pytest.raises(wandapp.CalibrationError, match="yielded 16 sequences but nsamples=20"):
        wandapp.prune(tiny_model("llama"), ids, nsamples=20, progress=False)
    with pytest.raises(wandapp.CalibrationError, match="ro_samples=20 needs.*16"):
        wandapp.prune(tiny_model("llama"), ids, ro_samples=20, progress=False)


# --- the per-row count: floor(in x sparsity) of the decimal the user wrote -----------------


def test_pruned_per_row_is_exact_over_widths_and_ratios():
    widths = [1, 3, 7, 64, 100, 576, 1000, 1536, 2048, 3072, 4096, 5120, 8192, 11008, 13824, 14336, 28672]
    ratios = [p / 100 for p in range(100)] + [p / 1000 for p in range(0, 1000, 7)] + [0.333, 0.6667, 0.12345]
    mismatches_of_plain_float = 0
    for ratio in ratios:
        for width in widths:
            exact = int(width * Fraction(repr(ratio)))
            assert wandapp.kernels.pruned_per_row(width, ratio) == exact, (width, ratio)
            mismatches_of_plain_float += int(width * ratio) != exact
    assert mismatches_of_plain_float > 0  # the float rule really is wrong on these inputs
    assert wandapp.kernels.pruned_per_row(100, 0.58) == 58
    for n, m in ((2, 4), (4, 8), (1, 4)):
        for width in (8, 64, 4096, 11008):
            assert wandapp.kernels.pruned_per_row(width, nm=(n, m)) == width // m * (m - n), (width, n, m)
    with pytest.raises(wandapp.SparsityError):
        wandapp.kernels.pruned_per_row(100, 1.0)


@pytest.mark.parametrize("sparsity", [0.58, 0.29, 0.57, "0.58"])
def test_a_layer_of_100_inputs_loses_what_the_user_asked_for(sparsity):
    """hidden 100, intermediate 300: 100 x 0.58 is 57.999... in floating point."""
    model = tiny_model("llama", hidden_size=100, intermediate_size=300, num_attention_heads=2, num_key_value_heads=1)
    ids = calib_ids(n=4, seqlen=8)
    report = wandapp.prune(model, ids, sparsity=sparsity, method="wanda", progress=False)
    ratio = float(sparsity)
    for name, mask in report.masks.items():
        expected = int(mask.shape[1] * Fraction(str(sparsity)))
        assert torch.all((~mask).sum(dim=1) == expected), name
        assert report.blocks[int(name.split(".")[2])].layers[name].pruned_per_row == expected
    assert_sparsity(model, ratio)
    with torch.no_grad():  # one weight short of the rule in one row: assert_sparsity notices
        model.model.layers[0].self_attn.q_proj.weight[0, (model.model.layers[0].self_attn.q_proj.weight[0] == 0).nonzero()[0]] = 1.0
    with pytest.raises(AssertionError, match=r"q_proj row 0 has 57 zeros, expected at least 58" if ratio == 0.58 else "row 0"):
        assert_sparsity(model, ratio)


# --- dense_check=False -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2-sliding"])
def test_without_the_dense_check_the_results_are_identical(family):
    """Sequences other than the replayed one stop at the last attention type's first block
    (block 1 of qwen2-sliding); every block still gets the same inputs and arguments, padded
    sequences included."""
    ids = calib_ids(10, 24)
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0
    loader = [{"input_ids": ids, "attention_mask": mask}]
    runs = [
        wandapp.prune(tiny_model(family, num_hidden_layers=3), loader, method=method, dense_check=check, **FAST)
        for method in ("wanda", "wanda++")
        for check in (True, False)
    ]
    for full, quick in (runs[:2], runs[2:]):
        assert full.masks.keys() == quick.masks.keys()
        assert all(torch.equal(full.masks[k], quick.masks[k]) for k in full.masks)
        assert [b.mse_final for b in full.blocks] == [b.mse_final for b in quick.blocks]


def test_without_the_dense_check_first_block_inputs_are_still_checked(ids):
    model = tiny_model("llama")
    ids = ids.clamp(max=126)
    ids[3, 5] = 127
    with torch.no_grad():
        model.model.embed_tokens.weight[127] = float("inf")
    before = state(model)
    with pytest.raises(wandapp.NonFiniteError, match="sequence 3: the input of block 0 "):
        wandapp.prune(model, ids, dense_check=False, **FAST)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["wanda", "wanda++"])
def test_without_the_dense_check_a_later_overflow_on_another_sequence_restores_its_block(method):
    """Only the replayed (longest) sequence runs through every block up front; an overflow of
    another sequence in block 1 is found when block 1 is pruned: block 0 stays pruned, block 1 is
    restored bit for bit, block 2 untouched. With the dense check the same model is refused
    before any change."""
    lengths = [32] + [24] * 7 + [20] + [24] * 7  # sequence 8 alone has 20 tokens
    sequences = [{"input_ids": calib_ids(1, n, seed=i)} for i, n in enumerate(lengths)]

    def model_overflowing_on_sequence_8():
        model = tiny_model("llama", num_hidden_layers=3)

        def blow_up(_module, args):
            if args[0].shape[-2] == 20:
                return (args[0] * float("inf"),)

        model.model.layers[1].mlp.down_proj.register_forward_pre_hook(blow_up)
        return model

    model = model_overflowing_on_sequence_8()
    before = state(model)
    with pytest.raises(wandapp.NonFiniteError, match="sequence 8: the input of model.layers.1.mlp.down_proj"):
        wandapp.prune(model, sequences, method=method, **FAST)
    assert_unchanged(model, before)

    model = model_overflowing_on_sequence_8()
    before = state(model)
    with pytest.raises(wandapp.PruneError) as info:
        wandapp.prune(model, sequences, method=method, dense_check=False, **FAST)
    assert isinstance(info.value.__cause__, wandapp.NonFiniteError), info.value
    assert str(info.value).startswith("pruning stopped in block 1 (NonFiniteError: `activation norms`")
    assert str(info.value).endswith("Block 0 is pruned; block 1 was restored and every later block is untouched. See err.report.")
    assert [b.status for b in info.value.report.blocks] == ["pruned", "restored", "untouched"]
    after = model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("model.layers.0."))
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("model.layers.0."))
