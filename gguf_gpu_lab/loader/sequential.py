"""The baseline: one tensor at a time, synchronously, CPU dequantization then a pageable copy."""

from __future__ import annotations

import time

import numpy as np

from .. import quant
from ..errors import LoadCancelled
from .plan import out_kind, shard_pieces
from .staging import piece_bytes
from .result import DeviceTensor


def run_sequential(pl) -> tuple[dict[str, DeviceTensor], int]:
    """One tensor at a time, synchronously: CPU dequantization, then a copy from pageable memory."""
    out: dict[str, DeviceTensor] = {}
    total = 0
    opts = pl.opts
    pl.check_memory([])
    whole = sum((pl.cuts[t.name].read_bytes if pl.cuts else t.n_bytes) for t in pl.tensors)
    for i, t in enumerate(pl.tensors):
        if pl.cancelled.is_set():
            raise LoadCancelled(f"{pl.model.path}: load cancelled")
        t0 = time.perf_counter_ns()
        c = pl.cuts.get(t.name) if pl.cuts else None
        if c is None or c.shard is None:
            # through the mapping (checked first; a truncation during the dequantization below is
            # SIGBUS) or, with read="preadv", a copy checked after its read: never SIGBUS there
            raw, c = pl.source.read(t.offset, t.n_bytes, mapped=pl.mapped), None
        else:  # the shard's covering blocks, gathered (finish_shapes keeps the shard's own columns)
            if pl.mapped:
                pl.source.check()
            raw = piece_bytes(pl.source, shard_pieces(c, c.read_bytes)[0], pl.mapped)
        x = quant.dequantize(raw, t.ggml_type, dtype=opts.dtype)
        t1 = time.perf_counter_ns()
        logical, store = out_kind(t, "sequential", opts.dtype)
        be = pl.backend_for(t)
        arr = be.empty(x.size, store)
        if isinstance(arr, np.ndarray):
            arr[...] = x.reshape(-1).view(store)
        else:
            with be.on_device():
                arr.set(np.ascontiguousarray(x.reshape(-1).view(store)))
        be.synchronize()
        t2 = time.perf_counter_ns()
        pl.span("main", "cpu_dequant", i, t.name, raw.nbytes, t0, t1)
        copies = f"gpu{be.device}/main" if pl.placement else "main"  # several devices: the one copied to
        pl.span(copies, "h2d", i, t.name, arr.nbytes, t1, t2)  # the bytes copied, not the file's
        out[t.name] = DeviceTensor(t, arr, logical, "sequential", be.device, c)
        total += raw.nbytes
        if pl.progress is not None and pl.progress(total, whole, t.name) is False:
            pl.cancelled.set()
            raise LoadCancelled(f"{pl.model.path}: load cancelled by the progress callback")
    return out, total
