"""Catching the first block's inputs (with every keyword argument the model passes its decoder
layers) in one checked dense pass, keeping activations on the offload device, and running one
block for the core."""

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


def without_padding(hidden: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``hidden`` [1, seq, dim] with padded positions set to 0. Real tokens never read them
    (causal and padding masks give them attention weight exactly 0), but an inf or NaN there would
    still turn a weight's gradient (0 x inf) or a product into NaN; zeros keep them harmless."""
    if token_mask is None:
        return hidden
    return hidden.masked_fill(~token_mask.to(hidden.device).unsqueeze(-1), 0)


def next_block_inputs(samples: list[Sample], outputs: list[torch.Tensor]) -> list[Sample]:
    """This block's outputs become the next block's inputs; arguments and padding stay."""
    return [Sample(without_padding(out, s.token_mask), s.kwargs, s.token_mask) for out, s in zip(outputs, samples)]


class _Captured(Exception):
    """Stops the model's forward after its last decoder block (the norm and LM head are not needed)."""


class _FiniteChecks:
    """Finiteness flags of one sequence's dense forward, on real tokens only, read with one
    host synchronisation per sequence: (where, flag) in the order the model computed them."""

    def __init__(self) -> None:
        self.flags: list[tuple[str, torch.Tensor]] = []
        self.token_mask: torch.Tensor | None = None  # [1, seq] bool on the model's device

    def check(self, where: str, x: torch.Tensor) -> None:
        real = x if self.token_mask is None or x.dim() != 3 else x[self.token_mask]
        self.flags.append((where, torch.isfinite(real).all()))

    def first_failure(self) -> str | None:
        if not self.flags:
            return None
        ok = torch.stack([flag for _, flag in self.flags]).cpu()
        bad = torch.nonzero(~ok)
        return self.flags[int(bad[0, 0])][0] if bad.numel() else None


@torch.no_grad()
def capture_first_block(adapter: DecoderAdapter, sequences: list[Sequence], offload: torch.device) -> list[Sample]:
    """Runs the dense model once per sequence through all its decoder blocks, keeping the first
    block's input and the arguments each attention type receives at its first block.

    The same pass checks, on real tokens, that every block's input, every linear layer's input
    and the last block's output are finite: a model that overflows on the user's own data (float16
    often does) raises NonFiniteError naming the first block and layer, before any weight changes.
    """
    model = adapter.model
    device = next(model.parameters()).device
    firsts = {index: kind for kind, index in adapter.first_of_each_kind().items()}
    last = len(adapter.layers) - 1
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, dict[str, Any]] = {}
    checks = _FiniteChecks()

    def on_block_input(index: int):
        def hook(_module: nn.Module, args: tuple, given: dict[str, Any]) -> None:
            x = args[0] if args else given["hidden_states"]
            checks.check(f"the input of block {index}", x)
            if index == 0:
                hidden.append(x)
            if index in firsts:
                kept = {k: v for k, v in given.items() if k not in _DROPPED_KWARGS and k != "hidden_states"}
                kwargs[firsts[index]] = move({**kept, "use_cache": False}, offload)

        return hook

    def on_linear_input(where: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            checks.check(where, args[0])

        return hook

    def on_last_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        checks.check(f"the output of block {last}", output[0] if isinstance(output, tuple) else output)
        raise _Captured

    handles = [layer.register_forward_pre_hook(on_block_input(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    handles += [
        linear.register_forward_pre_hook(on_linear_input(f"the input of {name} (block {i})"))
        for i in range(len(adapter.layers))
        for name, linear in adapter.linears(i)
    ]
    handles.append(adapter.layers[last].register_forward_hook(on_last_output))
    samples = []
    try:
        for i, seq in enumerate(sequences):
            attention_mask = None if seq.attention_mask is None else seq.attention_mask.to(device, torch.long)
            token_mask = seq.token_mask()
            checks.flags.clear()
            checks.token_mask = None if token_mask is None else token_mask.to(device)
            try:
                model(input_ids=seq.input_ids.to(device), attention_mask=attention_mask, use_cache=False)
            except _Captured:
                pass
            else:
                raise RuntimeError(f"the model returned without calling decoder block {last}")
            where = checks.first_failure()
            if where is not None:
                raise NonFiniteError(
                    f"the dense model overflows on calibration sequence {i}: {where} holds NaN or infinity (on real "
                    f"tokens) before any pruning. Load the model in bfloat16 or float32 (float16 overflows easily), "
                    "or check the input ids"
                )
            samples.append(Sample(without_padding(hidden.pop(), token_mask).to(offload), dict(kwargs), token_mask))
            kwargs.clear()
    finally:
        for handle in handles:
            handle.remove()
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
