"""The only file that knows how HuggingFace models are built: where the decoder blocks are, which
weight matrices each holds (linear layers and fused mixture-of-experts parameters), and how to
call a block. Found from the model's structure, not from a list of names, so every decoder-only
``*ForCausalLM`` is read the same way; the replay check (capture.py) then proves on the user's
own model that blocks run as pruning will run them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

import torch
from torch import nn

from wandapp.errors import InvalidArgumentError, UnsupportedModelError

#: ``targets`` / ``ignore`` as users write them (peft's ``target_modules`` rule): a string is a
#: regular expression matched against the whole name; a list holds names or name suffixes.
NamePatterns = Union[str, Sequence[str], None]

_EXPERT_NAME = re.compile(r"^(?P<module>.*)\.(?P<param>[^.\[\]]+)\[(?P<expert>\d+)\]$")


@dataclass(frozen=True)
class Target:
    """One weight matrix [out_features, in_features] that wandapp prunes row by row: an
    ``nn.Linear``'s weight, or expert ``expert``'s slice of a fused experts parameter
    ([experts, out, in], or [experts, in, out] when ``transposed``)."""

    name: str  # "model.layers.0.mlp.down_proj" or "model.layers.0.mlp.experts.down_proj[3]"
    module: nn.Module
    param_name: str  # "weight" for a linear layer; "gate_up_proj", "down_proj"... for experts
    expert: int | None = None
    transposed: bool = False

    @property
    def pattern_name(self) -> str:
        """The name ``targets`` and ``ignore`` match: the module, or the fused parameter."""
        return self.name if self.expert is None else self.name.rsplit("[", 1)[0]

    def weight(self) -> torch.Tensor:
        """The matrix [out, in], a view sharing the parameter's storage."""
        param = getattr(self.module, self.param_name)
        if self.expert is None:
            return param
        matrix = param[self.expert]
        return matrix.t() if self.transposed else matrix

    @property
    def in_features(self) -> int:
        return int(self.weight().shape[1])


def fused_experts(module: nn.Module) -> list[str]:
    """Names of ``module``'s fused expert parameters (3-D, one slice per expert: transformers 5's
    ``*Experts`` modules), or [] when it holds none."""
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int):
        return []
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == count]


