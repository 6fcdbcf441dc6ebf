"""Notebooks run top to bottom as a user would run them: on the host backend in CI, and through
CuPy on a GPU (``-m gpu``)."""

import importlib
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat (the test extra) runs the notebooks")
NotebookClient = pytest.importorskip("nbclient", reason="nbclient (the test extra) runs the notebooks").NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
NEEDS_HF = {"05-transformers.ipynb"}  # the hf extra: torch, transformers, accelerate


def _needs(path) -> None:
    """Skip a notebook that needs the hf extra where it is missing; fail instead where CI=true."""
    if path.name not in NEEDS_HF:
        return
    for name in ("torch", "transformers", "accelerate"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            why = f"{path.name} needs the hf extra: {name} is not importable ({e})"
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true, and {why}", pytrace=False)
            pytest.skip(why)


def _run(path, tmp_path) -> str:
    """Execute a notebook; returns the text of all its outputs."""
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs must be cleared in git"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    _needs(path)
    _run(path, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_the_gpu(path, tmp_path):
    _needs(path)
    text = _run(path, tmp_path)
    if path.name.startswith(("02", "03")):  # they show which backend loaded or dequantized
        assert "cupy" in text.lower() or "gpu float" in text.lower(), text[:2000]
    if path.name.startswith("05"):
        assert "on cuda" in text and "backend=cupy" in text, text[:2000]
