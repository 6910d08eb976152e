"""Quality of a model, pruned or not: perplexity, and task accuracy through EleutherAI's
lm-evaluation-harness.

``perplexity`` follows SPEC's protocol: concatenate the text, tokenize once, cut
non-overlapping windows of ``seqlen`` tokens, average the next-token NLL over every predicted
token, report exp(mean) together with the protocol.

``tasks`` (from ``wandapp.harness``, which documents it) runs harness tasks on the model
in memory: ``wandapp.eval.tasks(model, tokenizer, "austen_next_sentence,austen_last_word")``
works offline; it needs ``pip install "wandapp[eval]"``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from wandapp.data import load_text, tokenize
from wandapp.errors import InvalidArgumentError
from wandapp.harness import OFFLINE_TASKS, TaskResults, check_tasks, format_comparison, tasks
from wandapp.offload import input_device

__all__ = ["OFFLINE_TASKS", "Perplexity", "TaskResults", "check_tasks", "format_comparison", "perplexity", "tasks"]


@dataclass
class Perplexity:
    """A perplexity and the protocol that produced it."""

    perplexity: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # tokens evaluated (windows * seqlen)
    predicted: int  # tokens predicted (windows * (seqlen - 1))
    windows: int
    seqlen: int
    dtype: str
    text: str

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} on {self.text} "
            f"({self.tokens} tokens, {self.windows} windows x {self.seqlen}, {self.dtype})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field: the perplexity and the protocol that produced it."""
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer_or_ids: Any,
    text: str | None = None,
    *,
    seqlen: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> Perplexity:
    """Perplexity of ``model`` on ``text`` (a string, a path, or a bundled novel name), or on
    pre-tokenized ids when ``tokenizer_or_ids`` is a LongTensor. ``max_tokens`` caps the
    evaluated tokens (whole windows only)."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids, label = tokenizer_or_ids.reshape(-1).long(), "given ids"
    else:
        if text is None:
            raise InvalidArgumentError("perplexity needs `text` when given a tokenizer")
        ids = tokenize(tokenizer_or_ids, load_text(text))
        label = text if len(text) < 80 else f"a text of {len(text)} characters"
    if seqlen < 2:
        raise InvalidArgumentError(f"seqlen must be >= 2, got {seqlen}")
    limit = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    windows = limit // seqlen
    if windows == 0:
        raise InvalidArgumentError(f"the text has {limit} tokens, fewer than one window of seqlen={seqlen}")
    device = input_device(model)
    chunks = ids[: windows * seqlen].view(windows, seqlen)
    total, count = 0.0, 0
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += batch[:, 1:].numel()
    mean = total / count
    return Perplexity(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=windows * seqlen,
        predicted=count,
        windows=windows,
        seqlen=seqlen,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        text=label,
    )
