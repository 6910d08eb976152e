"""The build for each supported torch: the manifest choice and the refusal of any other torch,
the two manifests and the patched torch-sys kept in step, and the ImportError that `import
wandapp` raises under a torch the core was not built for."""

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
    [("2.11.0", "torch-2.11/Cargo.toml"), ("2.13.0", "Cargo.toml"), ("2.14.0", "Cargo.toml"),
     ("2.14.1+cu132", "Cargo.toml"), ("2.15.0", "Cargo.toml")],
)
def test_the_build_picks_the_manifest_for_the_installed_torch(torch_version, manifest):
    assert torch_build.manifest_for(torch_version) == manifest


@pytest.mark.parametrize("torch_version", ["2.10.0", "2.12.1", "2.16.0", "3.0.0", "2.15.0.dev20261101", "nightly"])
def test_an_unsupported_torch_is_refused_before_any_compiler_runs(torch_version):
    if torch_version == "2.15.0.dev20261101":  # a pre-release of a supported minor is that minor
        assert torch_build.manifest_for(torch_version) == "Cargo.toml"
        return
    with pytest.raises(torch_build.UnsupportedTorch, match=rf"against torch {torch_version}: it builds for torch 2.11, 2.13, 2.14, 2.15\b"):
        torch_build.manifest_for(torch_version)


def test_a_build_without_torch_is_refused_with_what_to_do():
    with pytest.raises(torch_build.UnsupportedTorch, match="no torch is installed.*--no-build-isolation"):
        torch_build.manifest_for(None)


def test_the_manifest_script_prints_the_error_and_fails_for_an_unsupported_torch(tmp_path):
    """`python build_backend/torch_build.py` (the Makefile's and the documented maturin command's
    manifest) under a torch 2.10: one line naming it, exit status 1, no traceback."""
    fake = tmp_path / "torch-2.10.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "build_backend" / "torch_build.py")], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        "error: wandapp cannot be built against torch 2.10.0: it builds for torch 2.11, 2.13, 2.14, 2.15. "
        "Install one of those (pip install torch==2.15.0) and build again."
    )


def test_the_supported_torches_are_listed_alike_everywhere():
    """The build backend's list is the one the import check names, pyproject's range allows and
    the patched torch-sys accepts."""
    listed = tuple(f"{major}.{minor}" for major, minor in sorted(torch_build.MANIFESTS))
    assert _torch_check.SUPPORTED == listed
    requirement = next(d for d in wandapp_requirements() if d.startswith("torch"))
    allowed = [f"2.{minor}" for minor in range(9, 18) if _allows(requirement, f"2.{minor}.0")]
    assert tuple(allowed) == listed, requirement
    vendored = (ROOT / "vendor" / "torch-sys" / "build.rs").read_text()
    patched = tuple(v for v in listed if v != "2.11")  # 2.11 builds with tch 0.24 (torch-2.11/Cargo.toml)
    assert "const TORCH_VERSIONS: &[&str] = &[" + ", ".join(f'"{v}"' for v in patched) + "];" in vendored


def wandapp_requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _allows(requirement: str, version: str) -> bool:
    from packaging.requirements import Requirement

    return Requirement(requirement).specifier.contains(version)


def test_the_manifests_differ_only_in_the_tch_release_and_the_patched_torch_sys():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10
    main = tomllib.loads((ROOT / "Cargo.toml").read_text())
    other = tomllib.loads((ROOT / "torch-2.11" / "Cargo.toml").read_text())
    for name in ("tch", "pyo3-tch"):
        assert main["dependencies"].pop(name) != other["dependencies"].pop(name)
    assert main.pop("patch") == {"crates-io": {"torch-sys": {"path": "vendor/torch-sys"}}}
    assert other["package"].pop("build") == "../build.rs" and other["lib"].pop("path") == "../src/lib.rs"
    assert other.pop("workspace") == {}
    assert main == other


def test_the_vendored_torch_sys_is_the_release_plus_the_patch(tmp_path):
    """Undoing vendor/torch-sys.patch on a copy of vendor/torch-sys gives exactly the crates.io
    release's files (vendor/torch-sys.release.sha256), so the patch file is the whole difference."""
    import hashlib

    git = shutil.which("git") or pytest.fail("git is needed to undo the patch")
    copy = tmp_path / "torch-sys"
    shutil.copytree(ROOT / "vendor" / "torch-sys", copy)
    subprocess.run([git, "apply", "-R", "-p1", str(ROOT / "vendor" / "torch-sys.patch")], cwd=copy, check=True)
    release = dict(line.split()[::-1] for line in (ROOT / "vendor" / "torch-sys.release.sha256").read_text().splitlines())
    files = {p.relative_to(copy).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.rglob("*") if p.is_file()}
    assert files == release
    assert files != {p.relative_to(ROOT / "vendor" / "torch-sys").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in (ROOT / "vendor" / "torch-sys").rglob("*") if p.is_file()}, "the patch changed nothing"


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
        pytest.skip("needs the checkout's editable build and a wandapp installed for another torch (make test-torch-2.14)")
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
