"""bench/downstream.py's Wanda++ vs Wanda lines, the claim its table is read for, recomputed from a
written table (``--compare-only``) against the arithmetic done by hand."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TABLE = """# Downstream accuracy

| model | perplexity | austen_next_sentence acc | austen_next_sentence acc_norm | austen_last_word acc |
|---|---|---|---|---|
| chance | - | 0.250 | 0.250 | 0.060 |
| dense | 33.66 | 0.550 ± 0.030 | 0.600 ± 0.030 | 0.500 ± 0.040 |
| wanda 0.5 | 64.71 | 0.300 ± 0.030 | 0.350 ± 0.040 | 0.250 ± 0.030 |
| wanda++ 0.5 | 50.06 | 0.340 ± 0.040 | 0.340 ± 0.030 | 0.250 ± 0.000 |
"""


def test_compare_only_states_each_difference_in_standard_errors(tmp_path):
    path = tmp_path / "downstream.md"
    path.write_text(TABLE)
    for _ in range(2):  # the second run replaces the lines of the first
        done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, 'bench'); import downstream; downstream.compare_only({str(path)!r})"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    lines = path.read_text().splitlines()
    assert lines[: len(TABLE.splitlines())] == TABLE.splitlines()
    # 0.04 / sqrt(0.04^2 + 0.03^2) = 0.8; -0.01 / 0.05 = -0.2; a zero difference is 0 se.
    expected = "- 0.5: austen_next_sentence acc +0.040 (+0.8 se); austen_next_sentence acc_norm -0.010 (-0.2 se); austen_last_word acc +0.000 (+0.0 se)"
    assert [line for line in lines if line.startswith("- ")] == [expected]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "downstream.png").stat().st_size > 0


def test_the_readme_and_results_page_show_the_benchmark_table_as_written():
    """The task-accuracy numbers in README.md and docs/results.md are bench/results/downstream.md's
    rows, verbatim: a rerun of the benchmark that changes them must be copied over."""
    rows = [line for line in (ROOT / "bench" / "results" / "downstream.md").read_text().splitlines() if line.startswith("|")]
    assert rows[0].startswith("| model | perplexity |") and len(rows) == 12
    for page in ("README.md", "docs/results.md"):
        assert "\n".join(rows) in (ROOT / page).read_text(), f"{page} lacks bench/results/downstream.md's table"


def test_the_table_is_read_back_with_its_chance_row(tmp_path):
    """--compare-only redraws the chart from the cells it reads: every model row, in order, each
    value with its standard error, and the chance levels."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import downstream
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cells, chance = downstream.read_cells(TABLE.splitlines())
    assert list(cells) == ["dense", "wanda 0.5", "wanda++ 0.5"]
    assert cells["wanda++ 0.5"][downstream.COLUMNS[1]] == (0.340, 0.030)
    assert chance == dict(zip(downstream.COLUMNS, (0.25, 0.25, 0.06)))
