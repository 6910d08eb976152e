"""Perplexity against pruning seconds on the embedded SmolLM2-135M: wanda, sparsegpt, sparsegpt+ro,
and wanda++ with the default RO schedule and with cheaper ones (fewer rounds, a larger rate,
extrapolation), at 2:4 and at 50%, in one process, one run after another. Perplexity on both held-out texts (A: Northanger Abbey, the
calibration's domain; B: the Python language reference, out of it).

    python bench/pareto.py                        # 16 x 256 calibration, 2:4 and 50% (about 55 min on 2 cores)
    python bench/pareto.py --smoke                # 2 x 32 tokens, 2:4, three runs: checks the script
    python bench/pareto.py --runs "A;B" --out NAME   # only runs A and B (and the default), to NAME.md

With --previous DIR (the python/ folder of a built checkout of an earlier wandapp, e.g.
`git worktree add ../wandapp-before 2a21492 && make -C ../wandapp-before build`), that version's
default wanda++ also runs, in a subprocess, after this one's default at the first sparsity: the cost
of the earlier code and settings side by side with today's.

Writes bench/results/pareto.md and bench/results/pareto.png (the frontier on each text).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, SECOND_TEXT, Workbench, machine, write_results  # noqa: E402

#: name -> (method, PruneConfig overrides), in the order they run.
RUNS = {
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "sparsegpt+ro": ("sparsegpt+ro", {}),
    "wanda++ default (K=3, lr 3e-4, backtracking, H=4)": ("wanda++", {}),
    # With 16 sequences and M = 16 nothing is left to hold out: before issue 24's H = 4, the guard
    # ran on every training sequence (ro_holdout=0 now). The labels assume the default --nsamples;
    # with more than 32 sequences the old guard was 8 held-out ones (ro_holdout=8).
    "wanda++ default before issue 24 (K=5, lr 1e-4, full search, guard on all 16)": (
        "wanda++", dict(ro_rounds=5, ro_lr=1e-4, ro_lr_search="full", ro_holdout=0)
    ),
    "wanda++ K=3, lr 3e-4, backtracking, guard on all 16": ("wanda++", dict(ro_holdout=0)),
    "wanda++ K=3, lr 3e-4, full search": ("wanda++", dict(ro_lr_search="full")),
    "wanda++ K=2": ("wanda++", dict(ro_rounds=2)),
    "wanda++ bfloat16 autocast": ("wanda++", dict(ro_autocast="bfloat16")),
}
DEFAULT = "wanda++ default (K=3, lr 3e-4, backtracking, H=4)"
#: The default that issue 24's goal is measured against (at most half its seconds at 2:4, within 2%).
BEFORE = "wanda++ default before issue 24 (K=5, lr 1e-4, full search, guard on all 16)"
SMOKE_RUNS = ("wanda", DEFAULT, "wanda++ K=2")
#: The row of --previous: the earlier version's code and default settings.
PREVIOUS_VERSION = "wanda++ previous version, its default"


#: Runs one default wanda++ of whatever wandapp PYTHONPATH gives, prints (seconds, ppl A, ppl B).
PREVIOUS_VERSION_RUN = """
import json, sys
sys.path.insert(0, {bench!r})
from common import Workbench
bench = Workbench({nsamples}, {seqlen}, {eval_tokens}, eval_seqlen={eval_seqlen})
ppl_a, sec, _, model = bench.run("wanda++", {sparsity!r})
print(json.dumps([sec, ppl_a, bench.ppl(model, bench.second_ids)]))
"""


def previous_version(folder: str, bench: Workbench, args: argparse.Namespace, sparsity) -> tuple[float, float, float]:
    """(seconds, ppl A, ppl B) of the default wanda++ of the wandapp in ``folder``, in a subprocess."""
    code = PREVIOUS_VERSION_RUN.format(
        bench=os.path.dirname(os.path.abspath(__file__)), nsamples=args.nsamples, seqlen=args.seqlen,
        eval_tokens=args.eval_tokens, eval_seqlen=bench.eval_seqlen, sparsity=sparsity,
    )
    env = {**os.environ, "PYTHONPATH": os.path.abspath(folder)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def frontier(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names of the (seconds, perplexity) points no other point beats on both: none is at most as
    slow and at most as perplexed while strictly better on one."""
    return {
        name
        for name, (sec, ppl) in points.items()
        if not any(s <= sec and p <= ppl and (s, p) != (sec, ppl) for other, (s, p) in points.items() if other != name)
    }


