"""Mask-selection speed: wandapp's Rust kernels vs the pure-PyTorch way (torch.sort / topk, as
in Wanda's code), measured side by side in one run.

    python bench/kernels.py [--repeats 7] [--device cpu]

Prints a table and writes bench/results/kernels-<device>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_results  # noqa: E402
from wandapp import kernels  # noqa: E402


def torch_sort_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = kernels.pruned_per_row(scores.shape[1], sparsity)
    idx = torch.sort(scores, dim=1, stable=True)[1][:, :k]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)


def torch_topk_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = kernels.pruned_per_row(scores.shape[1], sparsity)
    idx = torch.topk(scores, k, dim=1, largest=False)[1]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)


def torch_topk_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = scores.reshape(scores.shape[0], -1, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False)[1]
    return torch.ones_like(groups, dtype=torch.bool).scatter_(2, idx, False).reshape(scores.shape)


def median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = []
    for shape in [(4096, 4096), (11008, 4096)]:
        scores = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(args.device)
        cases = [
            ("50% unstructured", lambda: kernels.unstructured_mask(scores, 0.5),
             [("torch.sort", lambda: torch_sort_unstructured(scores, 0.5)), ("torch.topk", lambda: torch_topk_unstructured(scores, 0.5))]),
            ("2:4", lambda: kernels.nm_mask(scores, 2, 4), [("torch.topk", lambda: torch_topk_nm(scores, 2, 4))]),
        ]
        for label, ours, references in cases:
            assert torch.equal(ours(), references[0][1]()) or label == "2:4"  # same masks (ties aside for topk)
            t_ours = median_seconds(ours, args.repeats, args.device)
            for ref_name, ref in references:
                t_ref = median_seconds(ref, args.repeats, args.device)
                rows.append((f"{shape[0]}x{shape[1]}", label, ref_name, t_ref * 1e3, t_ours * 1e3, t_ref / t_ours))
    lines = [
        f"# Mask selection: wandapp vs PyTorch ({args.device}, {torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"Command: `python bench/kernels.py --repeats {args.repeats} --device {args.device}`; median of {args.repeats} runs, float32 scores.",
        "",
        "| scores | pattern | PyTorch reference | reference ms | wandapp ms | speed-up |",
        "|---|---|---|---|---|---|",
        *[f"| {s} | {p} | {r} | {tr:.1f} | {to:.1f} | {x:.2f}x |" for s, p, r, tr, to, x in rows],
    ]
    write_results(f"kernels-{args.device}.md", lines)


if __name__ == "__main__":
    main()
