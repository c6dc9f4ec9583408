"""Every notebook runs headless, top to bottom, in a scratch folder: where the browser tests cannot run
(no Playwright or no Chromium). Where they can, tests/test_browser.py runs every notebook in JupyterLab
and checks more (no stderr, console errors, controls, layout), so the notebooks are not run twice."""

import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


IN_A_BROWSER = importlib.util.find_spec("playwright") is not None and bool(
    shutil.which("chromium") or shutil.which("chromium-browser"))


@pytest.mark.real
@pytest.mark.skipif(IN_A_BROWSER, reason="tests/test_browser.py runs every notebook in JupyterLab in Chromium")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_headless(path, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))  # the kernel inherits it
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_there_is_a_quickstart():
    assert any(p.name == "00_quickstart.ipynb" for p in NOTEBOOKS)


def test_there_is_a_tokenization_bias_notebook():
    assert any(p.name == "03_tokenization_bias.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_kept_without_outputs(path):
    """Outputs stay out of git (`make executed-notebooks` writes executed copies to build/notebooks/)."""
    notebook = nbformat.read(path, as_version=4)
    with_outputs = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not with_outputs, f"cells {with_outputs} of {path.name} hold outputs: clear them before committing"
