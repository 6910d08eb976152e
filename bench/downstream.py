"""Downstream accuracy of pruned models: dense, magnitude, wanda, sparsegpt and wanda++ at 50% and
2:4 on the embedded SmolLM2-135M, zero-shot on wandapp's offline lm-evaluation-harness tasks
(austen_next_sentence, austen_last_word; built from Northanger Abbey, python/wandapp/data/tasks),
with perplexity beside, in one run.

    python bench/downstream.py               # everything: about 1 h 45 min on 2 idle CPU cores (9 evaluations of
                                             # about 10 min, 17 CPU-minutes each; pruning about 13 min)
    python bench/downstream.py --limit 100   # about 1 h
    python bench/downstream.py --limit 20 --methods magnitude,wanda --patterns 2:4 --out downstream_smoke.md

Calibration: 16 x 128 tokens of Persuasion (seed 0), as bench/quality.py. Perplexity: Northanger
Abbey, windows of 512 (--eval-tokens). Accuracy: wandapp.eval.tasks (the harness's numbers and
standard errors; --limit items per task, the first of each task's seeded-random order). Writes
bench/results/downstream.md (table) and bench/results/downstream.png (chart, with matplotlib).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, Workbench, machine, write_results  # noqa: E402

from wandapp.eval import OFFLINE_TASKS, TaskResults, tasks  # noqa: E402

PATTERNS = ["0.5", "2:4"]
METHODS = ["magnitude", "wanda", "sparsegpt", "wanda++"]
#: (task, metric) columns of the table and the chart
COLUMNS = [(OFFLINE_TASKS[0], "acc"), (OFFLINE_TASKS[0], "acc_norm"), (OFFLINE_TASKS[1], "acc")]


def cell(result: TaskResults, task: str, metric: str) -> str:
    se = result.stderr(task, metric)
    return f"{result.value(task, metric):.3f}" + ("" if se is None else f" ± {se:.3f}")


def chart(rows: list[tuple[str, float, TaskResults]], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no chart")
        return None
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4.2 * len(COLUMNS), 3.8), sharey=False)
    names = [r[0] for r in rows]
    for ax, (task, metric) in zip(axes, COLUMNS):
        values = [r[2].value(task, metric) for r in rows]
        errors = [r[2].stderr(task, metric) or 0 for r in rows]
        ax.barh(names, values, xerr=errors, color="#69c", capsize=2)
        chance = rows[0][2].chance.get(task, {}).get(metric)
        if chance is not None:
            ax.axvline(chance, color="#c66", linestyle="--", label=f"chance {chance:.2f}")
            ax.legend(loc="lower right", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{task}\n{metric} (± stderr)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated sparsities, e.g. 0.5,2:4")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all 200)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=None, help="task requests per forward call (default 8)")
    ap.add_argument("--out", default="downstream.md", help="file name under bench/results (the chart: same name, .png)")
    args = ap.parse_args()
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}")
    bench = Workbench(args.nsamples, args.seqlen, args.eval_tokens, eval_seqlen=512)

    def accuracy(model) -> TaskResults:
        return tasks(model, bench.tokenizer, list(OFFLINE_TASKS), limit=args.limit, batch_size=args.batch_size)

    start = time.perf_counter()
    rows: list[tuple[str, float, TaskResults]] = [("dense", bench.ppl(bench.dense), accuracy(bench.dense))]
    print(rows[0][2], flush=True)
    for pattern in patterns:
        sparsity = float(pattern) if "." in pattern else pattern
        for method in methods:
            ppl, seconds, _, model = bench.run(method, sparsity)
            rows.append((f"{method} {pattern}", ppl, accuracy(model)))
            print(f"{method} {pattern}: perplexity {ppl:.2f}, pruned in {seconds:.0f} s\n{rows[-1][2]}", flush=True)
    minutes = (time.perf_counter() - start) / 60

    command = "python bench/downstream.py" + "".join(
        f" --{flag.replace('_', '-')} {value}" for flag, value in vars(args).items() if value != ap.get_default(flag)
    )
    first = rows[0][2]
    header = "| model | perplexity | " + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " |"
    chance = "| chance | - | " + " | ".join(f"{first.chance.get(t, {}).get(m, float('nan')):.3f}" for t, m in COLUMNS) + " |"
    lines = [
        "# Downstream accuracy: SmolLM2-135M-Instruct pruned (float32, CPU)",
        "",
        f"Command: `{command}` ({minutes:.0f} min on {machine()})",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion (seed 0). Perplexity: the first "
        f"{args.eval_tokens} tokens of Northanger Abbey (windows of 512). Accuracy: {first.header()}; items per task: "
        f"{first.samples}; value ± the harness's standard error. Compare two models only where their difference "
        "exceeds the standard errors.",
        "",
        header,
        "|" + "---|" * (2 + len(COLUMNS)),
        chance,
        *(f"| {name} | {ppl:.2f} | " + " | ".join(cell(r, t, m) for t, m in COLUMNS) + " |" for name, ppl, r in rows),
        "",
        f"`{OFFLINE_TASKS[1]}` perplexity (of the final word): "
        + ", ".join(f"{name} {r.value(OFFLINE_TASKS[1], 'perplexity'):.1f}" for name, _, r in rows),
    ]
    write_results(args.out, lines)
    png = chart(rows, os.path.join(RESULTS, os.path.splitext(args.out)[0] + ".png"))
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
