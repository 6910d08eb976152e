"""python/wandapp/_core.pyi describes the compiled module exactly (mypy's stubtest)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_stub_matches_the_compiled_module():
    pytest.importorskip("mypy")
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "wandapp._core"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
