"""Calibration data helpers and perplexity against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

import wandapp
from wandapp import data
from wandapp.eval import perplexity

from conftest import tiny_model
from helpers import char_tokenizer


def test_random_windows_are_seeded_and_sized():
    ids = torch.arange(1000)
    a = data.random_windows(ids, 12, 50, seed=3)
    assert a.shape == (12, 50)
    assert torch.equal(a, data.random_windows(ids, 12, 50, seed=3))
    assert not torch.equal(a, data.random_windows(ids, 12, 50, seed=4))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows of the text
    with pytest.raises(wandapp.CalibrationError, match="fewer than seqlen"):
        data.random_windows(torch.arange(10), 2, 10)


def test_bundled_texts_differ_and_load():
    calib, held_out = data.load_text(data.CALIBRATION_TEXT), data.load_text(data.EVALUATION_TEXT)
    assert "Persuasion" in calib[:2000] and "NORTHANGER" in held_out[:2000]
    assert len(calib) > 400_000 and len(held_out) > 400_000


def test_text_from_file_and_string(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello file")
    assert data.load_text(str(path)) == "hello file"
    assert data.load_text("just a string") == "just a string"
    tok = char_tokenizer()
    windows = data.text_calibration(tok, str(path), nsamples=3, seqlen=4, seed=0)
    assert windows.shape == (3, 4)


def test_collect_sequences_splits_batches_and_keeps_padding():
    batch = {"input_ids": torch.ones(3, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5])}
    seqs = data.collect_sequences([batch, torch.zeros(2, 5, dtype=torch.long)], nsamples=4)
    assert len(seqs) == 4
    assert seqs[0].token_mask() is None
    assert torch.equal(seqs[1].token_mask(), torch.tensor([[True, True, True, False, False]]))
    with pytest.raises(wandapp.CalibrationError, match="all padding"):
        data.collect_sequences([{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.zeros(1, 3)}], 1)


def test_dataset_calibration_from_a_local_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["first document " * 20, "", "second one " * 20]})
    windows = data.dataset_calibration(ds, char_tokenizer(), nsamples=5, seqlen=16, seed=1)
    assert windows.shape == (5, 16)
    assert torch.equal(windows, data.dataset_calibration(ds, char_tokenizer(), nsamples=5, seqlen=16, seed=1))
    with pytest.raises(wandapp.CalibrationError, match="no column"):
        data.dataset_calibration(ds, char_tokenizer(), text_field="content")


def test_perplexity_matches_a_hand_computation():
    model = tiny_model("llama", seed=2)
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=64, progress=False, batch_size=2)
    assert (result.windows, result.tokens, result.predicted, result.seqlen, result.dtype) == (4, 256, 252, 64, "float32")
    # By hand: one window at a time, log-softmax, pick the next token, float64 sums.
    total = 0.0
    with torch.no_grad():
        for w in range(4):
            window = ids[w * 64 : (w + 1) * 64]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total -= sum(logp[t, window[t + 1]].item() for t in range(63))
    assert result.nll == pytest.approx(total / 252, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / 252), rel=1e-5)
    assert "256 tokens, 4 windows x 64, float32" in str(result)


def test_perplexity_errors():
    model = tiny_model("llama")
    with pytest.raises(wandapp.InvalidArgumentError, match="fewer than one window"):
        perplexity(model, torch.arange(10), seqlen=64, progress=False)
    with pytest.raises(wandapp.InvalidArgumentError, match="needs `text`"):
        perplexity(model, char_tokenizer(), progress=False)
