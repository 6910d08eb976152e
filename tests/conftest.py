"""Shared fixtures. The tiny random LLaMA comes from wandapp's own pytest plugin
(wandapp.testing); this adds the other families and calibration ids."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    base.update(overrides)
    if family == "llama":
        return LlamaConfig(**base)
    if family == "llama3":  # LLaMA 3.1-style rope scaling
        return LlamaConfig(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "mistral":
        return MistralConfig(**base)
    if family == "qwen2":
        return Qwen2Config(**base)
    if family == "qwen2-sliding":  # block 0 full attention, later blocks a sliding window of 8
        return Qwen2Config(**base, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).to(dtype).eval()


def calib_ids(n: int = 16, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids() -> torch.Tensor:
    return calib_ids()
