"""Test-only helpers: an offline character-level tokenizer for the tiny models, and the runner of
the documentation's Python examples (README.md, docs/)."""

from __future__ import annotations

import re

#: A ```python block, with the marker ``<!-- not-tested: reason -->`` on the line above if it has one.
_PYTHON_BLOCK = re.compile(r"(<!-- not-tested: [^>]+ -->\n)?```python\n(.*?)```", flags=re.S)


def python_blocks(path: str) -> list[str]:
    """The ```python blocks of the Markdown file ``path``, in order, less those marked not-tested."""
    with open(path, encoding="utf-8") as f:
        return [code for skip, code in _PYTHON_BLOCK.findall(f.read()) if not skip]


def run_python_blocks(path: str, blocks: list[str]) -> dict:
    """Runs ``blocks`` of ``path`` in order in one namespace (they build on each other; tracebacks
    name ``path``); returns the namespace."""
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, path, "exec"), namespace)
    return namespace


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
