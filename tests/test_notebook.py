"""notebooks/quickstart.ipynb runs top to bottom (offline, on the embedded model)."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.demo_model, pytest.mark.slow]

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path):
    """The kernel inherits the session's TMPDIR, so conftest's check sees what the notebook leaves
    there (its saved model once: half a gigabyte per run)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "2:4 holds on every linear layer" in outputs and "reloaded from" in outputs
