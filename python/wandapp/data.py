"""Calibration data: from any loader, a text (string or file), pre-tokenized ids, or a
HuggingFace ``datasets`` dataset the user already has. Nothing here downloads."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable

import torch

from wandapp.errors import CalibrationError

#: Novels bundled with the package (see data/PROVENANCE.md).
BUNDLED_TEXTS = ("persuasion", "northangerabbey")
CALIBRATION_TEXT = "persuasion"
EVALUATION_TEXT = "northangerabbey"


@dataclass
class Sequence:
    """One calibration sequence: ids [1, seq] and, when it has padding, its attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def token_mask(self) -> torch.Tensor | None:
        """[1, seq] bool, True on real tokens; None when nothing is padding."""
        if self.attention_mask is None or bool(self.attention_mask.all()):
            return None
        return self.attention_mask.bool()


def _as_batch(item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, dict) or hasattr(item, "keys"):
        if "input_ids" not in item:
            raise CalibrationError(f"calibration batch {index} is a mapping without 'input_ids' (keys: {list(item.keys())})")
        ids, mask = item["input_ids"], item.get("attention_mask")
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        ids, mask = item[0], None  # e.g. a TensorDataset batch (ids,)
    else:
        ids, mask = item, None
    if not isinstance(ids, torch.Tensor):
        raise CalibrationError(
            f"calibration batch {index} is a {type(ids).__name__}; yield LongTensor [batch, seq] "
            "or dicts with 'input_ids' (and optionally 'attention_mask')"
        )
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise CalibrationError(f"calibration batch {index}: input_ids must be an integer tensor [batch, seq], got {ids.dtype} {list(ids.shape)}")
    if ids.shape[1] == 0:
        raise CalibrationError(f"calibration batch {index} has sequences of length 0")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise CalibrationError(f"calibration batch {index}: attention_mask {list(mask.shape)} does not match input_ids {list(ids.shape)}")
    return ids.long(), mask


def collect_sequences(loader: Iterable[Any], nsamples: int) -> list[Sequence]:
    """Takes the first ``nsamples`` sequences from ``loader`` (splitting batches)."""
    sequences: list[Sequence] = []
    for index, item in enumerate(loader):
        ids, mask = _as_batch(item, index)
        for row in range(ids.shape[0]):
            row_mask = None if mask is None else mask[row : row + 1]
            if row_mask is not None and not row_mask.any():
                raise CalibrationError(f"calibration batch {index} row {row} is all padding")
            sequences.append(Sequence(ids[row : row + 1], row_mask))
            if len(sequences) == nsamples:
                return sequences
    if not sequences:
        raise CalibrationError("the calibration loader yielded nothing; pass a non-empty list or DataLoader")
    raise CalibrationError(
        f"the calibration loader yielded {len(sequences)} sequences but nsamples={nsamples}; "
        f"pass more data or set nsamples={len(sequences)}"
    )


def load_text(name_or_path: str) -> str:
    """A bundled novel by name (``"persuasion"``, ``"northangerabbey"``), a file path, or
    (when neither exists) the string itself."""
    if name_or_path in BUNDLED_TEXTS:
        data = resources.files("wandapp").joinpath("data", f"austen_{name_or_path}.txt.gz").read_bytes()
        return gzip.decompress(data).decode("utf-8")
    if len(name_or_path) < 4096 and os.path.isfile(name_or_path):
        opener = gzip.open if name_or_path.endswith(".gz") else open
        with opener(name_or_path, "rt", encoding="utf-8") as f:
            return f.read()
    return name_or_path


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one LongTensor of ids (no special tokens added)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets (seeded): [nsamples, seqlen]."""
    ids = ids.reshape(-1)
    if seqlen < 1 or nsamples < 1:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 1, got nsamples={nsamples}, seqlen={seqlen}")
    if ids.numel() <= seqlen:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than seqlen={seqlen} + 1; use more text or a shorter seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def text_calibration(tokenizer: Any, text: str, nsamples: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """Calibration windows from a text, a path, or a bundled novel name: [nsamples, seqlen]."""
    return random_windows(tokenize(tokenizer, load_text(text)), nsamples, seqlen, seed)


def dataset_calibration(
    dataset: Any, tokenizer: Any, nsamples: int = 128, seqlen: int = 512, seed: int = 0, text_field: str = "text"
) -> torch.Tensor:
    """Calibration windows from a HuggingFace ``datasets.Dataset`` the user loaded (C4,
    WikiText...): its ``text_field`` is joined with blank lines, tokenized, and windowed."""
    if text_field not in getattr(dataset, "column_names", []):
        raise CalibrationError(f"the dataset has no column {text_field!r} (columns: {getattr(dataset, 'column_names', None)})")
    text = "\n\n".join(t for t in dataset[text_field] if t)
    return random_windows(tokenize(tokenizer, text), nsamples, seqlen, seed)
