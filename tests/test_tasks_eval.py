"""Task accuracy through lm-evaluation-harness (wandapp.eval.tasks), the offline Austen tasks,
the pytest helper and the command line. The harness is the reference: the numbers must be the
ones its own simple_evaluate gives for the same model, tasks and settings."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'wandapp[eval]'")

import wandapp  # noqa: E402
from wandapp.cli import main  # noqa: E402
from wandapp.errors import InvalidArgumentError, MissingDependencyError  # noqa: E402
from wandapp.eval import OFFLINE_TASKS, TaskResults, check_tasks, tasks  # noqa: E402
from wandapp.harness import OFFLINE_TASKS_DIR  # noqa: E402
from wandapp.testing import assert_task_accuracy_above  # noqa: E402

from conftest import tiny_model  # noqa: E402
from helpers import char_tokenizer, python_blocks, run_python_blocks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEXT, LAST = OFFLINE_TASKS
#: Few items keep the tiny-model tests fast; 1000 resamples keep perplexity's bootstrap cheap.
FAST = dict(limit=6, batch_size=4, bootstrap_iters=1000)


def tokenizer_with_eos():
    """The tests' character tokenizer with an EOS token (the harness's prefix for empty contexts)."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    return tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", max_position_embeddings=1024), tokenizer_with_eos()  # the passages fit


@pytest.fixture(autouse=True)
def bootstrap_in_process(monkeypatch):
    """The harness's own switch: bootstrap standard errors without a process pool (cheaper for
    the few items here; both sides of every comparison run the same way)."""
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")


@pytest.fixture(scope="module")
def measured(tiny):
    """4 items of austen_next_sentence on the tiny model (shared by the tests that read it)."""
    return tasks(*tiny, [NEXT], limit=4, batch_size=2)


@pytest.fixture
def no_evaluation(monkeypatch):
    """Makes any evaluation fail the test: errors must come before it."""
    import lm_eval

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation ran before the error")

    monkeypatch.setattr(lm_eval, "simple_evaluate", refuse)


