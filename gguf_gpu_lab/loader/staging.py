"""Filling the pinned staging ring: the ring itself, the load's stop flag, the reader threads' reads
(file bytes, or in cpu mode dequantized values)."""

from __future__ import annotations

import queue
import threading

import numpy as np

from .. import quant
from ..device import Backend, Event
from ..errors import LoadCancelled
from ..quant._cpu import dequantize_blocks
from ..source import ByteSource
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


def read_chunk(source: ByteSource, pieces, slot: np.ndarray, mapped: bool) -> int:
    """The file bytes of a chunk's pieces, one after another, into ``slot``; returns the bytes
    written. ``mapped``: copied out of the file mapping (NumPy releases the GIL; 16 threads
    measured about 2x faster than preadv on the lent machine), after the caller's one check of
    the file for the chunk (a mapping touched past a truncated file's end is SIGBUS); else preadv
    straight into the slot (a truncation at any moment is an error); the ranges of every piece (a
    column shard's: one a row) go to the source at once, and a remote one fetches each run of
    adjacent ranges in one request."""
    if not mapped:
        return source.read_ranges([(p.file_offset + r * p.stride, p.nbytes // p.rows)
                                   for p in pieces for r in range(p.rows)], slot)
    pos = 0
    for p in pieces:
        piece_into(source, p, slot[pos:pos + p.nbytes], mapped)
        pos += p.nbytes
    return pos


def piece_into(source: ByteSource, p: Piece, dst: np.ndarray, mapped: bool) -> None:
    """A piece's file bytes into ``dst``: one run, or a column shard's rows gathered one after
    another (one 2-D copy out of the mapping, or one read per row), so that the device still
    sees one contiguous copy per piece. From the mapping only after the caller's ``check()``."""
    rb = p.nbytes // p.rows
    if mapped:
        span = (p.rows - 1) * p.stride + rb
        v = source.view(p.file_offset, span)
        if v is not None:
            if p.rows == 1:
                np.copyto(dst, v)
            else:
                rows = np.lib.stride_tricks.as_strided(v, (p.rows, rb), (p.stride, 1), writeable=False)
                np.copyto(dst.reshape(p.rows, rb), rows)
            return
    for r in range(p.rows):
        source.read_into(p.file_offset + r * p.stride, dst[r * rb:(r + 1) * rb])


def piece_bytes(source: ByteSource, p: Piece, mapped: bool, scratch: bool = False) -> np.ndarray:
    """A piece's bytes: a view of the mapping for one run (after the caller's ``check()``), else
    gathered or read into a new array, or with ``scratch`` into this thread's reused buffer."""
    if mapped and p.rows == 1:
        v = source.view(p.file_offset, p.nbytes)
        if v is not None:
            return v
    out = _scratch(p.nbytes) if scratch else np.empty(p.nbytes, np.uint8)
    piece_into(source, p, out, mapped)
    return out


def staged_bytes(p: Piece, dtype: str) -> int:
    """Bytes a piece takes in a cpu-mode staging slot: its values in the output dtype."""
    spec = quant.type_spec(p.tensor.ggml_type)
    if spec.kind == "int":
        return p.nbytes
    return p.n_blocks * spec.block_size * quant.resolve_dtype(dtype).itemsize


def cpu_piece(source: ByteSource, p: Piece, slot: np.ndarray, pos: int, dtype: str, mapped: bool) -> int:
    """A piece's values, dequantized on this reader's thread, into ``slot`` at ``pos``: its bytes
    read from the mapping (checked once per chunk by the caller) or, without it, with preadv into
    a buffer of this thread's (never through the mapping: a truncation is then an error, not SIGBUS)."""
    spec = quant.type_spec(p.tensor.ggml_type)
    raw = piece_bytes(source, p, mapped, scratch=True)
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


_TLS = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A reader thread's own buffer of ``n`` bytes (grown, never shrunk, freed with the thread)."""
    buf = getattr(_TLS, "buf", None)
    if buf is None or buf.nbytes < n:
        buf = _TLS.buf = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n]
