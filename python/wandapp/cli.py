"""The ``wandapp`` command (also ``python -m wandapp``): prune, eval, demo.

Argument and input errors print one line (``wandapp: error: ...``) and exit non-zero.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import sys
import time
from typing import Any, Sequence

from wandapp.config import METHODS

DTYPES = ("float32", "bfloat16", "float16")

#: PruneConfig fields that `wandapp prune` exposes as --flags (unset: the config's default).
CONFIG_FLAGS = {
    "alpha": float, "ro_rounds": int, "ro_samples": int, "ro_lr": float, "ro_holdout": int, "ro_min_improvement": float, "ro_lr_search": str, "ro_autocast": str,
    "device": str, "offload": str,
    "layer_sparsity": str, "owl_m": float, "owl_lambda": float,
}
#: Boolean PruneConfig fields that `wandapp prune` exposes as --flag / --no-flag (unset: the config's default).
BOOL_CONFIG_FLAGS = ("ro_extrapolate",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"wandapp: error: {message} (see `wandapp {self.prog.split()[-1]} --help`)\n")


def _load(model: str, dtype: str | None) -> tuple[Any, Any]:
    import torch

    if model == "demo":
        from wandapp.models import load_demo_model

        return load_demo_model(dtype=getattr(torch, dtype or "float32"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_folder(model)
    return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype) if dtype else "auto").eval(), AutoTokenizer.from_pretrained(model)


def _require_folder(model: str) -> None:
    if not os.path.isdir(model):
        from wandapp.errors import InvalidArgumentError

        raise InvalidArgumentError(f"--model {model!r} is neither 'demo' nor a folder holding a saved model")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="demo",
        help="'demo' (embedded SmolLM2-135M) or a folder from save_pretrained (streamed block by block)",
    )
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: the checkpoint's own (float32 for demo)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--eval-tokens", type=int, default=None, help="cap on evaluated tokens")


def _add_tasks(p: argparse.ArgumentParser, flag: str, limit: str, batch: str) -> None:
    """Task-accuracy flags (wandapp.eval.tasks: lm-evaluation-harness)."""
    p.add_argument(
        flag, default=None, metavar="A,B",
        help="lm-evaluation-harness tasks, comma-separated: austen_next_sentence,austen_last_word (offline; tag "
        "'austen'), the harness's own (need their data), or tasks in --include-path; needs wandapp[eval]",
    )
    p.add_argument(limit, type=_limit, default=None, help="items per task (an integer, or a fraction < 1); default: all")
    p.add_argument("--num-fewshot", type=int, default=0, help="examples before each task item (default 0: zero-shot)")
    p.add_argument(batch, type=int, default=None, help="task requests per forward call (default 8)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR", help="a folder of task YAML files (repeatable)")


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _task_accuracy(model: Any, tokenizer: Any, args: argparse.Namespace, names: str, limit: Any, batch: Any) -> Any:
    from wandapp.eval import tasks

    return tasks(model, tokenizer, names, num_fewshot=args.num_fewshot, limit=limit, batch_size=batch, seed=args.seed, include_path=args.include_path)


def _join_torchrun() -> Any:
    """Under torchrun (WORLD_SIZE > 1 in the environment): the default process group, initialised
    here unless the caller did (NCCL with this rank's GPU, LOCAL_RANK, when CUDA is available;
    gloo otherwise), as a ``wandapp.distributed.World``; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    from wandapp.distributed import World

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    return World.current()


