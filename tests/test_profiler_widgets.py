"""Profiler summaries, plots, trace export and the dashboards' logic (plain pytest, no browser)."""

import json
from io import BytesIO

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from gguf_gpu_lab import open_model, plots  # noqa: E402
from gguf_gpu_lab.loader import load  # noqa: E402
from gguf_gpu_lab.profiler import Profile, Span, compare, union_us  # noqa: E402

PNG = b"\x89PNG"


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


def test_plots_leave_no_pyplot_figure(small_model, no_block_model):
    import matplotlib.pyplot as plt

    plt.close("all")
    r = load(small_model, chunk_mb=0.1, backend="host")
    figs = [plots.timeline(r.profile), plots.throughput(r.profile), plots.stage_bandwidth(r.profile)]
    with open_model(no_block_model) as m:
        layers = plots.model_bytes(m, "layer")
        figs.append(layers)
    # pyplot keeps none of them, so a notebook shows each only as the cell's result
    assert plt.get_fignums() == []
    assert [t.get_text() for t in layers.axes[0].get_xticklabels()] == ["embeddings", "enc.blk.0", "v.blk.0", "v.blk.1",
                                                                        "other"]
    for fig in figs:
        fig.savefig(BytesIO(), format="png")
    with open_model(small_model) as m:
        fig = plots.model_bytes(m, "layer")
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert labels == ["embeddings", *(str(i) for i in range(m.metadata["llama.block_count"])), "other"]
        heights = [b.get_height() for b in fig.axes[0].patches]  # the bars add up to the title's MiB
        assert sum(heights) == pytest.approx(m.summary()["tensor_bytes"] / 2**20)


def test_model_bytes_without_layers(tmp_path):
    from .gguf_bytes import GGUFBytes, f32_tensor

    path = GGUFBytes(tensors=[f32_tensor("mm.0.weight", 32), f32_tensor("mm.2.bias", 32)]).write(tmp_path / "loose.gguf")
    with open_model(path) as m:
        assert list(m.summary()["by_layer"]["count"]) == [2]  # both in "other"
        fig = plots.model_bytes(m, "layer")
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["other"]
        fig.savefig(BytesIO(), format="png")


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
        assert ex.pane.fig.axes and ex.pane.widget.value[:4] == PNG
        ex.filter.value = "no such tensor"  # nothing matches: the last tensor's stats and figure go
        assert ex.choice.value is None and "no tensor matches" in ex.stats.value and not ex.pane.fig.axes
    assert ModelExplorer(str(small_model)).choice.value == "token_embd.weight"  # a path opens the model


def test_model_explorer_without_decoder_blocks(no_block_model, capsys):
    pytest.importorskip("ipywidgets")
    import matplotlib.pyplot as plt

    from gguf_gpu_lab.widgets import ModelExplorer

    plt.close("all")
    with open_model(no_block_model) as m:
        ex = ModelExplorer(m)
        assert "v.blk" in ex.table.value and "enc.blk" in ex.table.value
        for name in ex.choice.options:  # every tensor: 4-D, 1-D of 100 values, quantized...
            ex.choice.value = name
            assert name in ex.stats.value and ex.pane.widget.value[:4] == PNG
    assert plt.get_fignums() == [] and capsys.readouterr().out == ""  # nothing shown or printed outside


def test_load_lab_logic(small_model, capsys):
    pytest.importorskip("ipywidgets")
    import matplotlib.pyplot as plt

    from gguf_gpu_lab.widgets import LoadLab

    plt.close("all")
    lab = LoadLab(str(small_model), backend="host")
    # no empty figure under the widget, none printed outside Jupyter
    assert plt.get_fignums() == [] and capsys.readouterr().out == "" and len(lab.pane.widget.value) == 0
    lab.mode.value = "raw"
    lab.streams.value = 2
    lab.chunk_mb.value = 0.25
    r = lab.on_run()
    assert r.options.mode == "raw" and r.options.streams == 2 and lab.bar.value == pytest.approx(1.0)
    assert len(r) > 0  # the run just made keeps its arrays
    lab.mode.value = "gpu"
    r2 = lab.on_run()
    assert len(r2) > 0 and len(r) == 0  # the older run's arrays are dropped, its profile kept
    assert len(lab.runs) == 2 and "#2 gpu" in lab.compare_table.value and "GB/s" in lab.summary.value
    assert lab.pane.widget.value[:4] == PNG
    sweep = lab.on_sweep(streams=(1, 2), chunks=(0.25, 1.0))
    assert isinstance(sweep, pd.DataFrame) and sweep is lab.sweep
    assert sweep.index.name == "streams" and list(sweep.index) == [1, 2]
    assert sweep.columns.name == "chunk_mb" and list(sweep.columns) == [0.25, 1.0]
    assert (sweep.to_numpy() > 0).all() and lab.sweep_pane.widget.value[:4] == PNG
    assert plt.get_fignums() == []


