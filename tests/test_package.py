"""The package surface: submodules reachable after ``import wandapp`` without importing their
optional dependencies, and a typed error naming the extra when one is missing."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import wandapp


def test_submodules_are_attributes_and_load_lazily():
    code = (
        "import sys, wandapp\n"
        "assert 'peft' not in sys.modules and 'wandapp.lora' not in sys.modules\n"
        "assert callable(wandapp.lora.merge_sparse) and callable(wandapp.data.text_calibration)\n"
        "assert callable(wandapp.eval.perplexity) and callable(wandapp.testing.assert_nm)\n"
        "assert 'peft' not in sys.modules\n"
        "assert {'lora', 'data', 'eval', 'testing'} <= set(dir(wandapp))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'lorra'"):
        wandapp.lorra  # noqa: B018


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(wandapp.MissingDependencyError, match=r'pip install "wandapp\[lora\]"'):
        wandapp.lora.merge_sparse(object(), {})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = wandapp.PruneReport(model="m", method="wanda", sparsity="0.5", config={}, nsamples=1, device="cpu")
    with pytest.raises(wandapp.MissingDependencyError, match=r'pip install "wandapp\[demo\]"'):
        report.plot()


def test_sources_compile_without_warnings():
    """Python 3.12 warns at compile time about invalid escapes (``"\\."`` in a docstring), and a
    later Python makes them errors: every file of the package must compile cleanly."""
    root = Path(wandapp.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in sources:
            compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_scripts_do_not_shadow_a_module_that_the_libraries_import(tmp_path):
    """Python puts a script's own folder first on ``sys.path``: ``bench/kernels.py`` once stood in for
    the ``kernels`` package that transformers probes for, and every bench script failed to import
    ``LlamaConfig``. No script or test helper may share its name with an installed module or one that
    transformers looks for."""
    import importlib.util
    import re

    root = Path(__file__).resolve().parent.parent
    names = sorted({p.stem for folder in ("bench", "tests") for p in (root / folder).glob("*.py")})
    probes = Path(importlib.util.find_spec("transformers.utils.import_utils").origin).read_text()
    probed = set(re.findall(r'_is_package_available\(\s*"(\w+)"', probes))
    assert "torch" in probed, "transformers no longer names its optional packages this way: update the pattern"
    code = "import importlib.util, sys; print(*[n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    installed = subprocess.run(
        [sys.executable, "-I", "-c", code, *names], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(set(names) & probed) == [] and installed == []
