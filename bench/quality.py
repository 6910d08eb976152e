"""Quality grid on the embedded SmolLM2-135M: dense, magnitude, wanda, rgs, wanda++ at 50%
unstructured, 4:8 and 2:4. Perplexity on held-out text (Northanger Abbey; calibration on
Persuasion), pruning seconds and peak memory.

    python bench/quality.py                   # small, CPU-friendly defaults
    python bench/quality.py --paper           # the paper's 128 x 2048 calibration

Writes bench/results/quality.md and bench/results/quality.png.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, Workbench, machine, write_results  # noqa: E402

PATTERNS = ["0.5", "4:8", "2:4"]
METHODS = ["magnitude", "wanda", "rgs", "wanda++"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--paper", action="store_true", help="128 x 2048 calibration, as in the paper")
    args = ap.parse_args()
    if args.paper:
        args.nsamples, args.seqlen = 128, 2048
    bench = Workbench(args.nsamples, args.seqlen, args.eval_tokens, eval_seqlen=512)
    dense = bench.ppl(bench.dense)
    table: dict[str, dict[str, tuple[float, float, float]]] = {m: {} for m in METHODS}
    for pattern in PATTERNS:
        sparsity = float(pattern) if "." in pattern else pattern
        for method in METHODS:
            ppl, sec, report = bench.run(method, sparsity)
            peak = max(b.peak_memory_bytes for b in report.blocks) / 2**20
            table[method][pattern] = (ppl, sec, peak)
            print(f"{method:>10} {pattern:>4}: perplexity {ppl:8.2f}  {sec:6.0f} s  peak {peak:6.0f} MiB", flush=True)

    command = "python bench/quality.py" + (" --paper" if args.paper else f" --nsamples {args.nsamples} --seqlen {args.seqlen}") + f" --eval-tokens {args.eval_tokens}"
    header = "| method | " + " | ".join(f"{p} ppl | {p} s" for p in PATTERNS) + " |"
    lines = [
        "# Quality grid: SmolLM2-135M-Instruct (float32, CPU)",
        "",
        f"Command: `{command}`",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion (seed 0). Evaluation: the first "
        f"{args.eval_tokens} tokens of Northanger Abbey, windows of 512, float32. wandapp defaults otherwise "
        "(see `wandapp.PruneConfig`). Peak memory is the process's peak RSS.",
        f"Machine: {machine()}.",
        "",
        header,
        "|---|" + "---|---|" * len(PATTERNS),
        f"| dense | " + " | ".join(f"{dense:.2f} | -" for _ in PATTERNS) + " |",
    ]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(f"{table[method][p][0]:.2f} | {table[method][p][1]:.0f}" for p in PATTERNS) + " |")
    peak = max(v[2] for row in table.values() for v in row.values())
    lines += ["", f"Peak RSS over the whole run: {peak:.0f} MiB."]
    write_results("quality.md", lines)
    chart(table, dense, os.path.join(RESULTS, "quality.png"))


def chart(table, dense: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(PATTERNS))
    width = 0.2
    for i, method in enumerate(METHODS):
        ax.bar(x + (i - 1.5) * width, [table[method][p][0] for p in PATTERNS], width, label=method)
    ax.axhline(dense, color="k", linestyle="--", label=f"dense {dense:.1f}")
    ax.set_xticks(x, ["50%" if p == "0.5" else p for p in PATTERNS])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (held-out, log scale)")
    ax.set_title("SmolLM2-135M: pruning methods compared")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
