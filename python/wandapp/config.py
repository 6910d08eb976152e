"""``PruneConfig``: every setting of the method, documented, validated, serialisable."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from wandapp.errors import InvalidArgumentError, SparsityError

METHODS = ("magnitude", "wanda", "rgs", "wanda++", "sparsegpt", "sparsegpt+ro")
#: Methods that run regional optimization (RO) after pruning.
RO_METHODS = ("wanda++", "sparsegpt+ro")

#: How the sparsity is spread over blocks: the same in every block, or by OWL (unstructured only).
LAYER_SPARSITIES = ("uniform", "owl")

#: Default RO learning rate (where each block's step search starts, if it runs), chosen by measurement on
#: SmolLM2-135M at 2:4 (bench/ro_lr.py, bench/results/ro_lr.md; with 3 rounds instead of 5,
#: bench/results/pareto.md). The paper's 3e-7 barely moves the weights of a small model.
DEFAULT_RO_LR = 3e-4

#: Default number of RO rounds per block: 3 at 3e-4 matched 5 at 1e-4 in perplexity on both
#: held-out texts at 0.7x the time (bench/results/pareto.md); the paper runs 5.
DEFAULT_RO_ROUNDS = 3

#: Values of PruneConfig.ro_lr_search (True and False are taken as "full" and "off").
RO_LR_SEARCH = ("off", "backtrack", "full")

#: Values of PruneConfig.ro_autocast.
RO_AUTOCAST = ("auto", "bfloat16", "off")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity: ``sparsity`` (fraction pruned per row) or ``n``:``m``."""

    sparsity: float
    nm: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else repr(self.sparsity)  # the decimal as written

    def pruned_per_row(self, in_features: int) -> int:
        """Weights a row of ``in_features`` loses, by the core's rule (``kernels.pruned_per_row``)."""
        from wandapp.kernels import pruned_per_row

        return pruned_per_row(in_features, self.sparsity, self.nm)


def parse_sparsity(value: Union[float, str]) -> Pattern:
    """Accepts a float in [0, 1) (unstructured, per output row) or an "N:M" string; a string
    holding a float ("0.5", as from a command line or a config file) counts as the float."""
    if isinstance(value, str) and ":" not in value:
        try:
            value = float(value)
        except ValueError:
            raise SparsityError(f"sparsity {value!r} is neither a float such as 0.5 nor an N:M pattern such as '2:4'") from None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        if not match:
            raise SparsityError(f"sparsity {value!r} is not an N:M pattern; write e.g. '2:4' or a float such as 0.5")
        n, m = int(match[1]), int(match[2])
        if not 1 <= n < m:
            raise SparsityError(f"invalid N:M pattern {n}:{m}: need 1 <= n < m (2:4 keeps 2 of every 4)")
        return Pattern(sparsity=1 - n / m, nm=(n, m))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SparsityError(f"sparsity must be a float in [0, 1) or an 'N:M' string, got {type(value).__name__}")
    if not 0 <= value < 1:
        raise SparsityError(f"sparsity must be in [0, 1), got {value}; use 0.5 for 50% of each row")
    return Pattern(sparsity=float(value))


def parse_method(method: str) -> str:
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return method


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


