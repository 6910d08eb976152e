"""Zero-shot (and few-shot) task accuracy of an in-memory model through EleutherAI's
lm-evaluation-harness (``pip install "wandapp[eval]"``; https://github.com/EleutherAI/lm-evaluation-harness).

wandapp writes no task logic: the harness's ``HFLM`` wraps the model object and its tokenizer,
``simple_evaluate`` runs the tasks, and prompts, scoring, metrics and standard errors are the
harness's own. wandapp adds the checks that run before any evaluation (task names, task data,
the tokenizer against the model), a result with a table and ``to_dict()``, and two tasks built
from the bundled Northanger Abbey that run offline (:data:`OFFLINE_TASKS`, in
:data:`OFFLINE_TASKS_DIR`; how they were built and their chance levels: the README.md there).

Public entry points: ``wandapp.eval.tasks`` (re-exported from here), ``check_tasks``,
``TaskResults``, ``format_comparison``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import math
import os
import random
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from wandapp._optional import require
from wandapp.errors import InvalidArgumentError, MissingDependencyError
from wandapp.offload import input_device

#: The folder of wandapp's offline tasks (YAML + JSONL in the harness's format), always searched.
OFFLINE_TASKS_DIR: str = str(resources.files("wandapp").joinpath("data", "tasks"))
#: wandapp's offline tasks, built from Northanger Abbey by tools/build_offline_tasks.py; the tag
#: ``austen`` names both.
OFFLINE_TASKS = ("austen_next_sentence", "austen_last_word")

#: Messages the harness logs about the way wandapp calls it (a model object instead of a name, a
#: ``custom_dataset`` loader): true and expected here, so they are not shown.
_EXPECTED_NOTES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)

TaskNames = str | Sequence[str]


def _harness() -> Any:
    return require("lm_eval", "task accuracy (wandapp.eval.tasks)")


@dataclass
class TaskResults:
    """What lm-evaluation-harness measured, per task.

    ``metrics[task]`` maps the harness's metric names (``acc``, ``acc_norm``, ``perplexity``,
    ``exact_match,strict-match``: a metric whose filter is not the default ``none`` keeps it) to
    their values, and ``<metric>_stderr`` to their standard errors (None where the harness
    computed none). Values are the harness's own numbers: accuracies are fractions in [0, 1].
    """

    metrics: dict[str, dict[str, float | None]]
    #: items evaluated per task (after ``limit``), from the harness's ``n-samples``
    samples: dict[str, int]
    #: per task and metric: whether higher is better (the task's configuration)
    higher_is_better: dict[str, dict[str, bool]]
    #: per task and metric: the chance level its configuration declares (``metadata.chance``;
    #: wandapp's offline tasks do), empty elsewhere
    chance: dict[str, dict[str, float]]
    #: few-shot examples per task
    num_fewshot: dict[str, int]
    limit: int | float | None
    seed: int
    batch_size: int
    dtype: str
    harness_version: str
    #: task -> its version in the harness's configuration
    versions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, float | None]]:
        """``{task: {metric: value, metric_stderr: value, ...}}`` (a copy)."""
        return copy.deepcopy(self.metrics)

    def protocol(self) -> dict[str, Any]:
        """How the numbers were made: harness version, few-shot, limit, items, seed, batch, dtype."""
        return {
            "harness": f"lm-evaluation-harness {self.harness_version}",
            "num_fewshot": dict(self.num_fewshot),
            "limit": self.limit,
            "samples": dict(self.samples),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "chance": copy.deepcopy(self.chance),
            "versions": dict(self.versions),
        }

    def value(self, task: str, metric: str = "acc") -> float:
        """The value of ``metric`` on ``task``; InvalidArgumentError naming what exists otherwise."""
        if task not in self.metrics:
            raise InvalidArgumentError(f"no results for task {task!r}; these tasks ran: {sorted(self.metrics)}")
        if metric not in self.metrics[task] or metric.endswith("_stderr"):
            names = [m for m in self.metrics[task] if not m.endswith("_stderr")]
            raise InvalidArgumentError(f"task {task!r} has no metric {metric!r}; its metrics: {names}")
        value = self.metrics[task][metric]
        return float("nan") if value is None else value

    def stderr(self, task: str, metric: str = "acc") -> float | None:
        """The standard error of ``metric`` on ``task`` (None where the harness computed none)."""
        self.value(task, metric)
        return self.metrics[task].get(f"{metric}_stderr")

    def header(self) -> str:
        """One line: harness version, few-shot, limit, seed, batch size and dtype."""
        shots = sorted(set(self.num_fewshot.values())) or [0]
        return (
            f"lm-evaluation-harness {self.harness_version}, {'/'.join(map(str, shots))}-shot, "
            f"limit {self.limit}, seed {self.seed}, batch {self.batch_size}, {self.dtype}"
        )

    def __str__(self) -> str:
        rows = [("task", "metric", "value", "stderr", "n", "chance")]
        for task, metric in _metric_rows(self):
            chance = self.chance.get(task, {}).get(metric)
            rows.append((
                task, metric + _direction(self, task, metric), _fmt(self.value(task, metric)),
                _fmt(self.stderr(task, metric)), str(self.samples.get(task, "-")), "-" if chance is None else _fmt(chance),
            ))
        return self.header() + "\n" + _columns(rows)


def _metric_rows(result: TaskResults) -> list[tuple[str, str]]:
    return [(task, m) for task in sorted(result.metrics) for m in result.metrics[task] if not m.endswith("_stderr")]


def _direction(result: TaskResults, task: str, metric: str) -> str:
    better = result.higher_is_better.get(task, {}).get(metric)
    return "" if better is None else (" ^" if better else " v")


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def format_comparison(results: Mapping[str, TaskResults], markdown: bool = False) -> str:
    """Several results side by side (e.g. ``{"dense": before, "pruned": after}``): one row per task
    and metric, one column per result with ``value ± stderr``. ``^`` marks a metric where higher
    is better, ``v`` one where lower is. ``markdown=True`` gives a Markdown table."""
    if not results:
        raise InvalidArgumentError("format_comparison needs at least one result")
    first = next(iter(results.values()))
    header = ("task", "metric", *results.keys())
    rows = []
    for task, metric in _metric_rows(first):
        cells = []
        for result in results.values():
            if task in result.metrics and metric in result.metrics[task]:
                value, se = result.value(task, metric), result.stderr(task, metric)
                cells.append(_fmt(value) + ("" if se is None else f" ± {_fmt(se)}"))
            else:
                cells.append("-")
        rows.append((task, metric + _direction(first, task, metric), *cells))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    return first.header() + "\n" + _columns([header, *rows])


# ------------------------------------------------------------------------------------- checks


def _names(tasks: TaskNames) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise InvalidArgumentError(f"no task named (got {tasks!r}); name one, e.g. {list(OFFLINE_TASKS)} (offline)")
    return list(dict.fromkeys(names))


def _include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> tuple[str, ...]:
    given = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    for path in given:
        if not os.path.isdir(path):
            raise InvalidArgumentError(f"include_path {str(path)!r} is not a folder; name a folder holding task YAML files")
    return (OFFLINE_TASKS_DIR, *(os.path.abspath(p) for p in given))


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], defaults: bool) -> Any:
    """The harness's TaskManager over ``paths`` (and its own tasks with ``defaults``: indexing
    them takes about 10 s, so it is built once per process and only when a name needs it)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and os.path.isfile(name)


