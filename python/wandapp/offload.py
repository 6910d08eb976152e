"""Blocks of models dispatched by accelerate (``from_pretrained(device_map="auto")`` with CPU or
disk offload, ``dispatch_model``, ``cpu_offload``, ``disk_offload``): for its turn a block's
weights become ordinary tensors on the pruning device, and afterwards the pruned ones are written
back where they live (accelerate's CPU weights map, or its offload folder on disk), so the
model's own forward and ``save_pretrained`` see them. Plain models: the block is moved to the
device and back. Only accelerate's own primitives are used (hooks, ``set_module_tensor_to_device``,
``offload_weight``), the same across accelerate 1.x."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import MutableMapping
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

#: Files wandapp writes beside an offload folder's entries (never over a file it did not write:
#: transformers points disk entries at the user's own checkpoint shards).
_OWN_FILE_PREFIX = "wandapp__"


def align_hooks(module: nn.Module) -> list[Any]:
    """The accelerate ``AlignDevicesHook``s on ``module`` (inside SequentialHooks too)."""
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # accelerate not installed: nothing can be dispatched
        return []
    out, todo = [], [getattr(module, "_hf_hook", None)]
    while todo:
        hook = todo.pop(0)
        if isinstance(hook, SequentialHook):
            todo = list(hook.hooks) + todo
        elif isinstance(hook, AlignDevicesHook):
            out.append(hook)
    return out


def offload_hook(module: nn.Module) -> Any | None:
    """The hook that keeps ``module``'s own tensors elsewhere (CPU or disk) and loads them for each
    forward, or None."""
    return next((h for h in align_hooks(module) if h.offload and h.weights_map is not None), None)


def is_dispatched(model: nn.Module) -> bool:
    return any(align_hooks(m) for m in model.modules())


def offloaded_tensor_names(model: nn.Module) -> set[str]:
    """Full names of the tensors accelerate offloads (they show as ``meta`` in the model)."""
    out = set()
    for prefix, module in model.named_modules():
        hook = offload_hook(module)
        if hook is not None:
            out |= {f"{prefix}.{n}" if prefix else n for n in _swapped(module, hook)}
    return out


def _device(d: Any) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def execution_devices(model: nn.Module) -> set[torch.device]:
    """The devices accelerate's hooks compute on."""
    return {_device(h.execution_device) for m in model.modules() for h in align_hooks(m) if h.execution_device is not None}


def execution_device(model: nn.Module) -> torch.device:
    """Where a dispatched model computes: the first accelerator in ``hf_device_map``, else the
    execution device of its first hook (CPU when the whole model is offloaded on a host)."""
    for place in getattr(model, "hf_device_map", {}).values():
        if place not in ("cpu", "disk"):
            return _device(place)
    for module in model.modules():
        for hook in align_hooks(module):
            if hook.execution_device is not None:
                return _device(hook.execution_device)
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs (token ids) go."""
    return execution_device(model) if is_dispatched(model) else next(model.parameters()).device


def _swapped(module: nn.Module, hook: Any) -> list[str]:
    """Exactly the tensors ``hook`` swaps in for each forward and out after it."""
    from accelerate.utils import named_module_tensors

    tensors = named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True)
    return [n for n, _ in tensors]


class Placement:
    """A block on the pruning device (see ``placed``); ``write_back`` stores changed tensors
    where the model keeps them."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        #: (id(owning module), tensor name) -> (offload hook, the name relative to the hook's module)
        self.offloaded: dict[tuple[int, str], tuple[Any, str]] = {}

    def write_back(self, tensors: list[tuple[nn.Module, str]]) -> None:
        """Stores each (module, tensor name) that accelerate offloads in its weights map (in place
        for CPU, rewritten on disk); tensors of a block in memory need nothing."""
        with torch.no_grad():
            for module, name in dict.fromkeys(tensors):
                if (id(module), name) in self.offloaded:
                    hook, relative = self.offloaded[(id(module), name)]
                    _store(hook, relative, getattr(module, name).detach(), lambda: _spill_folder(self.model))


