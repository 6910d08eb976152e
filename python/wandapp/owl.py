"""Per-layer sparsity by OWL (outlier-weighted layer-wise sparsity, Yin et al., ICML 2024,
arXiv 2310.05175): blocks whose Wanda scores hold more outliers keep more weights, with the
model's mean sparsity exactly the one asked for. The math is in the core (src/owl.rs); this
module knows which matrices belong to which block."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from wandapp import _core
from wandapp.adapters import DecoderAdapter
from wandapp.config import Pattern, PruneConfig
from wandapp.errors import InvalidArgumentError, SparsityError
from wandapp.offload import placed


@dataclass
class LayerSparsity:
    """What OWL chose: per block (with targets) its outlier ratio and sparsity, and per matrix
    the number of weights each row loses."""

    outlier_ratio: dict[int, float]
    block_sparsity: dict[int, float]
    pruned_per_row: dict[str, int]


def check(adapter: DecoderAdapter, pattern: Pattern, cfg: PruneConfig) -> None:
    """Refuses, before any work, what OWL cannot do: N:M patterns (every group keeps n of m), block
    sparsities that could leave [0, 1) (one block can lie 2 x owl_lambda x (n - 1) / n from the
    mean over n blocks), and a block whose targets hold no linear layer (its outliers are scored on
    linear layers' inputs)."""
    if pattern.nm is not None:
        raise SparsityError(
            f"layer_sparsity='owl' spreads an unstructured sparsity over blocks; {pattern} keeps {pattern.nm[0]} of every "
            f"{pattern.nm[1]} in every layer. Use a float sparsity, or layer_sparsity='uniform'"
        )
    blocks = sum(1 for index in range(len(adapter.layers)) if adapter.targets(index))
    reach = 2 * cfg.owl_lambda * (blocks - 1) / max(blocks, 1)  # the farthest a block can be from the mean
    if not 0 <= pattern.sparsity - reach or not pattern.sparsity + reach < 1:
        raise InvalidArgumentError(
            f"layer_sparsity='owl' may give a block any sparsity in [{pattern.sparsity - reach:g}, {pattern.sparsity + reach:g}] "
            f"(sparsity {pattern} +- 2 x owl_lambda {cfg.owl_lambda} x (blocks - 1) / blocks, {blocks} blocks), which must "
            "lie in [0, 1); lower owl_lambda"
        )
    for index in range(len(adapter.layers)):
        targets = adapter.targets(index)
        if targets and all(t.expert is not None for t in targets):
            raise InvalidArgumentError(
                f"layer_sparsity='owl' scores each block's outliers on its linear layers, but the targets of block {index} "
                "are experts only; include the block's attention projections in targets, or use layer_sparsity='uniform'"
            )


def plan(
    adapter: DecoderAdapter, act_stats: dict[str, _core.ActivationStats], pattern: Pattern, cfg: PruneConfig, device: torch.device
) -> LayerSparsity:
    """OWL's allocation from the dense model's activation statistics (``act_stats``: every
    linear target's input over the calibration data, from the capture pass, as in OWL's own
    dense pre-pass); scores are computed block by block on ``device``. Matrices of one shape
    together lose exactly as many weights per row as under uniform sparsity; each one's count is
    as close to its block's sparsity as that allows."""
    blocks = [i for i in range(len(adapter.layers)) if adapter.targets(i)]
    ratios = {}
    for i in blocks:
        linears = [t for t in adapter.targets(i) if t.expert is None]
        with placed(adapter.layers[i], device, adapter.model):
            norms = [act_stats[t.name].norm().to(device) for t in linears]
            ratios[i] = _core.owl_outlier_ratio([t.weight() for t in linears], norms, cfg.owl_m)
    sparsities = dict(zip(blocks, _core.owl_sparsities([ratios[i] for i in blocks], pattern.sparsity, cfg.owl_lambda)))
    by_shape: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    for i in blocks:
        for t in adapter.targets(i):
            rows, in_features = t.weight().shape
            by_shape[(rows, in_features)].append((t.name, i))
    counts = {}
    for (_, in_features), members in by_shape.items():
        total = len(members) * pattern.pruned_per_row(in_features)
        allocated = _core.allocate_pruned_per_row([sparsities[i] for _, i in members], in_features, total)
        counts.update({name: k for (name, _), k in zip(members, allocated)})
    return LayerSparsity(ratios, sparsities, counts)