@dataclass
class DecoderAdapter:
    """A causal LM's decoder blocks, their names in ``model.named_modules()``, and the weight
    matrices of each block that this run prunes (``targets`` / ``ignore`` applied)."""

    model: nn.Module
    layers: nn.ModuleList
    prefix: str  # e.g. "model.layers"
    #: Each block's attention type (config.layer_types, e.g. "full_attention" or
    #: "sliding_attention"). Blocks of one type take the same keyword arguments (attention mask).
    kinds: list[str]
    selected: list[list[Target]] = field(default_factory=list)

    def first_of_each_kind(self) -> dict[str, int]:
        """The first block of each attention type: where the model's arguments for it are caught."""
        firsts: dict[str, int] = {}
        for index, kind in enumerate(self.kinds):
            firsts.setdefault(kind, index)
        return firsts

    def targets(self, index: int) -> list[Target]:
        """Block ``index``'s matrices to prune, in module order (the order the core receives)."""
        return self.selected[index]

    def all_targets(self) -> list[Target]:
        return [t for block in self.selected for t in block]

    def experts_modules(self, index: int) -> list[nn.Module]:
        """Block ``index``'s modules holding fused expert parameters (pruned ones or not)."""
        return [m for m in self.layers[index].modules() if fused_experts(m)]

    def token_bytes(self, seqlen: int, dtype: torch.dtype) -> int:
        """A rough upper bound of the device memory one token of a ``seqlen``-token sequence takes
        in a block's forward: hidden and MLP activations, the recorded linear inputs, their float64
        squares in the activation statistics, and the eager attention's scores. Sizes batches."""
        config = _text_config(self.model)
        hidden = config.hidden_size
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        activations = (8 * hidden + 4 * intermediate) * torch.finfo(dtype).bits // 8
        statistics = 16 * max(hidden, intermediate)  # float64 copy and square of the widest input
        scores = config.num_attention_heads * seqlen * 4 if getattr(config, "_attn_implementation", "eager") == "eager" else 0
        return activations + statistics + scores

    @staticmethod
    def call(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Runs a decoder layer with the keyword arguments the model itself passed to it."""
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def require_materialized(model: nn.Module) -> None:
    """Refuses a model with parameters or buffers on the meta device (a model built under
    ``torch.device("meta")`` or ``init_empty_weights``) that accelerate does not offload: such a
    model has no weights to prune; raises UnsupportedModelError saying so. Weights that
    accelerate offloads to CPU or disk behind hooks are fine (``wandapp.offload``)."""
    from wandapp.offload import offloaded_tensor_names

    offloaded = offloaded_tensor_names(model)
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta and name not in offloaded]
    if meta:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(meta)} parameters or buffers on the meta device (e.g. {meta[:3]}): it was "
            "built without weights (torch.device('meta'), init_empty_weights). Load real weights first "
            "(from_pretrained, or load_state_dict(..., assign=True) and re-create the buffers)"
        )


def _is_peft_model(model: Any) -> bool:
    """A peft ``PeftModel`` (by class, without importing peft)."""
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__)


def unwrap(model: Any, peft: str = "base") -> Any:
    """The model inside the usual wrappers, so that names are the model's own (a mask file written
    for a compiled model applies to the plain one, and ``targets`` match): torch.compile's
    ``OptimizedModule`` (``_orig_mod``), ``DataParallel`` / ``DistributedDataParallel``
    (``.module``), and a peft ``PeftModel`` (its base model, whose LoRA layers keep the plain
    model's names) unless ``peft="keep"``; ``peft="refuse"`` (pruning) raises UnsupportedModelError
    saying what to pass instead. Anything else is returned as it is."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif peft != "keep" and _is_peft_model(model):
            if peft == "refuse":
                raise UnsupportedModelError(
                    f"got a peft {type(model).__name__}: wandapp prunes the model before adapters are added (its LoRA layers "
                    "would be pruned under the adapter's names and the adapters left dense). Prune the plain model and then "
                    "call peft.get_peft_model, or merge first (peft_model.merge_and_unload()) and prune the merged model"
                )
            model = model.get_base_model()
        else:
            return model


def _text_config(model: nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _holds_weights(block: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or fused_experts(m) for m in block.modules())


def _decoder_layers(model: nn.Module, found: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: under the model's decoder (``get_decoder()``, so that a
    vision tower is never taken for it), the outermost list of modules of one class that hold
    weights to prune, preferring one of config.num_hidden_layers blocks."""
    try:
        decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    except Exception:  # some models implement get_decoder only for their composite class
        decoder = None
    root = decoder if isinstance(decoder, nn.Module) else model
    names = {id(m): n for n, m in model.named_modules()}
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and _holds_weights(m[0])]
    candidates = [m for m in lists if len({type(block) for block in m}) == 1]
    if not candidates:
        if lists:
            kinds = sorted({type(block).__name__ for block in lists[0]})
            raise UnsupportedModelError(f"{found}: its decoder blocks are of several classes ({kinds}); wandapp prunes stacks of one block class")
        raise UnsupportedModelError(
            f"{found} has no list of decoder blocks holding torch.nn.Linear layers under {type(root).__name__}; wandapp "
            "prunes decoder-only causal LMs built from nn.Linear (GPT-2's Conv1D layers, for one, are not)"
        )
    depth = getattr(_text_config(model), "num_hidden_layers", None)
    chosen = next((m for m in candidates if len(m) == depth), candidates[0])
    return names[id(chosen)], chosen


def _is_router(module: nn.Module) -> bool:
    return "Router" in type(module).__name__


def _block_matrices(layer: nn.Module, prefix: str, found: str, explicit: bool, inspect: bool = False) -> list[Target]:
    """Every linear layer and fused expert slice of one block, routers excepted, in module order.

    A router decides where tokens go and is never pruned: a module whose class is a ``*Router``,
    or a linear layer beside a mixture's experts (same parent) with one output per expert or a
    single output (a shared-expert gate). Unless ``explicit`` (the user named ``targets``), a
    block holding other weight matrices (experts in a layout wandapp does not know) is refused:
    they would stay dense without a word. With ``inspect`` (the testing helpers reading a model
    that LoRA now wraps), a peft LoRA layer stands for its base layer, under its own name."""
    routers = {id(m) for m in layer.modules() if _is_router(m)}
    for parent in layer.modules():
        experts = [m for m in parent.children() if fused_experts(m) or (isinstance(m, nn.ModuleList) and parent._modules.get("experts") is m)]
        counts = {int(getattr(m, "num_experts", 0)) or len(m) for m in experts}  # type: ignore[arg-type]
        routers |= {id(m) for m in parent.children() if isinstance(m, nn.Linear) and counts and m.out_features in counts | {1}}
    out: list[Target] = []
    covered: set[int] = set()
    wrapped: set[int] = set()  # inspect: the LoRA layers, whose base layer is taken under their name
    for name, module in layer.named_modules():
        full = f"{prefix}.{name}"
        if id(module) in routers or any(id(m) in routers for m in _ancestors(layer, name)):
            covered.update(id(p) for p in module.parameters(recurse=False))
            continue
        if any(id(m) in wrapped for m in _ancestors(layer, name)):
            covered.update(id(p) for p in module.parameters(recurse=False))
            continue
        if inspect and isinstance(getattr(module, "base_layer", None), nn.Linear):
            wrapped.add(id(module))
            out.append(Target(full, module.base_layer, "weight"))
            covered.add(id(module.base_layer.weight))
            continue
        if hasattr(module, "base_layer") or hasattr(module, "lora_A"):
            raise UnsupportedModelError(f"{found}: {full} is wrapped by an adapter ({type(module).__name__}); prune before adding LoRA")
        if isinstance(module, nn.Linear):
            if not module.weight.is_floating_point():
                raise UnsupportedModelError(f"{found}: {full} is a quantized {type(module).__name__} ({module.weight.dtype}); prune the unquantized model")
            out.append(Target(full, module, "weight"))
            covered.add(id(module.weight))
        for param in fused_experts(module):
            transposed = bool(getattr(module, "is_transposed", False))
            out.extend(Target(f"{full}.{param}[{e}]", module, param, e, transposed) for e in range(module.num_experts))  # type: ignore[arg-type]
            covered.add(id(getattr(module, param)))
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Embedding)):
            covered.update(id(p) for p in module.parameters(recurse=False))
    unknown = [f"{prefix}.{n}" for n, p in layer.named_parameters() if p.dim() >= 2 and id(p) not in covered and not n.endswith("bias")]
    if unknown and not explicit:
        raise UnsupportedModelError(
            f"{found}: {unknown[:3]} are weight matrices that are neither torch.nn.Linear layers nor fused experts "
            "wandapp knows, so pruning would leave them dense without a word. Name what to prune with targets= "
            "(e.g. targets=r'.*' prunes the linear layers found and leaves those dense)"
        )
    return out


def _ancestors(root: nn.Module, name: str) -> Iterator[nn.Module]:
    """The modules on the path from ``root`` (excluded) to ``name`` (excluded)."""
    parts = name.split(".") if name else []
    module = root
    for part in parts[:-1]:
        module = module.get_submodule(part)
        yield module


def _matches(name: str, patterns: NamePatterns) -> bool:
    """peft's ``target_modules`` rule: a string is a regular expression for the whole name; a
    list matches a name equal to an entry or ending with "." + an entry."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns or ())


def _select(blocks: list[list[Target]], targets: NamePatterns, ignore: NamePatterns, found: str) -> list[list[Target]]:
    """Applies ``targets`` (None: every matrix) and ``ignore``; refuses a pattern matching nothing."""
    names = {t.pattern_name for block in blocks for t in block}
    for field_name, patterns in (("targets", targets), ("ignore", ignore)):
        entries: list[tuple[str, NamePatterns]] = [(patterns, patterns)] if isinstance(patterns, str) else [(p, [p]) for p in patterns or ()]
        for shown, probe in entries:
            if not any(_matches(n, probe) for n in names):
                raise InvalidArgumentError(
                    f"{field_name} entry {shown!r} matches no prunable weight of {found} "
                    f"(e.g. {sorted(names)[:4]}; routers, norms, embeddings and the LM head are never pruned)"
                )
    chosen = [
        [t for t in block if (targets is None or _matches(t.pattern_name, targets)) and not _matches(t.pattern_name, ignore)]
        for block in blocks
    ]
    if not any(chosen):
        raise InvalidArgumentError(f"targets={targets!r} with ignore={ignore!r} leave nothing to prune in {found}")
    return chosen


def resolve(model: Any, targets: NamePatterns = None, ignore: NamePatterns = None, inspect: bool = False) -> DecoderAdapter:
    """Finds the decoder blocks and the matrices to prune, or raises UnsupportedModelError
    naming what was found; InvalidArgumentError when ``targets``/``ignore`` match nothing.
    ``model`` is taken out of its wrappers first (``unwrap``: a peft model is refused unless
    ``inspect``, for the testing helpers, which read its base model's matrices)."""
    model = unwrap(model, peft="base" if inspect else "refuse")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    found = f"{type(model).__name__} (model_type={model_type!r})"
    if not isinstance(model, nn.Module) or config is None or not hasattr(model, "get_input_embeddings"):
        raise UnsupportedModelError(f"wandapp prunes transformers causal LMs (AutoModelForCausalLM); got {found}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{found} is an encoder-decoder model; wandapp prunes decoder-only causal LMs")
    prefix, layers = _decoder_layers(model, found)
    # The model indexes config.layer_types by block, so a list longer than the blocks (a model
    # cut down for an experiment) is fine; a shorter one cannot run.
    kinds = list(getattr(_text_config(model), "layer_types", None) or ["full_attention"] * len(layers))[: len(layers)]
    if len(kinds) < len(layers):
        raise UnsupportedModelError(f"{found}: config.layer_types names {len(kinds)} blocks but the model has {len(layers)}")
    blocks = [_block_matrices(layer, f"{prefix}.{i}", found, targets is not None, inspect) for i, layer in enumerate(layers)]
    return DecoderAdapter(model, layers, prefix, kinds, _select(blocks, targets, ignore, found))


def matrix(model: nn.Module, name: str) -> torch.Tensor | None:
    """The weight matrix a mask name refers to (a module with a ``weight``, or
    ``module.param[expert]`` for a fused expert slice), or None when the model has no such one.
    Names are the model's own, also for a model in a wrapper (``unwrap``)."""
    model = unwrap(model)
    match = _EXPERT_NAME.match(name)
    try:
        if match is None:
            weight = getattr(model.get_submodule(name), "weight", None)
            return weight if isinstance(weight, torch.Tensor) else None
        module = model.get_submodule(match["module"])
    except AttributeError:
        return None
    if match["param"] not in fused_experts(module) or int(match["expert"]) >= int(getattr(module, "num_experts")):
        return None
    return Target(name, module, match["param"], int(match["expert"]), bool(getattr(module, "is_transposed", False))).weight()


def iter_matrices(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, matrix [out, in]) of every matrix of the decoder blocks that wandapp would prune."""
    for target in resolve(model, inspect=True).all_targets():
        yield target.name, target.weight()