def test_timeline_says_what_a_device_bar_means():
    ms = 1_000_000
    spans = [Span("reader 0", "read", 0, "a", 10, 0, 2 * ms), Span("copy engine", "h2d", 0, "a", 10, 2 * ms, 3 * ms),
             Span("kernels", "dequant", 0, "a", 10, 3 * ms, 4 * ms), Span("setup", "pin staging", -1, "", 0, 0, ms),
             Span("stream 0", "h2d", 0, "a", 10, 2 * ms, 3 * ms)]
    for timing in ("cupti", "events"):
        p = Profile.from_spans(spans, 0, 0.004, meta={"backend": "cupy", "device_timing": timing})
        fig = plots.timeline(p)
        assert fig.axes[0].get_legend().get_title().get_text() == plots.DEVICE_TIMING_NOTE[timing]
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
            "reader 0", "stream 0", "copy engine", "kernels", "setup"]
    host = Profile.from_spans(spans[:1], 0, 0.004, meta={"backend": "host", "device_timing": "events"})
    assert plots.timeline(host).axes[0].get_legend().get_title().get_text() == ""


def test_timeline_legend_colours_match_the_lanes():
    """A CUPTI timeline's "kernels" lane draws dequant bars; the setup's kernel preparation is named
    apart in the legend, so no legend entry names a lane in another lane's colour."""
    from matplotlib.colors import to_hex

    ms = 1_000_000
    spans = [Span("reader 0", "read", 0, "a", 10, 0, 2 * ms), Span("copy engine", "h2d", 0, "a", 10, 2 * ms, 3 * ms),
             Span("kernels", "dequant", 0, "a", 10, 3 * ms, 4 * ms), Span("setup", "kernels", -1, "", 0, 0, ms),
             Span("setup", "pin staging", -1, "", 0, 0, ms)]
    fig = plots.timeline(Profile.from_spans(spans, 0, 0.004, meta={"backend": "cupy", "device_timing": "cupti"}))
    legend = {t.get_text(): to_hex(h.get_facecolor()) for t, h in
              zip(fig.axes[0].get_legend().get_texts(), fig.axes[0].get_legend().legend_handles)}
    assert legend == {"read": plots.STAGE_COLORS["read"].lower(), "h2d": plots.STAGE_COLORS["h2d"].lower(),
                      "dequant": plots.STAGE_COLORS["dequant"].lower(),
                      "setup: pin staging": plots.STAGE_COLORS["pin staging"].lower(),
                      "setup: kernels": plots.STAGE_COLORS["kernels"].lower()}
    y = [t.get_text() for t in fig.axes[0].get_yticklabels()].index("kernels")
    on_lane = {to_hex(c.get_facecolor()[0]) for c in fig.axes[0].collections
               if abs(c.get_paths()[0].vertices[:, 1].mean() - y) < 0.5}
    assert on_lane == {legend["dequant"]}  # the kernels lane in the colour its legend entry names


def test_setup_stages_have_no_bandwidth_and_bound_nothing():
    ms = 1_000_000
    spans = [Span("reader 0", "read", -1, "a", 4_000_000, 0, 2 * ms), Span("stream 0", "h2d", 0, "a", 4_000_000, 2 * ms, 3 * ms),
             Span("setup", "pin staging", -1, "", 0, 0, 5 * ms),  # the longest span, moving no bytes
             Span("setup", "queue first copy", -1, "", 0, 0, ms)]
    p = Profile.from_spans(spans, 0, 0.006, meta={"backend": "host"})
    st = p.stage_summary().set_index("stage")
    assert st.loc["read", "gb_s"] == pytest.approx(2.0) and st.loc["h2d", "gb_s"] == pytest.approx(4.0)
    assert np.isnan(st.loc["pin staging", "gb_s"]) and np.isnan(st.loc["queue first copy", "gb_s"])
    assert p.bound_by() == "read" and p.summary()["bound_by"] == "read"
    assert sorted(c for c in compare({"one": p}).columns if c.endswith("_gb_s")) == ["h2d_gb_s", "read_gb_s"]
    fig = plots.stage_bandwidth(p)
    assert sorted(t.get_text() for t in fig.axes[0].get_xticklabels()) == ["h2d", "read"]
    only_setup = Profile.from_spans(spans[2:], 0, 0.006, meta={"backend": "host"})
    assert only_setup.bound_by() == "pin staging"  # nothing moved bytes: the longest stage still