@dataclass
class PruneConfig:
    r"""Settings of ``wandapp.prune``. Defaults are wandapp's measured choices;
    ``paper`` gives the paper's.

    Attributes:
        alpha: weight of the regional gradient in the RGS score (paper: 100).
        ro_rounds: K, the most rounds of prune -> regional optimization per block (paper: 5;
            wandapp: 3, which at ``ro_lr`` 3e-4 matched 5 rounds at 1e-4 at 0.7x the time);
            for "sparsegpt+ro", rounds of RO after SparseGPT, its masks fixed.
            ``ro_min_improvement`` may end a block's rounds earlier. Fewer rounds cost less and
            prune worse: bench/results/pareto.md.
        ro_samples: M, calibration sequences RO trains on, drawn with ``seed`` (paper: 32);
            None = min(32, the sequences used).
        ro_lr: RMSprop learning rate of RO (paper: 3e-7, tuned for 7B models; wandapp's
            default was measured on SmolLM2-135M, see bench/results/ro_lr.md and
            bench/results/pareto.md: a larger rate with fewer rounds fits the calibration's
            domain better and text unlike it worse). With ``ro_lr_search`` it is the starting
            point of each block's search, which keeps it or scales it by a power of two.
        ro_lr_search: how each block's RO step size is chosen on its held-out sequences.
            "full": the first round's update is scaled by the power of two t in
            [2^-10, 2^6] that minimises the held-out block error (doubling or halving from
            t = 1 while it falls; a few held-out passes per block). "backtrack" (the default):
            a backtracking line search, only halving (while the error falls or stays
            non-finite) and only when the first round at ``ro_lr`` does not lower the held-out
            error, so a rate that works costs no extra
            pass and one too large for the model's weights is scaled down instead of the
            round being lost. Either way the later rounds run at ``ro_lr * t`` and the
            report's ``ro_lr`` gives each block's rate. "off" = ``ro_lr`` everywhere (the
            paper's way). True and False are taken as "full" and "off". Measured on
            SmolLM2-135M (bench/results/pareto.md): "full" took 1.05-1.07x the time of
            "backtrack" (which ran no search pass there) for +0.5% / +1.4% perplexity at 2:4
            (in the calibration's domain / outside it) and -0.3% / -0.3% at 50%.
        ro_holdout: H, the sequences that guard RO: a round that makes their block error worse
            or non-finite is rolled back, and their passes give the activation norms of the next
            re-prune: first the sequences RO does not train on (the calibration's beyond its M),
            then, where fewer than H are left, the first of the training ones (with 16 sequences
            and M = 16, the guard is 4 training sequences). 0 guards on all the training sequences.
            Every round pays up to two passes of H sequences (after RO; before it, after a
            re-prune that changed the masks): on SmolLM2-135M with 16 sequences, 4 guarded as
            well as all 16 (the same perplexities at 2:4, +0.8% / +0.5% at 50%) at 0.76x the
            time in one run and 0.93x in another (bench/results/pareto_goal.md, pareto.md).
        ro_min_improvement: early stopping: a block's rounds end after a round that lowers its
            held-out block error by less than this fraction of the error before the round, or
            that the guard rolled back (the next round would start from the same weights at the
            same rate). 0 (the default, and the paper's way) runs all ``ro_rounds``. The report's ``ro_stop`` says
            per block why its rounds ended, ``ro_steps`` how many RMSprop steps ran.
        ro_extrapolate: after each round but the first, scale the round's update by the power of
            two t >= 1 that minimises the held-out block error (doubling while it falls, one
            held-out pass per doubling tried). Off by default: measured in bench/results/pareto.md.
        ro_autocast: the precision of RO's training forwards and backwards (mixed precision,
            ``torch.autocast``): "bfloat16" runs their matrix products in bfloat16 while the
            weights, the optimizer and every measured error (the targets, the guard, the step
            search, the activation statistics, the next block's inputs) stay float32; "off" runs
            them in the model's dtype (the default, and the paper's way); "auto" is "bfloat16"
            where the device computes it natively (a CUDA GPU with bfloat16 support, a CPU with
            AVX512-BF16 or AMX) and "off" elsewhere. Applies to float32 models only (a bfloat16
            or float16 model trains in its own dtype). Measured on SmolLM2-135M on a CPU with
            AVX512-BF16 (bench/results/pareto.md): 0.84x the default's time at 2:4 and 0.79x
            at 50%, at +0.2% / +0.6% perplexity in the calibration's domain and +2.5% / -0.8%
            outside it. The report's
            ``ro_autocast`` says per block what ran.
        ro_batch_size: calibration sequences per RO step, whose gradients are averaged (the
            paper: 1). None = 1 in one process; under torch.distributed, the number of ranks, so
            that each step takes one sequence per rank and RO runs in parallel (a round then takes
            ``ro_samples / ranks`` steps). Set it to make RO's result independent of the number of
            ranks (up to float summation order); README: several GPUs.
        seed: seeds every random choice (RO sample choice and order).
        nsamples: calibration sequences taken from the loader (paper: 128). None = every
            sequence the loader yields, up to 128 (the report's ``nsamples`` says how many);
            a number asks for exactly that many (CalibrationError if the loader has fewer).
        batch_size: calibration sequences per forward call where the method allows it
            (activation statistics, dense targets, block outputs and error; regional gradients and
            RO steps stay one sequence per backward). Only sequences of one length without padding
            share a batch. None = 1 on CPU; on CUDA as many as fit in half the free device memory
            (estimated from the block's shape), at most 16384 tokens and 64 sequences per call.
            Batching changes float summation order only (README: GPU).
        device: where a block runs; None = the model's device.
        offload: where captured activations wait between blocks; None = CPU when the
            model is on CUDA, else the model's device.
        progress: show a tqdm bar over blocks.
        dense_check: run every calibration sequence through the whole dense model before any
            weight changes, so that a model that overflows on the data (float16 often does) is
            refused up front, naming the block and layer. False: only the replay check's
            sequence (the longest) runs the whole model; the others stop at the first block (of
            each attention type), which saves one forward per sequence and block (wanda then
            costs what the plain algorithm costs: README, what each method costs), and an
            overflow on another sequence is found at its block (that block restored, earlier
            ones pruned: PruneError). layer_sparsity="owl" always runs the whole pass.
        targets: which weight matrices of the decoder blocks to prune, by name, as peft's
            ``target_modules``: a string is a regular expression matched against the whole name,
            a list holds names or name suffixes (``["q_proj", "mlp.experts.down_proj"]``). Names
            are those of ``model.named_modules()``; a fused experts parameter is named
            ``<module>.<parameter>`` (all its experts). None = every linear layer and every fused
            expert parameter of every block; routers, norms, embeddings and the LM head are never
            pruned. An entry that matches nothing is an InvalidArgumentError.
        ignore: names left out of ``targets``, by the same rule (e.g. ``["down_proj"]``, or
            ``r".*\.layers\.0\..*"`` for block 0).
        layer_sparsity: "uniform" (every matrix at ``sparsity``) or "owl" (outlier-weighted
            layer-wise sparsity, Yin et al. 2024, unstructured sparsity only): block l gets
            sparsity - (D_l - mean D), where D is the blocks' outlier ratios (share of Wanda
            scores above ``owl_m`` times their block's mean, on the dense model) scaled to
            [0, 2 x ``owl_lambda``]. Counts per row are rounded so that matrices of one shape
            lose exactly as many weights as under "uniform": the mean sparsity is exact.
        owl_m: OWL's outlier threshold M (OWL's code: 5).
        owl_lambda: OWL's lambda: block sparsities span 2 x lambda from the least to the most
            sparse block, around the mean ``sparsity`` (OWL: 0.08).
    """

    alpha: float = 100.0
    ro_rounds: int = DEFAULT_RO_ROUNDS
    ro_samples: Optional[int] = None
    ro_lr: float = DEFAULT_RO_LR
    ro_lr_search: Union[str, bool] = "backtrack"
    ro_holdout: int = 4
    ro_batch_size: Optional[int] = None
    ro_min_improvement: float = 0.0
    ro_extrapolate: bool = False
    ro_autocast: str = "off"
    seed: int = 0
    nsamples: Optional[int] = None
    batch_size: Optional[int] = None
    device: Union[str, torch.device, None] = None
    offload: Union[str, torch.device, None] = None
    progress: bool = True
    dense_check: bool = True
    targets: Union[str, list[str], None] = None
    ignore: Union[str, list[str], None] = None
    layer_sparsity: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise InvalidArgumentError(f"PruneConfig.{field} {rule}, got {getattr(self, field)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(isinstance(self.alpha, (int, float)) and self.alpha >= 0, "alpha", "must be a number >= 0")
        need(is_int(self.ro_rounds) and self.ro_rounds >= 0, "ro_rounds", "must be an integer >= 0")
        need(self.ro_samples is None or (is_int(self.ro_samples) and self.ro_samples >= 1), "ro_samples", "must be None or an integer >= 1")
        need(isinstance(self.ro_lr, (int, float)) and self.ro_lr > 0, "ro_lr", "must be a number > 0")
        need(is_int(self.ro_holdout) and self.ro_holdout >= 0, "ro_holdout", "must be an integer >= 0")
        need(self.ro_batch_size is None or (is_int(self.ro_batch_size) and self.ro_batch_size >= 1), "ro_batch_size", "must be None or an integer >= 1")
        need(is_int(self.seed) and self.seed >= 0, "seed", "must be an integer >= 0")
        need(self.nsamples is None or (is_int(self.nsamples) and self.nsamples >= 1), "nsamples", "must be None or an integer >= 1")
        need(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1), "batch_size", "must be None or an integer >= 1")
        need(isinstance(self.progress, bool), "progress", "must be True or False")
        if isinstance(self.ro_lr_search, bool):  # the switch it was: True ran the full search
            object.__setattr__(self, "ro_lr_search", "full" if self.ro_lr_search else "off")
        need(self.ro_lr_search in RO_LR_SEARCH, "ro_lr_search", f"must be one of {', '.join(map(repr, RO_LR_SEARCH))}")
        need(isinstance(self.ro_extrapolate, bool), "ro_extrapolate", "must be True or False")
        need(
            isinstance(self.ro_min_improvement, (int, float)) and not isinstance(self.ro_min_improvement, bool) and 0 <= self.ro_min_improvement < 1,
            "ro_min_improvement",
            "must be a number in [0, 1)",
        )
        need(self.ro_autocast in RO_AUTOCAST, "ro_autocast", f"must be one of {', '.join(map(repr, RO_AUTOCAST))}")
        need(isinstance(self.dense_check, bool), "dense_check", "must be True or False")
        need(self.layer_sparsity in LAYER_SPARSITIES, "layer_sparsity", f"must be one of {', '.join(LAYER_SPARSITIES)}")
        need(isinstance(self.owl_m, (int, float)) and self.owl_m > 0, "owl_m", "must be a number > 0")
        need(isinstance(self.owl_lambda, (int, float)) and 0 <= self.owl_lambda < 1, "owl_lambda", "must be a number in [0, 1)")
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if isinstance(value, tuple):
                value = list(value)
                object.__setattr__(self, field, value)
            need(
                value is None or (isinstance(value, str) and _compiles(value)) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
                field,
                "must be None, a regular expression, or a list of module names or name suffixes",
            )
        for field in ("device", "offload"):
            value = getattr(self, field)
            if value is not None:
                try:
                    torch.device(value)
                except (RuntimeError, TypeError):
                    need(False, field, "must be None or a torch device such as 'cpu' or 'cuda:0'")

    @classmethod
    def paper(cls, **overrides: Any) -> "PruneConfig":
        """The paper's settings: alpha 100, K=5 rounds, M=32 one per step, lr 3e-7 (no search), RO in
        the model's dtype, N=128."""
        paper = dict(alpha=100.0, ro_rounds=5, ro_samples=32, ro_lr=3e-7, ro_lr_search="off", ro_autocast="off", ro_batch_size=1, nsamples=128)
        return cls(**{**paper, **overrides})

    def ro_samples_for(self, nsamples: int) -> int:
        """M for a run on ``nsamples`` calibration sequences."""
        return min(32, nsamples) if self.ro_samples is None else self.ro_samples

    def replace(self, **overrides: Any) -> "PruneConfig":
        """A copy with ``overrides`` (field names) replaced; an unknown name is an ``InvalidArgumentError``."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidArgumentError(
                f"unknown PruneConfig field(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (devices as strings), as recorded in ``PruneReport.config``."""
        d = dataclasses.asdict(self)
        for field in ("device", "offload"):
            d[field] = None if d[field] is None else str(d[field])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneConfig":
        """The configuration ``to_dict`` gave (missing fields take their defaults)."""
        return cls().replace(**d)