def against_default(rows: dict[str, tuple[float, float, float]], pattern: str) -> list[str]:
    """Each other wanda++ run against the default: its seconds over the default's, and how much
    higher (+) or lower (-) its perplexity is on A and B."""
    sec, ppl_a, ppl_b = rows[DEFAULT]
    return [
        f"- {pattern}, {name}: {other_sec / sec:.2f} x the default's seconds ({other_sec:.0f} s against {sec:.0f} s); "
        f"perplexity {100 * (other_a / ppl_a - 1):+.1f}% on A, {100 * (other_b / ppl_b - 1):+.1f}% on B."
        for name, (other_sec, other_a, other_b) in rows.items()
        if name.startswith("wanda++") and name != DEFAULT
    ]


def default_against_before(rows: dict[str, tuple[float, float, float]], pattern: str) -> list[str]:
    """The default against what issue 24's goal measures it by, the other way round from
    `against_default`: the default's seconds over that run's, and its perplexity change. Against
    the default settings before issue 24 on today's code and, with --previous, against the code
    and default of an earlier version."""
    sec, ppl_a, ppl_b = rows[DEFAULT]
    return [
        f"- {pattern}: the default takes {sec / other_sec:.2f} x the seconds of {what} "
        f"({sec:.0f} s against {other_sec:.0f} s); perplexity {100 * (ppl_a / other_a - 1):+.1f}% on A, "
        f"{100 * (ppl_b / other_b - 1):+.1f}% on B."
        for name, what in ((BEFORE, "the default before issue 24"), (PREVIOUS_VERSION, "the previous version's default"))
        if name in rows
        for other_sec, other_a, other_b in [rows[name]]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--patterns", default="2:4,0.5", help="comma-separated sparsities")
    ap.add_argument("--smoke", action="store_true", help="2 x 32 tokens, 2:4, three runs, written to pareto_smoke.md")
    ap.add_argument("--previous", metavar="DIR", help="python/ folder of a built earlier wandapp whose default wanda++ also runs")
    ap.add_argument("--runs", metavar="A;B", help="only these runs (names of RUNS, ';'-separated), the default always among them")
    ap.add_argument("--out", metavar="NAME", help="results file name without .md (default: pareto, or pareto_smoke)")
    args = ap.parse_args()
    names = SMOKE_RUNS if args.smoke else RUNS
    if args.runs:
        chosen = args.runs.split(";")
        unknown = [n for n in chosen if n not in RUNS]
        if unknown:
            ap.error(f"unknown runs {unknown}; known: {list(RUNS)}")
        names = [n for n in RUNS if n in chosen or n == DEFAULT]
    runs = {name: RUNS[name] for name in names}
    if args.smoke:
        args.nsamples, args.seqlen, args.eval_tokens, args.patterns = 2, 32, 256, "2:4"
    patterns = args.patterns.split(",")
    bench = Workbench(args.nsamples, args.seqlen, args.eval_tokens, eval_seqlen=256 if args.smoke else 512)
    dense = (bench.ppl(bench.dense), bench.ppl(bench.dense, bench.second_ids))
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    for pattern in patterns:
        sparsity = float(pattern) if "." in pattern else pattern
        results[pattern] = {}
        for name, (method, overrides) in runs.items():
            ppl_a, sec, report, model = bench.run(method, sparsity, **overrides)
            ppl_b = bench.ppl(model, bench.second_ids)
            results[pattern][name] = (sec, ppl_a, ppl_b)
            rounds = sum(len(b.ro_losses) for b in report.blocks)
            print(f"{pattern:>4} {name:>42}: {sec:6.0f} s  ppl A {ppl_a:8.2f}  B {ppl_b:8.2f}  RO rounds {rounds}", flush=True)
            if name == DEFAULT and args.previous and pattern == patterns[0]:
                results[pattern][PREVIOUS_VERSION] = previous_version(args.previous, bench, args, sparsity)
                print(f"{pattern:>4} {PREVIOUS_VERSION:>42}: {results[pattern][PREVIOUS_VERSION][0]:6.0f} s", flush=True)

    command = "python bench/pareto.py" + (" --smoke" if args.smoke else "")
    if args.runs:
        command += f' --runs "{args.runs}"'
    if args.out:
        command += f" --out {args.out}"
    if args.previous:
        head = subprocess.run(["git", "-C", args.previous, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        command += f" --previous <python/ of a build of {head or args.previous}>"
    if not args.smoke and (args.nsamples, args.seqlen, args.eval_tokens, args.patterns) != (16, 256, 8192, "2:4,0.5"):
        command += f" --nsamples {args.nsamples} --seqlen {args.seqlen} --eval-tokens {args.eval_tokens} --patterns {args.patterns}"
    lines = [
        "# Perplexity against pruning seconds: SmolLM2-135M-Instruct (float32, CPU)",
        "",
        f"Command: `{command}`",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion (seed 0). Evaluation (windows of "
        f"{bench.eval_seqlen}): A = the first {args.eval_tokens} tokens of Northanger Abbey; B = the first "
        f"{args.eval_tokens} tokens of {SECOND_TEXT}. Dense: A {dense[0]:.2f}, B {dense[1]:.2f}. Seconds: pruning "
        "only, one run after another in one process (the previous version in a subprocess). K = RO rounds per "
        "block; wandapp defaults otherwise (`wandapp.PruneConfig`). Frontier: no other run of the same sparsity is "
        "at most as slow and at most as perplexed on that text.",
        f"Machine: {machine()}.",
        "",
        "| sparsity | run | seconds | ppl A | ppl B | frontier A | frontier B |",
        "|---|---|---|---|---|---|---|",
    ]
    for pattern, rows in results.items():
        on_a = frontier({n: (s, a) for n, (s, a, _) in rows.items()})
        on_b = frontier({n: (s, b) for n, (s, _, b) in rows.items()})
        for name, (sec, ppl_a, ppl_b) in rows.items():
            lines.append(
                f"| {pattern} | {name} | {sec:.0f} | {ppl_a:.2f} | {ppl_b:.2f} | {'yes' if name in on_a else ''} | {'yes' if name in on_b else ''} |"
            )
    lines += ["", "Against the default, measured above:", ""]
    for pattern, rows in results.items():
        lines += against_default(rows, pattern)
    if any(BEFORE in rows or PREVIOUS_VERSION in rows for rows in results.values()):
        lines += ["", "The default against what issue 24's goal measures it by (at most 0.5 x the seconds at 2:4, within 2% on A and B):", ""]
        for pattern, rows in results.items():
            lines += default_against_before(rows, pattern)
    name = args.out or ("pareto_smoke" if args.smoke else "pareto")
    write_results(f"{name}.md", lines)
    chart(results, dense, os.path.join(RESULTS, f"{name}.png"))


def chart(results: dict[str, dict[str, tuple[float, float, float]]], dense: tuple[float, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, (pattern, rows) in zip(axes, results.items()):
        for ax, column, text, dense_ppl in ((row[0], 1, "A (Northanger Abbey)", dense[0]), (row[1], 2, "B (Python reference)", dense[1])):
            points = {name: (values[0], values[column]) for name, values in rows.items()}
            on = sorted((points[n] for n in frontier(points)))
            ax.plot([p[0] for p in on], [p[1] for p in on], "k--", linewidth=1, label="frontier")
            for name, (sec, ppl) in points.items():
                ax.scatter(sec, ppl, label=name)
            ax.axhline(dense_ppl, color="grey", linestyle=":", label=f"dense {dense_ppl:.1f}")
            ax.set_yscale("log")
            ax.set_xlabel("pruning seconds")
            ax.set_ylabel(f"perplexity on {text}")
            ax.set_title(f"{pattern}: text {text}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