def test_overlap_counts_only_the_stages_that_move_bytes():
    """Setup spans beside a read, a copy and a dequantization that never run at once: no overlap."""
    ms = 1_000_000
    spans = [Span("reader 0", "read", 0, "a", 100, 0, 2 * ms), Span("stream 0", "h2d", 0, "a", 100, 2 * ms, 3 * ms),
             Span("stream 0", "dequant", 0, "a", 100, 3 * ms, 4 * ms),
             Span("setup", "pin staging", -1, "", 0, 0, 4 * ms), Span("setup", "queue first copy", 0, "a", 0, ms, 3 * ms)]
    p = Profile.from_spans(spans, 0, 0.004, meta={"backend": "host"})
    assert p.overlap() == 0.0 and p.summary()["overlap"] == 0.0
    piped = Profile.from_spans([*spans, Span("reader 1", "read", 1, "b", 100, 2 * ms, 3 * ms)], 0, 0.004)
    assert piped.overlap() == pytest.approx(0.25)  # reader 1's read beside chunk 0's copy: 1 of 4 ms


def test_copies_of_output_bytes_are_named_apart(small_model):
    """In cpu and sequential mode a copy moves the dequantized output, in gpu mode file bytes:
    compare() keeps them in separate columns, and the plots say which one a copy's GB/s is of."""
    runs = {m: load(small_model, mode=m, chunk_mb=0.25, backend="host") for m in ("gpu", "cpu", "sequential")}
    t = compare(runs)
    assert t.loc["gpu", "h2d_gb_s"] > 0 and np.isnan(t.loc["gpu", "h2d_out_gb_s"])
    for m in ("cpu", "sequential"):
        assert t.loc[m, "h2d_out_gb_s"] > 0 and np.isnan(t.loc[m, "h2d_gb_s"])
        st = runs[m].profile.stage_summary().set_index("stage")
        assert st.loc["h2d", "bytes"] == runs[m].out_bytes  # what the copies moved: the output
        labels = [line.get_label() for line in plots.throughput(runs[m].profile).axes[0].lines]
        assert "h2d (output bytes)" in labels and "h2d" not in labels
        ticks = [t.get_text() for t in plots.stage_bandwidth(runs[m].profile).axes[0].get_xticklabels()]
        assert "h2d\n(output bytes)" in ticks
    assert "h2d" in [line.get_label() for line in plots.throughput(runs["gpu"].profile).axes[0].lines]


@pytest.mark.parametrize("devices", [None, [0, 1]])
def test_sequential_copies_are_booked_to_their_device(small_model, devices):
    r = load(small_model, mode="sequential", backend="host", **({"device": devices} if devices else {}))
    df = r.profile.df
    assert set(df.loc[df["stage"] == "cpu_dequant", "device"]) == {-1}  # host work
    by_device = r.profile.stage_summary(by_device=True)
    h2d = by_device[by_device["stage"] == "h2d"].set_index("device")
    assert list(h2d.index) == (devices or [0]) and h2d["bytes"].sum() == r.out_bytes
    if devices:
        got = r.device_summary().set_index("device")
        assert (got["h2d_bytes"] > 0).all() and got["h2d_gb_s"].notna().all()
        assert got["h2d_bytes"].sum() == r.out_bytes


