"""Catching the first block's inputs (with every keyword argument the model passes its decoder
layers) in one checked dense pass, and keeping activations on the offload device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wandapp._core import ActivationStats
from wandapp.adapters import DecoderAdapter, Target
from wandapp.data import Sequence
from wandapp.errors import NonFiniteError, UnsupportedModelError
from wandapp.offload import input_device

# The cache would grow with every call; blocks are replayed without one.
_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value")


def move(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Moves tensors (also inside tuples, lists and dicts) to ``device``; ``non_blocking`` only
    for copies onto an accelerator (a copy to the host must finish before it is read)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, non_blocking) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device, non_blocking) for k, v in value.items()}
    return value


@dataclass
class Sample:
    """One calibration sequence at the input of the current block."""

    hidden: torch.Tensor  # [1, seq, hidden], on the offload device
    #: Per attention type (DecoderAdapter.kinds), the keyword arguments the model passes a block
    #: of that type (attention mask, position embeddings...), on the offload device.
    kwargs: dict[str, dict[str, Any]]
    token_mask: torch.Tensor | None  # [1, seq] bool, True on real tokens; None without padding


def pinned_offload(offload: torch.device, device: torch.device) -> bool:
    """Whether activations waiting on ``offload`` for blocks on ``device`` go to page-locked
    memory: CPU offload for a CUDA block, so that copies to the device run asynchronously."""
    return offload.type == "cpu" and device.type == "cuda"


def stash(t: torch.Tensor, offload: torch.device, pin: bool) -> torch.Tensor:
    """``t`` moved to where activations wait between blocks. With ``pin`` (CPU offload for a
    CUDA block) the copy lands in page-locked memory without waiting, so that the caller
    synchronises once for many copies, and copies back to the device run asynchronously."""
    if not pin:
        return t.to(offload)
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def without_padding(hidden: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``hidden`` [1, seq, dim] with padded positions set to 0. Real tokens never read them
    (causal and padding masks give them attention weight exactly 0), but an inf or NaN there would
    still turn a weight's gradient (0 x inf) or a product into NaN; zeros keep them harmless."""
    if token_mask is None:
        return hidden
    return hidden.masked_fill(~token_mask.to(hidden.device).unsqueeze(-1), 0)


def next_block_inputs(samples: list[Sample], outputs: list[torch.Tensor]) -> list[Sample]:
    """This block's outputs become the next block's inputs; arguments and padding stay."""
    return [Sample(out, s.kwargs, s.token_mask) for out, s in zip(outputs, samples)]


class _Captured(Exception):
    """Stops the model's forward after its last decoder block (the norm and LM head are not needed)."""


class _FiniteChecks:
    """Finiteness flags of the dense pass, on real tokens only, kept on the device and read with
    one host synchronisation after the last sequence. Each flag remembers the place it checks
    (a sequence may skip places: experts that received none of its tokens)."""

    def __init__(self) -> None:
        self.places: dict[str, int] = {}
        self.current: list[tuple[int, torch.Tensor]] = []
        self.per_sequence: list[tuple[list[int], torch.Tensor]] = []
        self.token_mask: torch.Tensor | None = None  # [1, seq] bool on the model's device

    def start(self, token_mask: torch.Tensor | None) -> None:
        self.current, self.token_mask = [], token_mask

    def check(self, where: str, x: torch.Tensor) -> None:
        real = x if self.token_mask is None or x.dim() != 3 else x[self.token_mask]
        # A float64 sum is finite exactly when every value is (it cannot overflow from finite
        # float32/half values), and costs one reduction instead of a bool copy of x.
        self.current.append((self.places.setdefault(where, len(self.places)), torch.isfinite(real.sum(dtype=torch.float64))))

    def finish(self) -> None:
        self.per_sequence.append(([k for k, _ in self.current], torch.stack([flag for _, flag in self.current])))

    def first_failure(self) -> tuple[int, str] | None:
        """(sequence, place) of the first non-finite value, or None."""
        if not self.per_sequence:
            return None
        flags = torch.cat([f for _, f in self.per_sequence]).cpu()
        names = list(self.places)
        offset = 0
        for n, (keys, _) in enumerate(self.per_sequence):
            bad = torch.nonzero(~flags[offset : offset + len(keys)])
            if bad.numel():
                return n, names[keys[int(bad[0, 0])]]
            offset += len(keys)
        return None


