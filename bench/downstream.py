"""Downstream accuracy of pruned models: dense, magnitude, wanda, sparsegpt and wanda++ at 50% and
2:4 on the embedded SmolLM2-135M, zero-shot on wandapp's offline lm-evaluation-harness tasks
(austen_next_sentence, austen_last_word; built from Northanger Abbey, python/wandapp/data/tasks),
with perplexity beside, in one run.

    python bench/downstream.py               # everything: 64 min on the 2-core machine (9 evaluations of 3 to 7
                                             # min, 200 items per task; pruning about 21 min, wanda++ 3 to 8)
    python bench/downstream.py --limit 100   # about half the evaluation time
    python bench/downstream.py --limit 20 --methods magnitude,wanda --patterns 2:4 --out downstream_smoke.md
    python bench/downstream.py --compare-only downstream.md   # redo the Wanda++ vs Wanda lines and the chart of a table

Calibration: 16 x 128 tokens of Persuasion (seed 0), as bench/quality.py. Perplexity: Northanger
Abbey, windows of 512 (--eval-tokens). Accuracy: wandapp.eval.tasks (the harness's numbers and
standard errors; --limit items per task, the first of each task's seeded-random order). Writes
bench/results/downstream.md (table) and bench/results/downstream.png (chart, with matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import re
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


#: {model: {(task, metric): (value, standard error or None)}}
Cells = dict[str, dict[tuple[str, str], tuple[float, float | None]]]

COMPARISON_HEADER = "Wanda++ against Wanda"


def comparison(cells: Cells) -> list[str]:
    """Wanda++ minus Wanda at each pattern in the table, per column, in units of the difference's
    standard error sqrt(se_wanda++^2 + se_wanda^2) (the two models' errors as independent; both see
    the same items, so this overstates the noise of the difference)."""
    lines = ["", f"{COMPARISON_HEADER} (difference, and the difference over sqrt(se_wanda++^2 + se_wanda^2)):"]
    for name in cells:
        if not name.startswith("wanda++ ") or f"wanda {name[8:]}" not in cells:
            continue
        ours, theirs = cells[name], cells[f"wanda {name[8:]}"]
        parts = []
        for column in COLUMNS:
            (a, sa), (b, sb) = ours[column], theirs[column]
            se = math.hypot(sa or 0.0, sb or 0.0)
            parts.append(f"{column[0]} {column[1]} {a - b:+.3f}" + (f" ({(a - b) / se:+.1f} se)" if se else ""))
        lines.append(f"- {name[8:]}: " + "; ".join(parts))
    return lines


def cells_of(rows: list[tuple[str, float, TaskResults]]) -> Cells:
    return {name: {(t, m): (r.value(t, m), r.stderr(t, m)) for t, m in COLUMNS} for name, _, r in rows}


def read_cells(lines: list[str]) -> tuple[Cells, dict[tuple[str, str], float]]:
    """The cells (value ± standard error) of a table this script wrote, and its chance row."""
    cells: Cells = {}
    chance: dict[tuple[str, str], float] = {}
    for line in lines:
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) != 2 + len(COLUMNS):
            continue
        found = [re.fullmatch(r"([0-9.]+) ± ([0-9.]+)", p) for p in parts[2:]]
        if all(found):
            cells[parts[0]] = {c: (float(f[1]), float(f[2])) for c, f in zip(COLUMNS, found)}
        elif parts[0] == "chance":
            chance = {c: float(v) for c, v in zip(COLUMNS, parts[2:]) if re.fullmatch(r"[0-9.]+", v)}
    return cells, chance


def compare_only(path: str) -> None:
    """Rewrites the comparison lines of a table this script wrote, from its cells (3 decimals), and
    redraws its chart: for a table some of whose rows were re-measured by a run of fewer methods."""
    lines = open(path).read().splitlines()
    if any(line.startswith(COMPARISON_HEADER) for line in lines):
        lines = lines[: next(i for i, line in enumerate(lines) if line.startswith(COMPARISON_HEADER)) - 1]
    cells, chance = read_cells(lines)
    write_results(os.path.basename(path), lines + comparison(cells), os.path.dirname(os.path.abspath(path)))
    chart(cells, chance, os.path.splitext(path)[0] + ".png")


def chart(cells: Cells, chance: dict[tuple[str, str], float], path: str) -> str | None:
    """Bars of each model's value ± standard error per column, with the chance level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no chart")
        return None
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4.2 * len(COLUMNS), 3.8), sharey=False)
    names = list(cells)
    for ax, (task, metric) in zip(axes, COLUMNS):
        values = [cells[n][(task, metric)][0] for n in names]
        errors = [cells[n][(task, metric)][1] or 0 for n in names]
        ax.barh(names, values, xerr=errors, color="#69c", capsize=2)
        level = chance.get((task, metric))
        if level is not None:
            ax.axvline(level, color="#c66", linestyle="--", label=f"chance {level:.2f}")
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
    ap.add_argument("--compare-only", metavar="FILE", help="only rewrite the Wanda++ vs Wanda lines and the chart of a table under bench/results")
    args = ap.parse_args()
    if args.compare_only:
        compare_only(os.path.join(RESULTS, args.compare_only))
        return
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
    cells = cells_of(rows)
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
        *comparison(cells),
    ]
    write_results(args.out, lines)
    chance_levels = {(t, m): first.chance[t][m] for t, m in COLUMNS if m in first.chance.get(t, {})}
    png = chart(cells, chance_levels, os.path.join(RESULTS, os.path.splitext(args.out)[0] + ".png"))
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
