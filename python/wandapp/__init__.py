"""wandapp: Wanda++ pruning for HuggingFace LLaMA-family models.

    report = wandapp.prune(model, calib_loader, sparsity="2:4")
    print(report)
"""

# torch first: the extension links against the libtorch inside the torch wheel and has no rpath.
import torch  # noqa: F401

import importlib
from typing import Any

from wandapp import _core, kernels
from wandapp.config import PruneConfig
from wandapp.errors import (
    CalibrationError,
    DeviceMismatchError,
    DtypeError,
    InvalidArgumentError,
    MaskFileError,
    MaskMismatchError,
    MissingDependencyError,
    NonFiniteError,
    PruneError,
    PruneInterrupted,
    ShapeError,
    SparsityError,
    UnsupportedModelError,
    WandappError,
)
from wandapp.masks import apply_masks, load_masks, save_masks
from wandapp.prune import prune
from wandapp.report import PruneReport

__version__: str = _core.__version__

#: Submodules reachable as ``wandapp.<name>`` after ``import wandapp``, imported on first use so
#: that their optional dependencies (peft, matplotlib...) load only when a feature needs them.
SUBMODULES = ("cli", "config", "data", "eval", "kernels", "lora", "masks", "models", "report", "testing")


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f"wandapp.{name}")
    raise AttributeError(f"module 'wandapp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *SUBMODULES})

__all__ = [
    "CalibrationError",
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
    "ShapeError",
    "SparsityError",
    "UnsupportedModelError",
    "WandappError",
    "__version__",
    "apply_masks",
    "kernels",
    "load_masks",
    "prune",
    "save_masks",
]
