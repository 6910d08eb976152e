"""Calibration data: from any loader, a text (string or file), pre-tokenized ids, or a
HuggingFace ``datasets`` dataset the user already has. Nothing here downloads."""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable

import numpy as np
import torch

from wandapp.errors import CalibrationError

#: Novels bundled with the package (see data/PROVENANCE.md).
BUNDLED_TEXTS = ("persuasion", "northangerabbey")
CALIBRATION_TEXT = "persuasion"
EVALUATION_TEXT = "northangerabbey"


@dataclass
class Sequence:
    """One calibration sequence: ids [1, seq] long and its attention mask [1, seq] bool (None
    when the batch had none)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def token_mask(self) -> torch.Tensor | None:
        """[1, seq] bool, True on real tokens; None when nothing is padding."""
        if self.attention_mask is None or bool(self.attention_mask.all()):
            return None
        return self.attention_mask.bool()


#: Sequences wandapp takes from a loader when ``PruneConfig.nsamples`` is None (the paper's N).
DEFAULT_MAX_SAMPLES = 128

#: Arguments of a causal LM's forward that change what it computes but that wandapp does not
#: replay (positions, embeddings, caches, packed-sequence boundaries from
#: DataCollatorWithFlattening): a batch carrying one is refused rather than pruned as if it were absent.
_REFUSED_KEYS = (
    "position_ids", "inputs_embeds", "past_key_values", "cache_position",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
)

_LAYOUTS = (
    "yield LongTensor [batch, seq], dicts (or a tokenizer's BatchEncoding) with 'input_ids' and an "
    "optional 'attention_mask', or (input_ids, attention_mask) pairs"
)


def _tensor(value: Any, index: int, what: str) -> torch.Tensor:
    """A tensor from a tensor, a numpy array or a (nested) list of numbers."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise CalibrationError(f"calibration batch {index}: {what} is a {type(value).__name__}; {_LAYOUTS}")
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        # DataLoader's default collate turns a field of token lists into one tensor per position.
        raise CalibrationError(
            f"calibration batch {index}: {what} is a list of tensors (a DataLoader collating lists of token ids "
            "transposes them); give the dataset tensors (datasets: .with_format('torch')) or a collator that pads"
        )
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CalibrationError(
            f"calibration batch {index}: {what} ({type(value).__name__}) is not a rectangular array of numbers ({err}); "
            "pad the sequences to one length and pass an attention_mask"
        ) from None


def _from_mapping(item: Any, index: int) -> tuple[Any, Any]:
    keys = list(item.keys())
    if "input_ids" not in item:
        raise CalibrationError(f"calibration batch {index} is a mapping without 'input_ids' (keys: {keys}); {_LAYOUTS}")
    refused = [k for k in _REFUSED_KEYS if item.get(k) is not None]
    if refused:
        raise CalibrationError(
            f"calibration batch {index} has {refused}, which would change what the model computes but which wandapp "
            "does not replay; pass only 'input_ids' and 'attention_mask' (labels and other fields are ignored)"
        )
    return item["input_ids"], item.get("attention_mask")


def _from_sequence(item: tuple | list, index: int) -> tuple[Any, Any]:
    """A tuple/list batch, as a ``TensorDataset`` DataLoader yields: (input_ids,) or
    (input_ids, attention_mask), the positional order of a causal LM's forward."""
    if len(item) == 1:
        return item[0], None
    if len(item) == 2:
        return item[0], item[1]
    raise CalibrationError(
        f"calibration batch {index} is a {type(item).__name__} of {len(item)} arrays; wandapp reads (input_ids,) and "
        "(input_ids, attention_mask) but cannot tell what the others are (a DataLoader collating lists of token ids "
        "also yields one tensor per position). Yield dicts {'input_ids': ..., 'attention_mask': ...} of tensors instead"
    )


