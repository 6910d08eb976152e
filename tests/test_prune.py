"""wandapp.prune on tiny random LLaMA, Mistral and Qwen2 models (no download)."""

from __future__ import annotations

import copy

import pytest
import torch

import wandapp
from wandapp.testing import assert_masks_equal, assert_nm, assert_sparsity

import reference
from conftest import DEVICES, calib_ids, tiny_model

FAST = dict(nsamples=16, ro_samples=8, ro_holdout=4, ro_rounds=2, progress=False)
METHODS = ["magnitude", "wanda", "rgs", "wanda++"]


def block_linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}


def check_pattern(model, sparsity):
    if isinstance(sparsity, str):
        assert_nm(model, *(int(v) for v in sparsity.split(":")))
    else:
        assert_sparsity(model, sparsity)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.7, "2:4", "4:8"])
def test_every_method_and_pattern_gives_exact_counts_and_finite_logits(method, sparsity, ids):
    model = tiny_model("llama")
    report = wandapp.prune(model, ids, sparsity=sparsity, method=method, **FAST)
    check_pattern(model, sparsity)
    masks = report.masks
    assert len(masks) == 2 * 7
    for name, mask in masks.items():
        rows, cols = mask.shape
        if isinstance(sparsity, str):
            n, m = (int(v) for v in sparsity.split(":"))
            assert torch.all(mask.view(rows, -1, m).sum(dim=2) == n), name
        else:
            assert torch.all((~mask).sum(dim=1) == reference.pruned_per_row(cols, sparsity)), name
    assert_masks_equal(model, masks)
    assert torch.isfinite(model(ids[:2]).logits).all()
    assert report.pruned_blocks == [0, 1]


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen2-sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_families_and_dtypes(family, dtype, ids):
    model = tiny_model(family, dtype=dtype)
    report = wandapp.prune(model, ids, sparsity="2:4", method="wanda++", **FAST)
    assert_nm(model, 2, 4)
    assert all(p.dtype == dtype for p in model.parameters())
    assert torch.isfinite(model(ids[:2]).logits.float()).all()
    assert all(b.status == "pruned" for b in report.blocks)


