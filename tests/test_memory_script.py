"""bench/memory.py runs as is: its --smoke mode measures the three ways on a 2-block model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_memory_script_smoke():
    pytest.importorskip("accelerate")
    done = subprocess.run([sys.executable, "bench/memory.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r[3].strip(): r for r in (line.split("|") for line in done.stdout.splitlines() if line.startswith("| 2 |"))}
    assert rows.keys() == {"in memory", "offloaded", "streamed"}
    # The checkpoint column is the model's float32 size, counted here from the same configuration.
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from memory import WIDTH
    finally:
        sys.path.remove(str(ROOT / "bench"))
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, max_position_embeddings=256, **WIDTH))
    size_mib = 4 * sum(p.numel() for p in model.parameters()) / 2**20
    for mode, row in rows.items():
        checkpoint, peak, above = int(row[2]), int(row[4]), int(row[5])
        assert abs(checkpoint - size_mib) <= 1, (mode, checkpoint, size_mib)
        assert 0 <= above <= peak, (mode, row)
    # Pruned in memory, the whole model sits in the process on top of the baseline.
    assert int(rows["in memory"][5]) >= size_mib - 1, rows["in memory"]
