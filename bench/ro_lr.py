"""How wandapp's default RO learning rate was chosen: wanda++ perplexity on held-out text for a
grid of learning rates, against wanda, on the embedded SmolLM2-135M at 2:4.

    python bench/ro_lr.py [--nsamples 16 --seqlen 128 --lrs 3e-7,3e-6,1e-5,3e-5,1e-4,3e-4,1e-3]

Writes bench/results/ro_lr.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import Workbench, machine, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--ro-samples", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--lrs", default="3e-7,3e-6,1e-5,3e-5,1e-4,3e-4,1e-3")
    ap.add_argument("--out", default="ro_lr.md", help="file name under bench/results")
    args = ap.parse_args()
    bench = Workbench(args.nsamples, args.seqlen, args.eval_tokens, eval_seqlen=512)
    rows = [("dense", "-", bench.ppl(bench.dense), 0.0, "-")]
    ppl, sec, _, _ = bench.run("wanda", "2:4")
    rows.append(("wanda", "-", ppl, sec, "-"))
    for lr in [float(x) for x in args.lrs.split(",")]:
        ppl, sec, report, _ = bench.run("wanda++", "2:4", ro_lr=lr, ro_samples=args.ro_samples, ro_holdout=4)
        rolled = sum(sum(b.ro_rolled_back) for b in report.blocks)
        rows.append(("wanda++", f"{lr:g}", ppl, sec, f"{rolled}/{5 * len(report.blocks)}"))
        print(rows[-1], flush=True)
    lines = [
        "# RO learning rate grid (SmolLM2-135M, 2:4)",
        "",
        f"Command: `python bench/ro_lr.py --nsamples {args.nsamples} --seqlen {args.seqlen} --ro-samples {args.ro_samples} "
        f"--eval-tokens {args.eval_tokens} --lrs {args.lrs} --out {args.out}`",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion (seed 0); evaluation: first "
        f"{args.eval_tokens} tokens of Northanger Abbey in windows of 512, float32. Machine: {machine()}.",
        "",
        "| method | ro_lr | perplexity | prune seconds | RO rounds rolled back |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {lr} | {p:.2f} | {s:.0f} | {rb} |" for m, lr, p, s, rb in rows]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
