"""Every ```python block of the documentation pages runs, in order, in one namespace per page, and
the test functions a page defines pass (pytest fixtures they name: ``tiny_llama``). A block marked
``<!-- not-tested: reason -->`` on the line above is skipped: it needs the embedded model (and runs
in README.md, tests/test_readme.py), several processes or the hub. docs/evaluation.md's blocks
run in tests/test_tasks_eval.py."""

from __future__ import annotations

import ast
import inspect
import os

import pytest
from helpers import python_blocks, run_python_blocks

from wandapp import PruneConfig
from wandapp.testing import tiny_llama_model

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
ELSEWHERE = {"evaluation.md"}
FIXTURES = {"tiny_llama": tiny_llama_model}
PAGES = sorted(p for p in os.listdir(DOCS) if p.endswith(".md") and p not in ELSEWHERE)


def blocks(page: str) -> list[str]:
    return python_blocks(os.path.join(DOCS, page))


def test_pages_have_examples_and_few_are_skipped():
    text = "".join(open(os.path.join(DOCS, p), encoding="utf-8").read() for p in PAGES)
    assert sum(len(blocks(p)) for p in PAGES) >= 6
    assert text.count("<!-- not-tested:") <= 2


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)])
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks(os.path.join(DOCS, page), blocks(page))
    for name, test in list(namespace.items()):
        if name.startswith("test_") and callable(test):
            test(**{arg: FIXTURES[arg]() for arg in inspect.signature(test).parameters})


def settings_table() -> dict[str, tuple[str, str]]:
    """docs/methods.md's PruneConfig table: field -> (default cell, paper cell)."""
    rows = {}
    for line in open(os.path.join(DOCS, "methods.md"), encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def literal(cell: str):
    """The cell's value when it is a plain Python literal (3, 3e-4, True), else None."""
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None


def test_the_settings_table_states_the_defaults_and_the_papers_values():
    rows = settings_table()
    default, paper = PruneConfig(), PruneConfig.paper()
    checked = 0
    for field, (default_cell, paper_cell) in rows.items():
        for cell, config in ((default_cell, default), (paper_cell, paper)):
            value = literal(cell)
            if value is not None:
                assert getattr(config, field) == value, f"docs/methods.md says {field} = {cell}; PruneConfig has {getattr(config, field)!r}"
                checked += 1
    assert {"alpha", "ro_rounds", "ro_lr", "ro_lr_search", "ro_holdout"} <= rows.keys() and checked >= 12
