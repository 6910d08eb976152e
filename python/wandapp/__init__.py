"""wandapp: Wanda++ pruning for HuggingFace LLaMA-family models.

    report = wandapp.prune(model, calib_loader, sparsity="2:4")
    print(report)
"""

# torch first: the extension links against the libtorch inside the torch wheel and has no rpath.
import torch  # noqa: F401

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
