"""``PruneReport``: what pruning did, per block and per linear layer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from wandapp._optional import require


@dataclass
class LayerReport:
    shape: list[int]
    #: The measured fraction of zeros of the weight after pruning (the mask is ``weight != 0``).
    sparsity: float
    mask_hash: str  # wandapp.kernels.mask_hash: sha256 of shape + packed bits
    pruned_per_row: int  # what the sparsity asks of every row (Pattern.pruned_per_row, or OWL's count), which selection prunes
    #: Scored by magnitude because no calibration token reached it (an expert its router never chose).
    magnitude_fallback: bool = False
    #: Weights the method kept that are exactly zero (already zero in the dense model, or set to
    #: zero by SparseGPT's update or RO): the layer has this many zeros beyond ``pruned_per_row``
    #: x rows, and its mask (``weight != 0``) marks them pruned.
    extra_zeros: int = 0


@dataclass
class BlockReport:
    index: int
    status: str  # "pruned", "untouched", "restored" (failed and rolled back) or "skipped" (targets/ignore select nothing in it)
    layers: dict[str, LayerReport] = field(default_factory=dict)
    #: block-output MSE vs the dense block after the first prune, before RO: with RO, on its
    #: held-out sequences (PruneConfig.ro_holdout; the pass over the others would serve only this
    #: number); without RO, mse_final
    mse_before_ro: float | None = None
    #: with RO: the block-output MSE after the final prune on the same held-out sequences (compare
    #: it with mse_before_ro for what RO and the re-prunes gained); None without RO
    holdout_mse_final: float | None = None
    mse_final: float | None = None  # block-output MSE after the final prune, over every calibration sequence
    ro_losses: list[float] = field(default_factory=list)  # mean RO loss of each round
    ro_rolled_back: list[bool] = field(default_factory=list)
    ro_lr: float | None = None  # RO's learning rate after the first round (its step search, PruneConfig.ro_lr_search)
    ro_steps: int = 0  # RMSprop steps over all rounds
    #: why RO's rounds ended: "rounds" (all PruneConfig.ro_rounds ran), "converged" (a round lowered the
    #: held-out error by less than PruneConfig.ro_min_improvement) or "rolled back" (a round was undone); None without RO
    ro_stop: str | None = None
    #: the dtype RO's training forwards ran in under torch.autocast (PruneConfig.ro_autocast), e.g.
    #: "bfloat16"; None: the weights' own dtype, or no RO
    ro_autocast: str | None = None
    outlier_ratio: float | None = None  # layer_sparsity="owl": share of Wanda scores above owl_m x the block's mean
    target_sparsity: float | None = None  # layer_sparsity="owl": the sparsity OWL gave the block (before rounding)
    seconds: float = 0.0
    peak_memory_bytes: int = 0  # CUDA: max_memory_allocated in this block; CPU: process peak RSS


@dataclass
class PruneReport:
    """Returned by ``wandapp.prune``. ``print(report)`` shows a table, ``to_dict()`` is
    JSON-serialisable, ``masks`` gives {module name: bool keep-mask}."""

    model: str
    method: str
    sparsity: str
    config: dict[str, Any]
    nsamples: int
    device: str
    blocks: list[BlockReport] = field(default_factory=list)
    #: prune_checkpoint: the folder its masks were written to, block by block, and read from.
    masks_folder: str | None = None
    _packed: dict[str, tuple[list[int], np.ndarray]] = field(default_factory=dict, repr=False)

    # -- building -----------------------------------------------------------------------
    def record_masks(
        self, names: list[str], masks: list[torch.Tensor], pruned_per_row: list[int], fallback: list[bool], extra_zeros: list[int] | None = None
    ) -> dict[str, LayerReport]:
        """Records each matrix's mask, which must be ``weight != 0`` of the pruned weight (so that
        the sparsity and the mask describe the weights as they are), and its ``extra_zeros``."""
        from wandapp.kernels import mask_hash

        layers = {}
        for k, (name, mask, count, by_magnitude) in enumerate(zip(names, masks, pruned_per_row, fallback)):
            cpu = mask.detach().to("cpu")
            self._packed[name] = (list(cpu.shape), np.packbits(cpu.numpy().reshape(-1)))
            layers[name] = LayerReport(
                list(cpu.shape), 1.0 - cpu.float().mean().item(), mask_hash(cpu), count, by_magnitude, extra_zeros[k] if extra_zeros else 0
            )
        return layers

    def take_masks(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The masks of ``names``, which the report then stops holding (they are kept in
        ``masks_folder``)."""
        masks = self.masks_of(names)
        for name in names:
            del self._packed[name]
        return masks

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneReport":
        """The report ``to_dict`` described (without masks held in memory)."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "blocks"}
        blocks = [
            BlockReport(**{**b, "layers": {name: LayerReport(**layer) for name, layer in b["layers"].items()}}) for b in d["blocks"]
        ]
        return cls(**fields, blocks=blocks)

    # -- reading ------------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{name: bool keep-mask [out, in] on CPU} of pruned matrices: a module name (as in
        ``model.named_modules()``), or ``<module>.<parameter>[<expert>]`` for an expert's slice
        of a fused experts parameter. prune_checkpoint's are read from ``masks_folder``."""
        out = {}
        if self.masks_folder is not None:
            from wandapp.masks import load_masks

            out.update(load_masks(self.masks_folder))
        out.update(self.masks_of(list(self._packed)))
        return out

    def masks_of(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The keep-masks (bool, True = kept) of the named layers, unpacked from the report's bits."""
        out = {}
        for name in names:
            shape, packed = self._packed[name]
            bits = np.unpackbits(packed, count=int(np.prod(shape))).astype(bool)
            out[name] = torch.from_numpy(bits).reshape(shape)
        return out

    @property
    def magnitude_fallbacks(self) -> list[str]:
        """Matrices scored by magnitude because no calibration token reached them (experts)."""
        return [name for b in self.blocks for name, l in b.layers.items() if l.magnitude_fallback]

    @property
    def extra_zeros(self) -> dict[str, int]:
        """{matrix: kept weights that are exactly zero} for the matrices that have any: their
        sparsity exceeds what was asked by that many weights (LayerReport.extra_zeros)."""
        return {name: l.extra_zeros for b in self.blocks for name, l in b.layers.items() if l.extra_zeros}

    @property
    def pruned_blocks(self) -> list[int]:
        return [b.index for b in self.blocks if b.status == "pruned"]

    @property
    def seconds(self) -> float:
        return sum(b.seconds for b in self.blocks)

    @property
    def achieved_sparsity(self) -> float:
        """Zeros over all pruned weights, as measured (the masks are ``weight != 0``)."""
        total = sum(int(np.prod(l.shape)) for b in self.blocks for l in b.layers.values())
        zeros = sum(l.sparsity * int(np.prod(l.shape)) for b in self.blocks for l in b.layers.values())
        return zeros / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready dicts: configuration, seed, per block and layer (masks excluded)."""
        d = {k: v for k, v in asdict(self).items() if k != "_packed"}
        d["seed"] = self.config.get("seed")
        d["achieved_sparsity"] = self.achieved_sparsity
        d["seconds"] = self.seconds
        return d

    def to_json(self, path: str | None = None) -> str:
        """``to_dict`` as indented JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def __str__(self) -> str:
        head = (
            f"PruneReport: {self.model}, method={self.method}, sparsity={self.sparsity}, "
            f"nsamples={self.nsamples}, seed={self.config.get('seed')}, device={self.device}\n"
            f"{'block':>5} {'status':>9} {'sparsity':>8} {'held-out mse before RO -> final':>31} {'mse final':>10} "
            f"{'RO rounds (rolled back), stop':>31} {'seconds':>8} {'peak MiB':>9}"
        )
        rows = [head]
        for b in self.blocks:
            sp = np.mean([l.sparsity for l in b.layers.values()]) if b.layers else float("nan")
            fmt = lambda v: "-" if v is None else f"{v:.3e}"  # noqa: E731
            ro = f"{len(b.ro_losses)} ({sum(b.ro_rolled_back)}), {b.ro_stop}" if b.ro_stop else "-"
            held = f"{fmt(b.mse_before_ro)} -> {fmt(b.holdout_mse_final)}" if b.holdout_mse_final is not None else "-"
            rows.append(
                f"{b.index:>5} {b.status:>9} {sp:>8.4f} {held:>31} {fmt(b.mse_final):>10} "
                f"{ro:>31} {b.seconds:>8.1f} {b.peak_memory_bytes / 2**20:>9.0f}"
            )
        matrices = sum(len(b.layers) for b in self.blocks)
        rows.append(
            f"total: {len(self.pruned_blocks)}/{len(self.blocks)} blocks pruned ({matrices} weight matrices), "
            f"sparsity {self.achieved_sparsity:.4f}, {self.seconds:.1f} s"
        )
        if self.magnitude_fallbacks:
            rows.append(
                f"{len(self.magnitude_fallbacks)} experts received no calibration token and were pruned by magnitude "
                f"(e.g. {self.magnitude_fallbacks[0]}); see report.magnitude_fallbacks"
            )
        if self.extra_zeros:
            name, count = next(iter(self.extra_zeros.items()))
            rows.append(
                f"{len(self.extra_zeros)} matrices hold zeros beyond the pattern asked for: weights kept by the method that are "
                f"exactly zero (e.g. {count} in {name}); see report.extra_zeros"
            )
        return "\n".join(rows)

    def plot(self, path: str | None = None) -> Any:
        """Per-block MSE against the dense block after the final prune over every calibration
        sequence and, for a method with RO, on RO's held-out sequences before RO and after the
        final prune (needs matplotlib). Returns the figure; saves it when ``path`` is given."""
        matplotlib = require("matplotlib", "PruneReport.plot")
        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pruned = [b for b in self.blocks if b.status == "pruned"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        held = [b for b in pruned if b.holdout_mse_final is not None]
        if held:
            ax.semilogy([b.index for b in held], [b.mse_before_ro for b in held], "o--", label="held-out, before RO")
            ax.semilogy([b.index for b in held], [b.holdout_mse_final for b in held], "s--", label="held-out, after final prune")
        ax.semilogy([b.index for b in pruned], [b.mse_final for b in pruned], "s-", label="all sequences, after final prune")
        ax.set_xlabel("block")
        ax.set_ylabel("output MSE vs dense block")
        ax.set_title(f"{self.model}: {self.method} at {self.sparsity}")
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
