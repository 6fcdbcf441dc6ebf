"""ipywidgets dashboards: a model explorer and a load lab. Figures are made under
``plt.ioff()`` and shown through the ipympl canvas when that backend is active, otherwise made
without pyplot and shown as a PNG in an Image widget (the inline backend), so no stray figure
is shown or printed. Jupyter-only imports stay in this module."""

from __future__ import annotations

import html
import io
import itertools
from typing import Any

import numpy as np

from .plots import _ipympl


def _widgets():
    try:
        import ipywidgets as w
    except ImportError as e:  # pragma: no cover - notebook extra
        raise ImportError("the dashboards need ipywidgets: pip install 'gguf-gpu-lab[notebook]'") from e
    return w


class _FigurePane:
    """A matplotlib figure inside a widget layout, redrawn in place."""

    def __init__(self, figsize):
        import matplotlib.pyplot as plt
        from matplotlib.figure import Figure

        w = _widgets()
        if _ipympl():
            with plt.ioff():
                self.fig = plt.figure(figsize=figsize, layout="constrained")
            self.widget = self.fig.canvas
        else:
            self.fig = Figure(figsize=figsize, layout="constrained")
            self.widget = w.Image(format="png")

    def draw(self):
        if _ipympl():
            self.fig.canvas.draw_idle()
            return
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        self.widget.value = buf.getvalue()


