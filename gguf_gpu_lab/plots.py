"""Matplotlib figures of a load and of a model. Each function returns the Figure and accepts
``ax=`` to draw into an existing axes (``timeline`` gives a figure without a layout engine the
constrained layout, which keeps its legend under the axes inside the figure). Pyplot lets go of each figure as soon as it is made, so a
notebook shows a returned figure once and no figure is left open."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from .profiler import copied, merge_spans, moving  # noqa: F401  (merge_spans is also part of this module's API)

STAGE_COLORS = {"read": "#4C72B0", "cpu_dequant": "#8172B2", "h2d": "#DD8452", "dequant": "#55A868",
                "d2d": "#C44E52", "pin staging": "#937860", "allocate outputs": "#8C8C8C", "kernels": "#CCB974",
                # the other host work on a load's critical path (the setup lane)
                "plan": "#B0B0B0", "device clock": "#64B5CD", "wait for warm-up": "#DA8BC3",
                "wait for kernels": "#E5D8A0", "progress callback": "#6D6D6D", "lanes and scratch": "#A89F91",
                "queue first copy": "#F0B27A"}
# what a device bar means, by how the device work was timed (the profile's meta["device_timing"])
DEVICE_TIMING_NOTE = {
    "events": "stream bars: from the stream reaching the work to its end (a copy waiting for the one copy "
              "engine counts as busy)",
    "cupti": "copy engine and kernels: when the hardware ran each copy and kernel (CUPTI)",
}


LEGEND_COLUMNS = 5  # a timeline's legend wraps after this many stages


def _ipympl() -> bool:
    import matplotlib

    return "ipympl" in matplotlib.get_backend() or matplotlib.get_backend() == "widget"


def _axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    # made through pyplot, which sets up a notebook's inline backend to show a returned figure,
    # then let go of at once, so that backend does not show it a second time (ipympl's canvas,
    # the figure's widget, needs it kept; made under ioff(), it is shown only when returned)
    with plt.ioff():
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    if not _ipympl():
        plt.close(fig)
    return fig, ax


def _lane_order(lanes) -> list[str]:
    """Host threads, then the device lanes grouped by device (``gpuD/...``, in device order, a
    sequential load's ``gpuD/main`` first), then the setup lane."""
    from .profiler import lane_device

    def key(name: str):
        kind, _, num = name.rpartition("/")[2].partition(" ")
        rank = {"reader": 0, "main": 1, "lane": 2, "stream": 3, "copy": 4, "kernels": 5, "setup": 7}.get(kind, 6)
        # host threads, device lanes, the rest
        group = 1 if lane_device(name, -1) >= 0 else 0 if rank <= 1 else 2 if rank >= 6 else 1
        return (group, lane_device(name, 0) if group == 1 else 0, rank, int(num) if num.isdigit() else 0, name)

    return sorted(set(lanes), key=key)


def _device_groups(ax, lanes: list[str]) -> None:
    """In a load over several devices, a line between the devices' groups of lanes and the host's
    (the reader threads above them, the setup lane below)."""
    from .profiler import lane_device

    devs = [lane_device(lane, -1) for lane in lanes]  # -1: host work, and every lane of one device
    if max(devs, default=-1) < 0:
        return
    for y in range(1, len(lanes)):
        if devs[y] != devs[y - 1]:
            ax.axhline(y - 0.5, color="#777777", linewidth=0.8, linestyle=":")


def timeline(profile, ax=None, *, width_px: int = 1200, title: str | None = None):
    """Per-lane timeline (reader threads, then streams, or with ``profile="cupti"`` the copy
    engine and the kernels, then the first load's setup), one bar per span, coloured by stage;
    the caption says what a device bar means. A load over several devices groups the streams
    by device (``gpu0/stream 0``...), a dotted line between devices. The legend sits under the
    axes; given an ``ax`` in a figure without a layout engine, the figure gets the constrained
    layout, so the legend and the axis label are not cut off."""
    df = profile.df
    lanes = _lane_order(df["lane"])
    fig, ax = _axes(ax, (11, 0.45 * len(lanes) + 1.4))
    if fig.get_layout_engine() is None:  # a plain plt.subplots(): no room kept under the axes
        fig.set_layout_engine("constrained")
    t_end_ms = max(profile.wall_s * 1e3, float(df["end_us"].max()) / 1e3 if len(df) else 0.0, 1e-3)
    min_gap = t_end_ms / width_px  # one pixel, in ms
    for y, lane in enumerate(lanes):
        g = df[df["lane"] == lane]
        for stage, gs in g.groupby("stage"):
            gs = gs.sort_values("start_us")
            s, e = merge_spans(gs["start_us"].to_numpy() / 1e3, gs["end_us"].to_numpy() / 1e3, min_gap)
            widths = np.maximum(e - s, min_gap)
            ax.broken_barh(list(zip(s, widths)), (y - 0.4, 0.8), facecolors=STAGE_COLORS.get(stage, "#999999"))
    ax.set_yticks(range(len(lanes)), lanes)
    _device_groups(ax, lanes)
    ax.invert_yaxis()
    ax.set_xlim(0, t_end_ms)
    ax.set_xlabel("ms since the start of the load")
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy

    present = [s for s in STAGE_COLORS if s in set(df["stage"])]
    # a stage seen only on the setup lane is named so: its "kernels" (getting the kernels ready) is
    # not the "kernels" lane of a CUPTI timeline, whose bars are dequant spans
    setup_only = set(df.loc[df["lane"] == "setup", "stage"]) - set(df.loc[df["lane"] != "setup", "stage"])
    meta = profile.meta
    note = DEVICE_TIMING_NOTE.get(meta.get("device_timing", "")) if meta.get("backend") != "host" else None
    # under the axes, in rows of at most LEGEND_COLUMNS and no wider than the axes (in a narrow one
    # a wider legend leaves the layout no room), with what a device bar means as its title: the bars
    # keep the figure's whole width
    handles = [Patch(color=STAGE_COLORS[s], label=f"setup: {s}" if s in setup_only else s) for s in present]
    renderer = getattr(fig.canvas, "get_renderer", lambda: None)()
    for ncols in range(min(len(present), LEGEND_COLUMNS), 0, -1):
        leg = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, 0), ncols=ncols, fontsize="small",
                        frameon=False, bbox_transform=offset_copy(ax.transAxes, fig=fig, y=-34, units="points"),
                        title=note, title_fontsize="x-small", alignment="left")
        if renderer is None or leg.get_window_extent(renderer).width <= ax.get_window_extent(renderer).width:
            break
    if note:
        leg.get_title().set_color("#555555")
    what = f"{meta['mode']} load" if meta.get("mode") else "load"  # a profile read back from CSV has no meta
    where = f" on {meta['backend']}" if meta.get("backend") else ""
    ax.set_title(title or f"{what}{where}: {len(df)} spans, {profile.wall_s * 1e3:.1f} ms")
    return fig


