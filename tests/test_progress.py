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