@contextmanager
def placed(block: nn.Module, device: torch.device, model: nn.Module | None = None) -> Iterator[Placement]:
    """Runs the body with ``block`` on ``device``: its weights ordinary tensors there (which the
    body may change in place and differentiate), its forward free of accelerate's swapping. On
    exit an offloaded block's tensors go back to ``meta`` (values kept only where ``write_back``
    stored them), a block in memory back to where it was. ``model``: the model the block belongs
    to (for a folder to write disk-offloaded tensors when accelerate has none)."""
    from_hooks = any(align_hooks(m) for m in block.modules())
    if not from_hooks:
        home = next(block.parameters()).device
        try:
            block.to(device)
            yield Placement(model)
        finally:
            block.to(home)
        return
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    placement = Placement(model)
    hooks: list[tuple[Any, Any, bool]] = []  # (hook, execution_device, offload) to restore
    loaded: list[tuple[nn.Module, str]] = []
    moved: list[tuple[nn.Module, str, torch.device]] = []
    try:
        for module in block.modules():
            hook = offload_hook(module)
            names = _swapped(module, hook) if hook is not None else []
            for name in names:
                set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
                loaded.append((module, name))
                owner, _, leaf = name.rpartition(".")  # a hook that places submodules names theirs
                placement.offloaded[(id(module.get_submodule(owner)), leaf)] = (hook, name)
            for name, t in named_module_tensors(module, include_buffers=True, recurse=False):
                if name not in names and t.device != device and not t.is_meta:
                    moved.append((module, name, t.device))
                    set_module_tensor_to_device(module, name, device)
            for h in align_hooks(module):
                hooks.append((h, h.execution_device, h.offload))
                h.offload, h.execution_device = False, device
        yield placement
    finally:
        for module, name in loaded:
            set_module_tensor_to_device(module, name, "meta")
        for module, name, home in moved:
            set_module_tensor_to_device(module, name, home)
        for h, execution, offload in hooks:
            h.execution_device, h.offload = execution, offload


def _store(hook: Any, name: str, value: torch.Tensor, spill_folder: Any) -> None:
    """``value`` as the offloaded copy of ``<hook's module>.<name>``: copied in place into a CPU
    weights map (keeping tied aliases), or written to disk in the stored dtype."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    weights_map, prefix = hook.weights_map, ""
    while isinstance(weights_map, PrefixedDataset):
        prefix, weights_map = weights_map.prefix + prefix, weights_map.dataset
    key = prefix + name
    if isinstance(weights_map, OffloadedWeightsLoader) and key not in weights_map.state_dict:
        _store_on_disk(weights_map, key, value, spill_folder)
        return
    store = weights_map.state_dict if isinstance(weights_map, OffloadedWeightsLoader) else weights_map
    if not isinstance(store, MutableMapping):
        raise TypeError(f"cannot write {key} back into accelerate's weights map of type {type(weights_map).__name__}")
    old = store[key]
    if old.data_ptr() != value.data_ptr():
        old.copy_(value)


def _store_on_disk(loader: Any, key: str, value: torch.Tensor, spill_folder: Any) -> None:
    """accelerate's own ``.dat`` files are rewritten in place; an entry that points into a
    safetensors file (transformers: the user's checkpoint) gets a new file of wandapp's in the
    offload folder, and every alias of the entry (tied weights) is repointed to it."""
    from accelerate.utils import offload_weight
    from safetensors.torch import save_file

    info = loader.index[key]
    dtype = getattr(torch, info["dtype"])
    if "safetensors_file" in info:
        folder = loader.save_folder or spill_folder()
        # Unique per write: two models sharing an offload folder never overwrite each other.
        path = os.path.join(folder, f"{_OWN_FILE_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:16]}_{uuid.uuid4().hex[:12]}.safetensors")
        save_file({key: value.to("cpu", dtype).contiguous()}, path)
        new = {"safetensors_file": path, "weight_name": key, "dtype": info["dtype"]}
        previous = info["safetensors_file"]
    else:
        # Written beside the old file, then renamed over it: an interrupted write never leaves a
        # truncated weight behind.
        written: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix=_OWN_FILE_PREFIX, dir=loader.save_folder) as staging:
            offload_weight(value.to("cpu", dtype).contiguous(), key, staging, index=written)
            os.replace(os.path.join(staging, f"{key}.dat"), os.path.join(loader.save_folder, f"{key}.dat"))
        new, previous = written[key], None
    for alias, entry in list(loader.index.items()):
        if entry is info:
            loader.index[alias] = new
    loader.index[key] = new
    if previous is not None and os.path.basename(previous).startswith(_OWN_FILE_PREFIX):
        os.remove(previous)  # an earlier pruning's file of wandapp's, now unreferenced


#: Folders made for models dispatched without an offload folder, by id(model).
_SPILL: dict[int, str] = {}


def _spill_folder(model: nn.Module | None) -> str:
    """A folder for pruned disk-offloaded weights of a model whose disk entries point into its
    checkpoint and that has no offload folder: kept as long as the model lives."""
    if model is None:
        raise RuntimeError("a disk-offloaded weight needs a folder to be written to")
    key = id(model)
    if key not in _SPILL:
        path = tempfile.mkdtemp(prefix="wandapp-offload-")
        _SPILL[key] = path
        # The callback must not hold the model itself.
        weakref.finalize(model, lambda: (shutil.rmtree(path, ignore_errors=True), _SPILL.pop(key, None)))
    return _SPILL[key]
