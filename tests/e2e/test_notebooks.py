"""The notebooks in notebooks/ run top to bottom without an error (executed with nbclient, as a user would)."""

from __future__ import annotations

import pytest

from helpers.cli import REPO

NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "ray_driver.ipynb"])
def test_notebook_runs(name: str):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The kernel inherits this process's environment (LORAFLEET_HOME from conftest) and runs in notebooks/, so
    # the notebooks' relative paths (../jobs/llama.yaml) work as they do for a user.
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    if name == "quickstart.ipynb":
        assert "step  8  loss" in outputs and "loss " in outputs
    else:
        assert "'status': 'succeeded'" in outputs and "->" in outputs
