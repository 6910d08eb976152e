"""The ``wandapp`` command end to end on a tiny random model saved to a temporary folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import wandapp
from wandapp.cli import main
from wandapp.testing import assert_masks_equal, assert_nm

from conftest import tiny_model
from helpers import char_tokenizer


@pytest.fixture
def saved_model(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def test_prune_saves_a_model_that_reloads_sparse(saved_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = main([
        "prune", "--model", saved_model, "--sparsity", "2:4", "--method", "wanda++", "--calib", "persuasion",
        "--nsamples", "8", "--seqlen", "32", "--ro-rounds", "1", "--out", out,
        "--eval", "northangerabbey", "--eval-seqlen", "64", "--eval-tokens", "512",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "total: 2/2 blocks pruned" in printed and "before: perplexity" in printed
    assert {"model.safetensors.index.json", "config.json", "masks", "report.json", "tokenizer.json"} <= set(os.listdir(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_nm(reloaded, 2, 4)
    masks, meta = wandapp.load_masks(os.path.join(out, "masks"), with_metadata=True)
    assert_masks_equal(reloaded, masks)
    assert meta["method"] == "wanda++" and meta["sparsity"] == "2:4" and json.loads(meta["config"])["ro_rounds"] == 1
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["perplexity"]["after"]["tokens"] == 512
    assert report["blocks"][1]["layers"]["model.layers.1.mlp.down_proj"]["mask_hash"] == wandapp.kernels.mask_hash(
        masks["model.layers.1.mlp.down_proj"]
    )


def test_config_flags_reach_the_report(saved_model, tmp_path):
    out = str(tmp_path / "out")
    code = main([
        "prune", "--model", saved_model, "--sparsity", "0.5", "--calib", "persuasion", "--nsamples", "8", "--seqlen", "32",
        "--paper", "--ro-samples", "4", "--ro-holdout", "2", "--alpha", "50", "--ro-rounds", "1", "--offload", "cpu", "--out", out,
        "--targets", "mlp.down_proj", "q_proj", "--ignore", "model.layers.0.self_attn.q_proj",
    ])
    assert code == 0
    report = json.load(open(os.path.join(out, "report.json")))
    config = report["config"]
    assert (config["targets"], config["ignore"]) == (["mlp.down_proj", "q_proj"], ["model.layers.0.self_attn.q_proj"])
    assert [list(b["layers"]) for b in report["blocks"]] == [
        ["model.layers.0.mlp.down_proj"], ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ]
    assert config["ro_lr"] == 3e-7  # from --paper
    assert (config["alpha"], config["ro_samples"], config["ro_holdout"], config["ro_rounds"], config["offload"]) == (50.0, 4, 2, 1, "cpu")
    assert config["ro_lr_search"] == "off"  # from --paper
    assert (config["ro_min_improvement"], config["ro_extrapolate"], config["ro_autocast"]) == (0.0, False, "off")  # from --paper


def test_owl_and_lr_search_flags(saved_model, tmp_path):
    out = str(tmp_path / "out")
    code = main([
        "prune", "--model", saved_model, "--sparsity", "0.5", "--method", "wanda++", "--calib", "persuasion", "--nsamples", "8",
        "--seqlen", "32", "--ro-samples", "4", "--ro-holdout", "2", "--ro-rounds", "2", "--ro-lr-search", "full", "--ro-extrapolate",
        "--ro-min-improvement", "0.2", "--ro-autocast", "bfloat16",
        "--layer-sparsity", "owl", "--owl-lambda", "0.1", "--out", out,
    ])
    assert code == 0
    report = json.load(open(os.path.join(out, "report.json")))
    config = report["config"]
    # Each flag differs from PruneConfig's default.
    assert (config["layer_sparsity"], config["owl_lambda"], config["ro_lr_search"]) == ("owl", 0.1, "full")
    assert (config["ro_extrapolate"], config["ro_min_improvement"], config["ro_autocast"]) == (True, 0.2, "bfloat16")
    # The step search scales the first round's rate by a power of two.
    assert all(b["target_sparsity"] is not None and math.log2(b["ro_lr"] / config["ro_lr"]).is_integer() for b in report["blocks"])
    assert {b["ro_autocast"] for b in report["blocks"]} == {"bfloat16"}


def test_eval_prints_the_protocol(saved_model, capsys):
    assert main(["eval", "--model", saved_model, "--text", "northangerabbey", "--eval-seqlen", "64", "--eval-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "256 tokens" in out and "4 windows x 64" in out and "float32" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["prune", "--model", "/nonexistent", "--out", "x"], "neither 'demo' nor a folder"),
        (["prune", "--out", "x", "--method", "obs"], "invalid choice"),
        (["prune", "--model", "demo"], "--out"),
        (["eval", "--eval-seqlen", "many"], "invalid int"),
    ],
)
def test_argument_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv) if argv[2:3] != ["/nonexistent"] else sys.exit(main(argv))
    assert info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.processes
def test_torchrun_prunes_on_every_rank_and_rank_0_writes(saved_model, tmp_path):
    args = ["prune", "--model", saved_model, "--sparsity", "2:4", "--method", "wanda", "--calib", "persuasion", "--nsamples", "6", "--seqlen", "32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "wandapp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "ranks")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("total: 2/2 blocks pruned") == 1  # rank 0 alone prints and writes
    report = json.load(open(tmp_path / "ranks" / "report.json"))
    assert report["nsamples"] == 6 and report["config"]["ro_batch_size"] == 2
    # One process (the checkpoint streamed) finds the same masks: wanda's statistics are summed exactly.
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    ranks, alone = wandapp.load_masks(str(tmp_path / "ranks" / "masks")), wandapp.load_masks(str(tmp_path / "alone" / "masks"))
    assert ranks.keys() == alone.keys() and all(torch.equal(ranks[k], alone[k]) for k in alone)


def test_python_dash_m_entry_point(saved_model):
    done = subprocess.run([sys.executable, "-m", "wandapp", "prune", "--model", saved_model, "--sparsity", "5:4", "--out", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "wandapp: error: invalid N:M pattern 5:4: need 1 <= n < m (2:4 keeps 2 of every 4)"
