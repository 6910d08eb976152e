"""The exceptions wandapp raises on purpose, all rooted at ``WandappError``.

Each also subclasses the builtin that describes it (``ValueError`` for a bad value,
``TypeError`` for a bad type), so existing ``except ValueError`` code keeps working. The Rust
core raises these same classes (mapped in ``src/bindings.rs``).
"""

from __future__ import annotations

from typing import Any


class WandappError(Exception):
    """Root of every error wandapp raises on purpose."""


class SparsityError(WandappError, ValueError):
    """A sparsity or N:M pattern is out of range or does not fit a layer."""


class ShapeError(WandappError, ValueError):
    """A tensor has the wrong rank or shape for its role."""


class DeviceMismatchError(WandappError, ValueError):
    """Tensors that work together live on different devices."""


class DtypeError(WandappError, TypeError):
    """A tensor has a dtype that cannot be used there (or is not a tensor)."""


class NonFiniteError(WandappError, ValueError):
    """NaN or infinity in scores, weights or activations."""


class InvalidArgumentError(WandappError, ValueError):
    """Any other argument outside its valid range."""


class CalibrationError(WandappError, ValueError):
    """The calibration data is empty, too small or malformed."""


class UnsupportedModelError(WandappError, TypeError):
    """The model is not a LLaMA-family causal LM that wandapp knows how to prune."""


class MaskFileError(WandappError, ValueError):
    """A mask file is missing, corrupt, truncated or of another format."""


class MaskMismatchError(WandappError, ValueError):
    """Masks do not match the model they are applied to (names or shapes)."""


class MissingDependencyError(WandappError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


class ResumeMismatchError(WandappError, ValueError):
    """An output folder records a run of another model, calibration data or settings than the
    one asked to resume there."""


class CheckpointError(WandappError, ValueError):
    """A checkpoint folder given to ``prune_checkpoint`` is incomplete or inconsistent: a shard the
    index names is missing or damaged, the index and the shards disagree, or a tensor the model
    needs is absent or of another shape or kind. Raised before anything is written."""


class PruneError(WandappError, RuntimeError):
    """Pruning stopped part-way. ``report`` says which blocks are pruned; the failed block
    and every later one are untouched (bit-identical to before)."""

    def __init__(self, message: str, report: Any = None, block: int | None = None):
        super().__init__(message)
        self.report = report
        self.block = block


class RankFailedError(PruneError):
    """Another process of the torch.distributed group that shares the calibration failed, and this
    one stopped with it (``rank``: the failed one; ``wandapp.distributed``). As for any
    PruneError, the block in progress is restored on every rank."""

    def __init__(self, message: str, rank: int, report: Any = None, block: int | None = None):
        super().__init__(message, report=report, block=block)
        self.rank = rank


class PruneInterrupted(PruneError, KeyboardInterrupt):
    """Ctrl-C during pruning: a ``PruneError`` that ``except KeyboardInterrupt`` still catches."""
