"""Fused mixture-of-experts parameters (transformers 5 stores each block's experts as 3-D
parameters such as ``mlp.experts.gate_up_proj`` [experts, out, in]): running them with the
per-expert loop, giving the core one leaf matrix per expert, and recording each expert's inputs
from the tokens routed to it."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from wandapp.adapters import Target
from wandapp.errors import UnsupportedModelError


@contextmanager
def eager_experts(modules: list[nn.Module]) -> Iterator[None]:
    """Runs the experts with transformers' per-expert loop ("eager") for as long as it lasts, so
    that each expert's matrix is a slice used by one ``linear`` / ``matmul`` call; the model's
    own setting (often "grouped_mm") is back afterwards. The loop computes the same function."""
    configs = {id(c): c for m in modules if (c := getattr(m, "config", None)) is not None}
    before = {key: getattr(c, "_experts_implementation", None) for key, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = "eager"
        yield
    finally:
        for key, c in configs.items():
            c._experts_implementation = before[key]


@contextmanager
def unfused(targets: list[Target]) -> Iterator[dict[str, torch.Tensor]]:
    """Gives every expert slice among ``targets`` its own leaf tensor [out, in] (yielded by target
    name), so that the core prunes, takes gradients of and optimises each expert as one matrix.
    While it lasts, the module's attribute shadows the fused parameter (which stays registered,
    in its place, untouched) with a stack of the leaves rebuilt before each forward of the module
    (autograd reaches the leaves through the stack); on exit the leaves are written back into the
    parameter and the shadow is removed."""
    groups: dict[tuple[int, str], list[Target]] = {}
    for t in targets:
        if t.expert is not None:
            groups.setdefault((id(t.module), t.param_name), []).append(t)
    leaves: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for members in groups.values():
            leaves.update(stack.enter_context(_unfuse(members[0].module, members[0].param_name, members[0].transposed, members)))
        yield leaves


@contextmanager
def _unfuse(module: nn.Module, name: str, transposed: bool, members: list[Target]) -> Iterator[dict[str, torch.Tensor]]:
    original = module._parameters[name]
    assert original is not None
    # One contiguous leaf [out, in] per expert; the fused layout is rebuilt from them.
    leaves = [(original[e].t() if transposed else original[e]).detach().clone(memory_format=torch.contiguous_format) for e in range(original.shape[0])]

    def stacked() -> torch.Tensor:
        return torch.stack([leaf.t() for leaf in leaves] if transposed else leaves)

    def restack(_module: nn.Module, _args: tuple) -> None:
        object.__setattr__(module, name, stacked())

    restack(module, ())
    handle = module.register_forward_pre_hook(restack)
    try:
        yield {t.name: leaves[t.expert] for t in members if t.expert is not None}
    finally:
        handle.remove()
        with torch.no_grad():
            original.copy_(stacked())
        del module.__dict__[name]


class _SliceCalls(TorchFunctionMode):
    """Records the input of every ``linear(x, W[e])`` / ``x @ W[e]`` whose weight is a slice of one
    of ``params`` (as the eager experts loop makes them), keyed by (parameter, expert)."""

    _LINEAR: tuple[Callable[..., Any], ...] = (F.linear,)
    _MATMUL: tuple[Callable[..., Any], ...] = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm)

    def __init__(self, params: list[tuple[nn.Module, str]]) -> None:
        super().__init__()
        self.params = params
        self.inputs: dict[tuple[int, int], list[torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if (func in self._LINEAR or func in self._MATMUL) and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            hit = self._slice_of(args[1])
            if hit is not None:
                self.inputs.setdefault(hit, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return func(*args, **(kwargs or {}))

    def _slice_of(self, w: torch.Tensor) -> tuple[int, int] | None:
        if w.dim() != 2:
            return None
        for k, (module, name) in enumerate(self.params):
            full = getattr(module, name)
            if w.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
                return k, (w.storage_offset() - full.storage_offset()) // full.stride(0)
        return None


@contextmanager
def routed_inputs(targets: list[Target], token_mask: torch.Tensor | None) -> Iterator[Callable[[Target], torch.Tensor]]:
    """Records, during one forward of their block, the input of each expert slice among
    ``targets`` from the real tokens routed to that expert. Yields a function giving a target's
    input [rows, in] (0 rows when no token reached the expert). ``token_mask`` [b, seq] leaves
    padded tokens out: they are dropped at the experts' input (their output rows are zero, and no
    real token reads them)."""
    params = list({(id(t.module), t.param_name): (t.module, t.param_name) for t in targets if t.expert is not None}.values())
    experts = list({id(m): m for m, _ in params}.values())
    keep = None if token_mask is None else token_mask.reshape(-1)
    rows: dict[int, int] = {}

    def drop_padding(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if keep is None:
            return None
        if len(args) < 3 or args[0].shape[0] != keep.numel():
            raise UnsupportedModelError(
                f"{type(module).__name__}.forward was called without (hidden_states [tokens, hidden], top_k_index, "
                "top_k_weights), which wandapp needs to leave padding out of each expert's statistics; "
                "calibrate without padding (sequences of one length)"
            )
        rows[id(module)] = args[0].shape[0]
        return tuple(a[keep] if i < 3 else a for i, a in enumerate(args)), kwargs

    def restore_rows(module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if keep is None:
            return None
        full = output.new_zeros(rows[id(module)], *output.shape[1:])
        full[keep] = output
        return full

    mode = _SliceCalls(params)
    with ExitStack() as stack:
        for m in experts:
            stack.callback(m.register_forward_pre_hook(drop_padding, with_kwargs=True).remove)
            stack.callback(m.register_forward_hook(restore_rows).remove)
        with mode:
            yield lambda t: _gathered(mode, params, t)


def _gathered(mode: _SliceCalls, params: list[tuple[nn.Module, str]], target: Target) -> torch.Tensor:
    assert target.expert is not None
    key = next(k for k, (m, name) in enumerate(params) if m is target.module and name == target.param_name)
    pieces = mode.inputs.get((key, target.expert), [])
    if pieces:
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    w = target.weight()
    return w.new_zeros(0, w.shape[1])
