"""Peak host memory (and on CUDA peak GPU memory) against model depth, for the three ways to prune a
model: in memory (``wandapp.prune`` on a loaded model), offloaded (``from_pretrained`` with every
block on disk, then ``wandapp.prune``) and streamed (``wandapp.prune_checkpoint``).

Each run is a fresh process (peak RSS is the process's ``VmHWM``, Linux) on a random LLaMA of the
same narrow width and 4, 16 or 64 blocks, saved as a sharded safetensors checkpoint; method wanda,
8 x 64 calibration tokens. The baseline column is the process's RSS after importing torch,
transformers and wandapp, before loading anything.

    python bench/memory.py            # writes bench/results/memory.md
    python bench/memory.py --smoke    # 2 blocks, prints only: a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_results  # noqa: E402

WIDTH = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12, vocab_size=1024)
MODES = ("in memory", "offloaded", "streamed")

#: Runs in a fresh process: prints one JSON line with its peak memory.
CHILD = """
import json, os, sys, tempfile, time
import torch, transformers, wandapp
from transformers import AutoModelForCausalLM
from wandapp.checkpoint import load_offloaded

def peak_rss():  # this process's high-water mark (ru_maxrss would count the parent's RSS at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

baseline = peak_rss()
src, dst, mode, device = sys.argv[1:5]
device = torch.device(device)
ids = torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
if mode == "in memory":
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto").to(device)
    wandapp.prune(model, ids, method="wanda", progress=False)
elif mode == "offloaded":
    with tempfile.TemporaryDirectory() as offload:
        model = load_offloaded(src, device, offload)
        wandapp.prune(model, ids, method="wanda", progress=False)
else:
    wandapp.prune_checkpoint(src, dst, ids, method="wanda", progress=False, device=str(device))
seconds = time.perf_counter() - start
gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
print(json.dumps({"baseline": baseline, "peak": peak_rss(), "gpu": gpu, "seconds": seconds}))
"""


def make_checkpoint(folder: str, blocks: int) -> int:
    """A random LLaMA of ``blocks`` blocks at WIDTH, saved in float32 shards; its size in bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=256, **WIDTH)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def measure(src: str, mode: str, device: str, scratch: str) -> dict:
    dst = tempfile.mkdtemp(dir=scratch)
    os.rmdir(dst)
    done = subprocess.run([sys.executable, "-c", CHILD, src, dst, mode, device], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} on {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,16,64")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="2 blocks; prints, writes nothing")
    parser.add_argument("--out", default="memory.md")
    args = parser.parse_args()
    depths = [2] if args.smoke else [int(d) for d in args.depths.split(",")]
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="wandapp-bench-memory-") as scratch:
        for blocks in depths:
            src = os.path.join(scratch, f"src{blocks}")
            size = make_checkpoint(src, blocks)
            for mode in MODES:
                start = time.perf_counter()
                r = measure(src, mode, args.device, scratch)
                gpu = "-" if r["gpu"] is None else mib(r["gpu"])
                rows.append(
                    f"| {blocks} | {mib(size)} | {mode} | {mib(r['peak'])} | {mib(r['peak'] - r['baseline'])} | {gpu} | {r['seconds']:.1f} |"
                )
                print(rows[-1], f"({time.perf_counter() - start:.0f} s with start-up)", flush=True)
    lines = [
        "# Peak memory against depth: in memory, offloaded, streamed",
        "",
        f"`python bench/memory.py --depths {','.join(map(str, depths))}` on {machine()}, device {args.device}.",
        f"Random LLaMA, hidden {WIDTH['hidden_size']}, intermediate {WIDTH['intermediate_size']}, float32 "
        f"(one block = {mib(4 * (4 * WIDTH['hidden_size'] ** 2 + 3 * WIDTH['hidden_size'] * WIDTH['intermediate_size']))} MiB), "
        "sharded safetensors; wanda, 8 x 64 calibration tokens; each run a fresh process.",
        "Peak RSS is the process's high-water mark (`VmHWM`); 'above baseline' subtracts it after importing torch, "
        "transformers and wandapp.",
        "",
        "| blocks | checkpoint MiB | mode | peak RSS MiB | above baseline MiB | peak GPU MiB | prune s |",
        "|---:|---:|---|---:|---:|---:|---:|",
        *rows,
    ]
    if args.smoke:
        print("\n".join(lines))
    else:
        write_results(args.out, lines)


if __name__ == "__main__":
    main()