def throughput(profile, ax=None, *, bins: int = 60, stages=("read", "h2d", "dequant", "cpu_dequant")):
    """GB/s over time per stage: each span's bytes spread evenly over its duration, in bins. The
    bytes are what each stage moved: in cpu and sequential mode the copies (``h2d``) move the
    dequantized output, not file bytes, and their line says so."""
    df = profile.df
    out = copied(profile.meta.get("mode")) == "output"
    fig, ax = _axes(ax, (9, 3.2))
    t_end = max(profile.wall_s * 1e6, float(df["end_us"].max()) if len(df) else 1.0)
    edges = np.linspace(0.0, t_end, bins + 1)
    width = edges[1] - edges[0]
    for stage in stages:
        g = df[df["stage"] == stage]
        if g.empty:
            continue
        acc = np.zeros(bins)
        for s, e, b in zip(g["start_us"], g["end_us"], g["bytes"]):
            dur = max(e - s, 1e-3)
            lo, hi = np.searchsorted(edges, s, "right") - 1, np.searchsorted(edges, e, "left")
            for k in range(max(lo, 0), min(hi, bins)):
                overlap = min(e, edges[k + 1]) - max(s, edges[k])
                if overlap > 0:
                    acc[k] += b * overlap / dur
        label = "h2d (output bytes)" if out and stage == "h2d" else stage
        ax.plot((edges[:-1] + width / 2) / 1e3, acc / width / 1e3, label=label, color=STAGE_COLORS.get(stage))
    ax.set_xlabel("ms since the start of the load")
    ax.set_ylabel("GB/s")
    ax.set_title("throughput over time")
    if ax.lines:  # a profile without spans draws no line to name
        ax.legend(fontsize="small")
    return fig