@pytest.mark.parametrize("method", ["wanda", "rgs"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
@pytest.mark.parametrize("family", ["llama", "qwen2-sliding"])
def test_masks_equal_the_slow_reference(method, sparsity, family):
    model = tiny_model(family, seed=3, num_hidden_layers=3)
    ref_model = copy.deepcopy(model)
    ids = calib_ids(n=8, seqlen=24, seed=4)
    report = wandapp.prune(model, ids, sparsity=sparsity, method=method, nsamples=8, progress=False)
    expected = reference.prune_model(ref_model, [ids[i : i + 1] for i in range(8)], method, sparsity)
    got = report.masks
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    for name, w in block_linear_weights(model).items():
        assert torch.equal(w, block_linear_weights(ref_model)[name]), name


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen2-sliding"])
def test_replayed_blocks_reproduce_the_models_own_hidden_states(family):
    """Each block, called with the captured arguments of its attention type, gives what the
    model computes itself (with a sliding window shorter than the sequence, block 0's mask
    would be wrong for blocks 1 and 2)."""
    from wandapp.adapters import resolve
    from wandapp.block import BlockRunner
    from wandapp.capture import capture_first_block, next_block_inputs
    from wandapp.data import collect_sequences

    model = tiny_model(family, num_hidden_layers=3)
    ids = calib_ids(n=2, seqlen=24)
    adapter = resolve(model)
    samples = capture_first_block(adapter, collect_sequences(ids, 2), torch.device("cpu"))
    with torch.no_grad():
        expected = [model(ids[i : i + 1], output_hidden_states=True).hidden_states for i in range(2)]
    for index in range(3):
        outputs = BlockRunner(adapter, index, samples, torch.device("cpu")).outputs()
        for i, out in enumerate(outputs):
            got = out if index < 2 else model.model.norm(out)  # HF's last hidden state is normed
            torch.testing.assert_close(got, expected[i][index + 1], rtol=1e-5, atol=1e-5)
        samples = next_block_inputs(samples, outputs)


def test_wanda_plus_plus_lowers_block_error_against_rgs():
    ids = calib_ids(n=24, seqlen=32, seed=5)
    settings = dict(nsamples=24, ro_samples=16, ro_holdout=8, ro_rounds=3, ro_lr=1e-4, progress=False)
    rgs = wandapp.prune(tiny_model("llama", seed=6, num_hidden_layers=4), ids, sparsity="2:4", method="rgs", **settings)
    wpp = wandapp.prune(tiny_model("llama", seed=6, num_hidden_layers=4), ids, sparsity="2:4", method="wanda++", **settings)
    better = [w.mse_final < r.mse_final for w, r in zip(wpp.blocks, rgs.blocks)]
    assert sum(better) > len(better) / 2, [(w.mse_final, r.mse_final) for w, r in zip(wpp.blocks, rgs.blocks)]
    # RO never raises the held-out error: a worse round is rolled back.
    for b in wpp.blocks:
        assert b.holdout_mse_final <= b.mse_before_ro * (1 + 1e-6)
    assert all(b.holdout_mse_final is None and b.mse_before_ro == b.mse_final for b in rgs.blocks)


def test_same_seed_same_masks_and_seed_matters():
    ids = calib_ids(n=16, seqlen=32, seed=7)
    run = lambda seed: wandapp.prune(tiny_model("llama"), ids, sparsity=0.5, method="wanda++", seed=seed, ro_lr=1e-4, **{k: v for k, v in FAST.items()})  # noqa: E731
    a, b = run(0), run(0)
    for name, mask in a.masks.items():
        assert torch.equal(mask, b.masks[name])
    hashes = lambda r: [l.mask_hash for blk in r.blocks for l in blk.layers.values()]  # noqa: E731
    assert hashes(a) == hashes(b)
    assert [blk.ro_losses for blk in a.blocks] == [blk.ro_losses for blk in b.blocks]
    assert [blk.ro_losses for blk in run(1).blocks] != [blk.ro_losses for blk in a.blocks]


def test_padding_does_not_change_the_statistics():
    """The same sequences, once plain and once right-padded with junk, give the same masks."""
    model = tiny_model("llama", seed=8)
    plain = calib_ids(n=8, seqlen=20, seed=9)
    junk = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(10))
    padded = {
        "input_ids": torch.cat([plain, junk], dim=1),
        "attention_mask": torch.cat([torch.ones(8, 20, dtype=torch.long), torch.zeros(8, 12, dtype=torch.long)], dim=1),
    }
    a = wandapp.prune(copy.deepcopy(model), plain, sparsity="2:4", method="rgs", nsamples=8, progress=False)
    b = wandapp.prune(copy.deepcopy(model), [padded], sparsity="2:4", method="rgs", nsamples=8, progress=False)
    agree = [torch.equal(a.masks[n], b.masks[n]) for n in a.masks]
    assert all(agree), f"{agree.count(False)} of {len(agree)} masks differ"
    for x, y in zip(a.blocks, b.blocks):
        assert y.mse_final == pytest.approx(x.mse_final, rel=1e-4)


def test_report_prints_and_serialises(ids):
    import json

    report = wandapp.prune(tiny_model("llama"), ids, sparsity="2:4", method="wanda++", **FAST)
    text = str(report)
    assert "wanda++" in text and "2:4" in text and "total: 2/2 blocks pruned" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["seed"] == 0 and d["config"]["ro_rounds"] == 2 and d["achieved_sparsity"] == pytest.approx(0.5)
    layer = d["blocks"][0]["layers"]["model.layers.0.self_attn.q_proj"]
    assert len(layer["mask_hash"]) == 64 and layer["sparsity"] == pytest.approx(0.5)
    # ro_min_improvement is 0 by default: both rounds of M = 8 one-sequence steps run.
    assert (len(d["blocks"][0]["ro_losses"]), d["blocks"][0]["ro_steps"], d["blocks"][0]["ro_stop"]) == (2, 16, "rounds")


def test_the_report_says_how_many_rounds_and_steps_ran_and_why_they_ended(ids):
    run = lambda method="wanda++", **kw: wandapp.prune(tiny_model("llama"), ids, sparsity="2:4", method=method, **{**FAST, **kw})  # noqa: E731
    every = run(ro_rounds=3, ro_min_improvement=0.0)
    # M = 8 training sequences, one per step, in each of the 3 rounds.
    assert [(len(b.ro_losses), b.ro_steps, b.ro_stop) for b in every.blocks] == [(3, 24, "rounds")] * 2
    early = run(ro_rounds=3, ro_min_improvement=0.9)  # no round lowers the held-out error by 90%
    assert [(len(b.ro_losses), b.ro_steps) for b in early.blocks] == [(1, 8)] * 2
    assert {b.ro_stop for b in early.blocks} <= {"converged", "rolled back"}
    assert early.blocks[0].ro_losses == every.blocks[0].ro_losses[:1]  # the round that ran is the same
    assert f"1 (0), {early.blocks[0].ro_stop}" in str(early) or "1 (1), rolled back" in str(early)
    batched = run(ro_rounds=3, ro_min_improvement=0.0, ro_batch_size=3)  # steps of 3, 3 and 2 sequences
    assert [b.ro_steps for b in batched.blocks] == [9, 9]
    wanda = run(method="wanda")
    assert [(b.ro_steps, b.ro_stop) for b in wanda.blocks] == [(0, None)] * 2

@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_each_device(device, ids):
    model = tiny_model("llama").to(device)
    wandapp.prune(model, ids, sparsity=0.5, method="wanda++", **FAST)
    assert_sparsity(model, 0.5)
    assert all(p.device.type == device for p in model.parameters())


def test_loaders_of_dicts_and_batches_are_split_into_sequences(ids):
    loader = [{"input_ids": ids[i : i + 4]} for i in range(0, 16, 4)]
    a = wandapp.prune(tiny_model("llama"), loader, sparsity=0.5, method="wanda", nsamples=16, progress=False)
    b = wandapp.prune(tiny_model("llama"), ids, sparsity=0.5, method="wanda", nsamples=16, progress=False)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])


