"""Shared set-up for the benchmarks: the embedded model, seeded calibration and held-out text."""

from __future__ import annotations

import copy
import os
import platform
import sys
import time

import torch

import wandapp
from wandapp import data
from wandapp.eval import perplexity
from wandapp.models import load_demo_model


RESULTS = os.path.join(os.path.dirname(__file__), "results")


def write_results(name: str, lines: list[str], directory: str = RESULTS) -> None:
    """Prints a results table and writes it to <directory>/<name> (default bench/results)."""
    print("\n".join(lines))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        f.write("\n".join(lines) + "\n")


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, python {sys.version.split()[0]}"


#: A second held-out text, out of the calibration's domain and on every machine: the Python
#: language reference topics shipped with the interpreter (pydoc_data), sorted by topic name.
SECOND_TEXT = "the Python language reference (pydoc_data.topics)"


def second_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class Workbench:
    """The dense demo model loaded once; each run prunes a fresh copy."""

    def __init__(self, nsamples: int, seqlen: int, eval_tokens: int, eval_seqlen: int, seed: int = 0):
        self.dense, self.tokenizer = load_demo_model()
        self.calib = data.text_calibration(self.tokenizer, data.CALIBRATION_TEXT, nsamples, seqlen, seed)
        self.eval_ids = data.tokenize(self.tokenizer, data.load_text(data.EVALUATION_TEXT))[:eval_tokens]
        self.second_ids = data.tokenize(self.tokenizer, second_text())[:eval_tokens]
        self.eval_seqlen = eval_seqlen
        self.nsamples = nsamples

    def ppl(self, model: torch.nn.Module, ids: torch.Tensor | None = None) -> float:
        """Perplexity on the evaluation text (Northanger Abbey), or on ``ids``."""
        return perplexity(model, self.eval_ids if ids is None else ids, seqlen=self.eval_seqlen, progress=False).perplexity

    def run(self, method: str, sparsity: str | float, **overrides) -> tuple[float, float, wandapp.PruneReport, torch.nn.Module]:
        """(perplexity, seconds, report, pruned model) of one pruning run on a copy of the dense model."""
        model = copy.deepcopy(self.dense)
        start = time.perf_counter()
        report = wandapp.prune(model, self.calib, sparsity=sparsity, method=method, nsamples=self.nsamples, progress=False, **overrides)
        seconds = time.perf_counter() - start
        return self.ppl(model), seconds, report, model
