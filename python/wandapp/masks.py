"""Saving, loading and re-applying masks: {matrix name: bool keep-mask} (a module name, or
``<module>.<parameter>[<expert>]`` for an expert's slice of a fused experts parameter).

Files are safetensors written and read by the Rust core (src/io.rs documents the format):
each mask bit-packed along its rows (1 bit per weight), with a SHA-256 per mask and the
caller's metadata. Loading parses data only; nothing in a file is executed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from wandapp import _core
from wandapp.adapters import matrix, unwrap
from wandapp.errors import MaskFileError, MaskMismatchError


def _versions() -> dict[str, str]:
    import transformers

    return {"wandapp": _core.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save_masks(path: str | os.PathLike[str], masks: Mapping[str, torch.Tensor], report: Any = None, **metadata: Any) -> None:
    """Writes ``masks`` to ``path``. With ``report`` (a PruneReport), its method, sparsity,
    config and seed are recorded; extra keyword ``metadata`` is stored as JSON strings."""
    meta: dict[str, Any] = {**_versions(), **metadata}
    if report is not None:
        meta.update(method=report.method, sparsity=report.sparsity, config=report.config, seed=report.config.get("seed"))
    encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    _core.save_masks(os.fspath(path), [(name, mask) for name, mask in masks.items()], encoded)


def load_masks(path: str | os.PathLike[str], with_metadata: bool = False) -> Any:
    """{name: bool mask on CPU}, or (masks, metadata) with ``with_metadata=True``, from a masks
    file or a folder of them (``prune_checkpoint``'s ``masks/``, one file per block: merged, the
    metadata of the last file). Raises MaskFileError for a missing, corrupt or truncated file, a
    mask whose hash does not match, or a folder without masks files."""
    path = os.fspath(path)
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise MaskFileError(f"{path!r} is a folder without masks files (*.safetensors)")
    masks: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        pairs, metadata = _core.load_masks(file)
        masks.update(pairs)
    return (masks, metadata) if with_metadata else masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zeroes each named weight matrix where its mask is False. Checks every name and shape
    first and raises MaskMismatchError naming the first mismatch, before changing anything.
    ``model`` may be in a wrapper (torch.compile, DataParallel, a peft model): names are the
    model's own."""
    model = unwrap(model)
    weights = {}
    for name, mask in masks.items():
        weight = matrix(model, name)
        if weight is None:
            example = next((n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)), "")
            raise MaskMismatchError(f"mask {name!r} names no module with a weight in this model (e.g. {example!r})")
        if tuple(mask.shape) != tuple(weight.shape):
            raise MaskMismatchError(f"mask {name!r} has shape {tuple(mask.shape)} but the weight is {tuple(weight.shape)}")
        weights[name] = weight
    for name, mask in masks.items():
        _core.apply_mask_(weights[name], mask.to(weights[name].device))