# --- validation happens before any weight is touched --------------------------------


def untouched(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sparsity=1.2), wandapp.SparsityError, "0, 1"),
        (dict(sparsity="4:4"), wandapp.SparsityError, "n < m"),
        (dict(sparsity="2:5"), wandapp.SparsityError, "divisible by 5"),
        (dict(sparsity="half"), wandapp.SparsityError, "N:M"),
        (dict(sparsity="1.5"), wandapp.SparsityError, "0, 1"),
        (dict(sparsity="2:x"), wandapp.SparsityError, "N:M"),
        (dict(method="obs"), wandapp.InvalidArgumentError, "unknown method"),
        (dict(nsamples=32), wandapp.CalibrationError, "yielded 16 sequences"),
        (dict(ro_samples=20, nsamples=16), wandapp.CalibrationError, "ro_samples"),
        (dict(ro_lr=-1.0), wandapp.InvalidArgumentError, "ro_lr"),
        (dict(ro_min_improvement=1.0), wandapp.InvalidArgumentError, "ro_min_improvement"),
        (dict(ro_min_improvement=True), wandapp.InvalidArgumentError, "ro_min_improvement"),
        (dict(ro_extrapolate="yes"), wandapp.InvalidArgumentError, "ro_extrapolate"),
        (dict(ro_autocast="float16"), wandapp.InvalidArgumentError, "ro_autocast.*'auto', 'bfloat16', 'off'"),
        (dict(ro_lr_search="yes"), wandapp.InvalidArgumentError, "ro_lr_search.*'off', 'backtrack', 'full'"),
        (dict(typo=1), wandapp.InvalidArgumentError, "typo"),
    ],
)
def test_bad_arguments_raise_before_touching_weights(kwargs, error, match, ids):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    args = dict(sparsity=0.5, method="wanda++", nsamples=16, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        wandapp.prune(model, ids, **args)
    assert untouched(model, before)


def test_a_float_string_is_the_float():
    from wandapp.config import parse_sparsity

    assert parse_sparsity("0.5") == parse_sparsity(0.5) and parse_sparsity(" 2:4 ") == parse_sparsity("2:4")


def test_ro_lr_search_takes_the_switch_it_was():
    """ro_lr_search was a boolean, True the full search: configs written then keep their meaning."""
    assert wandapp.PruneConfig(ro_lr_search=True).ro_lr_search == "full"
    assert wandapp.PruneConfig(ro_lr_search=False).ro_lr_search == "off"
    # A report.json written then records the boolean.
    recorded = {**wandapp.PruneConfig().to_dict(), "ro_lr_search": True}
    assert wandapp.PruneConfig.from_dict(recorded).ro_lr_search == "full"


@pytest.mark.parametrize(
    "loader,match",
    [([], "yielded nothing"), (["text"], "str"), ([torch.rand(2, 8)], "integer"), ([{"ids": 1}], "input_ids"),
     ([torch.full((16, 8), 500)], "outside")],
)
def test_bad_calibration_data(loader, match):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(wandapp.CalibrationError, match=match):
        wandapp.prune(model, loader, nsamples=16, progress=False)
    assert untouched(model, before)


def test_unsupported_model(ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128))
    with pytest.raises(wandapp.UnsupportedModelError, match="GPT2LMHeadModel.*gpt2"):
        wandapp.prune(model, ids, **FAST)


