"""Putting a model back exactly as the user left it after pruning.

Pruning switches the model to eval mode, turns ``requires_grad`` off and on, drops the gradients
RO leaves, registers hooks, runs the experts with another implementation and calls the model with
``use_cache=False``. Users prune models they are in the middle of preparing (part of a train-mode
model kept in eval, frozen parameters, gradient checkpointing on before LoRA): saving only
``model.training`` and calling ``model.train(flag)`` afterwards put every submodule in one mode.
``preserved`` snapshots every piece of state a module or parameter carries besides its
tensors' values, and puts each back as it was, per module and per parameter, on success, on an
error and on Ctrl-C.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch import nn



def _module_state(key: str) -> bool:
    """The module attributes that are settings rather than computed state: the ``training`` flag,
    hook registries of every kind (and accelerate's ``_hf_hook``), gradient checkpointing. Others
    (a rotary embedding's ``max_seq_len_cached``, kept consistent with its buffers) are left as
    the forward set them."""
    return key == "training" or "hook" in key or "gradient_checkpointing" in key or key.endswith("_implementation")


def _configs(model: nn.Module) -> list[Any]:
    """Every configuration object the model's modules point to (transformers' ``PretrainedConfig``
    and its sub-configs: ``use_cache``, the attention and experts implementations live there)."""
    found: dict[int, Any] = {}
    pending = [getattr(m, "config", None) for m in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "to_dict"):
            continue
        found[id(config)] = config
        pending.extend(v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type"))
    return list(found.values())


class _Attributes:
    """A shallow snapshot of the attributes of an object's ``__dict__`` that ``keep`` selects
    (identity of each value), which puts back rebound, added and removed ones; dict values (hook
    registries) get their contents back too, so hooks added are removed and hooks removed return."""

    def __init__(self, obj: Any, keep: Callable[[str], bool] = lambda _key: True) -> None:
        self.obj, self.keep = obj, keep
        self.values = {k: v for k, v in vars(obj).items() if keep(k)}
        self.contents = {k: list(v.items()) for k, v in self.values.items() if isinstance(v, dict)}

    def restore(self) -> None:
        now = vars(self.obj)
        for key in [k for k in now if k not in self.values and self.keep(k)]:
            del now[key]
        for key, value in self.values.items():
            if now.get(key, _MISSING) is not value:
                now[key] = value
        for key, saved in self.contents.items():
            registry = now[key]
            if list(registry.items()) != saved:
                registry.clear()
                registry.update(saved)


_MISSING = object()


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Runs the body, then puts back, whatever happened in it (an exception or Ctrl-C included):
    every module's own settings (its ``training`` flag, hooks of every kind, gradient
    checkpointing flags: ``_module_state``), every parameter's ``requires_grad`` and ``.grad``,
    and every config attribute (``use_cache``, ``_attn_implementation``, ``_experts_implementation``).
    The values of parameters and buffers are not touched: pruning changes them on purpose, and
    restores a failed block itself."""
    modules = [_Attributes(m, _module_state) for m in model.modules()]
    configs = [_Attributes(c) for c in _configs(model)]
    params = {id(p): (p, p.requires_grad, p.grad) for p in model.parameters()}
    try:
        yield
    finally:
        for saved in (*modules, *configs):
            saved.restore()
        for p, requires_grad, grad in params.values():
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
