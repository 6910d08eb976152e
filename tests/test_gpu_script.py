"""bench/gpu.py runs as is: its --smoke mode takes the GPU check's code paths on CPU."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_smoke(tmp_path):
    # One device test proves the script's test stage (this suite runs all of tests/test_device.py itself).
    one = "test_blocks_run_on_the_device_while_activations_wait_on_cpu"
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--tests", one, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "gpu-smoke.md").read_text()
    assert re.search(r"(?<!\d)1 passed", table) and "failed" not in table
    for method in ("| wanda |", "| wanda++ |"):
        assert method in table
    assert "wanda++ / wanda time:" in table


def test_a_failing_method_is_a_row_of_its_own_and_fails_the_run(tmp_path, monkeypatch):
    """One GPU call must bring back every number it can: a method that fails (out of memory, say)
    is reported in its row, the other method still runs, and the exit status says it failed."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(gpu, "run_tests", lambda device, select: ("30 passed", []))
    measured = gpu.prune_timed

    def prune_timed(method, *args):
        if method == "wanda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB")
        return measured(method, *args)

    monkeypatch.setattr(gpu, "prune_timed", prune_timed)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        gpu.main()
    assert stopped.value.code == 1
    table = (tmp_path / "gpu-smoke.md").read_text()
    assert "| wanda | failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB |" in table
    assert "| wanda++ | " in table and "wanda++ | failed" not in table
    assert "wanda++ / wanda time" not in table
