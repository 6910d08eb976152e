"""The build for each supported torch: the manifest choice, the two manifests kept in step, and
the ImportError that `import wandapp` raises under a torch the core was not built for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wandapp
from wandapp import _torch_check

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build_backend"))
import torch_build  # noqa: E402


def test_the_core_records_the_torch_it_links():
    assert wandapp._core.TORCH_VERSION == torch.__version__.split("+")[0]
    assert _torch_check.built_for() == wandapp._core.TORCH_VERSION


@pytest.mark.parametrize(
    "torch_version,manifest",
    [((2, 11), "torch-2.11/Cargo.toml"), ((2, 13), "Cargo.toml"), ((2, 12), "torch-2.11/Cargo.toml"),
     ((2, 15), "Cargo.toml"), ((2, 9), "torch-2.11/Cargo.toml"), (None, "Cargo.toml")],
)
def test_the_build_picks_the_manifest_for_the_installed_torch(torch_version, manifest):
    assert torch_build.manifest_for(torch_version) == manifest


def test_the_manifests_differ_only_in_the_tch_release():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10
    main = tomllib.loads((ROOT / "Cargo.toml").read_text())
    other = tomllib.loads((ROOT / "torch-2.11" / "Cargo.toml").read_text())
    for name in ("tch", "pyo3-tch"):
        assert main["dependencies"].pop(name) != other["dependencies"].pop(name)
    assert other["package"].pop("build") == "../build.rs" and other["lib"].pop("path") == "../src/lib.rs"
    assert other.pop("workspace") == {}
    assert main == other


def test_a_core_built_for_another_torch_is_named_in_the_error(monkeypatch):
    monkeypatch.setattr(_torch_check, "installed_torch", lambda: "2.99.0")
    monkeypatch.delenv(_torch_check.OVERRIDE, raising=False)
    with pytest.raises(ImportError, match=rf"built for torch {wandapp._core.TORCH_VERSION}, but torch 2.99.0 is installed.*rebuild"):
        _torch_check.load_core()
    monkeypatch.setenv(_torch_check.OVERRIDE, "1")
    assert _torch_check.load_core() is wandapp._core


def test_importing_the_other_builds_core_raises_a_clear_import_error():
    """The real thing: the checkout's editable core (built for the main venv's torch) imported
    by this interpreter's other torch. Runs where both exist (`make test`: the torch 2.11 job)."""
    other = ROOT / "python" / "wandapp"
    cores = list(other.glob("_core*.so"))
    if not cores or Path(wandapp.__file__).parent == other:
        pytest.skip("needs the checkout's editable build and a wandapp installed for another torch (make test-torch-2.11)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    env.pop(_torch_check.OVERRIDE, None)
    done = subprocess.run([sys.executable, "-c", "import wandapp"], capture_output=True, text=True, env=env, cwd="/")
    built = _torch_check._MARKER.search(cores[0].read_bytes()).group(1).decode()
    if built == torch.__version__.split("+")[0]:
        pytest.skip("the checkout's core was built for this same torch")
    assert done.returncode != 0
    assert f"ImportError: wandapp's compiled core was built for torch {built}, but torch {torch.__version__.split('+')[0]} is installed" in done.stderr


def test_the_extension_needs_no_python_symbol_that_3_13_removed():
    """tch's Python glue, compiled with Python <= 3.12 headers, calls _PyThreadState_UncheckedGet,
    which 3.13 no longer exports: src/c/python313_compat.c resolves it inside the extension, so the
    one abi3 build imports on 3.10-3.13 (measured: README, "As a package")."""
    nm = shutil.which("nm") or pytest.skip("binutils' nm is not installed")
    needed = subprocess.run([nm, "-D", "--undefined-only", wandapp._core.__file__], capture_output=True, text=True, check=True)
    symbols = {line.split()[-1] for line in needed.stdout.splitlines() if line.strip()}
    assert any(s.startswith("Py") for s in symbols), "nm listed no Python symbol: the check would be empty"
    assert "_PyThreadState_UncheckedGet" not in symbols