def _cmd_prune(args: argparse.Namespace) -> int:
    import torch

    import wandapp
    from wandapp import data
    from wandapp.config import PruneConfig, parse_sparsity
    from wandapp.distributed import guarded
    from wandapp.eval import perplexity

    parse_sparsity(args.sparsity)  # fail before the slow model load
    if args.eval_tasks:  # unknown tasks and missing task data too
        from wandapp.eval import check_tasks

        check_tasks(args.eval_tasks, args.include_path)
    accuracy = lambda m, t: _task_accuracy(m, t, args, args.eval_tasks, args.eval_limit, args.eval_batch_size)  # noqa: E731
    overrides = {
        field: getattr(args, field) for field in (*CONFIG_FLAGS, *BOOL_CONFIG_FLAGS, "dense_check", "targets", "ignore") if getattr(args, field) is not None
    }
    config = (PruneConfig.paper() if args.paper else PruneConfig()).replace(nsamples=args.nsamples, seed=args.seed, **overrides)
    # Under torchrun every rank prunes (each its share of the calibration) and rank 0 writes; a rank
    # that fails before its last collective stops the others.
    world = _join_torchrun()
    writes = world is None or world.rank == 0
    if args.model == "demo":  # in memory
        with guarded(world):
            model, tokenizer = _load(args.model, args.dtype)
            calib = data.text_calibration(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
            evaluate = lambda: perplexity(model, tokenizer, args.eval, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens)  # noqa: E731
            before = evaluate() if args.eval else None
            tasks_before = accuracy(model, tokenizer) if args.eval_tasks and writes else None
            report = wandapp.prune(model, calib, sparsity=args.sparsity, method=args.method, config=config)
        if not writes:
            return 0
        os.makedirs(os.path.join(args.out, "masks"), exist_ok=True)
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        wandapp.save_masks(os.path.join(args.out, "masks", "masks.safetensors"), report.masks, report=report)
        after = evaluate() if args.eval else None
        tasks_after = accuracy(model, tokenizer) if args.eval_tasks else None
    else:  # a checkpoint on disk: streamed block by block, resumable (wandapp.prune_checkpoint)
        from transformers import AutoTokenizer

        with guarded(world):
            _require_folder(args.model)
            if args.dense_check is None:  # as prune_checkpoint: the whole dense pass would read the model once per sequence
                config = config.replace(dense_check=False)
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            calib = data.text_calibration(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
            before = _checkpoint_perplexity(args.model, tokenizer, args) if args.eval else None
            tasks_before = _offloaded(args.model, args, lambda m: accuracy(m, tokenizer)) if args.eval_tasks and writes else None
            dtype = getattr(torch, args.dtype) if args.dtype else None
            report = wandapp.prune_checkpoint(args.model, args.out, calib, sparsity=args.sparsity, method=args.method, config=config, dtype=dtype)
        if not writes:
            return 0
        after = _checkpoint_perplexity(args.out, tokenizer, args) if args.eval else None
        tasks_after = _offloaded(args.out, args, lambda m: accuracy(m, tokenizer)) if args.eval_tasks else None
    print(report)
    result = report.to_dict()
    if before is not None and after is not None:
        result["perplexity"] = {"before": before.to_dict(), "after": after.to_dict()}
        print(f"before: {before}\nafter:  {after}")
    if tasks_before is not None and tasks_after is not None:
        from wandapp.eval import format_comparison

        result["tasks"] = {"before": tasks_before.to_dict(), "after": tasks_after.to_dict(), "protocol": tasks_after.protocol()}
        print(format_comparison({"dense": tasks_before, "pruned": tasks_after}))
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}/ (model, tokenizer, masks/, report.json)")
    return 0


def _checkpoint_perplexity(folder: str, tokenizer: Any, args: argparse.Namespace) -> Any:
    """Perplexity of the checkpoint in ``folder`` (read per module, see ``_offloaded``)."""
    from wandapp.eval import perplexity

    return _offloaded(folder, args, lambda model: perplexity(model, tokenizer, args.eval, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens))


def _offloaded(folder: str, args: argparse.Namespace, measure: Any) -> Any:
    """``measure(model)`` for the checkpoint in ``folder`` with its weights offloaded to disk
    (read per module, as prune_checkpoint reads them)."""
    import tempfile

    import torch

    from wandapp.checkpoint import load_offloaded

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="wandapp-offload-") as offload_folder:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        return measure(load_offloaded(folder, device, offload_folder, dtype))