def _manager_for(names: list[str], paths: tuple[str, ...]) -> Any:
    """The TaskManager that knows every name: wandapp's and the user's folders alone when they
    suffice, else with the harness's own tasks; InvalidArgumentError naming an unknown task."""
    manager = _task_manager(paths, False)
    if all(n in manager.all_tasks or _is_yaml_path(n) for n in names):
        return manager
    manager = _task_manager(paths, True)
    for name in names:
        if name not in manager.all_tasks and not _is_yaml_path(name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise InvalidArgumentError(
                f"unknown task {name!r}: not a task, group or tag of lm-evaluation-harness {_version()}, nor in "
                f"the folders searched ({', '.join(paths)})" + (f"; did you mean {close}?" if close else "")
                + f". wandapp's offline tasks: {list(OFFLINE_TASKS)} (tag 'austen'); for your own tasks name their "
                "folder with include_path= (--include-path DIR)"
            )
    return manager


def _load(names: list[str], paths: tuple[str, ...]) -> tuple[Any, list[Any]]:
    """(TaskManager, the tasks and groups named, each loaded with its data). A task whose data
    cannot be loaded (not downloaded and no network, a missing file) is an InvalidArgumentError
    naming it; one that needs a package not installed is a MissingDependencyError."""
    _harness()
    manager = _manager_for(names, paths)
    built: list[Any] = []
    for name in names:
        try:
            with _quiet_expected_notes(), _random_state():
                loaded = manager.load([name])
        except ModuleNotFoundError as err:
            raise MissingDependencyError(f"task {name!r} needs the {err.name!r} package, which is not installed; run: pip install {err.name}") from None
        except Exception as err:  # the harness and datasets raise many kinds (ConnectionError, FileNotFoundError, ...)
            raise InvalidArgumentError(
                f"task {name!r} could not load its data ({type(err).__name__}: {_first_line(err)}). Without network "
                "only data already on this machine can be used: download the dataset once where there is network "
                "(datasets keeps it in its cache; then set HF_DATASETS_OFFLINE=1), or give tasks whose data are local "
                f"files with include_path= (--include-path DIR), as wandapp's offline tasks {list(OFFLINE_TASKS)} do"
            ) from err
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag or a YAML path: its tasks
            built.extend(loaded["tasks"].values())
    return manager, built


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def check_tasks(tasks: TaskNames, include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict[str, list[str]]:
    """Checks that every task is known and its data loads, without a model: what
    ``tasks`` checks before evaluating, for callers (the command line, the pytest helper)
    that want to fail before slow work such as pruning. Returns ``{task: [metric names]}`` for
    the tasks that would run (a tag or group expanded to its tasks), metrics as the results
    name them.

    Raises:
        MissingDependencyError: lm-evaluation-harness is not installed (``pip install "wandapp[eval]"``),
            or a task needs a package that is not.
        InvalidArgumentError: no task named, an unknown task, a task whose data cannot be loaded
            (offline: not downloaded), an include_path that is not a folder.
    """
    _, built = _load(_names(tasks), _include_paths(include_path))
    metrics: dict[str, list[str]] = {}
    for item in built:
        for task in item.get_all_tasks() if hasattr(item, "get_all_tasks") else [item]:
            metrics[task.task_name] = list(task.higher_is_better())
    return metrics


def check_tokenizer(model: Any, tokenizer: Any) -> None:
    """InvalidArgumentError unless ``tokenizer`` can belong to ``model``: it must be a tokenizer
    (callable, with ``encode``) with a BOS or EOS token (the harness's prefix for an empty
    context) whose ids (``len(tokenizer)``, special tokens included) all fall inside the model's
    input embedding table. A tokenizer of another model with a larger
    vocabulary would index past the table; one with the same size cannot be told apart here."""
    if not callable(tokenizer) or not hasattr(tokenizer, "encode"):
        raise InvalidArgumentError(
            f"tokenizer is a {type(tokenizer).__name__}, not a tokenizer; pass the one saved with the model "
            "(AutoTokenizer.from_pretrained(<the model's folder>))"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise InvalidArgumentError(f"the model ({type(model).__name__}) has no input embeddings; pass a transformers *ForCausalLM")
    if getattr(tokenizer, "bos_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        raise InvalidArgumentError(
            f"the tokenizer ({type(tokenizer).__name__}) has neither a BOS nor an EOS token; lm-evaluation-harness "
            "scores an empty context after one of them. Set one (tokenizer.add_special_tokens({'eos_token': ...})), "
            "as the model was trained"
        )
    rows = embeddings.weight.shape[0]
    if len(tokenizer) > rows:
        raise InvalidArgumentError(
            f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has "
            f"{len(tokenizer)} tokens but the model's embedding table has {rows} rows: it is not this model's "
            "tokenizer. Pass the tokenizer saved with the model (AutoTokenizer.from_pretrained(<the model's folder>))"
        )


def _check_options(num_fewshot: int, limit: int | float | None, batch_size: int | None, seed: int, bootstrap_iters: int) -> None:
    def integer(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not integer(num_fewshot) or num_fewshot < 0:
        raise InvalidArgumentError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if limit is not None and not ((integer(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit < 1)):
        raise InvalidArgumentError(f"limit must be None, an integer >= 1 (items per task) or a fraction in (0, 1), got {limit!r}")
    if batch_size is not None and (not integer(batch_size) or batch_size < 1):
        raise InvalidArgumentError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if not integer(seed):
        raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    if not integer(bootstrap_iters) or bootstrap_iters < 0:
        raise InvalidArgumentError(f"bootstrap_iters must be an integer >= 0, got {bootstrap_iters!r}")


# ---------------------------------------------------------------------------------- evaluation


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(note in record.getMessage() for note in _EXPECTED_NOTES)


@contextlib.contextmanager
def _quiet_expected_notes() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm_eval.models.huggingface", "lm_eval.api.task")]
    note = _DropExpected()
    handlers = {h for lg in loggers for h in lg.handlers} | set(logging.getLogger().handlers)
    for target in [*loggers, *handlers]:
        target.addFilter(note)
    try:
        yield
    finally:
        for target in [*loggers, *handlers]:
            target.removeFilter(note)


@contextlib.contextmanager
def _random_state(model: Any = None) -> Iterator[None]:
    """Leaves the caller's random generators (Python, NumPy, torch on the CPU and on the model's
    GPUs) as they were: the harness seeds them, and loading tasks draws from Python's."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [] if model is None else sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _caller_state(model: Any) -> Iterator[None]:
    """Leaves the model's training flag (the harness calls ``model.eval()``) and the random
    generators as they were."""
    training = model.training
    try:
        with _random_state(model):
            yield
    finally:
        model.train(training)


def _version() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:  # pragma: no cover - imported but not installed as a distribution
        return "unknown"


#: Requests per forward call when batch_size is None.
DEFAULT_BATCH_SIZE = 8


def tasks(
    model: Any,
    tokenizer: Any,
    tasks: TaskNames,
    *,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    bootstrap_iters: int = 100000,
) -> TaskResults:
    """Accuracy of ``model`` (pruned or not, in memory) on lm-evaluation-harness tasks.

    The harness does everything that decides the numbers: ``lm_eval.models.huggingface.HFLM``
    wraps ``model`` and ``tokenizer`` (on the model's own device, in its own dtype) and
    ``lm_eval.simple_evaluate`` runs ``tasks`` with ``num_fewshot``, ``limit``,
    ``bootstrap_iters`` and every seed (Python, NumPy, torch, few-shot) set to ``seed``. The
    values returned are the harness's own, metric names included (``acc``, ``acc_norm``, and
    their standard errors ``acc_stderr``, ...). The harness shows its own progress bars.

    Args:
        model: a transformers causal LM (``*ForCausalLM``), on any device and dtype, or
            dispatched/offloaded by accelerate (inputs go to its execution device); its device,
            dtype, weights and training flag are left as they were, and so are the caller's
            random generators.
        tokenizer: the model's tokenizer (left unchanged: a copy gets the pad token the harness
            sets when it has none).
        tasks: names of harness tasks, groups or tags, as a list or one comma-separated string:
            wandapp's offline tasks (:data:`OFFLINE_TASKS`, tag ``austen``), the harness's own
            (``hellaswag``, ``arc_easy``...: their data are downloaded by ``datasets``, so they
            need network or a filled cache) or tasks in ``include_path``.
        num_fewshot: examples of the task before each item (0: zero-shot, the Wanda papers'
            protocol). A task whose configuration fixes 0 keeps it (the harness's rule).
        limit: items per task: an integer, or a fraction in (0, 1) of each task; None: all.
            The first items are taken (wandapp's offline tasks are in random order).
        batch_size: requests per forward call (None: :data:`DEFAULT_BATCH_SIZE`). Batches pad
            on the right, so the numbers agree across batch sizes to float rounding.
        seed: every seed of the harness.
        include_path: a folder (or folders) of further tasks in the harness's YAML format.
        bootstrap_iters: resamples for the standard errors that have no closed form
            (``perplexity``: the harness's default, 100000); 0 computes none.

    Returns:
        TaskResults: ``print`` it for a table (task, metric, value, stderr, items, chance);
        ``to_dict()`` gives ``{task: {metric: value, metric_stderr: value}}``.

    Raises:
        MissingDependencyError: lm-evaluation-harness is not installed (``pip install "wandapp[eval]"``),
            or a task needs a package that is not.
        InvalidArgumentError: an unknown task (with close names), a task whose data cannot be
            loaded (offline and not downloaded), a tokenizer that is not the model's (ids past
            its embedding table), an option out of range. All are raised before any evaluation.
    """
    lm_eval = _harness()
    _check_options(num_fewshot, limit, batch_size, seed, bootstrap_iters)
    check_tokenizer(model, tokenizer)
    manager, built = _load(_names(tasks), _include_paths(include_path))
    from lm_eval.models.huggingface import HFLM

    if getattr(tokenizer, "pad_token_id", None) is None:  # the harness would set one on the caller's tokenizer
        tokenizer = copy.deepcopy(tokenizer)
    batch = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    with _caller_state(model), _quiet_expected_notes():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
        device = input_device(model)
        if lm.device != device:  # HFLM takes model.device, which is "meta" for a model accelerate offloads
            lm._device = device
        out = lm_eval.simple_evaluate(
            model=lm, tasks=built, task_manager=manager, num_fewshot=num_fewshot, limit=limit, batch_size=batch,
            bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    return results_from_harness(out, limit=limit, seed=seed, batch_size=batch, dtype=str(next(model.parameters()).dtype).replace("torch.", ""))


def results_from_harness(out: Mapping[str, Any], *, limit: int | float | None, seed: int, batch_size: int, dtype: str) -> TaskResults:
    """A TaskResults from the dictionary ``lm_eval.simple_evaluate`` returns (its ``results``,
    ``n-samples``, ``higher_is_better``, ``n-shot``, ``versions`` and ``configs`` sections).
    Metric keys lose the harness's default filter suffix ``,none``; other filters stay."""
    metrics: dict[str, dict[str, float | None]] = {}
    for task, values in out["results"].items():
        row: dict[str, float | None] = {}
        for key, value in values.items():
            if key == "alias" or "," not in key:
                continue
            name = key[: -len(",none")] if key.endswith(",none") else key
            row[name] = None if isinstance(value, str) else float(value)  # "N/A": no stderr computed
        metrics[task] = row
    configs = out.get("configs", {})
    chance = {
        t: {k: float(v) for k, v in ((configs.get(t) or {}).get("metadata") or {}).get("chance", {}).items()}
        for t in metrics
    }
    return TaskResults(
        metrics=metrics,
        samples={t: int(n["effective"]) for t, n in out.get("n-samples", {}).items()},
        higher_is_better={t: dict(v) for t, v in out.get("higher_is_better", {}).items() if t in metrics},
        chance={t: c for t, c in chance.items() if c},
        num_fewshot={t: int(n) for t, n in out.get("n-shot", {}).items() if t in metrics},
        limit=limit,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        harness_version=_version(),
        versions={t: v for t, v in out.get("versions", {}).items() if t in metrics},
    )
