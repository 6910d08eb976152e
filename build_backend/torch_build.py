"""PEP 517 build backend: maturin, pointed at the Cargo manifest whose tch release matches the
torch installed where the build runs.

Each tch release binds one libtorch version, and its torch-sys crate (`links = "tch"`) cannot
share a lockfile with another release, so each supported torch has its own manifest (see
``MANIFESTS``). ``pip install --no-build-isolation .`` and ``make`` pick the one for the installed
torch with no flag to set; under build isolation (no torch in the build environment) and for
torch versions without a manifest, the nearest older one is used (set
``LIBTORCH_BYPASS_VERSION_CHECK=1`` for those; README: "Supported torch versions"). Passing
``--manifest-path`` yourself (MATURIN_PEP517_ARGS) overrides the choice.

``python build_backend/torch_build.py`` prints the manifest for the current environment.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType
from typing import Any, Mapping

#: (major, minor) of torch -> the Cargo manifest of the tch release built for it.
MANIFESTS = {(2, 11): "torch-2.11/Cargo.toml", (2, 13): "Cargo.toml"}
DEFAULT = (2, 13)


def installed_torch() -> tuple[int, int] | None:
    """(major, minor) of the torch installed in this environment, or None."""
    try:
        major, minor = metadata.version("torch").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def manifest_for(torch: tuple[int, int] | None) -> str:
    """The manifest for ``torch``: its own, else the newest one not newer than it (the oldest
    for an older torch), else the default when torch is not installed."""
    if torch is None:
        return MANIFESTS[DEFAULT]
    older = [v for v in MANIFESTS if v <= torch]
    return MANIFESTS[max(older) if older else min(MANIFESTS)]


def _maturin() -> ModuleType:
    """maturin's own backend, imported when a hook runs (the build requires it; reading the
    manifest choice does not)."""
    return importlib.import_module("maturin")


def _settings(config_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    args = _maturin().get_maturin_pep517_args(config_settings)
    if not any(a in ("-m", "--manifest-path") or a.startswith("--manifest-path=") for a in args):
        args = [*args, "--manifest-path", manifest_for(installed_torch())]
    return {**(config_settings or {}), "maturin.build-args": args}


def build_wheel(wheel_directory: str, config_settings: Mapping[str, Any] | None = None, metadata_directory: str | None = None) -> str:
    return _maturin().build_wheel(wheel_directory, _settings(config_settings), metadata_directory)


def build_editable(wheel_directory: str, config_settings: Mapping[str, Any] | None = None, metadata_directory: str | None = None) -> str:
    return _maturin().build_editable(wheel_directory, _settings(config_settings), metadata_directory)


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: Mapping[str, Any] | None = None) -> str:
    return _maturin().prepare_metadata_for_build_wheel(metadata_directory, _settings(config_settings))


def build_sdist(sdist_directory: str, config_settings: Mapping[str, Any] | None = None) -> str:
    return _maturin().build_sdist(sdist_directory, config_settings)


def get_requires_for_build_wheel(config_settings: Mapping[str, Any] | None = None) -> list[str]:
    return _maturin().get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings: Mapping[str, Any] | None = None) -> list[str]:
    return _maturin().get_requires_for_build_sdist(config_settings)


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


if __name__ == "__main__":
    print(manifest_for(installed_torch()))
