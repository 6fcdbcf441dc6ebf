"""When copies and kernels really ran, from CUPTI's activity records (NVIDIA's ``cupti-python``).

A stream's CUDA event fires when the stream reaches it, not when the copy engine starts the copy,
so event-timed h2d bars of four streams overlap while the one copy engine works through them one
after another. CUPTI records each copy's and kernel's start and end on the device. With
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
_records: list[tuple] = []  # (kind, copy kind, bytes, start, end, name, correlation id)
_external: dict[int, int] = {}  # CUPTI correlation id -> the loader's operation number
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
    rows, ext = [], {}
    for a in activities:
        kind = int(a.kind)
        if kind == cupti.ActivityKind.MEMCPY:
            rows.append(("memcpy", int(a.copy_kind), int(a.bytes), int(a.start), int(a.end), "", int(a.correlation_id)))
        elif kind in kernel_kinds:
            rows.append(("kernel", 0, 0, int(a.start), int(a.end), str(a.name), int(a.correlation_id)))
        elif kind == cupti.ActivityKind.EXTERNAL_CORRELATION:
            ext[int(a.correlation_id)] = int(a.external_id)
    with _lock:
        _records.extend(rows)
        _external.update(ext)


class Recorder:
    """Collects CUPTI memcpy and kernel records from ``start()`` to ``stop()``. The loader wraps
    each copy and launch in ``op(...)``, which tags it with an external correlation id, so every
    record is attributed to the chunk and tensor that issued it."""

    def __init__(self):
        global _registered
        self._cp = _cupti()
        with _lock:
            if not _registered:  # CUPTI takes one pair of buffer callbacks per process
                self._cp.activity_register_callbacks(_buffer_requested, _buffer_completed)
                _registered = True
        self._kinds = (self._cp.ActivityKind.MEMCPY, self._cp.ActivityKind.CONCURRENT_KERNEL,
                       self._cp.ActivityKind.EXTERNAL_CORRELATION)
        self._ext_kind = self._cp.ExternalCorrelationKind.CUSTOM0
        self.issued: list[tuple[str, int, str, int]] = []  # (stage, chunk, tensor, bytes) by operation number - 1
        self.records: list[tuple] = []
        self.external: dict[int, int] = {}
        self.offset_ns = 0

    def start(self) -> None:
        with _lock:
            _records.clear()
            _external.clear()
        h0 = time.perf_counter_ns()
        ts = int(self._cp.get_timestamp())
        h1 = time.perf_counter_ns()
        self.offset_ns = (h0 + h1) // 2 - ts  # CUPTI's clock to perf_counter_ns
        for k in self._kinds:
            self._cp.activity_enable(k)

    def push(self, stage: str, chunk: int, tensor: str, nbytes: int) -> None:
        """Tag the next CUDA call (until ``pop``) as this operation."""
        self.issued.append((stage, chunk, tensor, nbytes))
        self._cp.activity_push_external_correlation_id(self._ext_kind, len(self.issued))

    def pop(self) -> None:
        self._cp.activity_pop_external_correlation_id(self._ext_kind)

    def stop(self) -> None:
        """Call after the device work is complete: flushes every buffer and stops collecting."""
        self._cp.activity_flush_all(1)
        for k in self._kinds:
            self._cp.activity_disable(k)
        with _lock:
            self.records, _records[:] = list(_records), []
            self.external = dict(_external)
            _external.clear()

    def spans(self) -> list[Span]:
        return attribute(self.records, self.external, self.issued, self.offset_ns,
                         int(self._cp.ActivityMemcpyKind.HTOD), int(self._cp.ActivityMemcpyKind.DTOD))


def attribute(records, external: dict[int, int], issued, offset_ns: int, htod: int, dtod: int) -> list[Span]:
    """Spans from CUPTI records on the host clock: host-to-device copies on the ``copy engine``
    lane, kernels and device-to-device copies on ``kernels``; each attributed through its
    external correlation id to the operation the loader issued (chunk -1 where none: another
    library's work in the same window)."""
    spans = []
    for kind, copy_kind, nbytes, start, end, name, corr in records:
        if kind == "memcpy":
            stage = "h2d" if copy_kind == htod else "d2d" if copy_kind == dtod else None
        else:
            stage = "dequant" if name == "dequant" else "kernel"
        if stage is None:
            continue
        op = external.get(corr, 0)
        chunk, tensor, b = issued[op - 1][1:] if 0 < op <= len(issued) else (-1, "", nbytes)
        lane = COPY_LANE if stage == "h2d" else KERNEL_LANE
        spans.append(Span(lane, stage, chunk, tensor, b, start + offset_ns, end + offset_ns))
    return spans
