"""Catching the first block's inputs (with every keyword argument the model passes its decoder
layers), keeping activations on the offload device, and running one block for the core."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from wandapp.adapters import DecoderAdapter
from wandapp.data import Sequence
from wandapp.errors import NonFiniteError

# The cache would grow with every call; blocks are replayed without one.
_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value")


def move(value: Any, device: torch.device) -> Any:
    """Moves tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


@dataclass
class Sample:
    """One calibration sequence at the input of the current block."""

    hidden: torch.Tensor  # [1, seq, hidden], on the offload device
    #: Per attention type (DecoderAdapter.kinds), the keyword arguments the model passes a block
    #: of that type (attention mask, position embeddings...), on the offload device.
    kwargs: dict[str, dict[str, Any]]
    token_mask: torch.Tensor | None  # [1, seq] bool, True on real tokens; None without padding


def next_block_inputs(samples: list[Sample], outputs: list[torch.Tensor]) -> list[Sample]:
    """This block's outputs become the next block's inputs; arguments and padding stay."""
    return [Sample(out, s.kwargs, s.token_mask) for out, s in zip(outputs, samples)]


class _Captured(Exception):
    """Stops the model's forward once every block type has shown its arguments."""


@torch.no_grad()
def capture_first_block(adapter: DecoderAdapter, sequences: list[Sequence], offload: torch.device) -> list[Sample]:
    """Runs the model once per sequence up to the first block of its last attention type (just
    the first block when all blocks share one type), keeping the first block's input and the
    arguments each type receives."""
    model = adapter.model
    device = next(model.parameters()).device
    firsts = adapter.first_of_each_kind()
    last = max(firsts.values())
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, dict[str, Any]] = {}

    def catcher(kind: str, index: int):
        def catch(_module: nn.Module, args: tuple, given: dict[str, Any]) -> None:
            if index == 0:
                hidden.append(args[0] if args else given["hidden_states"])
            kept = {k: v for k, v in given.items() if k not in _DROPPED_KWARGS and k != "hidden_states"}
            kwargs[kind] = move({**kept, "use_cache": False}, offload)
            if index == last:
                raise _Captured

        return catch

    samples = []
    handles = [adapter.layers[i].register_forward_pre_hook(catcher(kind, i), with_kwargs=True) for kind, i in firsts.items()]
    try:
        for seq in sequences:
            attention_mask = None if seq.attention_mask is None else seq.attention_mask.to(device, torch.long)
            try:
                model(input_ids=seq.input_ids.to(device), attention_mask=attention_mask, use_cache=False)
            except _Captured:
                samples.append(Sample(hidden.pop().to(offload), dict(kwargs), seq.token_mask()))
                kwargs.clear()
            else:
                raise RuntimeError(f"the model returned without calling decoder block {last}")
    finally:
        for handle in handles:
            handle.remove()
    for i, s in enumerate(samples):
        real = s.hidden if s.token_mask is None else s.hidden[s.token_mask.to(s.hidden.device)]
        if not torch.isfinite(real).all():
            raise NonFiniteError(
                f"calibration sequence {i} gives NaN or infinite activations at the first block; "
                "check the input ids and the model's dtype (float16 overflows easily: try bfloat16 or float32)"
            )
    return samples


class BlockRunner:
    """The ``Block`` the core drives: the HuggingFace layer, run unchanged on ``device``."""

    def __init__(self, adapter: DecoderAdapter, index: int, samples: list[Sample], device: torch.device):
        self.layer = adapter.layers[index]
        self.kind = adapter.kinds[index]
        self.linears = [module for _, module in adapter.linears(index)]
        self.samples = samples
        self.device = device
        self.targets: list[torch.Tensor] = []
        self._recorded: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def forward(self, i: int) -> torch.Tensor:
        s = self.samples[i]
        return DecoderAdapter.call(self.layer, s.hidden.to(self.device), move(s.kwargs[self.kind], self.device))

    def linear_inputs(self, i: int) -> list[torch.Tensor]:
        with self._recording() as recorded:
            self.forward(i)
        return recorded

    def target(self, i: int) -> torch.Tensor:
        return self.targets[i].to(self.device)

    def token_mask(self, i: int) -> torch.Tensor | None:
        mask = self.samples[i].token_mask
        return None if mask is None else mask.to(self.device)

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The block's output for every sample, on the offload device."""
        return [self.forward(i).to(self.samples[i].hidden.device) for i in range(len(self))]

    @contextmanager
    def _recording(self) -> Iterator[list[torch.Tensor]]:
        by_layer: dict[int, torch.Tensor] = {}

        def keeper(k: int):
            def keep(_module: nn.Module, args: tuple) -> None:
                by_layer[k] = args[0].detach()

            return keep

        handles = [linear.register_forward_pre_hook(keeper(k)) for k, linear in enumerate(self.linears)]
        recorded: list[torch.Tensor] = []
        try:
            yield recorded
            recorded.extend(by_layer[k] for k in range(len(self.linears)))
        finally:
            for h in handles:
                h.remove()
