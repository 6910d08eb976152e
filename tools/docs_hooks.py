"""MkDocs hook (mkdocs.yml: ``hooks``): every public name of wandapp's API has a docstring and a
place in the API reference. Read statically by griffe (nothing is imported, so the site builds
without the compiled core); a missing one is a warning, which ``mkdocs build --strict`` makes an
error."""

from __future__ import annotations

import logging
import os
import re

import griffe

log = logging.getLogger("mkdocs.plugins.wandapp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The modules documented as a whole: each public function and class, and their public methods.
#: ``kernels`` re-exports the compiled core, read from ``_core.pyi`` (signatures, and the docstrings
#: tools/stub_docs.py copies from the compiled module).
MODULES = ("data", "eval", "lora", "testing", "distributed", "models", "kernels")
#: Top-level names documented otherwise: the version string.
NOT_RENDERED = {"__version__"}


def public_names() -> dict[str, griffe.Object | griffe.Alias]:
    """Public path -> object, for every name the API reference must show."""
    pkg = griffe.load("wandapp", search_paths=[os.path.join(ROOT, "python")], allow_inspection=False)
    names: dict[str, griffe.Object | griffe.Alias] = {}
    for name in pkg.exports or ():
        if name in NOT_RENDERED:
            continue
        # `wandapp.prune` is both a submodule and the function it exports: griffe sees the module.
        obj = pkg["prune.prune"] if name == "prune" else pkg[name]
        names[f"wandapp.{name}"] = obj
    for modname in MODULES:
        module = pkg[modname]
        names[module.path] = module
        for name, obj in module.members.items():
            if obj.is_public and obj.kind in (griffe.Kind.FUNCTION, griffe.Kind.CLASS):
                names[f"{module.path}.{name}"] = obj
    for path, obj in list(names.items()):
        if obj.kind is griffe.Kind.CLASS:
            for name, member in obj.members.items():
                if member.is_public and not name.startswith("_") and member.kind is griffe.Kind.FUNCTION:
                    names[f"{path}.{name}"] = member
    return names


def on_post_build(config, **kwargs) -> None:
    site = config["site_dir"]
    ids: set[str] = set()
    for folder, _, files in os.walk(site):
        for f in files:
            if f.endswith(".html"):
                ids.update(re.findall(r'id="(wandapp\.[\w.]+)"', open(os.path.join(folder, f), encoding="utf-8").read()))
    for path, obj in sorted(public_names().items()):
        if not obj.docstring or not obj.docstring.value.strip():
            log.warning("%s is public but has no docstring", path)
        canonical = obj.canonical_path if obj.is_alias else obj.path
        if not {path, canonical} & ids:
            log.warning("%s is public but not in the API reference (docs/api.md)", path)
