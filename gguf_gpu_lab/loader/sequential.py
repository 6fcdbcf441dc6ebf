"""The baseline: one tensor at a time, synchronously, CPU dequantization then a pageable copy."""

from __future__ import annotations

import time

import numpy as np

from .. import quant
from ..errors import LoadCancelled
from .plan import out_kind
from .result import DeviceTensor


def run_sequential(pl) -> tuple[dict[str, DeviceTensor], int]:
    """One tensor at a time, synchronously: CPU dequantization, then a copy from pageable memory."""
    out: dict[str, DeviceTensor] = {}
    total = 0
    opts = pl.opts
    pl.check_memory([])
    for i, t in enumerate(pl.tensors):
        if pl.cancelled.is_set():
            raise LoadCancelled(f"{pl.model.path}: load cancelled")
        t0 = time.perf_counter_ns()
        # through the mapping (checked first) or, with read="preadv", a copy: never SIGBUS there
        raw = pl.source.read(t.offset, t.n_bytes, mapped=pl.mapped)
        x = quant.dequantize(raw, t.ggml_type, dtype=opts.dtype)
        t1 = time.perf_counter_ns()
        logical, store = out_kind(t, "sequential", opts.dtype)
        be = pl.backend_for(t)
        arr = be.empty(t.n_elements, store)
        if isinstance(arr, np.ndarray):
            arr[...] = x.reshape(-1).view(store)
        else:
            with be.on_device():
                arr.set(np.ascontiguousarray(x.reshape(-1).view(store)))
        be.synchronize()
        t2 = time.perf_counter_ns()
        pl.span("main", "cpu_dequant", i, t.name, t.n_bytes, t0, t1)
        pl.span("main", "h2d", i, t.name, arr.nbytes, t1, t2)  # the bytes copied, not the file's
        out[t.name] = DeviceTensor(t, arr, logical, "sequential", be.device)
        total += t.n_bytes
        if pl.progress is not None and pl.progress(total, sum(x.n_bytes for x in pl.tensors), t.name) is False:
            pl.cancelled.set()
            raise LoadCancelled(f"{pl.model.path}: load cancelled by the progress callback")
    return out, total
