"""What LoRA after pruning does to sparsity and perplexity, and what `merge_sparse` costs.

Prunes the embedded SmolLM2-135M with wanda++ at 2:4, trains a peft LoRA adapter on Persuasion
windows the pruning did not see, then compares on held-out Northanger Abbey: the pruned model,
the unmerged adapter, peft's plain `merge_and_unload` (sparsity lost) and
`wandapp.lora.merge_sparse` (sparsity kept).

    python bench/lora.py [--steps 32 --lr 1e-3 --rank 8]

Writes bench/results/lora.md (or --out).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Workbench, machine, write_results  # noqa: E402

import wandapp  # noqa: E402
from wandapp import data  # noqa: E402
from wandapp.lora import merge_sparse, remask_cost  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def sparsity_of(model: torch.nn.Module, names: list[str]) -> float:
    """Share of zeros over the pruned layers' weights."""
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in names)
    return zeros / sum(modules[n].weight.numel() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32, help="LoRA steps of 2 sequences")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default="lora.md", help="file name under bench/results")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    bench = Workbench(args.nsamples, args.seqlen, args.eval_tokens, eval_seqlen=512)
    model = copy.deepcopy(bench.dense)
    masks = wandapp.prune(model, bench.calib, sparsity="2:4", nsamples=args.nsamples, progress=False).masks
    names = list(masks)
    pruned_ppl, pruned_sparsity = bench.ppl(model), sparsity_of(model, names)

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS))
    train = data.text_calibration(bench.tokenizer, data.CALIBRATION_TEXT, nsamples=2 * args.steps, seqlen=args.seqlen, seed=1)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    peft_model.train()
    for batch in train.split(2):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()

    cost = remask_cost(peft_model, masks, bench.eval_ids, seqlen=bench.eval_seqlen)
    plain = copy.deepcopy(peft_model).merge_and_unload()
    plain_ppl, plain_sparsity = bench.ppl(plain), sparsity_of(plain, names)
    merged = merge_sparse(peft_model, masks)
    merged_ppl, merged_sparsity = bench.ppl(merged), sparsity_of(merged, names)

    rows = [
        ("dense", bench.ppl(bench.dense), 0.0),
        ("wanda++ 2:4", pruned_ppl, pruned_sparsity),
        ("+ LoRA, adapter unmerged", cost.unmerged, float("nan")),
        ("+ LoRA, peft merge_and_unload", plain_ppl, plain_sparsity),
        ("+ LoRA, wandapp merge_sparse", merged_ppl, merged_sparsity),
    ]
    lines = [
        "# LoRA after pruning (SmolLM2-135M, wanda++ 2:4)",
        "",
        f"Command: `python bench/lora.py --nsamples {args.nsamples} --seqlen {args.seqlen} --eval-tokens {args.eval_tokens} "
        f"--steps {args.steps} --lr {args.lr:g} --rank {args.rank}`",
        f"Pruning calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion (seed 0). LoRA: rank {args.rank} on "
        f"{', '.join(TARGETS)}, AdamW lr {args.lr:g}, {args.steps} steps of 2 x {args.seqlen} tokens of Persuasion "
        f"(seed 1). Evaluation: first {args.eval_tokens} tokens of Northanger Abbey, windows of 512, float32. "
        f"Machine: {machine()}.",
        "",
        "| model | perplexity | sparsity of the pruned layers |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {ppl:.2f} | {'-' if s != s else f'{s:.4f}'} |" for name, ppl, s in rows]
    lines += [
        "",
        f"Re-masking keeps {cost.update_kept:.1%} of the adapter update's squared norm (the rest fell on pruned "
        f"weights) and costs {merged_ppl / cost.unmerged - 1:+.1%} perplexity against the unmerged adapter.",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
