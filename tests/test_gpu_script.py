"""bench/gpu.py runs as is: its --smoke mode takes the GPU check's code paths on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_smoke(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "gpu-smoke.md").read_text()
    assert "passed" in table and "failed" not in table
    for method in ("| wanda |", "| wanda++ |"):
        assert method in table
    assert "wanda++ / wanda time:" in table
