"""Calibration longer than a fixed position table allows (issue 22, kind 5): OPT (learned
positions with offset 2) and GPT-Neo (``wpe``) are pruned up to their limit and refused beyond it
with a CalibrationError before any work (they raised a bare IndexError); rotary models are not
limited by ``max_position_embeddings``."""

from __future__ import annotations

import pytest
import torch

import wandapp

from conftest import calib_ids, tiny_model

LIMIT = 32
RUN = dict(method="wanda", sparsity=0.5, progress=False)


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(61)
    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=LIMIT, word_embed_proj_dim=64)).eval()


def gpt_neo():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(62)
    return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=LIMIT,
                                          attention_types=[[["global"], 2]], bos_token_id=0, eos_token_id=0)).eval()


MODELS = {"opt": opt, "gpt_neo": gpt_neo}


@pytest.mark.parametrize("family", MODELS)
def test_sequences_up_to_the_limit_are_pruned(family):
    report = wandapp.prune(MODELS[family](), calib_ids(n=4, seqlen=LIMIT, seed=63), **RUN)
    assert report.pruned_blocks == [0, 1]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", MODELS)
def test_a_longer_sequence_is_refused_before_any_work(family, padded):
    model = MODELS[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = calib_ids(n=4, seqlen=LIMIT + 1, seed=64)
    data = ids
    if padded:  # real tokens fit, the padded width does not
        mask = torch.ones_like(ids)
        mask[:, 20:] = 0
        data = [{"input_ids": ids, "attention_mask": mask}]
    with pytest.raises(wandapp.CalibrationError, match=rf"{LIMIT + 1} tokens wide .* at most {LIMIT} tokens") as err:
        wandapp.prune(model, data, **RUN)
    if family == "opt":
        assert "34 rows, 2 of them an offset" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rotary_models_are_not_limited_by_max_position_embeddings():
    model = tiny_model("llama", seed=65, max_position_embeddings=16)
    report = wandapp.prune(model, calib_ids(n=4, seqlen=40, seed=66), **RUN)
    assert report.pruned_blocks == [0, 1]


def test_a_vision_towers_position_table_does_not_limit_the_text():
    """Gemma 3's vision tower has a 16-position table; its text decoder is rotary."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4,
    )
    torch.manual_seed(67)
    report = wandapp.prune(Gemma3ForConditionalGeneration(config).eval(), calib_ids(n=4, seqlen=24, seed=68), **RUN)
    assert report.pruned_blocks == [0, 1]