def harness_reference(model, tokenizer, names, limit, batch_size, bootstrap_iters, seed=0):
    """The harness on its own: HFLM + simple_evaluate with wandapp's task folder, results
    flattened here independently of wandapp's parser (metric keys are "<metric>,<filter>")."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=names,
        task_manager=TaskManager(include_path=OFFLINE_TASKS_DIR, include_defaults=False), limit=limit,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return {
        task: {key.split(",")[0]: (None if value == "N/A" else value) for key, value in row.items() if "," in key}
        for task, row in out["results"].items()
    }


def test_numbers_are_the_harness_own(tiny):
    model, tokenizer = tiny
    result = tasks(model, tokenizer, "austen", **FAST)
    reference = harness_reference(model, tokenizer, list(OFFLINE_TASKS), **FAST)
    assert result.to_dict() == reference  # exactly: values and standard errors
    assert set(result.to_dict()) == {NEXT, LAST}
    assert set(result.to_dict()[NEXT]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(result.to_dict()[LAST]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}


def test_table_protocol_and_values(measured):
    result = measured
    assert isinstance(result, TaskResults)
    assert result.samples == {NEXT: 4} and result.num_fewshot == {NEXT: 0}
    assert result.chance == {NEXT: {"acc": 0.25, "acc_norm": 0.25}}  # declared in the task's YAML
    assert result.value(NEXT) in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 items
    acc, se = result.value(NEXT), result.stderr(NEXT)
    assert se == pytest.approx((acc * (1 - acc) / 3) ** 0.5)  # the harness's sample standard error of a mean
    lines = str(result).splitlines()
    assert lines[0].startswith("lm-evaluation-harness ") and "0-shot" in lines[0] and "limit 4" in lines[0]
    assert lines[1].split() == ["task", "metric", "value", "stderr", "n", "chance"]
    row = lines[2].split()
    assert row[:3] == [NEXT, "acc", "^"] and float(row[3]) == pytest.approx(acc, abs=5e-5) and row[5:] == ["4", "0.2500"]
    assert result.protocol()["samples"] == {NEXT: 4} and result.protocol()["dtype"] == "float32"
    with pytest.raises(InvalidArgumentError, match="no metric 'f1'.*'acc', 'acc_norm'"):
        result.value(NEXT, "f1")


def test_a_task_folder_of_the_user_runs_and_the_caller_state_is_kept(tiny, tmp_path):
    """Any task in the harness's format, in a folder named by include_path; the model (weights,
    training flag), the tokenizer and the random generators are as they were."""
    items = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in [(1, 2), (2, 2), (3, 1)]]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "sums.yaml").write_text(
        "task: my_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "sums.jsonl") + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    model, _ = tiny
    tokenizer = tokenizer_with_eos()
    tokenizer.pad_token = None  # the harness sets one when there is none: on a copy
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    try:
        result = tasks(model, tokenizer, "my_sums", include_path=str(tmp_path), batch_size=2)
        assert (random.random(), np.random.rand(), torch.rand(1)) == expected
        assert model.training and tokenizer.pad_token is None
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    finally:
        model.eval()
    assert result.samples == {"my_sums": 3} and set(result.to_dict()["my_sums"]) == {"acc", "acc_stderr"}
    assert check_tasks("my_sums", include_path=tmp_path) == {"my_sums": ["acc"]}


# -------------------------------------------------------------------------------- the offline tasks


def test_offline_tasks_load_from_the_shipped_files():
    assert check_tasks("austen") == {NEXT: ["acc", "acc_norm"], LAST: ["perplexity", "acc"]}
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=OFFLINE_TASKS_DIR, include_defaults=False).load(list(OFFLINE_TASKS))["tasks"]
    for name in OFFLINE_TASKS:
        with open(os.path.join(OFFLINE_TASKS_DIR, f"{name}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == 200 and list(loaded[name].test_docs()) == rows
    next_rows = list(loaded[NEXT].test_docs())
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in next_rows)
    assert {r["label"] for r in next_rows} == {0, 1, 2, 3}
    for row in loaded[LAST].test_docs():  # the target occurs earlier in its passage
        assert re.search(rf"\b{row['target']}\b", row["context"]) and row["target"].isalpha()


def test_the_build_script_rebuilds_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_offline_tasks.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in sorted(os.listdir(OFFLINE_TASKS_DIR)):
        if name.endswith((".jsonl", ".yaml", ".py", ".md")):
            assert (tmp_path / name).read_bytes() == open(os.path.join(OFFLINE_TASKS_DIR, name), "rb").read(), name


@pytest.mark.demo_model
@pytest.mark.slow
def test_the_dense_demo_model_scores_above_chance():
    """On the first 50 items of each offline task (all 200, measured in docs/evaluation.md: next
    sentence acc_norm 0.465 ± 0.035, last word acc 0.385 ± 0.035)."""
    from wandapp.models import load_demo_model

    model, tokenizer = load_demo_model()
    result = tasks(model, tokenizer, "austen", limit=50, bootstrap_iters=1000)
    print(result)
    for task, metric, chance in ((NEXT, "acc_norm", 0.25), (LAST, "acc", 0.06)):
        assert result.chance[task][metric] == chance
        assert result.value(task, metric) > chance + result.stderr(task, metric), (task, metric, result.value(task, metric))


# ----------------------------------------------------------------------------------- the pytest helper


def test_assert_task_accuracy_above_passes_and_fails_with_the_numbers(tiny, measured):
    model, tokenizer = tiny
    acc = measured.value(NEXT)
    assert assert_task_accuracy_above(model, tokenizer, NEXT, acc - 0.01, limit=4, batch_size=2) == acc
    with pytest.raises(AssertionError) as failed:
        assert_task_accuracy_above(model, tokenizer, NEXT, acc, limit=4, batch_size=2)
    message = str(failed.value)
    assert message.startswith(f"{NEXT} acc {acc:.4f} ± {measured.stderr(NEXT):.4f} (stderr) on 4 items is not above {acc}")


def test_assert_task_accuracy_above_refuses_a_metric_or_a_tag_before_evaluating(tiny, no_evaluation):
    model, tokenizer = tiny
    with pytest.raises(InvalidArgumentError, match=r"'austen_last_word' reports no metric 'acc_norm'; its metrics: \['perplexity', 'acc'\]"):
        assert_task_accuracy_above(model, tokenizer, LAST, 0.1, metric="acc_norm")
    with pytest.raises(InvalidArgumentError, match="names several tasks"):
        assert_task_accuracy_above(model, tokenizer, "austen", 0.1)


# --------------------------------------------------------------------------------------------- errors


def test_an_unknown_task_is_refused_with_close_names(tiny, no_evaluation):
    model, tokenizer = tiny
    with pytest.raises(InvalidArgumentError, match=r"unknown task 'austen_next_sentense'.*did you mean \['austen_next_sentence'.*include_path"):
        tasks(model, tokenizer, "austen_last_word,austen_next_sentense")


def test_a_task_whose_data_cannot_be_found_is_refused(tiny, tmp_path, no_evaluation):
    (tmp_path / "gone.yaml").write_text(
        "task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "missing.jsonl") + "\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{a}}'\ndoc_to_target: '{{b}}'\n"
    )
    model, tokenizer = tiny
    with pytest.raises(InvalidArgumentError, match=r"task 'gone' could not load its data \(FileNotFoundError.*include_path="):
        tasks(model, tokenizer, "gone", include_path=tmp_path)


def test_a_tokenizer_of_another_model_is_refused(tiny, no_evaluation):
    model, _ = tiny
    tokenizer = tokenizer_with_eos()
    tokenizer.add_tokens([f"<extra{i}>" for i in range(60)])  # 158 ids, the model embeds 128
    with pytest.raises(InvalidArgumentError, match="has 158 tokens but the model's embedding table has 128 rows: it is not this model's tokenizer"):
        tasks(model, tokenizer, NEXT)
    with pytest.raises(InvalidArgumentError, match="not a tokenizer"):
        tasks(model, "gpt2", NEXT)
    with pytest.raises(InvalidArgumentError, match="neither a BOS nor an EOS token"):
        tasks(model, char_tokenizer(), NEXT)


@pytest.mark.parametrize("option, message", [
    (dict(limit=0), "limit must be"), (dict(limit=1.5), "limit must be"), (dict(num_fewshot=-1), "num_fewshot"),
    (dict(batch_size=0), "batch_size"), (dict(include_path="/nonexistent/tasks"), "is not a folder"),
])
def test_options_out_of_range_are_refused(tiny, no_evaluation, option, message):
    model, tokenizer = tiny
    with pytest.raises(InvalidArgumentError, match=message):
        tasks(model, tokenizer, NEXT, **option)
    with pytest.raises(InvalidArgumentError, match="no task named"):
        tasks(model, tokenizer, " , ")


def test_without_the_harness_the_error_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    model, tokenizer = tiny
    with pytest.raises(MissingDependencyError, match=r'wandapp\[eval\]'):
        tasks(model, tokenizer, NEXT)


# ---------------------------------------------------------------------------------------- command line


@pytest.fixture
def saved_model(tmp_path, tiny):
    folder = tmp_path / "tiny"
    tiny[0].save_pretrained(folder)
    tiny[1].save_pretrained(folder)
    return str(folder)


def test_cli_eval_prints_the_table(saved_model, capsys):
    assert main(["eval", "--model", saved_model, "--tasks", f"{NEXT},{LAST}", "--limit", "3", "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert not any(line.startswith("perplexity ") for line in printed.splitlines())  # only tasks asked for
    rows = {tuple(line.split()[:2]) for line in printed.splitlines()}
    assert {(NEXT, "acc"), (NEXT, "acc_norm"), (LAST, "acc"), (LAST, "perplexity")} <= rows and "limit 3" in printed


def test_cli_prune_reports_tasks_before_and_after(saved_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = main([
        "prune", "--model", saved_model, "--sparsity", "0.5", "--method", "magnitude", "--nsamples", "2", "--seqlen", "16",
        "--out", out, "--eval-tasks", NEXT, "--eval-limit", "2", "--eval-batch-size", "4",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("task "))
    assert header.split() == ["task", "metric", "dense", "pruned"]
    report = json.load(open(os.path.join(out, "report.json")))
    assert set(report["tasks"]) == {"before", "after", "protocol"}
    assert set(report["tasks"]["before"][NEXT]) == set(report["tasks"]["after"][NEXT]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert report["tasks"]["protocol"]["samples"] == {NEXT: 2}
    # the dense numbers are the dense model's own
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = tasks(AutoModelForCausalLM.from_pretrained(saved_model), AutoTokenizer.from_pretrained(saved_model), NEXT, limit=2, batch_size=4)
    assert report["tasks"]["before"] == dense.to_dict()


def test_cli_refuses_an_unknown_task_before_loading_or_pruning(tmp_path, capsys, monkeypatch):
    import wandapp.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model was loaded before the task check"))
    assert main(["prune", "--model", "demo", "--out", str(tmp_path / "o"), "--eval-tasks", "no_such_task_xyz"]) == 1
    assert main(["eval", "--model", "demo", "--tasks", "no_such_task_xyz"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("wandapp: error: unknown task 'no_such_task_xyz'") for e in errors)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.demo_model
@pytest.mark.slow
def test_the_evaluation_guide_examples_run(capsys):
    """docs/evaluation.md's Python blocks run in order in one namespace, and its pytest example passes."""
    guide = os.path.join(ROOT, "docs", "evaluation.md")
    blocks = python_blocks(guide)
    assert len(blocks) == 3
    namespace = run_python_blocks(guide, blocks)
    namespace["test_pruned_model_still_predicts_the_next_sentence"]()
    printed = capsys.readouterr().out
    assert "dense" in printed and "pruned" in printed and "capitals" in printed
