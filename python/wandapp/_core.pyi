"""Stub of the compiled module ``wandapp._core`` (src/bindings.rs)."""

from os import PathLike
from typing import Callable, Protocol, TypedDict

from typing_extensions import final

import torch

__all__ = [
    "ActivationStats", "GradientStats", "MASK_FORMAT", "MASK_FORMAT_VERSION", "TORCH_VERSION", "__version__",
    "allocate_pruned_per_row", "apply_mask_", "load_masks", "magnitude_score", "mask_hash", "nm_mask", "owl_outlier_ratio",
    "owl_sparsities", "prune_block_", "pruned_per_row", "rgs_score", "save_masks", "sparsegpt_prune_", "unstructured_mask",
    "wanda_score",
]

__version__: str
MASK_FORMAT: str
MASK_FORMAT_VERSION: str
TORCH_VERSION: str

def pruned_per_row(in_features: int, sparsity: float = 0.5, nm: tuple[int, int] | None = None) -> int:
    """How many weights each row of `in_features` loses: with `nm`, (m - n) per group of m; else
    floor(in_features x sparsity) with the sparsity read as the decimal it prints as (100 x 0.58 =
    58, not 57). The one rule behind the masks, the report and `wandapp.testing.assert_sparsity`.
    Raises SparsityError (sparsity outside [0, 1), an invalid N:M) or InvalidArgumentError
    (`in_features` < 0).
    """
def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row unstructured keep-mask (True = keep): every row of `scores` drops exactly
    `pruned_per_row(in_features, sparsity)` of its lowest scores; at equal score the lower column
    is dropped first. `scores` [out, in], any float dtype, CPU or CUDA; returns bool [out, in] on
    the same device (CPU: rayon partial selection). Raises ShapeError (not 2-D), DtypeError (not a
    float tensor), SparsityError, NonFiniteError (NaN or infinite scores).
    """
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: each group of `m` consecutive inputs of a row keeps its `n` highest scores
    ("2:4" keeps 2 of 4); at equal score the higher column is kept. `scores` [out, in], any float
    dtype, CPU or CUDA; returns bool [out, in] on the same device. Raises SparsityError (n > m, or
    `in` not divisible by m) and the errors of `unstructured_mask`.
    """
def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """The magnitude baseline's score |W_ij|: float32 [out, in] from `weight` [out, in] of any float
    dtype, on its device. Raises ShapeError, DtypeError.
    """
def wanda_score(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's score S_ij = |W_ij| * ||X_j||_2 (Sun et al. 2023; SPEC step 1): float32 [out, in] from
    `weight` [out, in] and `act_norm` [in] (`ActivationStats.norm`), any float dtypes, one device.
    Raises ShapeError (`act_norm` not [in]), DtypeError, DeviceMismatchError.
    """
def rgs_score(
    weight: torch.Tensor, grad_rms: torch.Tensor, act_norm: torch.Tensor, alpha: float = 100.0
) -> torch.Tensor:
    """Wanda++'s regional gradient score S_ij = (alpha * G_ij + ||X_j||_2) * |W_ij| (Yang et al. 2025;
    SPEC step 3): float32 [out, in] from `weight` and `grad_rms` [out, in] (`GradientStats.rms`) and
    `act_norm` [in], any float dtypes, one device; the paper's alpha is 100. Raises ShapeError,
    DtypeError, DeviceMismatchError.
    """
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zeroes `weight` [out, in] where the bool `mask` [out, in] is False, in place: same storage,
    outside autograd. Raises ShapeError, DtypeError (`mask` not bool), DeviceMismatchError.
    """
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023) on one weight [out, in] given the Hessian [in, in] of its
    inputs (H = 2/N sum x x^T): the OBS column sweep in blocks of `blocksize` with `percdamp` x
    mean(diag H) dampening, per-row unstructured (`sparsity`) or N:M (`nm`) masks chosen as it
    sweeps, and the error-compensating update. Changes `weight` in place; returns the keep-mask.
    Runs in the Hessian's precision (float32, or float64 when given float64) on its device. The
    defaults are `sparsegpt::BLOCK_SIZE` and `sparsegpt::PERCDAMP` (literal here for the signature).
    Raises ShapeError (`hessian` not [in, in]), SparsityError, DtypeError, DeviceMismatchError,
    NonFiniteError.
    """
def owl_outlier_ratio(weights: list[torch.Tensor], act_norms: list[torch.Tensor], m: float) -> float:
    """OWL's outlier ratio of one block (Yin et al. 2024): the fraction of its Wanda scores
    |W_ij| ||X_j|| (all `weights` [out, in] together, `act_norms[k]` [in] the norms of weight k's
    input) above `m` times their mean.
    """
def owl_sparsities(ratios: list[float], sparsity: float, lambda_: float) -> list[float]:
    """OWL's per-block sparsities for the mean `sparsity`: outlier ratios scaled to [0, 2 x lambda]
    and centred; block l gets sparsity - (scaled_l - mean).
    """
def allocate_pruned_per_row(sparsities: list[float], in_features: int, total: int) -> list[int]:
    """Whole numbers of weights pruned per row for matrices of one shape ([out, `in_features`]) with
    ideal sparsities `sparsities`, summing to exactly `total` (largest-remainder rounding).
    """
def mask_hash(mask: torch.Tensor) -> str:
    """SHA-256 (64 hex characters) of a bool mask's shape and bits, bit-packed: the hash stored in
    mask files and the report (`LayerReport.mask_hash`). Raises DtypeError (not bool).
    """
def save_masks(
    path: str | PathLike[str], masks: list[tuple[str, torch.Tensor]], metadata: dict[str, str]
) -> None:
    """Writes bool masks, bit-packed, to a safetensors file with string metadata."""
def load_masks(path: str | PathLike[str]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Reads a mask file. Verifies every hash."""

