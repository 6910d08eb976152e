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
