"""One rank of tests/test_distributed.py (forked by its fork server: ``run_rank``; or run as a script
with the spec and the output folder as arguments): joins a gloo group from the environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun sets them), prunes the tiny model conftest builds
with the settings in argv[1] (JSON) and saves what the test compares to argv[2]/rank{r}.pt: the
masks, the weights before and after, the report, or the error raised.

Spec keys: method, sparsity, n (sequences), layers, config (PruneConfig overrides), other_data_rank
(that rank passes other calibration data), other_weights_rank (that rank's model differs in one
weight by one ulp), fail ({"rank", "block", "where": "capture" | "forward"
| "ro" | "core" | "after"}: that rank raises there; "after": once every block is pruned, or
once prune_checkpoint has written the checkpoint), offload (blocks dispatched by accelerate to CPU and disk,
as tests/test_offload.py does, each rank into its own folder), checkpoint ({"src", "dst",
optionally "own_dst_rank" and "own_dst": that rank's dst instead}: run wandapp.prune_checkpoint
instead, on the checkpoint in src), other_config_rank and other_config (that rank's PruneConfig
overrides on top of config), fail_before_prune_rank (that rank raises inside
``wandapp.distributed.guarded`` before it calls prune).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import calib_ids, tiny_model  # noqa: E402

import wandapp  # noqa: E402
from wandapp import block  # noqa: E402

prune_module = importlib.import_module("wandapp.prune")  # `wandapp.prune` is the function
checkpoint_module = importlib.import_module("wandapp.checkpoint")


class Injected(RuntimeError):
    """The failure a test asks one rank to raise."""


def inject(fail: dict, model: torch.nn.Module) -> None:
    """Makes this rank raise ``Injected`` at ``fail["where"]`` (in block ``fail["block"]``)."""
    if fail["where"] == "capture":

        def broken_capture(*args, **kwargs):
            raise Injected("injected failure while capturing")

        prune_module.capture_first_block = broken_capture
        return
    if fail["where"] == "after":  # after the last block's collectives, still inside the guard
        # prune_checkpoint: once its checkpoint is written; prune: once every block is pruned.
        module, name = (checkpoint_module, "_prune_checkpoint") if model is None else (prune_module, "prune_blocks")
        run = getattr(module, name)

        def then_fail(*args, **kwargs):
            run(*args, **kwargs)
            raise Injected("injected failure after the last block")

        setattr(module, name, then_fail)
        return
    if fail["where"] == "core":  # as the core starts on the block
        run_core = prune_module._run_core

        def broken_core(adapter, index, *args):
            if index == fail["block"]:
                raise Injected(f"injected failure in block {index}")
            return run_core(adapter, index, *args)

        prune_module._run_core = broken_core
        return
    layer = model.model.layers[fail["block"]]

    def failing(original):
        def call(self, indices):
            if self.layer is layer and torch.is_grad_enabled():
                raise Injected(f"injected failure in block {fail['block']}")
            return original(self, indices)

        return call

    # "forward": the first pass over the block (the regional gradients' forwards record the linear
    # inputs); "ro": an RO step (the only forward with autograd on).
    if fail["where"] == "forward":
        block.BlockRunner.linear_inputs = failing(block.BlockRunner.linear_inputs)  # type: ignore[method-assign]
    else:
        block.BlockRunner.forward = failing(block.BlockRunner.forward)  # type: ignore[method-assign]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, also those accelerate keeps offloaded."""
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    return {k: v.clone() for k, v in get_state_dict_offloaded_model(model).items()}


def run_rank(spec_json: str, out: str, env: dict[str, str]) -> None:
    """The entry point of a rank forked by tests/test_distributed.py's fork server (which imported
    this module, torch and transformers once): the rank's environment, its output to
    ``out/rank<r>.log``, then :func:`main`."""
    torch.set_num_threads(1)
    os.environ.update(env)
    log = os.open(os.path.join(out, f"rank{env['RANK']}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    main(spec_json, out)


def main(spec_json: str, out: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = calib_ids(spec["n"], 16, seed=2 if spec.get("other_data_rank") == rank else 1)
    if "checkpoint" in spec:
        if spec.get("fail", {}).get("rank") == rank:
            inject(spec["fail"], None)
        where = spec["checkpoint"]
        dst = where["own_dst"] if where.get("own_dst_rank") == rank else where["dst"]
        try:
            report = wandapp.prune_checkpoint(where["src"], dst, ids, sparsity=spec["sparsity"], method=spec["method"], progress=False)
            result = {"rank": rank, "report": report.to_dict()}
        except Exception as err:  # the test inspects it
            result = {"rank": rank, "error": type(err).__name__, "message": str(err), "failed_rank": getattr(err, "rank", None)}
            result["report"] = err.report.to_dict() if getattr(err, "report", None) is not None else None
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
        return
    model = tiny_model("llama", num_hidden_layers=spec.get("layers", 3))
    if spec.get("other_weights_rank") == rank:
        with torch.no_grad():
            w = model.model.layers[1].mlp.up_proj.weight
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    if spec.get("offload"):
        from test_offload import dispatched

        model = dispatched(model, os.path.join(out, f"offload-rank{rank}"))
    if spec.get("fail", {}).get("rank") == rank:
        inject(spec["fail"], model)
    config = {**spec.get("config", {}), **(spec["other_config"] if spec.get("other_config_rank") == rank else {})}
    before = state(model)
    result: dict = {"rank": rank, "before": before}
    try:
        # The user's own step before prune (loading, say), guarded; other runs call prune alone.
        guard = wandapp.distributed.guarded(wandapp.distributed.World.current()) if "fail_before_prune_rank" in spec else nullcontext()
        with guard:
            if spec.get("fail_before_prune_rank") == rank:
                raise RuntimeError("failed before prune")
            report = wandapp.prune(model, ids, sparsity=spec["sparsity"], method=spec["method"], progress=False, **config)
        result["report"] = report.to_dict()
        result["masks"] = report.masks
    except Exception as err:  # the test inspects it
        result["error"] = type(err).__name__
        result["message"] = str(err)
        result["cause"] = type(err.__cause__).__name__ if err.__cause__ is not None else None
        result["failed_rank"] = getattr(err, "rank", None)
        result["report"] = err.report.to_dict() if getattr(err, "report", None) is not None else None
    result["after"] = state(model)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
