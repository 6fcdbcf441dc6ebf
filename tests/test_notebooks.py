"""Notebooks run top to bottom as a user would run them: on the host backend in CI, and through
CuPy on a GPU (``-m gpu``); each with its built-in model and with other files named through
``GGUF_LAB_MODEL`` (what the first cell reads), one of them without a decoder's ``blk.N.`` names."""

import importlib
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat (the test extra) runs the notebooks")
NotebookClient = pytest.importorskip("nbclient", reason="nbclient (the test extra) runs the notebooks").NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
MODELS = ["built-in", "other_model", "no_block_model"]  # the first cell's default, then fixtures
NEEDS_HF = {"05-transformers.ipynb"}  # the hf extra: torch, transformers, accelerate


def _needs(path, model) -> None:
    """Skip a notebook that needs the hf extra where it is missing; fail instead where CI=true. A
    transformers notebook runs on files of an architecture transformers reads (not on the one
    made of loose and vision-tower tensors)."""
    if path.name not in NEEDS_HF:
        return
    if model == "no_block_model":
        pytest.skip(f"{path.name} takes a model of an architecture transformers reads")
    for name in ("torch", "transformers", "accelerate"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            why = f"{path.name} needs the hf extra: {name} is not importable ({e})"
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true, and {why}", pytrace=False)
            pytest.skip(why)


def _run(path, tmp_path) -> list:
    """Execute a notebook; returns its code cells, with their outputs."""
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs must be cleared in git"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")
    return cells


def _text(cells) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in cells for o in c.get("outputs", []))


def _use_model(request, monkeypatch, model):
    if model == "built-in":
        monkeypatch.delenv("GGUF_LAB_MODEL", raising=False)
    else:
        monkeypatch.setenv("GGUF_LAB_MODEL", str(request.getfixturevalue(model)))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, model, tmp_path, request, monkeypatch):
    _needs(path, model)
    _use_model(request, monkeypatch, model)
    cells = _run(path, tmp_path)
    if model != "built-in":  # the file given was used, not the built-in one
        assert not (tmp_path / "gguf-lab-demo" / "synthetic-25M-Q4_K_M.gguf").exists()
        assert not (tmp_path / "gguf-lab-demo" / "all-types.gguf").exists()
    for c in cells:
        images = [o for o in c.outputs if "image/png" in o.get("data", {})]
        stray = [o for o in c.outputs if "Figure size" in o.get("data", {}).get("text/plain", "")
                 and "image/png" not in o["data"]]
        assert len(images) <= 1 and not stray, f"a figure shown twice or left over by:\n{c.source}"
        if "plots." in c.source:
            assert len(images) == 1, f"one figure expected from:\n{c.source}"


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_the_gpu(path, model, tmp_path, request, monkeypatch):
    _needs(path, model)
    _use_model(request, monkeypatch, model)
    text = _text(_run(path, tmp_path))
    if path.name.startswith(("02", "03")):  # they show which backend loaded or dequantized
        assert "cupy" in text.lower() or "gpu float" in text.lower(), text[:2000]
    if path.name.startswith("05"):
        assert "on cuda" in text and "backend=cupy" in text, text[:2000]
