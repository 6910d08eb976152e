"""What each method costs per block, on the embedded SmolLM2-135M: forward and backward passes per
calibration sequence (counted with hooks on the decoder layers), and wall time of wandapp's wanda
side by side with a plain-PyTorch Wanda (the algorithm as the Wanda repository runs it: one
statistics pass and one output pass per sequence and block), in one process.

    python bench/schedule.py                       # 16 x 256 tokens at 2:4 (the issue's setting)
    python bench/schedule.py --paper-ratio         # also wanda++ / wanda at N=128, M=32, K=5 (64 tokens),
                                                   # timed and as the counted passes' arithmetic
    python bench/schedule.py --only-paper-ratio    # only that

Writes bench/results/schedule.md, and with a paper-ratio flag bench/results/paper_ratio.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_results  # noqa: E402

import wandapp  # noqa: E402
from wandapp import data  # noqa: E402
from wandapp.models import load_demo_model  # noqa: E402

METHODS = ["magnitude", "wanda", "sparsegpt", "rgs", "wanda++", "sparsegpt+ro"]


class _Stop(Exception):
    pass


@torch.no_grad()
def plain_wanda(model: torch.nn.Module, calib: torch.Tensor, n: int, m: int) -> None:
    """Wanda in plain PyTorch, as the reference repository does it: catch the first block's
    inputs and arguments, then per block one pass for the input norms (float64 sums of squares),
    per-row N:M masks of |W| x ||X||, and one pass for the next block's inputs."""
    layers = model.model.layers
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(_module, args, kwargs):
        caught.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for ids in calib:
        try:
            model(input_ids=ids[None], use_cache=False)
        except _Stop:
            pass
    handle.remove()
    hidden = [h for h, _ in caught]
    kwargs = [{**k, "use_cache": False} for _, k in caught]
    for layer in layers:
        linears = [mod for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
        sums = {id(mod): torch.zeros(mod.in_features, dtype=torch.float64) for mod in linears}

        def accumulate(mod: torch.nn.Module, args: tuple) -> None:
            sums[id(mod)].add_(args[0].double().pow(2).sum(dim=(0, 1)))

        hooks = [mod.register_forward_pre_hook(accumulate) for mod in linears]
        for h, kw in zip(hidden, kwargs):
            layer(h, **kw)  # the statistics pass
        for hook in hooks:
            hook.remove()
        for mod in linears:
            score = mod.weight.abs().float() * (sums[id(mod)] / len(hidden)).sqrt().float()
            groups = score.view(score.shape[0], -1, m)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
            mod.weight.mul_(keep.view_as(mod.weight))
        outputs = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
        hidden = [o[0] if isinstance(o, tuple) else o for o in outputs]


class PassCounter:
    """Sequence-forwards and backwards through every decoder layer, while the `with` block runs."""

    def __init__(self, model: torch.nn.Module):
        self.layers = model.model.layers
        self.forwards = self.backwards = 0
        self.handles = []
        self.warnings = warnings.catch_warnings()

    def __enter__(self) -> "PassCounter":
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._forward, with_kwargs=True))
            self.handles.append(layer.register_full_backward_hook(self._backward))
        self.warnings.__enter__()
        # The regional gradients' backward starts at the layer's output (its inputs need none).
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.warnings.__exit__(*exc)

    def _forward(self, _module, args, kwargs):
        self.forwards += (args[0] if args else kwargs["hidden_states"]).shape[0]

    def _backward(self, *_):
        self.backwards += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--paper-ratio", action="store_true", help="also time wanda++ against wanda at N=128, M=32, K=5")
    ap.add_argument("--only-paper-ratio", action="store_true", help="only time wanda++ against wanda at N=128, M=32, K=5")
    args = ap.parse_args()
    dense, tokenizer = load_demo_model()
    if args.paper_ratio or args.only_paper_ratio:
        paper_ratio(dense, tokenizer)
    if args.only_paper_ratio:
        return
    calib = data.text_calibration(tokenizer, data.CALIBRATION_TEXT, args.nsamples, args.seqlen, 0)
    blocks = len(dense.model.layers)
    settings = dict(sparsity="2:4", nsamples=args.nsamples, progress=False, ro_samples=min(8, args.nsamples), ro_holdout=4, ro_rounds=2)

    timings = {}
    for name, run in (
        ("plain-PyTorch Wanda", lambda model: plain_wanda(model, calib, 2, 4)),
        ("wandapp wanda", lambda model: wandapp.prune(model, calib, method="wanda", **settings)),
        ("wandapp wanda, dense_check=False", lambda model: wandapp.prune(model, calib, method="wanda", dense_check=False, **settings)),
    ):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        run(model)
        timings[name] = time.perf_counter() - start
        print(f"{name}: {timings[name]:.1f} s", flush=True)

    counts = {}
    for method in METHODS:
        model = copy.deepcopy(dense)
        with PassCounter(model) as counter:
            wandapp.prune(model, calib, method=method, **settings)
        # The capture pass runs every sequence through every block once, before any pruning.
        counts[method] = ((counter.forwards - args.nsamples * blocks) / blocks / args.nsamples, counter.backwards / blocks / args.nsamples)
        print(f"{method}: {counts[method][0]:.2f} forwards and {counts[method][1]:.2f} backwards per sequence and block", flush=True)

    lines = [
        "# Cost of each method per block: SmolLM2-135M-Instruct (float32, CPU)",
        "",
        f"Command: `python bench/schedule.py --nsamples {args.nsamples} --seqlen {args.seqlen}`",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of Persuasion, 2:4. Machine: {machine()}.",
        "",
        "Wall time, one process, back to back:",
        "",
        "| run | seconds |",
        "|---|---|",
        *(f"| {name} | {sec:.1f} |" for name, sec in timings.items()),
        f"| ratio wandapp / plain | {timings['wandapp wanda'] / timings['plain-PyTorch Wanda']:.2f} |",
        f"| ratio wandapp (dense_check=False) / plain | {timings['wandapp wanda, dense_check=False'] / timings['plain-PyTorch Wanda']:.2f} |",
        "",
        f"Block passes per calibration sequence and block, counted with hooks (RO: {settings['ro_rounds']} rounds of "
        f"{settings['ro_samples']} training and {settings['ro_holdout']} held-out sequences; the capture pass, one "
        "forward per sequence through the dense model, comes on top for every method):",
        "",
        "| method | forwards | backwards |",
        "|---|---|---|",
        *(f"| {method} | {f:.2f} | {b:.2f} |" for method, (f, b) in counts.items()),
    ]
    write_results("schedule.md", lines)


