"""Profiler summaries, plots, trace export and the dashboards' logic (plain pytest, no browser)."""

import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from gguf_gpu_lab import open_model, plots  # noqa: E402
from gguf_gpu_lab.loader import load  # noqa: E402
from gguf_gpu_lab.profiler import Profile, Span, compare, union_us  # noqa: E402


def _profile():
    # two readers and one stream; times in ns from 0
    us = 1000
    spans = [Span("reader 0", "read", 0, "a", 100, 0, 10 * us), Span("reader 1", "read", 1, "b", 100, 5 * us, 15 * us),
             Span("stream 0", "h2d", 0, "a", 100, 10 * us, 12 * us), Span("stream 0", "dequant", 0, "a", 100, 12 * us, 14 * us),
             Span("stream 0", "h2d", 1, "b", 100, 15 * us, 17 * us), Span("stream 0", "dequant", 1, "b", 100, 17 * us, 19 * us)]
    return Profile.from_spans(spans, 0, 25e-6, {"mode": "gpu", "backend": "test", "file_bytes": 200})


def test_union_and_stage_summary():
    assert union_us([0, 5, 20], [10, 15, 30]) == 25
    p = _profile()
    st = p.stage_summary().set_index("stage")
    assert st.loc["read", "busy_us"] == 15 and st.loc["h2d", "busy_us"] == 4 and st.loc["read", "bytes"] == 200
    assert st.loc["dequant", "gb_s"] == pytest.approx(200 / 4e-6 / 1e9)


def test_overlap_idle_bound_and_lanes():
    p = _profile()  # wall 25 us
    # read with h2d 10-12 (reader 1 reads until 15), read with dequant 12-14: 4 us of 25
    assert p.overlap() == pytest.approx(4 / 25)
    gaps = p.idle_gaps(min_us=1)
    assert gaps[["start_us", "end_us"]].values.tolist() == [[19.0, 25.0]]
    assert p.bound_by() == "read"
    lanes = p.lane_summary().set_index("lane")
    assert lanes.loc["stream 0", "busy_us"] == 8 and lanes.loc["stream 0", "utilisation"] == pytest.approx(8 / 25)
    s = p.summary(peaks={"h2d": 100.0})
    assert s["bound_by"] == "read" and "of_peak" in s["stages"] and s["gb_s"] == pytest.approx(200 / 25e-6 / 1e9)


def test_chrome_trace(tmp_path):
    p = _profile()
    path = p.to_chrome_trace(str(tmp_path / "t.json"))
    doc = json.load(open(path))
    ev = doc["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {(0, "reader 0"), (0, "reader 1"), (1, "stream 0")}
    xs = [e for e in ev if e["ph"] == "X"]
    assert len(xs) == 6 and all(e["dur"] >= 0 for e in xs)
    assert {e["pid"] for e in xs if e["name"] in ("h2d", "dequant")} == {1}


def test_csv_round_trip(tmp_path):
    import pandas as pd

    p = _profile()
    back = Profile.from_df(pd.read_csv(p.to_csv(str(tmp_path / "s.csv"))))
    assert back.stage_summary().equals(p.stage_summary())


def test_merge_spans_keeps_readable_at_10000():
    starts = np.arange(10000) * 1.0
    s, e = plots.merge_spans(starts, starts + 0.9, min_gap=0.5)
    assert len(s) == 1 and e[-1] == pytest.approx(9999.9)
    s, e = plots.merge_spans(starts, starts + 0.4, min_gap=0.5)
    assert len(s) == 10000


def test_plots_from_a_real_load(small_model):
    r = load(small_model, chunk_mb=0.1, backend="host")
    for fig in (plots.timeline(r.profile), plots.throughput(r.profile),
                plots.stage_bandwidth(r.profile, {"h2d": 1.0})):
        assert fig.axes and fig.axes[0].has_data()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert plots.timeline(r.profile, ax=ax) is fig  # draws into the given axes
    with open_model(small_model) as m:
        assert plots.model_bytes(m, "layer").axes[0].has_data()
        with pytest.raises(ValueError):
            plots.model_bytes(m, "color")
    plt.close("all")


def test_compare_runs(small_model):
    a = load(small_model, chunk_mb=0.1, streams=1, backend="host")
    b = load(small_model, chunk_mb=0.1, streams=4, backend="host")
    t = compare({"one": a, "four": b})
    assert list(t.index) == ["one", "four"] and {"gb_s", "overlap", "bound_by", "read_gb_s"} <= set(t.columns)
    with pytest.raises(ValueError, match="no profile"):
        compare({"x": load(small_model, backend="host", profile=False)})


def test_model_explorer_logic(small_model):
    pytest.importorskip("ipywidgets")
    from gguf_gpu_lab.widgets import ModelExplorer

    with open_model(small_model) as m:
        ex = ModelExplorer(m)
        ex.type.value = "Q6_K"
        assert set(ex.rows()["type"]) == {"Q6_K"}
        assert all(m.info(n).type_name == "Q6_K" for n in ex.choice.options)
        ex.type.value = "all"
        ex.filter.value = "ffn_down"
        assert all("ffn_down" in n for n in ex.choice.options)
        ex.choice.value = ex.choice.options[-1]
        assert ex.choice.value in ex.stats.value and "std" in ex.stats.value and "no GPU here" in ex.stats.value
        assert ex.pane.fig.axes


def test_load_lab_logic(small_model):
    pytest.importorskip("ipywidgets")
    from gguf_gpu_lab.widgets import LoadLab

    lab = LoadLab(str(small_model), backend="host")
    lab.mode.value = "raw"
    lab.streams.value = 2
    lab.chunk_mb.value = 0.25
    r = lab.on_run()
    assert r.options.mode == "raw" and r.options.streams == 2 and lab.bar.value == pytest.approx(1.0)
    lab.mode.value = "gpu"
    lab.on_run()
    assert len(lab.runs) == 2 and "#2 gpu" in lab.compare_table.value and "GB/s" in lab.summary.value
    grid = lab.on_sweep(streams=(1, 2), chunks=(0.25, 1.0))
    assert grid.shape == (2, 2) and (grid > 0).all() and lab.sweep_pane.fig.axes
