"""When copies and kernels really ran, from CUPTI's activity records (NVIDIA's ``cupti-python``).

A stream's CUDA event fires when the stream reaches it, not when the copy engine starts the copy,
so event-timed h2d bars of four streams overlap while the copy engine works through them one
after another (the driver may put an odd copy on a second engine, sharing the same link). CUPTI records each copy's and kernel's start and end on the device. With
``load(..., profile="cupti")`` the device spans come from those records instead of the events:
one ``copy engine`` lane (host-to-device copies) and one ``kernels`` lane (dequantization and
device-to-device copies), each span attributed to the chunk and tensor that issued it. NVIDIA
only; the events remain the portable timing (ROCm, or without ``cupti-python``).
"""

from __future__ import annotations

import threading
import time

from .errors import BackendError
from .profiler import Span

COPY_LANE = "copy engine"
KERNEL_LANE = "kernels"

_lock = threading.Lock()
_records: list[tuple] = []  # (kind, copy kind, bytes, start, end, name, CUPTI stream id)
_registered = False


def _cupti():
    try:
        from cupti import cupti
    except Exception as e:
        raise BackendError(f"profile='cupti' needs NVIDIA's cupti-python (pip install cupti-python; it needs "
                           f"pyelftools too): {type(e).__name__}: {e}") from None
    return cupti


def available() -> bool:
    try:
        _cupti()
        return True
    except BackendError:
        return False


def _buffer_requested():
    return 8 << 20, 0  # bytes a buffer, no record limit


def _buffer_completed(activities) -> None:
    cupti = _cupti()
    kernel_kinds = (int(cupti.ActivityKind.CONCURRENT_KERNEL), int(cupti.ActivityKind.KERNEL))
    rows = []
    for a in activities:
        kind = int(a.kind)
        if kind == cupti.ActivityKind.MEMCPY:
            rows.append(("memcpy", int(a.copy_kind), int(a.bytes), int(a.start), int(a.end), "", int(a.stream_id)))
        elif kind in kernel_kinds:
            rows.append(("kernel", 0, 0, int(a.start), int(a.end), str(a.name), int(a.stream_id)))
    with _lock:
        _records.extend(rows)


class Recorder:
    """Collects CUPTI memcpy and kernel records from ``start()`` to ``stop()``. The loader notes
    each copy and launch it issues (``issue``) with its lane; work on one stream runs in issue
    order, so each stream's records, in time order, are its lane's operations in issue order."""

    def __init__(self):
        global _registered
        self._cp = _cupti()
        with _lock:
            if not _registered:  # CUPTI takes one pair of buffer callbacks per process
                self._cp.activity_register_callbacks(_buffer_requested, _buffer_completed)
                _registered = True
        self._kinds = (self._cp.ActivityKind.MEMCPY, self._cp.ActivityKind.CONCURRENT_KERNEL)
        self.issued: list[tuple[int, str, int, str, int]] = []  # (lane, stage, chunk, tensor, bytes)
        self.stream_lane: dict[int, int] = {}  # CUPTI stream id -> lane index
        self.records: list[tuple] = []
        self.offset_ns = 0

    def bind(self, lanes) -> None:
        """Learn the CUPTI stream id of each lane's stream (on the thread that uses them)."""
        import cupy

        ctx = cupy.cuda.driver.ctxGetCurrent()
        for lane in lanes:
            self.stream_lane[int(self._cp.get_stream_id_ex(ctx, lane.stream.ptr, 0))] = lane.index

    def issue(self, lane: int, stage: str, chunk: int, tensor: str, nbytes: int) -> None:
        self.issued.append((lane, stage, chunk, tensor, nbytes))

    def start(self) -> None:
        with _lock:
            _records.clear()
        h0 = time.perf_counter_ns()
        ts = int(self._cp.get_timestamp())
        h1 = time.perf_counter_ns()
        self.offset_ns = (h0 + h1) // 2 - ts  # CUPTI's clock to perf_counter_ns
        for k in self._kinds:
            self._cp.activity_enable(k)

    def stop(self) -> None:
        """Call after the device work is complete: flushes every buffer and stops collecting."""
        self._cp.activity_flush_all(1)
        for k in self._kinds:
            self._cp.activity_disable(k)
        with _lock:
            self.records, _records[:] = list(_records), []

    def spans(self) -> list[Span]:
        return attribute(self.records, self.stream_lane, self.issued, self.offset_ns,
                         int(self._cp.ActivityMemcpyKind.HTOD), int(self._cp.ActivityMemcpyKind.DTOD))


def attribute(records, stream_lane: dict[int, int], issued, offset_ns: int, htod: int, dtod: int) -> list[Span]:
    """Spans from CUPTI records on the host clock: host-to-device copies on the ``copy engine``
    lane, kernels and device-to-device copies on ``kernels``. On each of the loader's streams the
    records, in time order, are matched to that lane's issued operations in order (an operation
    and a record of a different stage do not match); a record that matches nothing (another
    stream's work, or an unexpected one) keeps chunk -1."""
    todo: dict[int, list] = {}
    for op in issued:
        todo.setdefault(op[0], []).append(op)
    pos = {lane: 0 for lane in todo}
    spans = []
    for kind, copy_kind, nbytes, start, end, name, stream in sorted(records, key=lambda r: r[3]):
        if kind == "memcpy":
            stage = "h2d" if copy_kind == htod else "d2d" if copy_kind == dtod else None
        else:
            stage = "dequant" if name == "dequant" else "kernel"
        if stage is None:
            continue
        chunk, tensor, b = -1, "", nbytes
        lane = stream_lane.get(stream)
        if lane in todo and pos[lane] < len(todo[lane]) and todo[lane][pos[lane]][1] == stage:
            _, _, chunk, tensor, b = todo[lane][pos[lane]]
            pos[lane] += 1
        spans.append(Span(COPY_LANE if stage == "h2d" else KERNEL_LANE, stage, chunk, tensor, b,
                          start + offset_ns, end + offset_ns))
    return spans
