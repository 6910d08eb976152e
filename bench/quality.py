"""Quality grid on the embedded SmolLM2-135M: dense, every method, and the variants in VARIANTS
(RO with the full per-block step search instead of backtracking, RO at the constant rate; the RO
default before issue 24, 5 rounds searched from 1e-4; OWL layer-wise sparsity) at
50% unstructured, 4:8 and 2:4. Perplexity on two held-out texts (Northanger Abbey, the
calibration's domain: calibration on Persuasion; and the Python language reference, out of it),
pruning seconds and peak memory, side by side.

    python bench/quality.py                   # small, CPU-friendly defaults
    python bench/quality.py --paper           # the paper's 128 x 2048 calibration
    python bench/quality.py --methods "wanda++,wanda++ full search" --out quality_ro_lr.md

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
#: name -> (method, PruneConfig overrides); OWL applies to unstructured sparsity only.
VARIANTS = {
    "wanda++ full search": ("wanda++", dict(ro_lr_search="full")),
    "sparsegpt+ro full search": ("sparsegpt+ro", dict(ro_lr_search="full")),
    "wanda++ no search": ("wanda++", dict(ro_lr_search="off")),
    "wanda++ K=5 lr=1e-4": ("wanda++", dict(ro_rounds=5, ro_lr=1e-4, ro_lr_search="full")),
    "wanda owl": ("wanda", dict(layer_sparsity="owl")),
    "wanda++ owl": ("wanda++", dict(layer_sparsity="owl")),
    "sparsegpt owl": ("sparsegpt", dict(layer_sparsity="owl")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--paper", action="store_true", help="128 x 2048 calibration, as in the paper")
    ap.add_argument("--methods", default=",".join([*METHODS, *VARIANTS]), help="comma-separated subset of " + ",".join([*METHODS, *VARIANTS]))
    ap.add_argument("--out", default="quality.md", help="file name under bench/results")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated sparsities, e.g. 0.7 or 0.5,2:4")
    args = ap.parse_args()
    methods = args.methods.split(",")
    patterns = args.patterns.split(",")
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if unknown:
        ap.error(f"unknown methods {unknown}")
    if args.paper:
        args.nsamples, args.seqlen = 128, 2048
    bench = Workbench(args.nsamples, args.seqlen, args.eval_tokens, eval_seqlen=512)
    dense = (bench.ppl(bench.dense), bench.ppl(bench.dense, bench.second_ids))
    table: dict[str, dict[str, tuple[float, float, float, float]]] = {m: {} for m in methods}
    for pattern in patterns:
        sparsity = float(pattern) if "." in pattern else pattern
        for method in methods:
            name, overrides = VARIANTS.get(method, (method, {}))
            if overrides.get("layer_sparsity") == "owl" and ":" in pattern:
                continue
            ppl, sec, report, model = bench.run(name, sparsity, **overrides)
            second = bench.ppl(model, bench.second_ids)
            peak = max(b.peak_memory_bytes for b in report.blocks) / 2**20
            table[method][pattern] = (ppl, second, sec, peak)
            print(f"{method:>12} {pattern:>4}: perplexity {ppl:8.2f} / {second:8.2f}  {sec:6.0f} s  peak {peak:6.0f} MiB", flush=True)

    command = "python bench/quality.py" + (" --paper" if args.paper else f" --nsamples {args.nsamples} --seqlen {args.seqlen}") + f" --eval-tokens {args.eval_tokens}"
    if args.methods != ",".join([*METHODS, *VARIANTS]):
        command += f' --methods "{args.methods}"'
    if args.out != "quality.md":
        command += f" --out {args.out}"
    if patterns != PATTERNS:
        command += f" --patterns {args.patterns}"
    header = "| method | " + " | ".join(f"{p} ppl A | {p} ppl B | {p} s" for p in patterns) + " |"
    lines = [
        "# Quality grid: SmolLM2-135M-Instruct (float32, CPU)",
        "",
        f"Command: `{command}`",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion (seed 0). Evaluation (windows of 512, "
        f"float32): A = the first {args.eval_tokens} tokens of Northanger Abbey (the calibration's domain); B = the "
        f"first {args.eval_tokens} tokens of {SECOND_TEXT} (out of it). Seconds: pruning only, the runs one after "
        "another in one process. wandapp defaults otherwise (see `wandapp.PruneConfig`). Peak memory is the "
        "process's peak RSS. Variants: `full search` scales each block's first RO round by the best power of two "
        "(`ro_lr_search=\"full\"`, the default before the backtracking one); `no search` runs RO at the constant "
        "`ro_lr` (`ro_lr_search=\"off\"`); `K=5 lr=1e-4` is the RO default before issue 24 (5 rounds, the full "
        "search starting at 1e-4); "
        "`owl` is `layer_sparsity=\"owl\"` (unstructured only, `-` for N:M).",
        f"Machine: {machine()}.",
        "",
        header,
        "|---|" + "---|---|---|" * len(patterns),
        "| dense | " + " | ".join(f"{dense[0]:.2f} | {dense[1]:.2f} | -" for _ in patterns) + " |",
    ]
    for method in methods:
        cells = [
            f"{table[method][p][0]:.2f} | {table[method][p][1]:.2f} | {table[method][p][2]:.0f}" if p in table[method] else "- | - | -"
            for p in patterns
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    peak = max(v[3] for row in table.values() for v in row.values())
    lines += ["", f"Peak RSS over the whole run: {peak:.0f} MiB."]
    write_results(args.out, lines)
    if args.out == "quality.md" and patterns == PATTERNS:
        chart({m: row for m, row in table.items() if len(row) == len(PATTERNS)}, dense[0], os.path.join(RESULTS, "quality.png"))


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
