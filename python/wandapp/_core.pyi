"""Stub of the compiled module ``wandapp._core`` (src/bindings.rs)."""

from os import PathLike
from typing import Protocol, TypedDict

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

def pruned_per_row(in_features: int, sparsity: float = 0.5, nm: tuple[int, int] | None = None) -> int: ...
def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor: ...
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor: ...
def magnitude_score(weight: torch.Tensor) -> torch.Tensor: ...
def wanda_score(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor: ...
def rgs_score(
    weight: torch.Tensor, grad_rms: torch.Tensor, act_norm: torch.Tensor, alpha: float = 100.0
) -> torch.Tensor: ...
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> None: ...
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor: ...
def owl_outlier_ratio(weights: list[torch.Tensor], act_norms: list[torch.Tensor], m: float) -> float: ...
def owl_sparsities(ratios: list[float], sparsity: float, lambda_: float) -> list[float]: ...
def allocate_pruned_per_row(sparsities: list[float], in_features: int, total: int) -> list[int]: ...
def mask_hash(mask: torch.Tensor) -> str: ...
def save_masks(
    path: str | PathLike[str], masks: list[tuple[str, torch.Tensor]], metadata: dict[str, str]
) -> None: ...
def load_masks(path: str | PathLike[str]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]: ...

@final
class ActivationStats:
    def __new__(cls, in_features: int) -> ActivationStats: ...
    def update(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None: ...
    def norm(self) -> torch.Tensor: ...
    @property
    def nsamples(self) -> int: ...
    @property
    def in_features(self) -> int: ...

@final
class GradientStats:
    def __new__(cls, shape: list[int]) -> GradientStats: ...
    def update(self, grad: torch.Tensor) -> None: ...
    def rms(self) -> torch.Tensor: ...
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

class _RoundResult(TypedDict):
    loss: float
    lr: float
    holdout_before: float
    holdout_after: float
    rolled_back: bool

class _BlockResult(TypedDict):
    masks: list[torch.Tensor]
    mse_before_ro: float
    mse_final: float
    magnitude_fallback: list[bool]
    rounds: list[_RoundResult]

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
    ro_lr_search: bool = False,
    ro_batch_size: int = 1,
    seed: int = 0,
) -> _BlockResult: ...

