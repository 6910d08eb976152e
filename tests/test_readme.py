"""The README's Python code blocks run, in order, in one namespace (they build on each other),
and the pytest example's test functions pass."""

from __future__ import annotations

import os

import pytest
from helpers import python_blocks, run_python_blocks

pytestmark = [pytest.mark.demo_model, pytest.mark.slow]

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks(README, blocks)
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    assert tests
    for test in tests:
        test()
    assert "total: 30/30 blocks pruned" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "pruned-lora" / "model.safetensors")
