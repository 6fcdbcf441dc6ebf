"""Spans of a load on one clock, as a tidy pandas DataFrame, with summaries and trace export.

Columns of ``Profile.df`` (units in the names):

| column | meaning |
| --- | --- |
| ``lane`` | where the span ran: ``reader N`` (a host thread), ``stream N`` (a GPU stream), ``lane N`` (a host-backend lane), ``main`` (a ``sequential`` load's one thread), ``setup`` (a pipelined load's host work that is not a read, copy or kernel), and with ``profile="cupti"`` ``copy engine`` and ``kernels`` in place of the streams; in a load over several devices ``gpuD/stream N`` (``gpuD/lane N`` on the host backend, ``gpuD/main`` for a ``sequential`` load's copies) |
| ``stage`` | what ran: ``read``, ``cpu_dequant``, ``h2d``, ``dequant`` (``STAGES``), ``d2d`` (CUPTI: a device-to-device copy), or on the ``setup`` lane ``plan``, ``pin staging``, ``lanes and scratch``, ``allocate outputs``, ``kernels``, ``wait for kernels``, ``queue first copy``, ``progress callback``, ``device clock``, ``wait for warm-up`` |
| ``chunk`` | the chunk's index in the plan (for ``sequential``, the tensor's); -1 for setup work of no chunk |
| ``tensor`` | the first tensor of the chunk; ``""`` for setup work of no chunk |
| ``bytes`` | the bytes the span moved: file bytes for ``read``, ``cpu_dequant``, ``dequant`` and ``d2d``; for ``h2d`` the bytes copied, which are file bytes in ``gpu`` and ``raw`` mode and the dequantized output in ``cpu`` and ``sequential`` mode (``copied``); 0 for setup work |
| ``start_us``, ``end_us``, ``dur_us`` | microseconds from the start of the load |
| ``device`` | the device a device span ran on (a ``sequential`` load's copy: the device it copied to); -1 for host work (reads, setup) |

Device spans come from CUDA/HIP events put on the host clock through a reference event; host
spans from ``time.perf_counter_ns``. The loader keeps the events and reads their times when the
profile is first looked at, so a load never waits on timing queries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

COLUMNS = ("lane", "stage", "chunk", "tensor", "bytes", "start_us", "end_us", "dur_us", "device")
DEVICE_LANES = ("stream", "lane", "copy engine", "kernels")  # lanes of device work (a host lane plays one)


def lane_device(lane: str, default: int = 0) -> int:
    """The device a lane's spans ran on: D for ``gpuD/...``, ``default`` (the load's one device)
    for the device lanes of a single-device load, -1 for host work.

    Example:
        >>> lane_device("gpu1/stream 0"), lane_device("stream 2", default=3), lane_device("reader 0")
        (1, 3, -1)
    """
    head, sep, _ = lane.partition("/")
    if sep and head.startswith("gpu") and head[3:].isdigit():
        return int(head[3:])
    return default if lane.startswith(DEVICE_LANES) else -1


def span_device(lane: str, stage: str, default: int = 0) -> int:
    """The device a span's work went to: its lane's (``lane_device``), and for a copy made by a
    host thread (a ``sequential`` load's ``main``) the load's one device.

    Example:
        >>> span_device("main", "cpu_dequant"), span_device("main", "h2d", default=2)
        (-1, 2)
    """
    d = lane_device(lane, default)
    return default if d < 0 and stage == "h2d" else d


def copied(mode: str | None) -> str | None:
    """What an ``h2d`` span's bytes are in a load of this mode: ``"file"`` bytes where the device
    gets the quantized blocks (gpu, raw), ``"output"`` bytes where the CPU dequantized them first
    (cpu, sequential); None for a mode not known (a profile read back without its meta)."""
    return {"gpu": "file", "raw": "file", "cpu": "output", "sequential": "output"}.get(mode or "")


STAGES = ("read", "cpu_dequant", "h2d", "dequant")


@dataclass(frozen=True)
class Span:
    lane: str
    stage: str
    chunk: int
    tensor: str
    bytes: int
    start_ns: int  # host perf_counter_ns
    end_ns: int


class Profile:
    """The spans of one load. ``deferred``: a callable giving more spans, called once, when
    the spans are first read (the loader's device spans, read from their events)."""

    def __init__(self, spans: Sequence[Span], origin_ns: int, wall_s: float, meta: dict | None = None,
                 deferred: Callable[[], Sequence[Span]] | None = None):
        self._spans = list(spans)
        self.origin_ns = origin_ns
        self.wall_s = wall_s
        self.meta = dict(meta or {})
        self._deferred = deferred
        self._sorted = False
        self._df = None

    @classmethod
    def from_spans(cls, spans: Sequence[Span], origin_ns: int, wall_s: float, meta: dict | None = None,
                   deferred: Callable[[], Sequence[Span]] | None = None) -> "Profile":
        return cls(spans, origin_ns, wall_s, meta, deferred)

    @property
    def spans(self) -> list[Span]:
        """Every span, sorted by start."""
        if self._deferred is not None:
            more, self._deferred = self._deferred, None
            self._spans.extend(more())
            self._sorted = False
        if not self._sorted:
            self._spans.sort(key=lambda s: s.start_ns)
            self._sorted = True
        return self._spans

    def __repr__(self):
        return f"<Profile {self.meta.get('mode', '')} wall={self.wall_s:.3f}s>"

    @classmethod
    def from_df(cls, df, wall_s: float | None = None, meta: dict | None = None) -> "Profile":
        """A profile back from its DataFrame (for instance one read from CSV or Parquet, where an
        empty ``tensor`` comes back as NaN: it is ``""`` again). A file keeps the spans only: pass
        ``meta`` (``profile.meta``: mode, backend, devices...) for what the summaries and plots
        say beside them; ``wall_s`` defaults to the last span's end."""
        spans = [Span(r.lane, r.stage, int(r.chunk), r.tensor if isinstance(r.tensor, str) else "", int(r.bytes),
                      int(r.start_us * 1e3), int(r.end_us * 1e3))
                 for r in df.itertuples(index=False)]
        wall = wall_s if wall_s is not None else (float(df["end_us"].max()) / 1e6 if len(df) else 0.0)
        return cls.from_spans(spans, 0, wall, meta)

    # -- the table --------------------------------------------------------------------------
    @property
    def df(self):
        """The spans as a DataFrame with the documented columns, sorted by start."""
        if self._df is None:
            import pandas as pd

            o = self.origin_ns
            spans = self.spans
            default = (self.meta.get("devices") or [0])[0]
            self._df = pd.DataFrame({
                "lane": [s.lane for s in spans], "stage": [s.stage for s in spans],
                "chunk": [s.chunk for s in spans], "tensor": [s.tensor for s in spans],
                "bytes": [s.bytes for s in spans],
                "start_us": [(s.start_ns - o) / 1e3 for s in spans],
                "end_us": [(s.end_ns - o) / 1e3 for s in spans],
                "dur_us": [(s.end_ns - s.start_ns) / 1e3 for s in spans],
                "device": [span_device(s.lane, s.stage, default) for s in spans],
            }, columns=list(COLUMNS))
        return self._df

    @property
    def wall_us(self) -> float:
        return self.wall_s * 1e6

    # -- summaries --------------------------------------------------------------------------
    def stage_summary(self, by_device: bool = False):
        """Per stage: spans, bytes, busy time (union over lanes) and GB/s of those bytes while busy
        (NaN for a stage that moves no bytes: the setup work, see ``moving``). The bytes are what
        each stage moved (the ``bytes`` column): file bytes, but for ``h2d`` in cpu and sequential
        mode the dequantized output it copied (``copied``). ``by_device``: per
        device and stage (device -1: host work such as reads), so a load over
        several devices shows each device's copy and dequantization bandwidth."""
        import pandas as pd

        keys = ["device", "stage"] if by_device else ["stage"]
        rows = []
        for key, g in self.df.groupby(keys if by_device else "stage", sort=by_device):
            busy = union_us(g["start_us"].tolist(), g["end_us"].tolist())
            rows.append({**dict(zip(keys, key if by_device else (key,))), "spans": len(g), "bytes": int(g["bytes"].sum()),
                         "busy_us": busy, "gb_s": g["bytes"].sum() / busy / 1e3 if busy and g["bytes"].sum() else
                         float("nan")})
        return pd.DataFrame(rows, columns=[*keys, "spans", "bytes", "busy_us", "gb_s"])

    def device_summary(self):
        """Per device: the bytes copied to it (file bytes in gpu and raw mode, the dequantized
        output in cpu and sequential mode: ``copied``), the time its copies were busy (union over
        its lanes) and their GB/s, and the GB/s it received over the whole load's wall time."""
        import pandas as pd

        df = self.df
        h2d = df[(df["device"] >= 0) & (df["stage"] == "h2d")]
        rows = []
        for d, g in h2d.groupby("device"):
            busy = union_us(g["start_us"].tolist(), g["end_us"].tolist())
            nbytes = int(g["bytes"].sum())
            rows.append({"device": int(d), "h2d_bytes": nbytes, "h2d_busy_us": busy,
                         "h2d_gb_s": nbytes / busy / 1e3 if busy else float("nan"),
                         "gb_s": nbytes / self.wall_s / 1e9 if self.wall_s else float("nan")})
        return pd.DataFrame(rows, columns=["device", "h2d_bytes", "h2d_busy_us", "h2d_gb_s", "gb_s"])

    def lane_summary(self):
        """Per lane: spans, busy time and utilisation (busy share of the load's wall time)."""
        import pandas as pd

        rows = []
        for lane, g in self.df.groupby("lane", sort=True):
            busy = union_us(g["start_us"].tolist(), g["end_us"].tolist())
            rows.append({"lane": lane, "spans": len(g), "busy_us": busy,
                         "utilisation": busy / self.wall_us if self.wall_us else float("nan")})
        return pd.DataFrame(rows, columns=["lane", "spans", "busy_us", "utilisation"])

    def overlap(self) -> float:
        """Share of the wall time in which two or more different stages that move bytes (read,
        copy, dequantize: see ``moving``) run at once. The setup work is left out: a load that
        reads, then copies, then dequantizes, one after another, overlaps 0 however long its
        setup spans run beside them."""
        df = self.df
        moved = set(moving(self.stage_summary())["stage"])
        edges = []
        for r in df.loc[df["stage"].isin(moved), ["stage", "start_us", "end_us"]].itertuples(index=False):
            edges.append((r.start_us, 1, r.stage))
            edges.append((r.end_us, -1, r.stage))
        edges.sort(key=lambda e: (e[0], e[1]))
        active: dict[str, int] = {}
        t_prev, both = None, 0.0
        for t, d, stage in edges:
            if t_prev is not None and sum(1 for v in active.values() if v > 0) >= 2:
                both += t - t_prev
            active[stage] = active.get(stage, 0) + d
            t_prev = t
        return both / self.wall_us if self.wall_us else 0.0

    def idle_gaps(self, min_us: float = 100.0):
        """Intervals of at least ``min_us`` in which nothing ran, from the load's start to its end."""
        import pandas as pd

        df = self.df
        gaps, cursor = [], 0.0
        for s, e in sorted(zip(df["start_us"], df["end_us"])):
            if s - cursor >= min_us:
                gaps.append((cursor, s))
            cursor = max(cursor, e)
        if self.wall_us - cursor >= min_us:
            gaps.append((cursor, self.wall_us))
        return pd.DataFrame(gaps, columns=["start_us", "end_us"]).assign(dur_us=lambda d: d.end_us - d.start_us)

    def bound_by(self) -> str | None:
        """The stage that moves bytes (read, copy, dequantize) with the most busy time: the one
        that bounds the run."""
        return _bound_by(self.stage_summary())

    def summary(self, peaks: Mapping[str, float] | None = None) -> dict[str, Any]:
        """One dictionary: wall time, GB/s, per-stage table, overlap, idle time, the bounding
        stage, and the measured peaks (GB/s by stage name, e.g. ``{"h2d": 54.7}``) beside them."""
        st = self.stage_summary()
        if peaks:
            st["peak_gb_s"] = st["stage"].map(lambda s: peaks.get(s, float("nan")))
            st["of_peak"] = st["gb_s"] / st["peak_gb_s"]
        file_bytes = self.meta.get("file_bytes", int(self.df.loc[self.df.stage.isin(["read", "cpu_dequant"]), "bytes"].sum()))
        gaps = self.idle_gaps()
        return {"wall_s": self.wall_s, "file_bytes": file_bytes,
                "gb_s": file_bytes / self.wall_s / 1e9 if self.wall_s else float("nan"),
                "stages": st, "lanes": self.lane_summary(), "overlap": self.overlap(),
                "idle_us": float(gaps["dur_us"].sum()) if len(gaps) else 0.0, "bound_by": _bound_by(st),
                "meta": dict(self.meta)}

    # -- export -----------------------------------------------------------------------------
    def chrome_trace(self) -> dict:
        """The spans as a Chrome trace (opens in Perfetto and chrome://tracing): process 0 is the
        host, process 1 the device (in a load over several devices, process 1 + D is device D),
        declared where it has a lane; one thread per lane, named by metadata events. A lane is a
        device's where ``lane_device`` says so: streams, host-backend lanes, CUPTI's ``copy
        engine`` and ``kernels``."""
        df = self.df
        lanes = sorted(set(df["lane"]))
        several = any(lane_device(lane, -1) >= 0 for lane in lanes)  # a gpuD/ prefix
        pid = {lane: (1 + lane_device(lane, 0) if several else 1) if lane_device(lane, 0) >= 0 else 0 for lane in lanes}
        tid = {lane: i for i, lane in enumerate(lanes)}
        events: list[dict] = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "host"}}]
        for p in sorted(set(pid.values()) - {0}):
            events.append({"ph": "M", "name": "process_name", "pid": p, "tid": 0,
                           "args": {"name": f"gpu{p - 1}" if several else "device"}})
        for lane in lanes:
            events.append({"ph": "M", "name": "thread_name", "pid": pid[lane], "tid": tid[lane], "args": {"name": lane}})
        for r in df.itertuples(index=False):
            events.append({"ph": "X", "name": r.stage, "cat": r.stage, "pid": pid[r.lane], "tid": tid[r.lane],
                           "ts": float(r.start_us), "dur": float(r.dur_us),
                           "args": {"tensor": r.tensor, "chunk": int(r.chunk), "bytes": int(r.bytes)}})
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {k: str(v) for k, v in self.meta.items()}}

    def to_chrome_trace(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)
        return path

    def to_csv(self, path: str) -> str:
        self.df.to_csv(path, index=False)
        return path

    def to_parquet(self, path: str) -> str:
        """Needs pyarrow (or fastparquet); CSV needs nothing."""
        self.df.to_parquet(path, index=False)
        return path


