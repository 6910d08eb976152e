"""python/wandapp/_core.pyi describes the compiled module exactly (mypy's stubtest)."""

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
