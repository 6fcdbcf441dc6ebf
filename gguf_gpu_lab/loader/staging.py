"""Filling the pinned staging ring: the ring itself, the load's stop flag, the reader threads' reads
(file bytes, or in cpu mode dequantized values)."""

from __future__ import annotations

import os
import queue
import threading

import numpy as np

from .. import quant
from ..device import Backend, Event
from ..errors import GGUFLabError, LoadCancelled
from ..model import GGUFModel
from ..quant._cpu import dequantize_blocks
from .plan import Piece

class Stop:
    """The load's stop flag: set by the load itself (an error, a cancelling callback), or by the
    caller's ``cancel`` event, which the load only reads."""

    def __init__(self, user: threading.Event | None):
        self._own = threading.Event()
        self._user = user

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._user is not None and self._user.is_set())


class Staging:
    """The ring of pinned staging slots, allocated once at exact size; a slot is handed out only
    after the event of its previous use has completed."""

    def __init__(self, backend: Backend, n_slots: int, slot_bytes: int):
        self.backend = backend
        self.slots, self._kept = backend.lease_staging(n_slots, slot_bytes)
        self._free: queue.Queue = queue.Queue()
        for i in range(n_slots):
            self._free.put((i, None))

    def acquire(self, cancelled: Stop) -> tuple[int, np.ndarray]:
        while True:
            try:
                i, ev = self._free.get(timeout=0.05)
            except queue.Empty:
                if cancelled.is_set():
                    raise LoadCancelled("load cancelled") from None
                continue
            if ev is not None:
                ev.synchronize()
            return i, self.slots[i]

    def release(self, i: int, ev: Event | None) -> None:
        self._free.put((i, ev))

    def close(self) -> None:
        self.backend.return_staging(self.slots, self._kept)
        self.slots = []


def default_readers(devices: int = 1) -> int:
    """Two cores fewer than the machine has (one for the thread that queues copies and kernels,
    one for the driver), at least two, at most 14 a device: on the lent 16-core H100 host 14
    readers loaded fastest (12: 7% slower, 16: level or slower; BENCHMARKS.md); on the 32-core
    two-GPU host 28 threads copied out of the page cache at 58.6 GB/s against 43.9 with 14, so
    a load over several devices may use more (issue 14)."""
    return max(2, min(14 * devices, quant.default_threads() - 2))


def read_into(fd: int, mm: np.ndarray | None, dst: np.ndarray, offset: int) -> None:
    """File bytes [offset, offset + len(dst)) into dst: a copy out of the file mapping (NumPy
    releases the GIL; 16 threads measured about 2x faster than preadv on the lent machine), or
    preadv straight into the buffer when ``mm`` is None."""
    n = dst.nbytes
    if mm is not None:
        if offset + n > os.fstat(fd).st_size:  # touching mapped pages past the end is SIGBUS
            raise GGUFLabError(f"file ended early: needs bytes up to {offset + n}, the file now has "
                               f"{os.fstat(fd).st_size} (was it truncated after it was opened?)")
        np.copyto(dst, mm[offset:offset + n])
        return
    if hasattr(os, "preadv"):
        got = 0
        view = memoryview(dst).cast("B")
        while got < n:
            r = os.preadv(fd, [view[got:]], offset + got)
            if r <= 0:
                raise GGUFLabError(f"file ended early: read {got} of {n} bytes at offset {offset} "
                                   "(was it truncated after it was opened?)")
            got += r
    else:  # pragma: no cover - platforms without preadv
        dst[...] = mm[offset:offset + n]


def gather_into(fd: int, mm: np.ndarray | None, dst: np.ndarray, p: Piece) -> None:
    """A strided piece's file bytes into ``dst``, its rows (a column shard's segments) gathered one
    after another: one 2-D copy out of the mapping, or one read per row, so that the device still
    sees one contiguous copy per piece."""
    rb = p.nbytes // p.rows
    if mm is not None:
        end = p.file_offset + (p.rows - 1) * p.stride + rb
        if end > os.fstat(fd).st_size:  # touching mapped pages past the end is SIGBUS
            raise GGUFLabError(f"file ended early: needs bytes up to {end}, the file now has "
                               f"{os.fstat(fd).st_size} (was it truncated after it was opened?)")
        src = np.lib.stride_tricks.as_strided(mm[p.file_offset:end], (p.rows, rb), (p.stride, 1), writeable=False)
        np.copyto(dst.reshape(p.rows, rb), src)
        return
    for r in range(p.rows):
        read_into(fd, None, dst[r * rb:(r + 1) * rb], p.file_offset + r * p.stride)


def piece_bytes(model: GGUFModel, p: Piece) -> np.ndarray:
    """A piece's bytes out of the model's mapping: a view for one run, a gathered copy for a
    column shard's rows."""
    spec = quant.type_spec(p.tensor.ggml_type)
    raw = model.raw(p.tensor.name)
    lo = p.first_block * spec.type_size
    if p.rows == 1:
        return raw[lo:lo + p.nbytes]
    rb = p.nbytes // p.rows
    end = lo + (p.rows - 1) * p.stride + rb
    return np.lib.stride_tricks.as_strided(raw[lo:end], (p.rows, rb), (p.stride, 1), writeable=False).reshape(-1)


def staged_bytes(p: Piece, dtype: str) -> int:
    """Bytes a piece takes in a cpu-mode staging slot: its values in the output dtype."""
    spec = quant.type_spec(p.tensor.ggml_type)
    if spec.kind == "int":
        return p.nbytes
    return p.n_blocks * spec.block_size * quant.resolve_dtype(dtype).itemsize


def cpu_piece(model: GGUFModel, p: Piece, slot: np.ndarray, pos: int, dtype: str) -> int:
    spec = quant.type_spec(p.tensor.ggml_type)
    raw = piece_bytes(model, p)
    if spec.kind == "int":
        slot[pos:pos + raw.nbytes] = raw
        return pos + raw.nbytes
    odt = quant.resolve_dtype(dtype)
    n = p.n_blocks * spec.block_size
    dst = slot[pos:pos + n * odt.itemsize].view(odt)
    if spec.kind == "quant":
        # one thread per reader, readers in parallel: large tasks and no GIL-holding fast path
        blocks = np.ascontiguousarray(raw).reshape(p.n_blocks, spec.type_size)
        dequantize_blocks(spec, blocks, dst.reshape(p.n_blocks, spec.block_size), 1,
                          task_elements=1 << 22, alone=False)
    else:  # plain floats: a cast
        quant.dequantize(raw, spec.ggml_type, dtype=dtype, threads=1, out=dst)
    return pos + n * odt.itemsize