def test_layer_types_longer_than_the_blocks_is_fine_shorter_is_not(ids):
    model = tiny_model("qwen2-sliding", num_hidden_layers=3)
    model.model.layers = model.model.layers[:2]  # a cut-down model still runs in transformers
    wandapp.prune(model, ids, **FAST)
    model.config.layer_types = model.config.layer_types[:1]
    with pytest.raises(wandapp.UnsupportedModelError, match="names 1 blocks but the model has 2"):
        wandapp.prune(model, ids, **FAST)


# --- a failure part-way leaves every block either pruned or untouched ----------------


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_block_restores_that_block(exc, ids):
    model = tiny_model("llama", num_hidden_layers=3)
    original = copy.deepcopy(model.state_dict())
    target = model.model.layers[1].mlp.down_proj
    calls = {"n": 0}
    real_forward = target.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 30:  # after gradients and some RO steps of block 1
            raise exc
        return real_forward(x)

    target.forward = flaky
    expected = wandapp.PruneInterrupted if isinstance(exc, KeyboardInterrupt) else wandapp.PruneError
    with pytest.raises(expected) as info:
        wandapp.prune(model, ids, sparsity="2:4", method="wanda++", **FAST)
    err = info.value
    assert err.block == 1 and isinstance(err.__cause__, type(exc))
    assert [b.status for b in err.report.blocks] == ["pruned", "restored", "untouched"]
    state = model.state_dict()
    for name, value in original.items():
        if name.startswith("model.layers.0.") and name.endswith("proj.weight"):
            assert not torch.equal(state[name], value), name
        elif not name.startswith("model.layers.0."):
            assert torch.equal(state[name], value), name
    assert all(p.grad is None for p in model.parameters())
    if isinstance(exc, KeyboardInterrupt):
        assert isinstance(err, KeyboardInterrupt)


def test_the_error_names_the_pruned_blocks_as_runs(ids):
    """A failure in the last block: the pruned ones as runs of indices, and no later block to name."""
    model = tiny_model("llama", num_hidden_layers=4)
    pruned_marker = model.model.layers[0].mlp.down_proj.weight

    def boom(_module, _args):
        if (pruned_marker == 0).any():  # only once pruning began, not in the dense capture
            raise RuntimeError("boom")

    model.model.layers[3].mlp.down_proj.register_forward_pre_hook(boom)
    with pytest.raises(wandapp.PruneError) as info:
        wandapp.prune(model, ids, method="wanda", progress=False)
    assert str(info.value) == "pruning stopped in block 3 (RuntimeError: boom). Blocks 0..2 are pruned; block 3 was restored. See err.report."


@pytest.mark.parametrize("method", METHODS)
def test_batching_changes_only_the_summation_order(method, ids):
    """batch_size > 1 runs statistics, targets, outputs and block errors several sequences per
    forward call; on CPU the masks agree exactly with one-by-one runs (measured: 0 bits differ)
    and block errors to float32 rounding."""
    one = wandapp.prune(tiny_model("llama", num_hidden_layers=3), ids, sparsity="2:4", method=method, batch_size=1, **FAST)
    for batch_size in (3, 16):
        got = wandapp.prune(tiny_model("llama", num_hidden_layers=3), ids, sparsity="2:4", method=method, batch_size=batch_size, **FAST)
        assert got.config["batch_size"] == batch_size
        for name in one.masks:
            assert torch.equal(got.masks[name], one.masks[name]), (batch_size, name)
        for a, b in zip(one.blocks, got.blocks):
            assert a.mse_final == pytest.approx(b.mse_final, rel=1e-4)


def test_batches_of_one_token_sequences():
    """Sequences of length 1: the 1-D cache position has no batch dimension and is not expanded."""
    ids = calib_ids(n=8, seqlen=1)
    one = wandapp.prune(tiny_model("llama"), ids, sparsity=0.5, method="wanda", batch_size=1, progress=False)
    four = wandapp.prune(tiny_model("llama"), ids, sparsity=0.5, method="wanda", batch_size=4, progress=False)
    for name in one.masks:
        assert torch.equal(one.masks[name], four.masks[name]), name
