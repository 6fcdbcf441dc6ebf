"""The README's Python examples run as written, in a folder holding the demo model (the GPU
example under ``-m gpu``)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _example(i: int, code: str):
    marks = [pytest.mark.gpu] if re.search(r"^import cupy\b", code, re.M) else []
    return pytest.param(code, marks=marks, id=f"example{i + 1}" + ("-gpu" if marks else ""))


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """What ``gguf-gpu-lab demo`` leaves: gguf-lab-demo/synthetic-25M-Q4_K_M.gguf."""
    from gguf_gpu_lab.tools.synth import synth

    folder = tmp_path_factory.mktemp("readme")
    (folder / "gguf-lab-demo").mkdir()
    synth(folder / "gguf-lab-demo" / "synthetic-25M-Q4_K_M.gguf", "25M", "Q4_K_M", seed=0)
    return folder


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", [_example(i, b) for i, b in enumerate(BLOCKS)])
def test_readme_example_runs(code, demo_folder, monkeypatch):
    if ".to_torch()" in code or "as_torch(" in code:
        pytest.importorskip("torch", reason="to_torch() needs PyTorch (the torch extra)")
    if "hf." in code:
        pytest.importorskip("transformers", reason="transformers models need the hf extra")
    monkeypatch.chdir(demo_folder)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
