"""The only file that knows HuggingFace attribute names: where the decoder blocks are, which
linear layers each holds, and how to call one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wandapp.errors import UnsupportedModelError

#: model_type -> the causal-LM class wandapp is tested on.
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

#: The seven linear layers of a block, in the order the core receives their weights.
LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class DecoderAdapter:
    """A supported model's decoder blocks and their names in ``model.named_modules()``."""

    model: nn.Module
    layers: nn.ModuleList
    prefix: str  # e.g. "model.layers"
    #: Each block's attention type (config.layer_types, e.g. "full_attention" or
    #: "sliding_attention"). Blocks of one type take the same keyword arguments (attention mask).
    kinds: list[str]

    def first_of_each_kind(self) -> dict[str, int]:
        """The first block of each attention type: where the model's arguments for it are caught."""
        firsts: dict[str, int] = {}
        for index, kind in enumerate(self.kinds):
            firsts.setdefault(kind, index)
        return firsts

    def linears(self, index: int) -> list[tuple[str, nn.Linear]]:
        layer = self.layers[index]
        return [(f"{self.prefix}.{index}.{name}", layer.get_submodule(name)) for name in LINEAR_NAMES]

    def all_linears(self) -> list[tuple[str, nn.Linear]]:
        return [pair for i in range(len(self.layers)) for pair in self.linears(i)]

    def token_bytes(self, seqlen: int, dtype: torch.dtype) -> int:
        """A rough upper bound of the device memory one token of a ``seqlen``-token sequence takes
        in a block's forward: hidden and MLP activations, the recorded linear inputs, their float64
        squares in the activation statistics, and the eager attention's scores. Sizes batches."""
        config = self.model.config
        hidden = config.hidden_size
        intermediate = getattr(config, "intermediate_size", 4 * hidden)
        activations = (8 * hidden + 4 * intermediate) * torch.finfo(dtype).bits // 8
        statistics = 16 * max(hidden, intermediate)  # float64 copy and square of the widest input
        scores = config.num_attention_heads * seqlen * 4 if getattr(config, "_attn_implementation", "eager") == "eager" else 0
        return activations + statistics + scores

    @staticmethod
    def call(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Runs a decoder layer with the keyword arguments the model itself passed to it."""
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _offloading(hook: Any) -> bool:
    """Whether an accelerate hook (``module._hf_hook``) keeps the module's weights elsewhere and
    loads them only for each forward (cpu_offload, disk_offload, device_map with "cpu"/"disk")."""
    if hook is None:
        return False
    if any(_offloading(h) for h in getattr(hook, "hooks", ())):  # SequentialHook
        return True
    return bool(getattr(hook, "offload", False)) or getattr(hook, "weights_map", None) is not None


def require_materialized(model: nn.Module) -> None:
    """Refuses a model whose weights are not all in memory: parameters or buffers on the meta
    device (a model built under ``torch.device("meta")`` or ``init_empty_weights``), or modules
    whose weights accelerate offloads to CPU or disk behind hooks. Such a model cannot be pruned
    in place until it is loaded on one real device; raises UnsupportedModelError saying so."""
    offloaded = [name or "<model>" for name, module in model.named_modules() if _offloading(getattr(module, "_hf_hook", None))]
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if offloaded:
        raise UnsupportedModelError(
            f"{type(model).__name__} is dispatched by accelerate with offloaded weights ({len(offloaded)} modules, e.g. "
            f"{offloaded[:3]}; {len(meta)} tensors show as 'meta'). wandapp prunes weights in place and needs them in "
            "memory on one device: load the model without offloading (from_pretrained without device_map, or "
            "device_map={'': 'cuda:0'}), and set PruneConfig.device/offload for where blocks run"
        )
    if meta:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(meta)} parameters or buffers on the meta device (e.g. {meta[:3]}): it was "
            "built without weights (torch.device('meta'), init_empty_weights). Load real weights first "
            "(from_pretrained, or load_state_dict(..., assign=True) and re-create the buffers), on one device"
        )


def resolve(model: Any) -> DecoderAdapter:
    """Finds the decoder blocks, or raises UnsupportedModelError naming what was found."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    found = f"{type(model).__name__} (model_type={model_type!r})"
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"wandapp prunes {', '.join(SUPPORTED.values())}; got {found}. "
            "Load a LLaMA-family causal LM with transformers' AutoModelForCausalLM."
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"{found} has no decoder layers at model.model.layers; pass the *ForCausalLM model itself")
    # The model indexes config.layer_types by block, so a list longer than the blocks (a model
    # cut down for an experiment) is fine; a shorter one cannot run.
    kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * len(layers))[: len(layers)]
    if len(kinds) < len(layers):
        raise UnsupportedModelError(f"{found}: config.layer_types names {len(kinds)} blocks but the model has {len(layers)}")
    for i, layer in enumerate(layers):
        for name in LINEAR_NAMES:
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                raise UnsupportedModelError(f"{found}: block {i} has no {name}") from None
            if type(module) is not nn.Linear:
                raise UnsupportedModelError(
                    f"{found}: block {i} {name} is a {type(module).__name__}, not torch.nn.Linear "
                    "(quantized or adapter-wrapped models cannot be pruned; prune before adding LoRA)"
                )
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return DecoderAdapter(model=model, layers=layers, prefix=prefix, kinds=kinds)
