"""Progress bars: one helper for the command line and load(progress=True)."""

import pytest

from gguf_gpu_lab.loader import load
from gguf_gpu_lab.progress import ProgressBar


def test_load_bar_starts_with_its_total_in_decimal_units(small_model, monkeypatch, capsys):
    from tqdm import tqdm

    from gguf_gpu_lab import open_model

    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")
    with open_model(small_model) as m:
        total = sum(t.n_bytes for t in m.tensors)
        load(m, backend="host", progress=True, chunk_mb=0.5)
    first = capsys.readouterr().err.split("\r")[1]  # the bar as first drawn
    assert first.startswith("load (gpu):   0%|") and f" 0.00/{tqdm.format_sizeof(total)} [" in first  # GB/MB, not GiB/MiB


@pytest.mark.parametrize("env", [None, "0"])
def test_no_bar_where_no_one_watches(small_model, monkeypatch, capsys, env):
    if env is None:
        monkeypatch.delenv("GGUF_LAB_PROGRESS", raising=False)  # and stderr is captured: not a terminal
    else:
        monkeypatch.setenv("GGUF_LAB_PROGRESS", env)
    load(small_model, backend="host", progress=True, chunk_mb=0.5)
    assert capsys.readouterr().err == ""


def test_notebook_bar_is_sized_by_its_total(monkeypatch):
    import tqdm.auto
    import tqdm.notebook

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)  # as in a Jupyter kernel with ipywidgets
    monkeypatch.delenv("GGUF_LAB_PROGRESS", raising=False)
    bar = ProgressBar("load (gpu)")
    bar(5, 10, "blk.0.attn_q.weight")
    widget = bar.bar.container.children[1]
    bar.bar.refresh()
    assert (widget.max, widget.value, widget.bar_style) == (10, 5, "")  # not drawn full ("info") from the start
    bar(5, 20)  # a total that changes resizes the widget
    bar.bar.refresh()
    assert (widget.max, widget.value) == (20, 5)
    bar.close()


def test_a_saved_notebook_shows_the_bar_at_its_end(small_model, tmp_path):
    """In a Jupyter kernel, the bar's saved widget state and its text fallback read 100% of the
    load's bytes, not a rate-limited 0% or 91% beside a full bar."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat (the test extra) runs notebooks")
    nbclient = pytest.importorskip("nbclient", reason="nbclient (the test extra) runs notebooks")
    pytest.importorskip("ipywidgets", reason="ipywidgets makes the notebook bar")
    from tqdm import tqdm

    from gguf_gpu_lab import open_model

    with open_model(small_model) as m:
        total = tqdm.format_sizeof(sum(t.n_bytes for t in m.tensors), divisor=1000)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os\nos.environ.pop('GGUF_LAB_PROGRESS', None)\nimport gguf_gpu_lab as lab\n"
        f"r = lab.load({str(small_model)!r}, backend='host', chunk_mb=0.05, progress=True)")])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    (shown,) = [o for o in nb.cells[0].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    fallback = shown["data"]["text/plain"]
    assert "100%" in fallback and f"{total}/{total}" in fallback, fallback
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    texts = [s["state"]["value"] for s in state.values() if s["model_name"] == "HTMLModel" and s["state"].get("value")]
    bars = [s["state"] for s in state.values() if s["model_name"] == "FloatProgressModel"]
    assert bars and all(b["value"] == b["max"] for b in bars)
    assert any("100%" in t for t in texts) and not any(f"{total}/" in t and f"{total}/{total}" not in t for t in texts), texts