@final
class ActivationStats:
    """Streaming ||X_j||_2 of one linear layer's inputs over calibration sequences, as Wanda's code
    computes it (SPEC step 1; padding excluded): `ActivationStats(in_features)`, `update` per batch,
    `norm()` at the end. Raises ShapeError for an input whose last dimension is not `in_features`.
    """
    def __new__(cls, in_features: int) -> ActivationStats: ...
    def update(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Adds x [batch, seq, in]; tokens where `token_mask` [batch, seq] is False do not count."""
    def all_reduce(self, reduce: Callable[[list[torch.Tensor]], None], world_size: int) -> None:
        """Adds the statistics of the other processes that share the calibration (torch.distributed):
        `reduce(tensors)` sums each tensor in place over the `world_size` processes
        (``wandapp.distributed.World.all_reduce``). Every process calls it at the same point.
        """
    def norm(self) -> torch.Tensor:
        """float32 [in]: sqrt of the mean over sequences of each sequence's sum of squares."""
    @property
    def nsamples(self) -> int: ...
    @property
    def in_features(self) -> int: ...

@final
class GradientStats:
    """Streaming RMS over samples of a weight's gradient, the regional gradient G of Wanda++ (SPEC
    step 2): `GradientStats(list(weight.shape))`, `update` with each sample's d loss / d W, `rms()`
    at the end.
    """
    def __new__(cls, shape: list[int]) -> GradientStats: ...
    def update(self, grad: torch.Tensor) -> None:
        """Adds one sample's gradient [shape] (its square, summed in float64). Raises ShapeError."""
    def rms(self) -> torch.Tensor:
        """G: float32 [shape], sqrt(sum of squares / nsamples), the RMS over samples of SPEC step 2."""
    @property
    def nsamples(self) -> int: ...
    @property
    def shape(self) -> list[int]: ...

class _Block(Protocol):
    def __len__(self) -> int: ...
    def batches(self, indices: list[int]) -> list[list[int]]: ...
    def forward(self, batch: list[int]) -> torch.Tensor: ...
    def linear_inputs(self, batch: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]: ...
    def set_targets(self, batch: list[int], out: torch.Tensor) -> None: ...
    def target(self, batch: list[int]) -> torch.Tensor: ...
    def set_outputs(self, batch: list[int], out: torch.Tensor) -> None: ...
    def token_mask(self, batch: list[int]) -> torch.Tensor | None: ...
    # Optional: a block whose calibration is spread over processes (world_size() > 1) also has
    # local() -> list[int] (its sequences, sorted) and all_reduce(tensors: list[torch.Tensor]) -> None.
    # Optional: training_forward(batch) -> torch.Tensor, the forward of an RO training step (its
    # output serves only the gradient, so it may run under autocast); without it, forward serves.

class _RoundResult(TypedDict):
    loss: float
    lr: float
    holdout_before: float
    holdout_after: float
    rolled_back: bool
    steps: int

class _BlockResult(TypedDict):
    masks: list[torch.Tensor]
    mse_before_ro: float
    holdout_mse_final: float | None
    mse_final: float
    magnitude_fallback: list[bool]
    rounds: list[_RoundResult]
    ro_stop: str | None

def prune_block_(
    block: _Block,
    weights: list[torch.Tensor],
    *,
    method: str,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    pruned_per_row: list[int] | None = None,
    alpha: float = 100.0,
    ro_rounds: int = 5,
    ro_samples: int = 32,
    ro_holdout: int = 8,
    ro_lr: float = 3e-7,
    ro_lr_search: str = "off",
    ro_batch_size: int = 1,
    ro_min_improvement: float = 0.0,
    ro_extrapolate: bool = False,
    seed: int = 0,
) -> _BlockResult:
    """Runs one block's whole schedule (SPEC step 6) on `weights`, in place; returns a dict with
    `masks` (bool, one per weight), `mse_before_ro` (with RO: on its held-out sequences),
    `holdout_mse_final` (with RO: the final error on them; None without), `mse_final` (every
    sequence), `rounds` (one dict per RO round)
    and `ro_stop` (why the rounds ended: "rounds", "converged", "rolled back"; None without RO).
    `ro_min_improvement` > 0 ends a block's rounds early (see `PruneConfig.ro_min_improvement`).
    `pruned_per_row` (one count per weight) replaces the unstructured `sparsity` with per-layer
    counts (OWL); `ro_lr_search` ("off", "backtrack", "full") scales RO's first round by a line search on the
    held-out sequences.
    """

