"""wandapp.testing: each assertion passes on a correct model and names the first offender."""

from __future__ import annotations

import pytest
import torch

import wandapp
from wandapp.testing import assert_masks_equal, assert_nm, assert_perplexity_below, assert_sparsity

from conftest import calib_ids
from helpers import char_tokenizer


def test_plugin_fixture_is_a_fresh_tiny_llama(tiny_llama):
    assert type(tiny_llama).__name__ == "LlamaForCausalLM" and len(tiny_llama.model.layers) == 2


def test_tiny_llama_model_is_seeded_and_leaves_the_global_generator_alone():
    from wandapp.testing import tiny_llama_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = tiny_llama_model(seed=5), tiny_llama_model(seed=5)
    assert torch.rand(3).equal(expected)
    assert all(x.equal(y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_assertions_pass_then_name_the_first_offender(tiny_llama):
    report = wandapp.prune(tiny_llama, calib_ids(), sparsity="2:4", method="magnitude", nsamples=16, progress=False)
    assert_nm(tiny_llama, 2, 4)
    assert_sparsity(tiny_llama, 0.5)
    assert_masks_equal(tiny_llama, report.masks)
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[3] = 1.0
    with pytest.raises(AssertionError, match=r"model.layers.1.mlp.up_proj row 3 inputs 0..3 keep 4"):
        assert_nm(tiny_llama, 2, 4)
    with pytest.raises(AssertionError, match=r"model.layers.1.mlp.up_proj row 3 has 0 zeros"):
        assert_sparsity(tiny_llama, 0.5)
    with pytest.raises(AssertionError, match=r"model.layers.1.mlp.up_proj row 3 col \d+ is non-zero"):
        assert_masks_equal(tiny_llama, report.masks)


def test_assert_perplexity_below(tiny_llama):
    tok = char_tokenizer()
    ppl = assert_perplexity_below(tiny_llama, tok, "northangerabbey", 1000.0, seqlen=64, max_tokens=256)
    assert 1 < ppl < 1000
    with pytest.raises(AssertionError, match="is not below 1.0"):
        assert_perplexity_below(tiny_llama, tok, "northangerabbey", 1.0, seqlen=64, max_tokens=256)