def paper_ratio(dense: torch.nn.Module, tokenizer) -> None:
    """wanda and wanda++ at the paper's N=128, M=32, K=5, back to back: wanda before and after
    both wanda++ runs (defaults, and RO's training steps under ``ro_autocast="auto"``), so that a
    machine that slows down or speeds up during the run shows. The passes per sequence and block
    are counted with hooks on a two-block copy of the model (they depend on N, M, K and H only),
    which gives the ratio the method's multiply-adds set."""
    paper = data.text_calibration(tokenizer, data.CALIBRATION_TEXT, 128, 64, 0)
    settings = dict(sparsity="2:4", nsamples=128, ro_samples=32, ro_rounds=5, progress=False)
    runs = [
        ("wanda", "wanda", {}),
        ("wanda++", "wanda++", {}),
        ("wanda++, ro_autocast='auto'", "wanda++", dict(ro_autocast="auto")),
        ("wanda", "wanda", {}),
    ]
    seconds, autocast = [], {}
    for name, method, extra in runs:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = wandapp.prune(model, paper, method=method, **settings, **extra)
        seconds.append(time.perf_counter() - start)
        autocast[name] = ", ".join(sorted({str(b.ro_autocast).replace("None", "float32") for b in report.blocks if b.ro_losses}))
        print(f"{name} at N=128, M=32, K=5: {seconds[-1]:.1f} s", flush=True)
    wanda = (seconds[0] + seconds[3]) / 2
    counts = {method: passes_per_block(dense, paper, method, settings) for method in ("wanda", "wanda++")}
    # A backward makes two products per forward one (the gradients of the weights and of the
    # inputs); the capture pass is one more forward per sequence for both.
    cost = {method: 1 + f + 2 * b for method, (f, b) in counts.items()}
    defaults = wandapp.PruneConfig()
    write_results("paper_ratio.md", [
        "# wanda++ against wanda at the paper's sizes: SmolLM2-135M-Instruct (float32 weights, CPU)",
        "",
        "Command: `python bench/schedule.py --only-paper-ratio`",
        f"N=128 calibration sequences of 64 tokens (Persuasion), M=32, K=5, 2:4, defaults otherwise "
        f"(`wandapp.PruneConfig`: `ro_holdout` {defaults.ro_holdout}, `ro_lr_search` {defaults.ro_lr_search!r}, `ro_autocast` "
        f"{defaults.ro_autocast!r}). Machine: {machine()}. One process, back to back.",
        "",
        "| run | RO's training steps in | seconds | / wanda |",
        "|---|---|---|---|",
        f"| wanda (before and after the wanda++ runs; mean) | | {seconds[0]:.1f}, {seconds[3]:.1f}; {wanda:.1f} | 1 |",
        *(f"| {name} | {autocast[name]} | {sec:.1f} | {sec / wanda:.2f} |" for (name, _, _), sec in zip(runs[1:3], seconds[1:3])),
        "",
        "Passes per calibration sequence and block, counted with hooks on a two-block copy of the model "
        "without the step search (whose held-out passes come only where a block's first round fails; "
        "the capture pass, one forward of every sequence before any pruning, counted apart), and the "
        "forward-equivalents they make, a backward counting as two forwards:",
        "",
        "| method | forwards | backwards | forward-equivalents with the capture pass |",
        "|---|---|---|---|",
        *(f"| {method} | {f:.2f} | {b:.2f} | {cost[method]:.2f} |" for method, (f, b) in counts.items()),
        f"| ratio wanda++ / wanda | | | {cost['wanda++'] / cost['wanda']:.2f} |",
    ])


def passes_per_block(dense: torch.nn.Module, calib: torch.Tensor, method: str, settings: dict) -> tuple[float, float]:
    """Forwards (without the capture pass) and backwards per sequence and block of `method`,
    counted on a copy of `dense` cut to its first two blocks (a LLaMA config: no per-layer lists)
    without the step search, so that they depend on N, M, K and H only."""
    model = copy.deepcopy(dense)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    with PassCounter(model) as counter:
        wandapp.prune(model, calib, method=method, **{**settings, "ro_lr_search": "off"})
    n = len(calib)
    return (counter.forwards - 2 * n) / 2 / n, counter.backwards / 2 / n


if __name__ == "__main__":
    main()