class ModelExplorer:
    """Filterable tensor table; for the chosen tensor: statistics and a histogram of its finite
    values (with the count of the others, inf and NaN), a heatmap of a slice on a colour scale
    centred on zero, and the difference between CPU and GPU dequantization (where a GPU is present).
    ``model``: an open ``GGUFModel``, or a path or URL (as ``LoadLab`` takes).

    Example:
        >>> explorer = ModelExplorer(model)          # in a notebook, show explorer.ui
        >>> explorer.filter.value = "attn_q"         # what typing into the filter box does
        >>> explorer.choice.options
        ('blk.0.attn_q.weight', 'blk.1.attn_q.weight')
    """

    def __init__(self, model, *, max_rows: int = 30, heatmap: int = 64):
        from .model import GGUFModel, shared_model

        w = _widgets()
        self.model = model if isinstance(model, GGUFModel) else shared_model(model)  # an open model, or a path
        self.max_rows = max_rows
        self.heatmap = heatmap
        types = ["all"] + sorted({t.type_name for t in self.model.tensors})
        self.filter = w.Text(placeholder="name contains…", description="filter")
        self.type = w.Dropdown(options=types, value="all", description="type")
        self.choice = w.Select(options=[t.name for t in self.model.tensors], rows=8, description="tensor",
                               layout=w.Layout(width="420px"))
        self.table = w.HTML()
        self.stats = w.HTML()
        self.pane = _FigurePane((9, 3.2))
        self.filter.observe(self._on_filter, "value")
        self.type.observe(self._on_filter, "value")
        self.choice.observe(self._on_choice, "value")
        self.ui = w.VBox([w.HBox([self.filter, self.type]), self.table, self.choice, self.stats, self.pane.widget])
        self._on_filter()
        self._on_choice()

    def rows(self):
        df = self.model.tensors_df()
        if self.filter.value:
            df = df[df["name"].str.contains(self.filter.value, regex=False)]
        if self.type.value != "all":
            df = df[df["type"] == self.type.value]
        return df

    def _on_filter(self, change=None):
        df = self.rows()
        self.table.value = df.head(self.max_rows).drop(columns=["np_shape"]).to_html(index=False) + \
            (f"<i>{len(df) - self.max_rows} more</i>" if len(df) > self.max_rows else "")
        names = list(df["name"])
        self.choice.options = names
        if names and self.choice.value not in names:
            self.choice.value = names[0]

    def _on_choice(self, change=None):
        name = self.choice.value
        if not name:  # a filter that matches nothing: no tensor's figures left standing
            self.stats.value = "<i>no tensor matches the filter</i>"
            self.pane.fig.clear()
            self.pane.draw()
            return
        t = self.model.info(name)
        x = self.model.dequantize(name)
        flat = x.reshape(-1)
        ok = np.isfinite(flat)
        finite = flat[ok]  # inf or NaN would make every statistic and the histogram's range meaningless
        diff = self.gpu_difference(name, cpu=x)
        values = (f"min {finite.min():.5g} · max {finite.max():.5g} · mean {finite.mean():.5g} · "
                  f"std {finite.std():.5g}" if finite.size else "no finite value")
        others = "" if ok.all() else (f" · not finite: {np.isinf(flat).sum()} inf, {np.isnan(flat).sum()} NaN "
                                      "(left out of the statistics and the histogram)")
        self.stats.value = (f"<b>{name}</b>: {t.type_name}, shape {t.np_shape}, {t.n_bytes / 2**20:.2f} MiB, "
                            f"{t.bits_per_weight:.2f} bits/weight<br>{values} · zeros {np.mean(flat == 0):.1%}"
                            f"{others}<br>CPU vs GPU: {diff}")
        fig = self.pane.fig
        fig.clear()
        a1, a2 = fig.subplots(1, 2)
        a1.hist(finite, bins=100, color="#4C72B0")
        a1.set_title("finite values" if finite.size < flat.size else "values")
        width = min(self.heatmap, flat.size)  # not 2-D: whole rows of the first values, any size
        sl = x if x.ndim == 2 else flat[: min(self.heatmap, flat.size // width) * width].reshape(-1, width)
        sl = sl[: self.heatmap, : self.heatmap]
        shown = np.abs(sl[np.isfinite(sl)])
        lim = float(shown.max()) if shown.size and shown.max() > 0 else 1.0  # white at zero, on both sides
        im = a2.imshow(sl, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=a2)
        a2.set_title(f"first {sl.shape[0]}×{sl.shape[1]}" if x.ndim == 2 else
                     f"first {sl.size} values, in rows of {sl.shape[1]}")
        self.pane.draw()

    def gpu_difference(self, name: str, cpu: np.ndarray | None = None) -> str:
        """CPU against GPU float32 dequantization of a tensor (``cpu``: its CPU result, if at hand)."""
        from .device import gpu_available

        if not gpu_available():
            return "no GPU here"
        import cupy

        from .quant.gpu import dequantize_gpu
        from .tools.verify import mismatches

        t = self.model.info(name)
        g = dequantize_gpu(cupy.asarray(self.model.raw(name)), t.ggml_type, dtype="float32").get()
        c = self.model.dequantize(name) if cpu is None else cpu
        bad = mismatches(g, c).size
        return "bit-exact (float32)" if bad == 0 else f"{bad} values differ, max |diff| {np.abs(g - c.reshape(-1)).max():.3g}"


class LoadLab:
    """Choose mode, streams, chunk size, readers, order and dtype (and where there is more than
    one GPU, the device or all of them); run with a live progress bar; see the timeline and
    summary (per device, over several); keep runs and compare them; sweep streams × chunk size
    into a heatmap of GB/s. A path that opens no model is refused here; a run or sweep that
    fails (the file changed meanwhile) says so in the status line, then raises.

    Example:
        >>> load_lab = LoadLab("model.gguf")         # in a notebook, show load_lab.ui
        >>> load_lab.streams.value = 2               # what moving the slider does
        >>> load_lab.readers.value = 4               # (default: load()'s own, two fewer than the cores)
        >>> r = load_lab.on_run()                    # what pressing "run" does
        >>> r.options.streams, list(load_lab.runs)
        (2, ['#1 gpu s2 c16 r4'])
    """

    def __init__(self, path: str, *, backend: str = "auto"):
        from .device import device_count
        from .model import shared_model

        w = _widgets()
        shared_model(path)  # a path that opens no model fails here, not at the first click
        self.path = path
        self.backend = backend
        self.runs: dict[str, Any] = {}
        n = device_count(backend)
        # where there is more than one GPU: one of them, or all at once (split by layer)
        self.device = (w.Dropdown(options=[(f"device {d}", d) for d in range(n)] + [(f"all ({n})", "all")], value=0,
                                  description="device") if n > 1 else None)
        self.mode = w.Dropdown(options=["gpu", "raw", "cpu", "sequential"], value="gpu", description="mode")
        self.dtype = w.Dropdown(options=["float16", "float32", "bfloat16"], value="float16", description="dtype")
        self.streams = w.IntSlider(value=4, min=1, max=8, description="streams")
        self.chunk_mb = w.FloatLogSlider(value=16, base=2, min=-2, max=7, description="chunk MiB")
        from .loader.staging import default_readers

        readers = default_readers()  # load()'s own default: the lab's first run is lab.load(path)'s
        self.readers = w.IntSlider(value=readers, min=1, max=max(16, readers), description="readers")
        self.order = w.Dropdown(options=["file", "largest", "layer"], value="file", description="order")
        self.run_button = w.Button(description="run", button_style="primary")
        self.sweep_button = w.Button(description="sweep streams × chunk")
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress")
        self.status = w.HTML()
        self.summary = w.HTML()
        self.compare_table = w.HTML()
        self.pane = _FigurePane((10, 3.6))
        self.sweep_pane = _FigurePane((5, 3.2))
        self.run_button.on_click(self.on_run)
        self.sweep_button.on_click(self.on_sweep)
        first = [self.mode, self.dtype, self.order] + ([self.device] if self.device is not None else [])
        controls = w.VBox([w.HBox(first), w.HBox([self.streams, self.chunk_mb, self.readers]),
                           w.HBox([self.run_button, self.sweep_button, self.bar]), self.status])
        self.ui = w.VBox([controls, self.pane.widget, self.summary, self.compare_table, self.sweep_pane.widget])

    def _progress(self, done, total, name):
        self.bar.value = done / total if total else 1.0
        self.status.value = f"{done / 1e6:.1f} / {total / 1e6:.1f} MB · {html.escape(str(name))}"

    def options(self) -> dict[str, Any]:
        opts = {"mode": self.mode.value, "dtype": self.dtype.value, "streams": self.streams.value,
                "chunk_mb": float(self.chunk_mb.value), "readers": self.readers.value, "order": self.order.value}
        if self.device is not None:
            opts["device"] = self.device.value
        return opts

    def _failed(self, what: str, e: Exception) -> None:
        """The error in the status line: a button's callback raises where no one sees it."""
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.status.value = f'<span style="color:#b00">{what} failed: {type(e).__name__}: {html.escape(line)}</span>'

    def on_run(self, _button=None):
        try:
            return self._run()
        except Exception as e:
            self._failed("run", e)
            raise

    def _run(self):
        from .loader import load
        from .plots import timeline
        from .profiler import compare, copied

        opts = self.options()
        self.bar.value = 0.0
        r = load(self.path, backend=self.backend, progress=self._progress, **opts)
        label = f"#{len(self.runs) + 1} {opts['mode']} s{opts['streams']} c{opts['chunk_mb']:g} r{opts['readers']}"
        if "device" in opts:
            label += f" d{opts['device']}"
        self.runs[label] = r
        s = r.profile.summary()
        per_device = r.device_summary().to_html(index=False) if r.place is not None else ""
        self.summary.value = (f"<b>{label}</b>: {r.gb_s:.2f} GB/s, {r.wall_s * 1e3:.1f} ms, backend {r.backend}, "
                              f"overlap {s['overlap']:.0%}, bound by {s['bound_by']}"
                              + (", h2d: the dequantized output copied" if copied(opts["mode"]) == "output" else "")
                              + s["stages"].to_html(index=False)
                              + per_device)
        self.pane.fig.clear()
        timeline(r.profile, ax=self.pane.fig.subplots())
        self.pane.draw()
        self.compare_table.value = compare(self.runs).to_html(float_format="%.3f")
        for v in self.runs.values():  # keep the profiles, drop the device arrays of older runs
            if v is not r:
                v.tensors.clear()
        return r

    def on_sweep(self, _button=None, streams=(1, 2, 4, 8), chunks=(4.0, 16.0, 64.0)):
        """Load once per streams × chunk size; returns the GB/s as a DataFrame (index: streams,
        columns: chunk MiB), also kept as ``self.sweep``, and draws it as a heatmap."""
        try:
            return self._sweep(streams, chunks)
        except Exception as e:
            self._failed("sweep", e)
            raise

    def _sweep(self, streams, chunks):
        import pandas as pd

        from .loader import load

        grid = np.zeros((len(streams), len(chunks)))
        base = self.options()
        for (i, s), (j, c) in itertools.product(enumerate(streams), enumerate(chunks)):
            r = load(self.path, backend=self.backend, profile=False,
                     **{**base, "streams": s, "chunk_mb": c})
            grid[i, j] = r.gb_s
            self.bar.value = (i * len(chunks) + j + 1) / grid.size
        fig = self.sweep_pane.fig
        fig.clear()
        ax = fig.subplots()
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(chunks)), [f"{c:g}" for c in chunks])
        ax.set_yticks(range(len(streams)), [str(s) for s in streams])
        ax.set_xlabel("chunk MiB")
        ax.set_ylabel("streams")
        for (i, j), v in np.ndenumerate(grid):  # dark text on viridis' light end, light on its dark end
            light = im.norm(v) > 0.6 if np.isfinite(v) else False
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if light else "white", fontsize="small")
        fig.colorbar(im, ax=ax, label="GB/s")
        ax.set_title(f"{base['mode']} mode: GB/s")
        self.sweep_pane.draw()
        self.sweep = pd.DataFrame(grid, index=pd.Index(streams, name="streams"),
                                  columns=pd.Index(chunks, name="chunk_mb"))
        return self.sweep