def merge_spans(starts: np.ndarray, ends: np.ndarray, min_gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Join spans (sorted by start) separated by less than ``min_gap``: at 10,000 spans a lane,
    the ones closer than a pixel draw as one bar (``plots.timeline``); with ``min_gap=0``, the
    union of overlapping intervals."""
    if len(starts) == 0:
        return starts, ends
    out_s, out_e = [starts[0]], [ends[0]]
    for s, e in zip(starts[1:], ends[1:]):
        if s - out_e[-1] < min_gap:
            out_e[-1] = max(out_e[-1], e)
        else:
            out_s.append(s)
            out_e.append(e)
    return np.asarray(out_s), np.asarray(out_e)


def moving(stages):
    """The rows of a ``stage_summary`` table whose stages move bytes (read, copy, dequantize): the
    ones with a bandwidth; the setup work moves none."""
    return stages[stages["bytes"] > 0].reset_index(drop=True)


def _bound_by(stages) -> str | None:
    """The stage with the most busy time among those that move bytes (read, copy, dequantize);
    a setup stage only where no stage moved any."""
    moved = moving(stages)
    stages = moved if len(moved) else stages
    return None if stages.empty else str(stages.loc[stages["busy_us"].idxmax(), "stage"])


def union_us(starts: list[float], ends: list[float]) -> float:
    """Length of the union of intervals."""
    if not starts:
        return 0.0
    order = np.argsort(np.asarray(starts, dtype=float), kind="stable")
    s, e = merge_spans(np.asarray(starts, dtype=float)[order], np.asarray(ends, dtype=float)[order], 0.0)
    return float((e - s).sum())


def compare(runs: Mapping[str, Any]):
    """A table with one row per run (``LoadResult`` or ``Profile``, keyed by a label): wall
    time, GB/s, overlap, the bounding stage and each stage's GB/s (``read_gb_s``, ...). A copy's
    GB/s is ``h2d_gb_s`` where it copied file bytes (gpu, raw mode) and ``h2d_out_gb_s`` where it
    copied the dequantized output (cpu, sequential mode: ``copied``), so one column never holds
    both."""
    import pandas as pd

    rows = []
    for label, run in runs.items():
        prof = getattr(run, "profile", run)
        if prof is None:
            raise ValueError(f"run {label!r} has no profile (it was loaded with profile=False)")
        s = prof.summary()
        row = {"run": label, "wall_s": s["wall_s"], "gb_s": s["gb_s"], "overlap": s["overlap"], "bound_by": s["bound_by"]}
        out = copied(prof.meta.get("mode")) == "output"
        for r in moving(s["stages"]).itertuples(index=False):  # setup work has no bandwidth
            row[f"{r.stage}_out_gb_s" if out and r.stage == "h2d" else f"{r.stage}_gb_s"] = r.gb_s
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
