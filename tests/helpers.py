"""Test-only helpers: an offline character-level tokenizer for the tiny models."""

from __future__ import annotations


def char_tokenizer(vocab_size: int = 128):
    """A PreTrainedTokenizerFast mapping each printable ASCII character to an id (< vocab_size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"[UNK]": 0, "[PAD]": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
