"""PEP 517 build backend: maturin, pointed at the Cargo manifest whose tch release matches the
torch installed where the build runs.

Each tch release binds one libtorch version, and its torch-sys crate (`links = "tch"`) cannot
share a lockfile with another release, so each supported torch has its manifest (see
``MANIFESTS``): tch 0.24 for torch 2.11, tch 0.26 with its torch-sys patched (vendor/README.md)
for 2.13, 2.14 and 2.15. ``pip install --no-build-isolation .`` and ``make`` pick the one for the
installed torch with no flag to set. A torch outside that set, or none (a build under build
isolation, where pip does not install torch), stops the build with :class:`UnsupportedTorch`
before any compiler runs. Passing ``--manifest-path`` yourself (MATURIN_PEP517_ARGS) overrides the
choice.

``python build_backend/torch_build.py`` prints the manifest for the current environment (or the
error and exit status 1): ``maturin build --manifest-path "$(python build_backend/torch_build.py)"``.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata
from types import ModuleType
from typing import Any, Mapping

#: (major, minor) of torch -> the Cargo manifest of the tch release built for it. The one list of
#: supported torch releases (pyproject's range, vendor/torch-sys's check and the README follow it).
MANIFESTS = {
    (2, 11): "torch-2.11/Cargo.toml",
    (2, 13): "Cargo.toml",
    (2, 14): "Cargo.toml",
    (2, 15): "Cargo.toml",
}


class UnsupportedTorch(RuntimeError):
    """The build environment has no torch, or one wandapp cannot be built against."""


def supported() -> str:
    """The supported torch releases, for messages: "2.11, 2.13, 2.14, 2.15"."""
    return ", ".join(f"{major}.{minor}" for major, minor in sorted(MANIFESTS))


def installed_torch() -> str | None:
    """The version of the torch installed in this environment ("2.15.0"), or None."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def manifest_for(torch: str | None) -> str:
    """The manifest for the torch release ``torch`` ("2.14.1+cu132"); raises
    :class:`UnsupportedTorch` naming it and the supported ones when there is none."""
    if torch is None:
        raise UnsupportedTorch(
            "wandapp links the libtorch of the installed torch, and no torch is installed in the build "
            f"environment. Install one of torch {supported()} first, then build without build isolation: "
            "pip install --no-build-isolation <wandapp source>"
        )
    try:
        major, minor = (int(part) for part in torch.split("+")[0].split(".")[:2])
    except ValueError:
        major, minor = -1, -1
    if (major, minor) not in MANIFESTS:
        raise UnsupportedTorch(
            f"wandapp cannot be built against torch {torch}: it builds for torch {supported()}. "
            "Install one of those (pip install torch==2.15.0) and build again."
        )
    return MANIFESTS[major, minor]


def _maturin() -> ModuleType:
    """maturin's own backend, imported when a hook runs (the build requires it; reading the
    manifest choice does not)."""
    return importlib.import_module("maturin")


def _settings(config_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    args = _maturin().get_maturin_pep517_args(config_settings)
    if not any(a in ("-m", "--manifest-path") or a.startswith("--manifest-path=") for a in args):
        try:
            manifest = manifest_for(installed_torch())
        except UnsupportedTorch as err:
            # pip shows a hook's exit message as it is; an exception would bury it in a traceback.
            raise SystemExit(f"error: {err}") from None
        args = [*args, "--manifest-path", manifest]
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
    try:
        print(manifest_for(installed_torch()))
    except UnsupportedTorch as err:
        sys.exit(f"error: {err}")
