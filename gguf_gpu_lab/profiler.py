"""Spans of a load on one clock, as a tidy pandas DataFrame.

Columns (units in the names): ``lane`` (reader thread, stream or host lane), ``stage`` (read,
cpu_dequant, h2d, dequant), ``chunk``, ``tensor`` (first tensor of the chunk), ``bytes``
(file bytes of the chunk), ``start_us``, ``end_us``, ``dur_us`` (from the start of the load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

COLUMNS = ("lane", "stage", "chunk", "tensor", "bytes", "start_us", "end_us", "dur_us")


@dataclass(frozen=True)
class Span:
    lane: str
    stage: str
    chunk: int
    tensor: str
    bytes: int
    start_ns: int  # host perf_counter_ns
    end_ns: int


@dataclass
class Profile:
    spans: list[Span]
    origin_ns: int
    wall_s: float
    meta: dict[str, Any] = field(default_factory=dict)
    _df: Any = None

    @classmethod
    def from_spans(cls, spans: Sequence[Span], origin_ns: int, wall_s: float, meta: dict | None = None) -> "Profile":
        return cls(sorted(spans, key=lambda s: s.start_ns), origin_ns, wall_s, dict(meta or {}))

    @property
    def df(self):
        """The spans as a DataFrame with the documented columns, sorted by start."""
        if self._df is None:
            import pandas as pd

            o = self.origin_ns
            self._df = pd.DataFrame({
                "lane": [s.lane for s in self.spans], "stage": [s.stage for s in self.spans],
                "chunk": [s.chunk for s in self.spans], "tensor": [s.tensor for s in self.spans],
                "bytes": [s.bytes for s in self.spans],
                "start_us": [(s.start_ns - o) / 1e3 for s in self.spans],
                "end_us": [(s.end_ns - o) / 1e3 for s in self.spans],
                "dur_us": [(s.end_ns - s.start_ns) / 1e3 for s in self.spans],
            }, columns=list(COLUMNS))
        return self._df

    def stage_summary(self):
        """Busy time (union over lanes) and GB/s of file bytes per stage."""
        import pandas as pd

        rows = []
        for stage, g in self.df.groupby("stage", sort=False):
            busy = _union_us(g["start_us"].tolist(), g["end_us"].tolist())
            rows.append({"stage": stage, "spans": len(g), "bytes": int(g["bytes"].sum()), "busy_us": busy,
                         "gb_s": g["bytes"].sum() / busy / 1e3 if busy else float("nan")})
        return pd.DataFrame(rows)


def _union_us(starts: list[float], ends: list[float]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(zip(starts, ends)):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total