def _cmd_eval(args: argparse.Namespace) -> int:
    from wandapp.eval import check_tasks, perplexity

    if args.tasks:  # before the model load
        check_tasks(args.tasks, args.include_path)
    model, tokenizer = _load(args.model, args.dtype)
    if args.text or not args.tasks:
        print(perplexity(model, tokenizer, args.text or "northangerabbey", seqlen=args.eval_seqlen, max_tokens=args.eval_tokens))
    if args.tasks:
        print(_task_accuracy(model, tokenizer, args, args.tasks, args.limit, args.batch_size))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import wandapp
    from wandapp import data
    from wandapp.eval import perplexity

    model, tokenizer = _load("demo", "float32")
    calib = data.text_calibration(tokenizer, data.CALIBRATION_TEXT, args.nsamples, args.seqlen, args.seed)
    eval_ids = data.tokenize(tokenizer, data.load_text(data.EVALUATION_TEXT))[: args.eval_tokens]
    protocol = None
    rows = []
    for method in ["dense", *args.methods.split(",")]:
        pruned, seconds, sparsity = model, 0.0, 0.0
        if method != "dense":
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            report = wandapp.prune(pruned, calib, sparsity=args.sparsity, method=method, nsamples=args.nsamples, seed=args.seed)
            seconds, sparsity = time.perf_counter() - start, report.achieved_sparsity
        protocol = perplexity(pruned, eval_ids, seqlen=args.eval_seqlen)
        rows.append((method, protocol.perplexity, seconds, sparsity))
        print(f"{method:>10}: perplexity {protocol.perplexity:.2f}, {seconds:.0f} s, sparsity {sparsity:.3f}", flush=True)
    lines = [
        f"SmolLM2-135M-Instruct at {args.sparsity}; calibration {args.nsamples} x {args.seqlen} tokens of "
        f"{data.CALIBRATION_TEXT} (seed {args.seed}); perplexity on {protocol.tokens} tokens of "
        f"{data.EVALUATION_TEXT} ({protocol.windows} windows x {protocol.seqlen}, {protocol.dtype})",
        f"{'method':>10} {'perplexity':>10} {'prune s':>8} {'sparsity':>8}",
        *[f"{m:>10} {p:>10.2f} {s:>8.0f} {sp:>8.3f}" for m, p, s, sp in rows],
    ]
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    chart = _bar_chart(rows, args.sparsity, os.path.join(args.out, "demo.png"))
    print(f"wrote {args.out}/demo.txt" + (f" and {chart}" if chart else ""))
    return 0


def _bar_chart(rows: list[tuple[str, float, float, float]], sparsity: str, path: str) -> str | None:
    """Perplexity per method on a log scale (magnitude's would flatten the others' bars), and the
    pruning seconds beside it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the chart (pip install 'wandapp[demo]')")
        return None
    methods = [r[0] for r in rows]
    colors = ["#888", "#c66", "#69c", "#3a3", "#a6c"][: len(rows)]
    fig, (ppl, secs) = plt.subplots(1, 2, figsize=(9, 3.5))
    ppl.bar_label(ppl.bar(methods, [r[1] for r in rows], color=colors), fmt="%.1f")
    ppl.set_yscale("log")
    ppl.set_title("held-out perplexity (log scale, lower is better)", fontsize=10)
    secs.bar_label(secs.bar(methods, [r[2] for r in rows], color=colors), fmt="%.0f")
    secs.set_title("pruning seconds", fontsize=10)
    fig.suptitle(f"SmolLM2-135M pruned at {sparsity}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wandapp", description="Wanda++ pruning for LLaMA-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model and save it with its masks and report")
    _add_model(p)
    p.add_argument("--sparsity", default="2:4", help="a fraction such as 0.5, or N:M such as 2:4")
    p.add_argument("--method", default="wanda++", choices=list(METHODS))
    p.add_argument("--calib", default="persuasion", help="calibration text: a string, a file, or a bundled novel name")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper", action="store_true", help="start from PruneConfig.paper() (lr 3e-7, 32 RO samples)")
    for field, kind in CONFIG_FLAGS.items():
        p.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None, help=f"PruneConfig.{field} (see its docs)")
    for field in BOOL_CONFIG_FLAGS:
        p.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None, help=f"PruneConfig.{field} (see its docs)")
    p.add_argument(
        "--dense-check", action=argparse.BooleanOptionalAction, default=None,
        help="PruneConfig.dense_check (default: on for demo, off for --model DIR, which reads the model from disk)",
    )
    for field in ("targets", "ignore"):
        p.add_argument(f"--{field}", nargs="+", default=None, metavar="NAME", help=f"PruneConfig.{field}: module names or name suffixes")
    p.add_argument("--out", required=True, help="output folder; with --model DIR the run resumes there after a crash")
    p.add_argument("--eval", default=None, help="held-out text for perplexity before and after")
    _add_eval(p)
    _add_tasks(p, "--eval-tasks", "--eval-limit", "--eval-batch-size")
    p.set_defaults(run=_cmd_prune)

    p = sub.add_parser("eval", help="perplexity of a model on a text, and its accuracy on lm-evaluation-harness tasks")
    _add_model(p)
    p.add_argument("--text", default=None, help="a string, a file, or a bundled novel name (default: northangerabbey unless --tasks is given)")
    _add_eval(p)
    _add_tasks(p, "--tasks", "--limit", "--batch-size")
    p.add_argument("--seed", type=int, default=0, help="the harness's seeds")
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser("demo", help="magnitude vs wanda vs wanda++ on the embedded SmolLM2 (offline)")
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--methods", default="magnitude,wanda,wanda++")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--out", default="wandapp-demo")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wandapp.errors import WandappError

    try:
        return args.run(args)
    except WandappError as err:
        print(f"wandapp: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
