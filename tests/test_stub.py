"""python/wandapp/_core.pyi describes the compiled module exactly: its signatures (mypy's stubtest)
and its docstrings (tools/stub_docs.py, which the documentation site reads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_stub_matches_the_compiled_module():
    pytest.importorskip("mypy")
    config = Path(__file__).with_name("stubtest.ini")
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "wandapp._core", "--mypy-config-file", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_stub_has_the_compiled_docstrings():
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "stub_docs.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
