"""Every ```python block of the documentation pages runs, in order, in one namespace per page, and
the test functions a page defines pass (pytest fixtures they name: ``tiny_llama``). A block marked
``<!-- not-tested: reason -->`` on the line above is skipped: it needs the embedded model (and runs
in README.md, tests/test_readme.py), several processes or the hub. docs/evaluation.md's blocks
run in tests/test_tasks_eval.py."""

from __future__ import annotations

import inspect
import os

import pytest
from helpers import python_blocks, run_python_blocks

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
