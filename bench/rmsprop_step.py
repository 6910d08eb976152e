"""RO's masked RMSprop step, element-wise work only, on the shapes of one SmolLM2-135M block: the
formulation wandapp used before (a boolean ``masked_fill_`` on the weights after every step, the
square root of the raw square average, fresh tensors for every intermediate) against today's
(src/ro.rs ``MaskedRmsprop``: the gradient multiplied by a float keep-mask, the square average
raised to 1e-32 before its root, scratch allocated once per round), side by side in one run, and
whether both leave bit-identical weights. Both are tensor-op steps, the one CUDA and non-float32
CPU weights take; float32 CPU weights now take one Rust loop over memory instead
(src/ro.rs ``fused_cpu_step``), measured end to end by ``python bench/schedule.py
--only-paper-ratio`` (docs/methods.md, What each method costs).

    python bench/rmsprop_step.py [--steps 32] [--repeats 5]

Writes bench/results/rmsprop_step.md. On a CPU, a fresh tensor of a weight's size costs a page
fault per 4 KiB, and ``masked_fill_`` with a random boolean mask and ``sqrt`` of zeros or subnormals
are many times slower than the arithmetic around them; RO runs this
step once per training sequence and round (160 times per block at the paper's M = 32, K = 5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_results  # noqa: E402

ALPHA, EPS, LR, FLOOR = 0.99, 1e-8, 3e-4, 1e-32
#: q, k, v, o, gate, up, down of SmolLM2-135M ([out, in]).
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def before(w: torch.Tensor, master: torch.Tensor, avg: torch.Tensor, g: torch.Tensor, pruned: torch.Tensor) -> None:
    avg.mul_(ALPHA).addcmul_(g, g * (1 - ALPHA))
    denom = avg.sqrt().add_(EPS)
    master.addcdiv_(g * -LR, denom).masked_fill_(pruned, 0.0)
    w.copy_(master)


def today(w: torch.Tensor, avg: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, g: torch.Tensor, denom: torch.Tensor) -> None:
    """``g`` and ``denom``: scratch of the weight's shape, allocated once per round."""
    torch.mul(grad, keep, out=g)
    torch.mul(g, 1 - ALPHA, out=denom)
    avg.mul_(ALPHA).addcmul_(g, denom)
    torch.clamp_min(avg, FLOOR, out=denom).sqrt_().add_(EPS)
    w.addcdiv_(g.mul_(-LR), denom)


def run(steps: int, seed: int) -> tuple[float, float, bool]:
    """Seconds per step (before, today) over ``steps`` steps of every weight, and whether the
    weights end bit-identical (today's once-per-round ``masked_fill_`` included)."""
    gen = torch.Generator().manual_seed(seed)
    weights, masks = [], []
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen) * 0.02
        groups = w.abs().view(shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True).view(shape)
        weights.append(w * keep)
        masks.append(keep)
    # Gradients of the size RO sees on SmolLM2-135M (median |g| 1e-5 to 2e-3 by block).
    grads = [[torch.randn(s, generator=gen) * 1e-5 for s in SHAPES] for _ in range(steps)]
    old = [w.clone() for w in weights]
    masters = [w.clone() for w in weights]
    new = [w.clone() for w in weights]
    avg_old = [torch.zeros_like(w) for w in weights]
    avg_new = [torch.zeros_like(w) for w in weights]
    pruned = [m.logical_not() for m in masks]
    keep = [m.float() for m in masks]
    scratch = [(torch.empty_like(w), torch.empty_like(w)) for w in weights]
    start = time.perf_counter()
    for step in grads:
        for k, g in enumerate(step):
            before(old[k], masters[k], avg_old[k], g, pruned[k])
    t_before = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for step in grads:
        for k, g in enumerate(step):
            today(new[k], avg_new[k], g, keep[k], *scratch[k])
    for w, p in zip(new, pruned):
        w.masked_fill_(p, 0.0)
    t_today = (time.perf_counter() - start) / steps
    return t_before, t_today, all(torch.equal(a, b) for a, b in zip(old, new))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=32, help="RMSprop steps per repeat (one round at M = 32)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    runs = [run(args.steps, seed) for seed in range(args.repeats)]
    t_before = statistics.median(r[0] for r in runs)
    t_today = statistics.median(r[1] for r in runs)
    write_results("rmsprop_step.md", [
        "# RO's masked RMSprop step: element-wise work per step, one SmolLM2-135M block (float32, CPU)",
        "",
        f"Command: `python bench/rmsprop_step.py --steps {args.steps} --repeats {args.repeats}`",
        f"Seven weights (3.5 M entries) at 2:4, gradients N(0, 1e-5^2). Median over {args.repeats} repeats "
        f"of {args.steps} steps, side by side in one process. Machine: {machine()}.",
        "",
        "| step | ms per step |",
        "|---|---|",
        f"| before (masked_fill_ on the weights every step, sqrt of the raw average) | {t_before * 1e3:.2f} |",
        f"| today (gradient x float keep-mask, average raised to {FLOOR:g} before sqrt, no allocation) | {t_today * 1e3:.2f} |",
        f"| ratio today / before | {t_today / t_before:.2f} |",
        "",
        f"Weights bit-identical after every repeat: {'yes' if all(r[2] for r in runs) else 'NO'}.",
    ])


if __name__ == "__main__":
    main()
