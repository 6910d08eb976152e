"""wandapp: Wanda++ pruning for HuggingFace LLaMA-family models.

    report = wandapp.prune(model, calib_loader, sparsity="2:4")
    print(report)
"""

# torch first: the extension links against the libtorch inside the torch wheel and has no rpath.
import torch  # noqa: F401

import importlib as _importlib
from typing import Any as _Any

from wandapp._torch_check import load_core

_core = load_core()

from wandapp import kernels  # noqa: E402
from wandapp.config import PruneConfig
from wandapp.errors import (
    CalibrationError,
    CheckpointError,
    DeviceMismatchError,
    DtypeError,
    InvalidArgumentError,
    MaskFileError,
    MaskMismatchError,
    MissingDependencyError,
    NonFiniteError,
    PruneError,
    PruneInterrupted,
    RankFailedError,
    ResumeMismatchError,
    ShapeError,
    SparsityError,
    UnsupportedModelError,
    WandappError,
)
from wandapp.masks import apply_masks, load_masks, save_masks
from wandapp.checkpoint import prune_checkpoint
from wandapp.prune import prune
from wandapp.report import PruneReport

__version__: str = _core.__version__

__all__ = [
    "CalibrationError",
    "CheckpointError",
    "DeviceMismatchError",
    "DtypeError",
    "InvalidArgumentError",
    "MaskFileError",
    "MaskMismatchError",
    "MissingDependencyError",
    "NonFiniteError",
    "PruneConfig",
    "PruneError",
    "PruneInterrupted",
    "PruneReport",
    "RankFailedError",
    "ResumeMismatchError",
    "ShapeError",
    "SparsityError",
    "UnsupportedModelError",
    "WandappError",
    "__version__",
    "apply_masks",
    "kernels",
    "load_masks",
    "prune",
    "prune_checkpoint",
    "save_masks",
]

#: Submodules reachable as ``wandapp.<name>`` after ``import wandapp``, imported on first use so
#: that their optional dependencies (peft, matplotlib...) load only when a feature needs them.
_LAZY_SUBMODULES = ("cli", "data", "distributed", "eval", "lora", "models", "testing")


def __getattr__(name: str) -> _Any:
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"wandapp.{name}")
    raise AttributeError(f"module 'wandapp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_LAZY_SUBMODULES})