def replay_tolerance(dtype: torch.dtype) -> float:
    """The replay check's bound on ||replayed - model|| / ||the block's change of the hidden
    state|| (real tokens): 1e-3, or 4 ulps of a half-precision dtype. Replaying is the same
    computation, so on CPU the error is exactly 0; wrong arguments give errors of order 1."""
    return max(1e-3, 4 * torch.finfo(dtype).eps)


class _Replay:
    """The replay check: runs one calibration sequence through the blocks one by one, exactly as
    pruning will (each block called alone with the arguments caught for its attention type, on
    the previous replayed output with padding zeroed), beside the model's own forward, and
    compares every block's output with the hidden state the model passes on. Errors stay on the
    device until ``first_mismatch`` reads them once."""

    def __init__(self, adapter: DecoderAdapter, token_mask: torch.Tensor | None) -> None:
        self.adapter = adapter
        self.token_mask = token_mask
        self.kwargs: dict[str, dict[str, Any]] = {}
        self.hidden: torch.Tensor | None = None
        self.model_input: torch.Tensor | None = None
        self.running = False  # the block hooks ignore the replay's own block calls
        self.errors: list[torch.Tensor] = []

    def real(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.token_mask is None else x[self.token_mask].float()

    def block_input(self, index: int, x: torch.Tensor) -> None:
        """At the model's call of block ``index`` with input ``x``: checks the replayed output
        of the block before, then replays block ``index``."""
        if index > 0:
            self.compare(x)
        else:
            self.hidden = without_padding(x, self.token_mask)
        self.model_input = x
        assert self.hidden is not None
        self.running = True
        try:
            out = DecoderAdapter.call(self.adapter.layers[index], self.hidden, self.kwargs[self.adapter.kinds[index]])
        finally:
            self.running = False
        self.hidden = without_padding(out, self.token_mask)

    def compare(self, model_output: torch.Tensor) -> None:
        assert self.hidden is not None and self.model_input is not None
        expected = self.real(model_output)
        change = torch.linalg.vector_norm(expected - self.real(self.model_input))
        error = torch.linalg.vector_norm(self.real(self.hidden) - expected)
        self.errors.append(error / change.clamp_min(torch.finfo(torch.float32).tiny))

    def first_mismatch(self, tolerance: float) -> tuple[int, float] | None:
        """(block, relative error) of the first block whose replay differs, or None."""
        errors = torch.stack(self.errors).cpu().tolist()
        return next(((i, e) for i, e in enumerate(errors) if not e <= tolerance), None)


@torch.no_grad()
def capture_first_block(
    adapter: DecoderAdapter,
    sequences: list[Sequence],
    offload: torch.device,
    pin: bool = False,
    act_stats: dict[str, ActivationStats] | None = None,
    dense_check: bool = True,
    numbers: list[int] | None = None,
) -> list[Sample]:
    """Runs the dense model once per sequence through all its decoder blocks, keeping the first
    block's input and the arguments each attention type receives at its first block. With
    ``act_stats`` (a dict), it also gathers the activation statistics of every linear target's
    input on the dense model, by target name (OWL's dense pre-pass, at no extra forward).
    Without ``dense_check``, only the replayed sequence runs through every block; the others
    stop once the last attention type's first block has its arguments (their checks then cover
    the blocks they reached).

    The same pass checks, on real tokens, that every block's input, every linear layer's input
    and the last block's output are finite: a model that overflows on the user's own data (float16
    often does) raises NonFiniteError naming the first block and layer, before any weight changes.
    It also replays the longest sequence block by block (``_Replay``) and raises
    UnsupportedModelError naming the first block whose replay differs from the model's forward
    by more than ``replay_tolerance``: such a model would be pruned on wrong inputs. Messages name
    sequences by ``numbers`` (a rank's share: their numbers among all the calibration), or by
    position.
    """
    numbers = numbers or list(range(len(sequences)))
    model = adapter.model
    device = input_device(model)
    firsts = {index: kind for kind, index in adapter.first_of_each_kind().items()}
    stop_at = max(firsts) if not dense_check and act_stats is None else None
    last = len(adapter.layers) - 1
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, dict[str, Any]] = {}
    checks = _FiniteChecks()
    lengths = [seq.input_ids.shape[1] if seq.attention_mask is None else int(seq.attention_mask.sum()) for seq in sequences]
    replayed = lengths.index(max(lengths))
    replay: _Replay | None = None
    replay_errors: _Replay | None = None

    def on_block_input(index: int):
        def hook(_module: nn.Module, args: tuple, given: dict[str, Any]) -> None:
            if replay is not None and replay.running:
                return
            x = args[0] if args else given["hidden_states"]
            checks.check(f"the input of block {index}", x)
            if index == 0:
                hidden.append(x)
            if index in firsts:
                kept = {k: v for k, v in given.items() if k not in _DROPPED_KWARGS and k != "hidden_states"}
                kwargs[firsts[index]] = move({**kept, "use_cache": False}, offload)
                if replay is not None:
                    replay.kwargs[firsts[index]] = {**kept, "use_cache": False}
            if replay is not None:
                replay.block_input(index, x)
            elif index == stop_at:
                raise _Captured

        return hook

    seen: set[str] = set()
    partial: set[str] = set()
    tokens = [0]  # of the sequence running

    def on_linear_input(target: Target, where: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if replay is None or not replay.running:
                checks.check(where, args[0])
                seen.add(target.name)
                if args[0].numel() != tokens[0] * args[0].shape[-1]:
                    partial.add(target.name)
                elif act_stats is not None:
                    stats = act_stats.setdefault(target.name, ActivationStats(args[0].shape[-1]))
                    stats.update(args[0].reshape(1, tokens[0], -1), checks.token_mask)

        return hook

    def on_last_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        if replay is not None and replay.running:
            return
        out = output[0] if isinstance(output, tuple) else output
        checks.check(f"the output of block {last}", out)
        if replay is not None:
            replay.compare(out)
        raise _Captured

    handles = [layer.register_forward_pre_hook(on_block_input(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    handles += [
        target.module.register_forward_pre_hook(on_linear_input(target, f"the input of {target.name} (block {i})"))
        for i in range(len(adapter.layers))
        for target in adapter.targets(i)
        if target.expert is None
    ]
    handles.append(adapter.layers[last].register_forward_hook(on_last_output))
    samples = []
    try:
        for n, seq in enumerate(sequences):
            attention_mask = None if seq.attention_mask is None else seq.attention_mask.to(device, torch.long)
            token_mask = seq.token_mask()
            device_mask = None if token_mask is None else token_mask.to(device)
            checks.start(device_mask)
            tokens[0] = seq.input_ids.numel()
            replay = _Replay(adapter, device_mask) if n == replayed else None
            try:
                model(input_ids=seq.input_ids.to(device), attention_mask=attention_mask, use_cache=False)
            except _Captured:
                pass
            else:
                raise RuntimeError(f"the model returned without calling decoder block {last}")
            checks.finish()
            samples.append(Sample(stash(without_padding(hidden.pop(), token_mask), offload, pin), dict(kwargs), token_mask))
            kwargs.clear()
            if replay is not None:
                replay_errors, replay = replay, None
    finally:
        for handle in handles:
            handle.remove()
    if pin:
        torch.cuda.synchronize()
    failure = checks.first_failure()
    if failure is not None:
        raise NonFiniteError(
            f"the dense model overflows on calibration sequence {numbers[failure[0]]}: {failure[1]} holds NaN or infinity (on real "
            "tokens) before any pruning. Load the model in bfloat16 or float32 (float16 overflows easily), "
            "or check the input ids"
        )
    linears = [t.name for t in adapter.all_targets() if t.expert is None]
    unseen = [name for name in linears if name not in seen]
    if partial or unseen:
        raise UnsupportedModelError(
            f"{type(model).__name__}: linear layers {sorted(partial)[:3] or unseen[:3]} "
            + ("see only some tokens (experts stored as separate modules, each run on the tokens routed to it)" if partial else
               "are never called as modules in the model's forward (their weights are used directly)")
            + "; wandapp cannot gather their inputs. It prunes transformers 5's fused experts; pass ignore=[...] "
            "naming these layers to leave them dense"
        )
    assert replay_errors is not None
    tolerance = replay_tolerance(samples[0].hidden.dtype)
    mismatch = replay_errors.first_mismatch(tolerance)
    if mismatch is not None:
        raise UnsupportedModelError(
            f"replay check failed: decoder block {mismatch[0]} of {type(model).__name__}, called alone with the arguments "
            f"the model passed to the first block of its attention type ({adapter.kinds[mismatch[0]]!r}), gives an output "
            f"that differs from the model's own forward on calibration sequence {numbers[replayed]} (relative error {mismatch[1]:.2e}, "
            f"tolerance {tolerance:.1e}). The model passes its blocks something wandapp does not capture (per-block "
            "arguments, or work between blocks), so pruning would use wrong inputs; this architecture is not supported"
        )
    return samples
