"""Quality grid on the embedded SmolLM2-135M: dense, magnitude, wanda, rgs, wanda++, sparsegpt
and sparsegpt+ro at 50% unstructured, 4:8 and 2:4. Perplexity on two held-out texts (Northanger
Abbey, the calibration's domain: calibration on Persuasion; and the Python language reference, out
of it), pruning seconds and peak memory, side by side.

    python bench/quality.py                   # small, CPU-friendly defaults
    python bench/quality.py --paper           # the paper's 128 x 2048 calibration

Writes bench/results/quality.md and bench/results/quality.png.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, SECOND_TEXT, Workbench, machine, write_results  # noqa: E402

PATTERNS = ["0.5", "4:8", "2:4"]
METHODS = ["magnitude", "wanda", "rgs", "wanda++", "sparsegpt", "sparsegpt+ro"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--paper", action="store_true", help="128 x 2048 calibration, as in the paper")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = ap.parse_args()
    methods = args.methods.split(",")
    if args.paper:
        args.nsamples, args.seqlen = 128, 2048
    bench = Workbench(args.nsamples, args.seqlen, args.eval_tokens, eval_seqlen=512)
    dense = (bench.ppl(bench.dense), bench.ppl(bench.dense, bench.second_ids))
    table: dict[str, dict[str, tuple[float, float, float, float]]] = {m: {} for m in methods}
    for pattern in PATTERNS:
        sparsity = float(pattern) if "." in pattern else pattern
        for method in methods:
            ppl, sec, report, model = bench.run(method, sparsity)
            second = bench.ppl(model, bench.second_ids)
            peak = max(b.peak_memory_bytes for b in report.blocks) / 2**20
            table[method][pattern] = (ppl, second, sec, peak)
            print(f"{method:>12} {pattern:>4}: perplexity {ppl:8.2f} / {second:8.2f}  {sec:6.0f} s  peak {peak:6.0f} MiB", flush=True)

    command = "python bench/quality.py" + (" --paper" if args.paper else f" --nsamples {args.nsamples} --seqlen {args.seqlen}") + f" --eval-tokens {args.eval_tokens}"
    header = "| method | " + " | ".join(f"{p} ppl A | {p} ppl B | {p} s" for p in PATTERNS) + " |"
    lines = [
        "# Quality grid: SmolLM2-135M-Instruct (float32, CPU)",
        "",
        f"Command: `{command}`",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion (seed 0). Evaluation (windows of 512, "
        f"float32): A = the first {args.eval_tokens} tokens of Northanger Abbey (the calibration's domain); B = the "
        f"first {args.eval_tokens} tokens of {SECOND_TEXT} (out of it). Seconds: pruning only, the runs one after "
        "another in one process. wandapp defaults otherwise (see `wandapp.PruneConfig`). Peak memory is the "
        "process's peak RSS.",
        f"Machine: {machine()}.",
        "",
        header,
        "|---|" + "---|---|---|" * len(PATTERNS),
        "| dense | " + " | ".join(f"{dense[0]:.2f} | {dense[1]:.2f} | -" for _ in PATTERNS) + " |",
    ]
    for method in methods:
        lines.append(
            f"| {method} | " + " | ".join(f"{table[method][p][0]:.2f} | {table[method][p][1]:.2f} | {table[method][p][2]:.0f}" for p in PATTERNS) + " |"
        )
    peak = max(v[3] for row in table.values() for v in row.values())
    lines += ["", f"Peak RSS over the whole run: {peak:.0f} MiB."]
    write_results("quality.md", lines)
    chart(table, dense[0], os.path.join(RESULTS, "quality.png"))


def chart(table, dense: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(PATTERNS))
    width = 0.8 / len(table)
    for i, method in enumerate(table):
        ax.bar(x + (i - (len(table) - 1) / 2) * width, [table[method][p][0] for p in PATTERNS], width, label=method)
    ax.axhline(dense, color="k", linestyle="--", label=f"dense {dense:.1f}")
    ax.set_xticks(x, ["50%" if p == "0.5" else p for p in PATTERNS])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity on Northanger Abbey (log scale)")
    ax.set_title("SmolLM2-135M: pruning methods compared")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