def test_chrome_trace_puts_every_device_lane_under_the_device(tmp_path):
    ms = 1_000_000
    cupti = [Span("reader 0", "read", 0, "a", 10, 0, 2 * ms), Span("copy engine", "h2d", 0, "a", 10, 2 * ms, 3 * ms),
             Span("kernels", "dequant", 0, "a", 10, 3 * ms, 4 * ms), Span("setup", "pin staging", -1, "", 0, 0, ms)]
    host = [Span("reader 0", "read", 0, "a", 10, 0, 2 * ms), Span("lane 0", "h2d", 0, "a", 10, 2 * ms, 3 * ms)]
    for spans in (cupti, host):
        p = Profile.from_spans(spans, 0, 0.004, meta={"devices": [0]})
        ev = p.chrome_trace()["traceEvents"]
        pids = {e["args"]["name"]: e["pid"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
        assert {lane for lane, pid in pids.items() if pid == 1} == set(p.df.loc[p.df["device"] == 0, "lane"])
        assert {lane for lane, pid in pids.items() if pid == 0} == set(p.df.loc[p.df["device"] == -1, "lane"])
    only_host = Profile.from_spans(cupti[:1], 0, 0.004).chrome_trace()["traceEvents"]
    assert [e["args"]["name"] for e in only_host if e["name"] == "process_name"] == ["host"]  # no empty "device"
    # read back from CSV, the setup spans' empty tensor names are NaN: the trace is still JSON
    back = Profile.from_df(pd.read_csv(Profile.from_spans(cupti, 0, 0.004).to_csv(str(tmp_path / "s.csv"))))
    assert set(back.df["tensor"]) == {"a", ""}
    text = open(back.to_chrome_trace(str(tmp_path / "t.json"))).read()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the trace is not JSON"))
    assert {e["args"]["tensor"] for e in doc["traceEvents"] if e["ph"] == "X"} == {"a", ""}

def test_throughput_of_an_empty_profile_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.throughput(Profile.from_spans([], 0, 0.0))
    assert fig.axes[0].get_legend() is None


def test_timeline_in_a_plain_figure_keeps_its_legend_inside():
    """Drawn into one axes of plt.subplots(1, 2) (no layout engine), the legend under the axes and
    the x label stay inside the figure; a profile read back without its meta has a title without
    empty fields; a line between every device's lanes and the host's."""
    import matplotlib.pyplot as plt

    ms = 1_000_000
    spans = [Span("reader 0", "read", 0, "a", 10, 0, 2 * ms), Span("gpu0/stream 0", "h2d", 0, "a", 10, 2 * ms, 3 * ms),
             Span("gpu1/stream 0", "dequant", 1, "b", 10, 3 * ms, 4 * ms), Span("setup", "pin staging", -1, "", 0, 0, ms),
             Span("setup", "plan", -1, "", 0, ms, 2 * ms), Span("setup", "allocate outputs", -1, "", 0, 2 * ms, 3 * ms)]
    fig, (ax, _) = plt.subplots(1, 2)
    plots.timeline(Profile.from_spans(spans, 0, 0.004), ax=ax)
    fig.canvas.draw()
    inside = fig.bbox
    for artist in (ax.get_legend(), ax.xaxis.label):
        box = artist.get_window_extent()
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, artist
    assert ax.get_title() == "load: 6 spans, 4.0 ms"
    assert sorted(line.get_ydata()[0] for line in ax.lines) == [0.5, 1.5, 2.5]  # reader | gpu0 | gpu1 | setup
    plt.close(fig)


def test_model_explorer_with_values_that_are_not_finite(tmp_path):
    """A tensor holding inf and NaN: statistics and histogram of its finite values, the count of
    the others; the heatmap's colours centred on zero; a 1-D tensor's slice named for what it is."""
    pytest.importorskip("ipywidgets")
    from gguf_gpu_lab.widgets import ModelExplorer

    from .gguf_bytes import GGUFBytes, Tensor

    values = np.linspace(0.001, 2.0, 200, dtype=np.float32)
    values[3], values[7] = np.inf, np.nan
    path = GGUFBytes(tensors=[Tensor("odd.weight", (200,), 0, values.tobytes())]).write(tmp_path / "odd.gguf")
    ex = ModelExplorer(str(path))  # the first tensor is shown at once
    assert "min 0.001 · max 2 ·" in ex.stats.value and "1 inf, 1 NaN" in ex.stats.value
    hist, heat = ex.pane.fig.axes[:2]
    assert sum(p.get_height() for p in hist.patches) == 198
    (im,) = heat.images
    assert im.norm.vmin == -im.norm.vmax < 0  # white at zero
    assert heat.get_title() == "first 192 values, in rows of 64"
    assert ex.pane.widget.value[:4] == PNG


def test_load_lab_says_when_a_run_fails(small_model, tmp_path):
    pytest.importorskip("ipywidgets")
    import shutil

    from gguf_gpu_lab import GGUFLabError
    from gguf_gpu_lab.widgets import LoadLab

    with pytest.raises(GGUFLabError, match="does-not-exist"):
        LoadLab(str(tmp_path / "does-not-exist.gguf"), backend="host")
    path = shutil.copy(small_model, tmp_path / "m.gguf")
    lab = LoadLab(str(path), backend="host")
    r = lab.on_run()
    done = r.file_bytes / 1e6
    assert lab.status.value.startswith(f"{done:.1f} / {done:.1f} MB · ")  # decimal units, as the summaries
    with open(path, "r+b") as f:  # the file changes between runs
        f.truncate(path.stat().st_size // 2)
    for click in (lab.on_run, lambda: lab.on_sweep(streams=(1,), chunks=(1.0,))):
        with pytest.raises(GGUFLabError):
            click()
        assert "failed: " in lab.status.value and "m.gguf" in lab.status.value
    assert len(lab.runs) == 1
