"""The Rust kernels, on ``torch.Tensor`` shared zero-copy with PyTorch (CPU and CUDA).

Masks are bool tensors, True = keep. Scores are float32. Every row of a weight (an output
feature) competes on its own. Ties are broken by column index: at equal score the lower
column counts as smaller (unstructured drops it first; N:M keeps the higher one).
Unstructured sparsity s drops ``pruned_per_row(in_features, s)`` = floor(in_features x s) of
each row, with s read as the decimal it prints as (100 x 0.58 prunes 58); ``nm=(n, m)`` gives
the N:M count.

>>> import torch, wandapp
>>> scores = torch.tensor([[3.0, 1.0, 1.0, 2.0]])
>>> wandapp.kernels.unstructured_mask(scores, 0.5)
tensor([[ True, False, False,  True]])
>>> wandapp.kernels.nm_mask(scores, 2, 4)
tensor([[ True, False, False,  True]])
>>> wandapp.kernels.pruned_per_row(100, 0.58)
58
"""

from wandapp._core import (
    ActivationStats,
    GradientStats,
    allocate_pruned_per_row,
    apply_mask_,
    magnitude_score,
    mask_hash,
    nm_mask,
    owl_outlier_ratio,
    owl_sparsities,
    pruned_per_row,
    rgs_score,
    sparsegpt_prune_,
    unstructured_mask,
    wanda_score,
)

__all__ = [
    "ActivationStats",
    "GradientStats",
    "allocate_pruned_per_row",
    "apply_mask_",
    "magnitude_score",
    "mask_hash",
    "nm_mask",
    "owl_outlier_ratio",
    "owl_sparsities",
    "pruned_per_row",
    "rgs_score",
    "sparsegpt_prune_",
    "unstructured_mask",
    "wanda_score",
]
