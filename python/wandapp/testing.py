"""Assertions for users' regression suites, and a pytest plugin (registered by the package's
``pytest11`` entry point) with a tiny random LLaMA fixture.

    from wandapp.testing import assert_nm
    assert_nm(model, 2, 4)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from wandapp.adapters import iter_matrices, matrix


def _linears(model: Any) -> list[tuple[str, torch.Tensor]]:
    return list(iter_matrices(model))


def assert_sparsity(model: Any, sparsity: float, *, exact: bool = False) -> None:
    """Every row of every block linear has at least ``pruned_per_row(in, sparsity)`` zeros
    (floor(in x sparsity), the sparsity read as its decimal: the count pruning uses). With
    ``exact=True`` every row has exactly that many: a row pruned beyond the count asked for fails
    too (a pruned row has more only where a kept weight is itself zero, which the report lists in
    ``extra_zeros``). Names the first offender."""
    from wandapp.kernels import pruned_per_row

    for name, w in _linears(model):
        need = pruned_per_row(w.shape[1], sparsity)
        zeros = (w == 0).sum(dim=1)
        bad = torch.nonzero(zeros != need if exact else zeros < need)
        if bad.numel():
            row = int(bad[0, 0])
            expected = f"exactly {need}" if exact else f"at least {need}"
            raise AssertionError(f"{name} row {row} has {int(zeros[row])} zeros, expected {expected} (sparsity {sparsity})")


def assert_nm(model: Any, n: int, m: int) -> None:
    """Every group of m consecutive inputs of every row keeps at most n non-zeros."""
    for name, w in _linears(model):
        if w.shape[1] % m:
            raise AssertionError(f"{name} has {w.shape[1]} inputs, not divisible by m={m}")
        nonzero = (w != 0).view(w.shape[0], -1, m).sum(dim=2)
        bad = torch.nonzero(nonzero > n)
        if bad.numel():
            row, group = int(bad[0, 0]), int(bad[0, 1])
            raise AssertionError(
                f"{name} row {row} inputs {group * m}..{group * m + m - 1} keep {int(nonzero[row, group])} weights, more than {n}:{m} allows"
            )


def assert_masks_equal(model: Any, masks: Mapping[str, torch.Tensor]) -> None:
    """Each named weight is zero exactly where its mask says pruned: a masked-out weight that is
    not zero (the model does not respect the masks) and a kept weight that is zero (the masks
    claim more weights than the model has: a report or mask file that is not the model's) both
    fail. Masks from ``PruneReport.masks`` are ``weight != 0`` of the pruned model."""
    for name, mask in masks.items():
        w = matrix(model, name)
        if w is None:
            raise AssertionError(f"mask {name!r} names no weight of the model")
        if tuple(w.shape) != tuple(mask.shape):
            raise AssertionError(f"{name}: weight {tuple(w.shape)} vs mask {tuple(mask.shape)}")
        revived = torch.nonzero((w != 0) & ~mask.to(w.device))
        if revived.numel():
            row, col = (int(v) for v in revived[0])
            raise AssertionError(f"{name} row {row} col {col} is non-zero but its mask says pruned")
        vanished = torch.nonzero((w == 0) & mask.to(w.device))
        if vanished.numel():
            row, col = (int(v) for v in vanished[0])
            raise AssertionError(f"{name} row {row} col {col} is zero but its mask says kept ({len(vanished)} such weights)")


def assert_perplexity_below(model: Any, tokenizer: Any, text: str, limit: float, **kwargs: Any) -> float:
    """Perplexity (wandapp.eval.perplexity with ``kwargs``) below ``limit``; returns it."""
    from wandapp.eval import perplexity

    result = perplexity(model, tokenizer, text, progress=False, **kwargs)
    if not result.perplexity < limit:
        raise AssertionError(f"{result} is not below {limit}")
    return result.perplexity


def assert_task_accuracy_above(
    model: Any, tokenizer: Any, task: str, threshold: float, *, limit: int | float | None = None, metric: str = "acc", **kwargs: Any
) -> float:
    """``metric`` (default ``acc``, a fraction in [0, 1]) of lm-evaluation-harness task ``task``
    (wandapp.eval.tasks with ``limit`` and ``kwargs``: ``num_fewshot``, ``batch_size``, ``seed``,
    ``include_path``) above ``threshold``; returns it. The AssertionError names the task, the
    metric, its value with standard error and items, and the threshold. ``limit`` keeps a
    regression test cheap (the first ``limit`` items; wandapp's offline tasks are in random
    order); the standard error in the message says how far the value may move.

    Raises:
        AssertionError: the value is not above ``threshold``.
        InvalidArgumentError: ``task`` is unknown, a group or tag (name one task), or does not
            report ``metric`` (the message lists its metrics), before any evaluation; and as
            wandapp.eval.tasks raises.
    """
    from wandapp.errors import InvalidArgumentError
    from wandapp.eval import check_tasks, tasks

    metrics = check_tasks([task], kwargs.get("include_path"))
    if list(metrics) != [task]:
        raise InvalidArgumentError(f"{task!r} names several tasks {sorted(metrics)}; assert on one of them")
    if metric not in metrics[task]:
        raise InvalidArgumentError(f"task {task!r} reports no metric {metric!r}; its metrics: {metrics[task]}")
    result = tasks(model, tokenizer, [task], limit=limit, **kwargs)
    value, stderr = result.value(task, metric), result.stderr(task, metric)
    if not value > threshold:
        spread = "" if stderr is None else f" ± {stderr:.4f} (stderr)"
        raise AssertionError(
            f"{task} {metric} {value:.4f}{spread} on {result.samples.get(task)} items is not above {threshold} ({result.header()})"
        )
    return value


def tiny_llama_model(seed: int = 0, num_layers: int = 2, **config: Any) -> Any:
    """A random LlamaForCausalLM small enough for unit tests (GQA, vocab 128). No download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    settings.update(config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global generator as it was
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**settings)).eval()


try:  # the assertions work without pytest; only the fixture needs it
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def tiny_llama() -> Any:
        """A fresh tiny random LlamaForCausalLM (seeded)."""
        return tiny_llama_model()
