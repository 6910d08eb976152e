"""bench/memory.py runs as is: its --smoke mode measures the three ways on a 2-block model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_memory_script_smoke():
    pytest.importorskip("accelerate")
    done = subprocess.run([sys.executable, "bench/memory.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    assert {r[3].strip() for r in rows} == {"in memory", "offloaded", "streamed"}
    assert all(int(r[4]) > 0 for r in rows)  # a peak RSS in MiB for each