def _is_positional(item: Any) -> bool:
    """A batch of positional arrays rather than one array of token ids: a list whose first element
    is a tensor or numpy array (a DataLoader over a TensorDataset), or a tuple of arrays or lists
    (``zip(ids, masks)``). A list of lists stays a batch of token-id rows."""
    if not isinstance(item, (tuple, list)) or not item:
        return False
    if isinstance(item[0], (torch.Tensor, np.ndarray)):
        return True
    return isinstance(item, tuple) and all(isinstance(v, (list, tuple)) for v in item)


def _as_batch(item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [batch, seq] long, attention_mask [batch, seq] bool or None) of one batch of
    any supported layout; anything else is a CalibrationError (nothing is silently dropped)."""
    if isinstance(item, dict) or hasattr(item, "keys"):
        ids, mask = _from_mapping(item, index)
    elif _is_positional(item):
        ids, mask = _from_sequence(item, index)
    else:  # a tensor, an array, or a list of token ids
        ids, mask = item, None
    ids = _tensor(ids, index, "input_ids")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise CalibrationError(f"calibration batch {index}: input_ids must be an integer tensor [batch, seq], got {ids.dtype} {list(ids.shape)}")
    if ids.shape[1] == 0:
        raise CalibrationError(f"calibration batch {index} has sequences of length 0")
    return ids.long(), None if mask is None else _attention_mask(mask, ids, index)


def _attention_mask(mask: Any, ids: torch.Tensor, index: int) -> torch.Tensor:
    """A [batch, seq] 1/0 mask (1 = real token) as bool; refused when it is not one."""
    mask = _tensor(mask, index, "attention_mask")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise CalibrationError(
            f"calibration batch {index}: attention_mask {list(mask.shape)} does not match input_ids {list(ids.shape)}; "
            "pass a 2-D padding mask [batch, seq] of 1 (real token) and 0 (padding)"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise CalibrationError(
            f"calibration batch {index}: attention_mask holds values other than 0 and 1 "
            f"({sorted(set(mask.flatten().tolist()))[:5]}...); is the second element of the batch really a padding mask?"
        )
    return mask.bool()


def collect_sequences(loader: Iterable[Any], nsamples: int | None = None) -> list[Sequence]:
    """Splits the loader's batches into single sequences: exactly ``nsamples`` of them, or with
    None every sequence the loader yields up to ``DEFAULT_MAX_SAMPLES``. CalibrationError when
    the loader is empty, a row is all padding, or it yields fewer than ``nsamples``."""
    limit = DEFAULT_MAX_SAMPLES if nsamples is None else nsamples
    sequences: list[Sequence] = []
    for index, item in enumerate(loader):
        ids, mask = _as_batch(item, index)
        for row in range(ids.shape[0]):
            row_mask = None if mask is None else mask[row : row + 1].clone()
            if row_mask is not None and not row_mask.any():
                raise CalibrationError(f"calibration batch {index} row {row} is all padding")
            # Clones are ordinary tensors even when the loader made inference tensors.
            sequences.append(Sequence(ids[row : row + 1].clone(), row_mask))
            if len(sequences) == limit:
                return sequences
    if not sequences:
        raise CalibrationError("the calibration loader yielded nothing; pass a non-empty list or DataLoader")
    if nsamples is None:
        return sequences
    raise CalibrationError(
        f"the calibration loader yielded {len(sequences)} sequences but nsamples={nsamples}; "
        f"pass more data, set nsamples={len(sequences)}, or leave nsamples=None to use them all"
    )


def sequences_sha256(sequences: list[Sequence]) -> str:
    """SHA-256 (hex) of the sequences' token ids and attention masks, shapes included: what a
    resumed run (``prune_checkpoint``) or another rank (``wandapp.distributed``) must share."""
    digest = hashlib.sha256()
    for seq in sequences:
        for t in (seq.input_ids, seq.attention_mask):
            digest.update(b"none" if t is None else repr(tuple(t.shape)).encode() + t.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


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
