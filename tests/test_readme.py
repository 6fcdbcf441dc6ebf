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


TEXT = README.read_text()


def test_readme_and_notebooks_use_lab_load():
    import json

    notebooks = README.parent / "notebooks"
    sources = [TEXT] + ["".join(c["source"]) for nb in notebooks.glob("*.ipynb")
                        for c in json.loads(nb.read_text())["cells"]]
    assert not [s for s in sources if "from gguf_gpu_lab.loader import" in s]
    assert "lab.load(" in TEXT and any("lab.load(" in s for s in sources[1:])


def test_the_quoted_option_error_is_what_the_command_line_prints(capsys):
    from gguf_gpu_lab.cli import main

    quoted = re.search(r"\(`(gguf-gpu-lab load: error: argument --streams: [^`]*)`\)", TEXT).group(1)
    with pytest.raises(SystemExit):
        main(["load", "m.gguf", "--streams", "0"])
    assert capsys.readouterr().err == quoted + "\n"


def test_the_gpu_only_benchmark_list_is_complete(monkeypatch, tmp_path, capsys):
    """Every benchmark that stops without a GPU is named in the README's list of them."""
    import gguf_gpu_lab.device
    from gguf_gpu_lab.cli import main

    monkeypatch.setattr(gguf_gpu_lab.device, "_cupy_or_reason", lambda: (None, "no GPU here"))
    monkeypatch.chdir(tmp_path)
    sentence = re.search(r"`bench`, [^.]*? need a\s+GPU", TEXT).group(0)
    named = set(re.findall(r"`(bench(?: --[a-z0-9-]+)?)`", sentence))
    for flag in ["", "--cpu", "--dequant", "--open", "--e2e", "--hf", "--multi-gpu", "--first", "--remote", "--export", "--tp"]:
        if flag in ("--cpu", "--open", "--export", "--tp"):
            continue  # they run (and are named as running anywhere)
        assert main(["bench", *([flag] if flag else [])]) == 2
        assert "needs a GPU" in capsys.readouterr().err
        assert ("bench " + flag).strip() in named, flag
    assert "`bench --cpu`, `bench --open`, `bench --export` and `bench --tp` run anywhere" in TEXT


def test_headline_rows_name_their_machine_and_transformers_version():
    table = TEXT.split("| open + load + synchronize", 1)[1].split("\n\n", 1)[0]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    assert rows and all(re.search(r"\| (H100|H200), \d{4}-\d\d-\d\d \|", r) for r in rows)

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    hf = next(r for r in tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
              ["optional-dependencies"]["hf"] if r.startswith("transformers"))
    least = re.search(r">=([\d.]+)", hf).group(1)
    assert f"transformers {least} or later" in TEXT  # the version the extra needs is stated
    for v in re.findall(r"transformers (\d+\.\d+)\b", TEXT):  # an older one only where labelled as such
        assert v == least or f"version {v}, the one installed for that run" in TEXT, v
