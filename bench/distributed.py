"""Wall time of pruning with the calibration spread over torch.distributed ranks (gloo, CPU
processes), against one process, and how far wanda++'s result moves.

Each configuration runs in fresh processes on a random LLaMA of SmolLM2-135M's block shape
(hidden 576, MLP 1536, 9 heads, 3 KV heads), 4 blocks, with 16 calibration sequences of 128 random
tokens; every rank limited to ``--threads`` torch threads, as torchrun does (OMP_NUM_THREADS). Per
run: the seconds ``wandapp.prune`` took (the slowest rank), the share of them rank 0 spent inside
wandapp's collectives (the sums and the failure checks, waiting for the slower rank included), and
against the one-process run of the same method its mask bits that differ and the largest relative
difference of a block's final error.

    python bench/distributed.py              # writes bench/results/distributed.md
    python bench/distributed.py --smoke      # 2 blocks, 4 sequences, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_results  # noqa: E402

SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=2048, max_position_embeddings=512
)

#: One rank (or the lone process): prunes and saves its masks, block errors and timings.
CHILD = """
import json, os, sys, time
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig
import wandapp
from wandapp.distributed import World

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
inside = [0.0]
for name in ("all_reduce", "check"):
    original = getattr(World, name)
    def timed(self, *args, _original=original):
        start = time.perf_counter()
        try:
            return _original(self, *args)
        finally:
            inside[0] += time.perf_counter() - start
    setattr(World, name, timed)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(LlamaConfig(**spec["shape"], num_hidden_layers=spec["layers"])).eval()
ids = torch.randint(0, spec["shape"]["vocab_size"], (spec["nsamples"], spec["seqlen"]), generator=torch.Generator().manual_seed(1))
config = {k: v for k, v in spec["config"].items()}
start = time.perf_counter()
report = wandapp.prune(model, ids, sparsity="2:4", method=spec["method"], progress=False, **config)
seconds = time.perf_counter() - start
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save({"masks": report.masks, "mse": [b.mse_final for b in report.blocks], "seconds": seconds, "inside": inside[0],
            "ro_batch_size": report.config["ro_batch_size"]}, os.path.join(spec["out"], f"rank{rank}.pt"))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def run(world: int, spec: dict) -> dict:
    """Runs ``world`` processes (one without a process group); rank 0's result with the slowest
    rank's seconds."""
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        spec = {**spec, "out": out}
        procs = []
        for rank in range(world):
            env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
            if world > 1:
                env.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], env=env))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a rank of the {world}-process run failed")
        results = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    first = results[0]
    first["seconds"] = max(r["seconds"] for r in results)
    return first


def compare(got: dict, alone: dict) -> tuple[int, int, float]:
    """(mask bits that differ, mask bits, the relative difference got / alone - 1 of the block final
    error that differs most, with its sign: positive is worse)."""
    bits = sum(int((got["masks"][k] != alone["masks"][k]).sum()) for k in alone["masks"])
    total = sum(m.numel() for m in alone["masks"].values())
    mse = max((a / b - 1 for a, b in zip(got["mse"], alone["mse"])), key=abs)
    return bits, total, mse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 blocks, 4 sequences; print only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    layers, nsamples, seqlen = (2, 4, 32) if args.smoke else (4, 16, 128)
    base = dict(shape=SHAPE, layers=layers, nsamples=nsamples, seqlen=seqlen, threads=args.threads)
    ro = dict(ro_samples=4, ro_holdout=2, ro_rounds=1) if args.smoke else {}
    rows = []
    for method, config in [("wanda", {}), ("wanda++", ro), ("wanda++", {**ro, "ro_batch_size": 2})]:
        spec = {**base, "method": method, "config": config}
        alone = run(1, spec)
        # One process with every thread of the ranks, then the ranks with one thread each.
        for world, threads in ((1, args.threads), (1, 2 * args.threads), (2, args.threads)):
            got = alone if (world, threads) == (1, args.threads) else run(world, {**spec, "threads": threads})
            bits, total, mse = compare(got, alone)
            label = method + (f", ro_batch_size {got['ro_batch_size']}" if method == "wanda++" else "")
            share = f"{100 * got['inside'] / got['seconds']:.0f}%" if world > 1 else "-"
            rows.append(
                f"| {label} | {world} x {threads} | {got['seconds']:.1f} | {alone['seconds'] / got['seconds']:.2f}x | {share} "
                f"| {bits} of {total} | {mse:+.1e} |"
            )
            print(rows[-1], flush=True)
    lines = [
        f"# Calibration spread over CPU processes (gloo), `python bench/distributed.py{' --smoke' if args.smoke else ''}`",
        "",
        f"Random LLaMA of SmolLM2-135M's block shape, {layers} blocks, {nsamples} x {seqlen} calibration tokens, 2:4, "
        f"processes x torch threads each; {machine()}, {os.cpu_count()} CPU cores.",
        "Seconds: `wandapp.prune` on the slowest rank; speed-up against one process with one rank's threads. Collectives: "
        "rank 0's share of those seconds inside wandapp's collectives (waiting for the other rank included). Against that "
        "one-process run (ro_batch_size None resolves to 1 in one process, 2 across two): mask bits that differ, and "
        "got / one-process - 1 for the block final error that differs most (positive: worse).",
        "",
        "| method | processes x threads | seconds | speed-up | collectives | mask bits differing | block error difference |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    if args.smoke:
        print("\n".join(lines))
    else:
        write_results("distributed.md", lines)


if __name__ == "__main__":
    main()