def stage_bandwidth(profile, peaks: Mapping[str, float] | None = None, ax=None):
    """GB/s per stage while busy, beside the measured peaks (dashed) where given: the stages that
    move bytes (the setup work has no bandwidth); in cpu and sequential mode the copies' bar is
    of the dequantized output they moved, and labelled so."""
    st = moving(profile.stage_summary())
    fig, ax = _axes(ax, (6, 3.2))
    x = np.arange(len(st))
    ax.bar(x, st["gb_s"], color=[STAGE_COLORS.get(s, "#999999") for s in st["stage"]])
    for i, s in enumerate(st["stage"]):
        if peaks and s in peaks:
            ax.hlines(peaks[s], i - 0.4, i + 0.4, colors="black", linestyles="dashed")
            ax.annotate(f"peak {peaks[s]:.0f}", (i, peaks[s]), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize="small")
    out = copied(profile.meta.get("mode")) == "output"
    ax.set_xticks(x, ["h2d\n(output bytes)" if out and s == "h2d" else s for s in st["stage"]])
    ax.set_ylabel("GB/s while busy")
    ax.set_title("bandwidth per stage")
    return fig


def model_bytes(model, by: str = "type", ax=None):
    """A model's tensor bytes by type or by layer (bars labelled by index where every block is a
    decoder's ``blk.N``, by ``group.N`` where there are other stacks such as ``v.blk``; the tensors
    outside every block in an ``embeddings`` bar first and an ``other`` bar last)."""
    s = model.summary()
    if by not in ("type", "layer"):
        raise ValueError(f"by must be 'type' or 'layer', got {by!r}")
    fig, ax = _axes(ax, (8, 3.2))
    data = s["by_type"] if by == "type" else s["by_layer"]
    if by == "layer":
        groups = {g for g, i in data.index if i >= 0}
        data = data.set_axis([g if i < 0 else str(i) if groups == {"blk"} else f"{g}.{i}" for g, i in data.index])
    if len(data):
        (data["n_bytes"] / 2**20).plot.bar(ax=ax, color="#4C72B0")
    else:
        ax.text(0.5, 0.5, f"no tensor belongs to a {by}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_ylabel("MiB")
    ax.set_xlabel(by)
    ax.set_title(f"{s['n_tensors']} tensors, {s['tensor_bytes'] / 2**20:.1f} MiB, by {by}")
    return fig


def write_profile(profile, out_dir: str) -> dict[str, str]:
    """The spans (CSV), the timeline (PNG) and a Chrome trace (JSON) of a load, into out_dir
    (what ``gguf-gpu-lab load --profile DIR`` and the demo write)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = {"spans": os.path.join(out_dir, "spans.csv"), "timeline": os.path.join(out_dir, "timeline.png"),
             "trace": os.path.join(out_dir, "trace.json")}
    profile.to_csv(paths["spans"])
    fig = timeline(profile)
    fig.savefig(paths["timeline"], dpi=110)
    plt.close(fig)
    profile.to_chrome_trace(paths["trace"])
    return paths
