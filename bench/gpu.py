"""The GPU check, in one command: the CUDA test subset with CPU-vs-CUDA parity, then a
LLaMA-2-7B-shaped model (random bfloat16 weights built on the GPU, no download) pruned at 2:4 by
wanda and by wanda++ with the paper's calibration size, side by side.

    python bench/gpu.py                 # on the GPU machine (one H200: about 8 minutes)
    python bench/gpu.py --smoke         # the same code paths on CPU at a toy shape, < 1 minute

Prints and writes bench/results/gpu.md (``--smoke``: gpu-smoke.md; ``--out DIR`` elsewhere). What
is timed and what is extrapolated is labelled in the table. The file is rewritten after each stage
(tests, wanda, wanda++), a method that fails is reported in its row while the other still runs, and
the exit status is 1 when a test or a method failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: LLaMA-2-7B's shape (hidden, intermediate, heads, blocks) and the paper's calibration size.
FULL = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            num_hidden_layers=32, vocab_size=32000, nsamples=128, seqlen=2048)
#: The test subset's limit, so that a hanging test leaves time for the pruning runs.
TEST_TIMEOUT_S = 240
TOY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
           num_hidden_layers=2, vocab_size=128, nsamples=8, seqlen=32)


def run_tests(device: str, select: str | None = None) -> tuple[str, list[str]]:
    """The device-parametrized pytest subset (narrowed by the pytest ``-k`` expression ``select``);
    returns (summary line, failing test ids)."""
    env = {**os.environ, "WANDAPP_TEST_DEVICE": device}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/test_device.py"]
    chosen = []
    if device == "cuda":  # and the CUDA-parametrized kernel tests
        cmd.append("tests/test_kernels.py")
        chosen.append("(cuda or test_device)")
    if select:
        chosen.append(f"({select})")
    if chosen:
        cmd += ["-k", " and ".join(chosen)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"stopped after {TEST_TIMEOUT_S} s (the pruning runs below still ran)", []
    lines = done.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    return (lines[-1] if lines else done.stderr.strip()[-300:]), failed


def build_model(shape: dict, blocks: int, device: str, dtype: torch.dtype, seed: int = 0):
    """A random LlamaForCausalLM of ``shape`` with ``blocks`` blocks, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("nsamples", "seqlen")})
    config.num_hidden_layers = blocks
    config.max_position_embeddings = max(shape["seqlen"], 64)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def prune_timed(method: str, shape: dict, blocks: int, device: str, dtype: torch.dtype, calib: torch.Tensor) -> dict:
    import wandapp

    model = build_model(shape, blocks, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = wandapp.prune(model, calib, sparsity="2:4", method=method, config=wandapp.PruneConfig.paper(nsamples=len(calib), ro_samples=min(32, len(calib))), progress=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # Per block (the report resets the counter at each block): weights of the whole cut-down model included.
    peak = max(b.peak_memory_bytes for b in report.blocks)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    block_weights = sum(p.numel() * p.element_size() for p in model.model.layers.parameters()) / blocks
    per_block = [b.seconds for b in report.blocks]
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(seconds=seconds, per_block=sum(per_block) / len(per_block), peak=peak, weights=weights, block_weights=block_weights, blocks=blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy shape on CPU: proves the script before GPU time is spent")
    ap.add_argument("--blocks", type=int, default=None, help="blocks to prune (default: 8 on the GPU, all 2 in --smoke)")
    ap.add_argument("--out", default=RESULTS, help="directory for the results file")
    ap.add_argument("--tests", default=None, metavar="EXPR", help="run only the tests pytest -k EXPR selects (default: all of the subset)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs CUDA; use --smoke to run the same code paths on CPU")
    shape = TOY if args.smoke else FULL
    blocks = args.blocks or (shape["num_hidden_layers"] if args.smoke else 8)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"

    started = time.perf_counter()
    name = "gpu-smoke.md" if args.smoke else "gpu.md"
    command = f"python bench/gpu.py{' --smoke' if args.smoke else ''}{f' --blocks {args.blocks}' if args.blocks else ''}{f' --tests {args.tests!r}' if args.tests else ''}"
    summary, failed = run_tests(device, args.tests)
    print(f"tests on {device}: {summary}", flush=True)
    calib = torch.randint(0, shape["vocab_size"], (shape["nsamples"], shape["seqlen"]), generator=torch.Generator().manual_seed(0))
    runs: dict[str, dict] = {}

    def save() -> None:
        write_results(name, table(command, where, device, shape, blocks, dtype, summary, failed, runs, started), args.out)

    # The file is rewritten after each stage, so a run stopped by its time limit keeps what it measured;
    # a method that fails (out of memory, say) is a row of its own and the other still runs.
    save()
    for method in ("wanda", "wanda++"):
        try:
            runs[method] = prune_timed(method, shape, blocks, device, dtype, calib)
        except Exception as exc:
            traceback.print_exc()
            runs[method] = dict(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            if device == "cuda":
                torch.cuda.empty_cache()
        save()
    if failed or any("error" in r for r in runs.values()):
        sys.exit(1)


def table(command: str, where: str, device: str, shape: dict, blocks: int, dtype: torch.dtype, summary: str,
          failed: list[str], runs: dict[str, dict], started: float) -> list[str]:
    """The results file: the tests' summary, then one row per method measured so far."""
    total = shape["num_hidden_layers"]
    label = "timed" if blocks == total else f"extrapolated from {blocks} timed blocks (x {total / blocks:g})"
    lines = [
        f"# GPU check ({'smoke, ' if device == 'cpu' else ''}{where})",
        "",
        f"`{command}`; {machine()}; {time.perf_counter() - started:.0f} s in all.",
        "",
        f"Tests (`WANDAPP_TEST_DEVICE={device} pytest tests/test_device.py`{' + CUDA kernel tests' if device == 'cuda' else ''}): {summary}",
        *[f"- {line}" for line in failed],
        "",
        f"Pruning at 2:4, LlamaConfig hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
        f"{shape['num_attention_heads']} heads, {total} blocks ({blocks} pruned), {str(dtype).replace('torch.', '')} random weights; "
        f"calibration {shape['nsamples']} x {shape['seqlen']} random tokens; PruneConfig.paper() (K=5, M=min(32, sequences)), "
        "batch_size automatic.",
        "",
        f"| method | s/block | s for {blocks} blocks | s for all {total} blocks ({label}) | "
        f"{'peak process RSS GiB' if device == 'cpu' else 'peak GPU memory GiB in a block (max_memory_allocated)'} | "
        f"model weights GiB ({blocks} blocks) |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in runs.items():
        if "error" in r:
            lines.append(f"| {method} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {method} | {r['per_block']:.2f} | {r['seconds']:.1f} | {r['seconds'] * total / blocks:.1f} | "
            f"{r['peak'] / 2**30:.2f} | {r['weights'] / 2**30:.2f} |"
        )
    done = [r for r in runs.values() if "error" not in r]
    if done:
        lines += ["", f"The peak includes the weights of the {blocks}-block model; the full {total}-block model's weights add "
                  f"{(total - blocks) * done[0]['block_weights'] / 2**30:.1f} GiB (not measured here)."]
    if all(m in runs and "error" not in runs[m] for m in ("wanda", "wanda++")):
        lines.append(f"wanda++ / wanda time: {runs['wanda++']['seconds'] / runs['wanda']['seconds']:.2f}x (same run, same shape).")
    return lines


if __name__ == "__main__":
    main()
