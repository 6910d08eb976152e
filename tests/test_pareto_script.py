"""bench/pareto.py: its frontier against a brute-force check, its goal lines against hand
arithmetic, the script end to end (--smoke), and the README's table as the results file wrote it."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pareto():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import pareto
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return pareto


def test_the_frontier_is_every_point_nothing_beats(pareto):
    rng = random.Random(0)
    for _ in range(200):
        # Few distinct values, so that ties in seconds, perplexity or both occur.
        points = {f"run {i}": (rng.randint(1, 6), rng.randint(1, 6)) for i in range(rng.randint(1, 8))}
        expected = set()
        for name, (sec, ppl) in points.items():
            beaten = False
            for other, (s, p) in points.items():
                if other != name and s <= sec and p <= ppl and (s < sec or p < ppl):
                    beaten = True
            if not beaten:
                expected.add(name)
        assert pareto.frontier(points) == expected, points
    assert pareto.frontier({"a": (1, 5), "b": (2, 3), "c": (2, 4), "d": (1, 5)}) == {"a", "b", "d"}


def test_each_schedule_is_stated_against_the_default(pareto):
    rows = {pareto.DEFAULT: (400.0, 80.0, 70.0), "wanda": (20.0, 180.0, 110.0), "wanda++ K=3": (190.0, 79.2, 71.4)}
    assert pareto.against_default(rows, "2:4") == [
        "- 2:4, wanda++ K=3: 0.47 x the default's seconds (190 s against 400 s); perplexity -1.0% on A, +2.0% on B."
    ]
    rows[pareto.PREVIOUS_VERSION] = (500.0, 80.0, 70.0)
    assert pareto.against_default(rows, "2:4")[1] == (
        "- 2:4, wanda++ previous version, its default: 1.25 x the default's seconds (500 s against 400 s); perplexity +0.0% on A, +0.0% on B."
    )


def test_the_default_is_stated_against_the_default_before_issue_24(pareto):
    rows = {pareto.DEFAULT: (140.0, 71.0, 73.7), "wanda": (20.0, 180.0, 110.0)}
    assert pareto.default_against_before(rows, "2:4") == []
    rows[pareto.BEFORE] = (280.0, 72.0, 73.0)
    assert pareto.default_against_before(rows, "2:4") == [
        "- 2:4: the default takes 0.50 x the seconds of the default before issue 24 (140 s against 280 s); perplexity -1.4% on A, +1.0% on B."
    ]
    rows[pareto.PREVIOUS_VERSION] = (350.0, 71.0, 75.4)
    assert pareto.default_against_before(rows, "2:4")[1] == (
        "- 2:4: the default takes 0.40 x the seconds of the previous version's default (140 s against 350 s); perplexity +0.0% on A, -2.3% on B."
    )


def test_the_script_runs_and_writes_its_table(tmp_path, pareto):
    done = subprocess.run([sys.executable, "bench/pareto.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 2:4 |")]
    assert [r[1].strip() for r in rows] == ["wanda", pareto.DEFAULT, "wanda++ K=2"]
    assert all(float(r[2]) >= 0 and float(r[3]) > 1 and float(r[4]) > 1 for r in rows)
    assert any(r[5].strip() == "yes" for r in rows) and any(r[6].strip() == "yes" for r in rows)
    assert "- 2:4, wanda++ K=2: " in done.stdout


def test_an_unknown_run_is_refused_with_the_known_ones():
    done = subprocess.run([sys.executable, "bench/pareto.py", "--runs", "wanda;wanda++ K=9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown runs ['wanda++ K=9']" in done.stderr and "wanda++ bfloat16 autocast" in done.stderr and "wanda++ K=2" in done.stderr


def test_the_readme_shows_the_benchmark_table_as_written():
    """README.md's frontier table is bench/results/pareto.md's rows, verbatim."""
    rows = [line for line in (ROOT / "bench" / "results" / "pareto.md").read_text().splitlines() if line.startswith("| ")]
    readme = (ROOT / "README.md").read_text()
    assert rows and all(row in readme for row in rows)
