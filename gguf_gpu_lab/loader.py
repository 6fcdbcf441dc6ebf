"""Loading tensors onto the device: plan, pinned staging ring, reader threads, lanes (streams).

    file --readers--> pinned staging slot --lane k: H2D--> device --lane k: dequant--> output

Reader threads only fill staging slots; one thread (the caller's) queues each chunk's copy and
kernel as its read finishes, round robin over the lanes, so no reader waits on another's Python
work. The event after a chunk's copy guards its slot's reuse. Outputs are allocated while the
first reads run, and before any chunk's copy is queued.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import quant
from .device import Backend, Event, get_backend
from .errors import GGUFLabError, LoadCancelled
from .model import GGUFModel, TensorInfo, shared_model
from .profiler import Profile, Span
from .quant._cpu import dequantize_blocks

MODES = ("gpu", "raw", "cpu", "sequential")
ORDERS = ("file", "largest", "layer")


@dataclass(frozen=True)
class LoadOptions:
    mode: str = "gpu"
    dtype: str = "float16"
    streams: int = 4
    chunk_mb: float = 16.0
    readers: int | None = None  # default: default_readers()
    read: str = "mmap"
    staging_mb: float | None = None  # default: 2 slots a lane
    order: Any = "file"
    profile: bool | str = True  # True or "events": CUDA/HIP events; "cupti": CUPTI activity records

    def check(self) -> "LoadOptions":
        if self.mode not in MODES:
            raise GGUFLabError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (isinstance(self.streams, int) and 1 <= self.streams <= 64):
            raise GGUFLabError(f"streams must be an integer from 1 to 64, got {self.streams!r}")
        if self.readers is not None and not (isinstance(self.readers, int) and 1 <= self.readers <= 256):
            raise GGUFLabError(f"readers must be an integer from 1 to 256, got {self.readers!r}")
        if self.read not in ("mmap", "preadv"):
            raise GGUFLabError(f"read must be 'mmap' or 'preadv', got {self.read!r}")
        if not self.chunk_mb > 0:
            raise GGUFLabError(f"chunk_mb must be positive, got {self.chunk_mb!r}")
        if self.staging_mb is not None and not self.staging_mb > 0:
            raise GGUFLabError(f"staging_mb must be positive, got {self.staging_mb!r}")
        if not (callable(self.order) or self.order in ORDERS):
            raise GGUFLabError(f"order must be one of {', '.join(ORDERS)} or a callable, got {self.order!r}")
        if self.profile not in (True, False, "events", "cupti"):
            raise GGUFLabError(f"profile must be True, False, 'events' or 'cupti', got {self.profile!r}")
        if self.mode != "raw":
            quant.resolve_dtype(self.dtype)
        return self


@dataclass
class DeviceTensor:
    """A loaded tensor: ``array`` (CuPy on a GPU, NumPy on the host backend) and its ``info``.
    ``dtype`` is the logical dtype ("float16", "bfloat16", ... or "raw" for quantized bytes);
    bfloat16 arrays hold uint16 bit patterns."""

    info: TensorInfo
    array: Any
    dtype: str
    mode: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def to_torch(self):
        """Zero-copy ``torch.Tensor`` through DLPack (bfloat16 bit patterns as torch.bfloat16)."""
        import torch

        t = torch.from_dlpack(self.array)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def numpy(self) -> np.ndarray:
        a = self.array
        if not isinstance(a, np.ndarray):
            import cupy

            a = cupy.asnumpy(a)
        if self.dtype == "bfloat16":
            a = a.view(quant.resolve_dtype("bfloat16"))
        return a


@dataclass
class LoadResult(Mapping[str, DeviceTensor]):
    """What ``load`` returns: a read-only mapping of tensor name to ``DeviceTensor`` (``r[name]``,
    ``len(r)``, ``for name in r``), with ``file_bytes`` moved, ``out_bytes`` on the device,
    ``wall_s`` (from the backend being ready to the last byte in place), ``gb_s``, the
    ``options`` used, the ``backend`` name, the ``profile`` (spans; None with ``profile=False``) and
    the ``path`` of the file. ``to_torch()`` gives every tensor as a ``torch.Tensor`` without copies
    (needs torch)."""

    tensors: dict[str, DeviceTensor]
    file_bytes: int
    out_bytes: int
    wall_s: float
    options: LoadOptions
    backend: str
    profile: Profile | None = None
    path: str | None = None

    def __getitem__(self, k):
        return self.tensors[k]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    @property
    def gb_s(self) -> float:
        """File bytes moved per second of wall time."""
        return self.file_bytes / self.wall_s / 1e9 if self.wall_s else float("inf")

    def to_torch(self) -> dict:
        return {k: v.to_torch() for k, v in self.tensors.items()}

    def __repr__(self):
        return (f"<LoadResult {len(self.tensors)} tensors, {self.file_bytes / 1e9:.3f} GB in {self.wall_s:.3f} s "
                f"({self.gb_s:.1f} GB/s), mode={self.options.mode}, backend={self.backend}>")


# -- planning (pure) --------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """A run of whole blocks of one tensor: ``[first_block, first_block + n_blocks)``."""

    tensor: TensorInfo
    first_block: int
    n_blocks: int
    file_offset: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def select(tensors: Sequence[TensorInfo], names=None, order="file") -> list[TensorInfo]:
    """The tensors to load, in load order. ``names``: a list of names or a predicate."""
    if names is None:
        chosen = list(tensors)
    elif callable(names):
        chosen = [t for t in tensors if names(t)]
    else:
        by_name = {t.name: t for t in tensors}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"no tensor named {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        chosen = [by_name[n] for n in dict.fromkeys(names)]
    if callable(order):
        return sorted(chosen, key=order)
    if order == "file":
        return sorted(chosen, key=lambda t: t.offset)
    if order == "largest":
        return sorted(chosen, key=lambda t: (-t.n_bytes, t.offset))
    if order == "layer":  # embeddings, each stack's blocks (a decoder's, a vision tower's...), the rest
        from .naming import layer_key

        return sorted(chosen, key=layer_key(chosen))
    raise GGUFLabError(f"order must be one of {', '.join(ORDERS)} or a callable, got {order!r}")


def plan_chunks(tensors: Sequence[TensorInfo], chunk_bytes: int) -> list[Chunk]:
    """Split big tensors into chunks of whole blocks of at most ``chunk_bytes``; batch small
    ones together up to ``chunk_bytes``."""
    chunks: list[Chunk] = []
    batch: list[Piece] = []
    size = 0

    def flush():
        nonlocal batch, size
        if batch:
            chunks.append(Chunk(len(chunks), tuple(batch)))
        batch, size = [], 0

    for t in tensors:
        spec = quant.type_spec(t.ggml_type)
        n_blocks = t.n_elements // spec.block_size
        per = max(1, chunk_bytes // spec.type_size)
        if t.n_bytes > chunk_bytes:
            flush()
            for b0 in range(0, n_blocks, per):
                nb = min(per, n_blocks - b0)
                chunks.append(Chunk(len(chunks), (Piece(t, b0, nb, t.offset + b0 * spec.type_size, nb * spec.type_size),)))
        else:
            if size + t.n_bytes > chunk_bytes:
                flush()
            batch.append(Piece(t, 0, n_blocks, t.offset, t.n_bytes))
            size += t.n_bytes
    flush()
    return chunks


def _out_kind(t: TensorInfo, mode: str, dtype: str) -> tuple[str, np.dtype]:
    """(logical dtype, storage dtype) of a tensor's output in a mode."""
    spec = quant.type_spec(t.ggml_type)
    if mode == "raw":
        return "raw", np.dtype(np.uint8)
    if spec.kind == "int":
        return spec.storage_dtype.name, spec.storage_dtype
    if dtype == "bfloat16":
        return "bfloat16", np.dtype(np.uint16)
    return dtype, quant.resolve_dtype(dtype)


# -- the pipeline -----------------------------------------------------------------------------

class _Stop:
    """The load's stop flag: set by the load itself (an error, a cancelling callback), or by the
    caller's ``cancel`` event, which the load only reads."""

    def __init__(self, user: threading.Event | None):
        self._own = threading.Event()
        self._user = user

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._user is not None and self._user.is_set())


class _Staging:
    """The ring of pinned staging slots, allocated once at exact size; a slot is handed out only
    after the event of its previous use has completed."""

    def __init__(self, backend: Backend, n_slots: int, slot_bytes: int):
        self.backend = backend
        self.slots, self._kept = backend.lease_staging(n_slots, slot_bytes)
        self._free: queue.Queue = queue.Queue()
        for i in range(n_slots):
            self._free.put((i, None))

    def acquire(self, cancelled: _Stop) -> tuple[int, np.ndarray]:
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


def default_readers() -> int:
    """Two cores fewer than the machine has (one for the thread that queues copies and kernels,
    one for the driver), at least two, at most 14: on the lent 16-core H100 host 14 readers
    loaded fastest (12: 7% slower, 16: level or slower; BENCHMARKS.md)."""
    return max(2, min(14, quant.default_threads() - 2))


def _read_into(fd: int, mm: np.ndarray | None, dst: np.ndarray, offset: int) -> None:
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


def _alloc_outputs(backend: Backend, tensors: Sequence[TensorInfo], mode: str, dtype: str) -> dict[str, DeviceTensor]:
    out: dict[str, DeviceTensor] = {}
    for t in tensors:
        logical, store = _out_kind(t, mode, dtype)
        n = t.n_bytes if mode == "raw" else t.n_elements
        out[t.name] = DeviceTensor(t, backend.empty(n, store), logical, mode)
    return out


def _finish_shapes(result: dict[str, DeviceTensor]) -> None:
    """Outputs were filled flat; give the dequantized ones their tensor shapes (raw stays bytes)."""
    for dt in result.values():
        if dt.dtype != "raw":
            dt.array = dt.array.reshape(dt.info.np_shape)


class _Loader:
    def __init__(self, model: GGUFModel, backend: Backend, opts: LoadOptions, tensors: list[TensorInfo],
                 progress: Callable | None, cancelled: _Stop):
        self.model, self.backend, self.opts, self.tensors = model, backend, opts, tensors
        self.progress = progress
        self.cancelled = cancelled
        self.spans: list[Span] = []
        self.device_events: list = []  # (lane name, chunk, [(stage, event)]): spans once read
        self.cupti = None  # a cupti_trace.Recorder when the device work is timed by CUPTI
        self.event_timing = bool(opts.profile) and opts.profile != "cupti"
        self._span_lock = threading.Lock()
        self.error: BaseException | None = None

    def span(self, lane: str, stage: str, chunk: int, tensor: str, nbytes: int, t0: int, t1: int) -> None:
        if self.opts.profile:
            with self._span_lock:
                self.spans.append(Span(lane, stage, chunk, tensor, nbytes, t0, t1))

    def run(self) -> tuple[dict[str, DeviceTensor], int]:
        opts = self.opts
        if opts.mode == "sequential":
            return self._sequential()
        cpu_mode = opts.mode == "cpu"
        out_item = 1 if opts.mode == "raw" else quant.resolve_dtype(opts.dtype).itemsize
        chunk_bytes = max(1, int(opts.chunk_mb * (1 << 20)))
        if cpu_mode:  # the slot holds dequantized values: plan in quantized bytes of about that size
            chunk_bytes = max(1, int(chunk_bytes / max(out_item / 0.5, 1.0)))
        chunks = plan_chunks(self.tensors, chunk_bytes)
        max_chunk = max((c.nbytes for c in chunks), default=0)
        self._check_memory(opts.streams * max_chunk if opts.mode == "gpu" else 0)
        if not chunks:
            return _alloc_outputs(self.backend, self.tensors, opts.mode, opts.dtype), 0
        # a slot holds a chunk's file bytes, or in cpu mode its dequantized values
        slot_bytes = max(sum(self._staged_bytes(p) for p in c.pieces) for c in chunks) if cpu_mode else max_chunk
        readers = min(opts.readers or default_readers(), len(chunks))
        # enough slots for every reader to fill one while each lane has one in flight
        n_slots = (readers + 2 * opts.streams if opts.staging_mb is None
                   else max(2, int(opts.staging_mb * (1 << 20) // slot_bytes)))
        n_slots = min(n_slots, len(chunks))
        total = sum(c.nbytes for c in chunks)
        staging = None
        lanes: list = []
        threads: list[threading.Thread] = []
        scratch: list[Any] = []
        outputs: dict[str, DeviceTensor] = {}
        fd = os.open(self.model.path, os.O_RDONLY)
        kernels = self._prepare_kernels(chunks)  # compiles (or loads) while the first reads run
        try:
            t0 = time.perf_counter_ns()
            staging = _Staging(self.backend, n_slots, slot_bytes)
            self.span("setup", "pin staging", -1, "", 0, t0, time.perf_counter_ns())
            mm = self.model._data() if opts.read == "mmap" else None
            ready_q: queue.Queue = queue.Queue()
            work = iter(chunks)
            work_lock = threading.Lock()
            rng = self.backend.range

            def reader(rid: int):
                """Fill staging slots: file bytes (or, in cpu mode, dequantized values); the
                main thread queues their copies and kernels."""
                try:
                    while not self.cancelled.is_set():
                        with work_lock:
                            c = next(work, None)
                        if c is None:
                            return
                        slot_i, slot = staging.acquire(self.cancelled)
                        with rng(f"read chunk {c.index}", 0):
                            t0 = time.perf_counter_ns()
                            pos = 0
                            for p in c.pieces:
                                if cpu_mode:
                                    pos = self._cpu_piece(p, slot, pos)
                                else:
                                    _read_into(fd, mm, slot[pos:pos + p.nbytes], p.file_offset)
                                    pos += p.nbytes
                            t1 = time.perf_counter_ns()
                        self.span(f"reader {rid}", "cpu_dequant" if cpu_mode else "read", c.index,
                                  c.pieces[0].tensor.name, c.nbytes, t0, t1)
                        ready_q.put((c, slot_i, slot[:pos]))
                except BaseException as e:  # re-raised by the main thread after cleanup
                    self.error = self.error or e
                    self.cancelled.set()
                    ready_q.put(None)

            # readers start first; outputs are allocated while they fill the first slots
            threads = [threading.Thread(target=reader, args=(i,), name=f"gguf-lab-reader{i}", daemon=True)
                       for i in range(readers)]
            for th in threads:
                th.start()
            with rng("allocate outputs", 1):
                t0 = time.perf_counter_ns()
                outputs.update(_alloc_outputs(self.backend, self.tensors, opts.mode, opts.dtype))
                lanes = self.backend.lanes(opts.streams)
                if self.cupti is not None:
                    self.cupti.bind(lanes)
                if opts.mode == "gpu":  # quantized bytes land here, per lane, before the kernel expands them
                    scratch = [self.backend.empty(max_chunk, np.uint8) for _ in lanes]
                self.span("setup", "allocate outputs", -1, "", 0, t0,
                          time.perf_counter_ns())
            if kernels is not None:
                kernels.join()
                if kernels.error is not None:
                    raise kernels.error
            try:
                # one thread queues every chunk, in the order its read finished, round robin over
                # the lanes; completions are reported in queueing order
                pending: collections.deque = collections.deque()
                done_bytes = submitted = 0
                while submitted < len(chunks):
                    item = self._get(ready_q)
                    if item is None:
                        break
                    c, slot_i, data = item
                    lane = lanes[submitted % len(lanes)]
                    with rng(f"queue chunk {c.index}", 2):
                        evs = self._enqueue(c, lane, data, outputs, scratch)
                    # the slot is free again once its copy is done (the kernel reads device scratch)
                    staging.release(slot_i, dict(evs)["h2d"])
                    pending.append((c, lane, evs))
                    submitted += 1
                    while pending and pending[0][2][-1][1].done():
                        done_bytes = self._complete(pending.popleft(), done_bytes, total)
                while pending and self.error is None:
                    pending[0][2][-1][1].synchronize()
                    done_bytes = self._complete(pending.popleft(), done_bytes, total)
            except BaseException:
                self.cancelled.set()
                raise
            finally:
                for th in threads:
                    th.join()
                for ln in lanes:
                    ln.close()
                self.backend.synchronize()
            if self.error is not None:
                raise self.error
            if self.cancelled.is_set():
                raise LoadCancelled(f"{self.model.path}: load cancelled")
            return outputs, total
        except BaseException as e:
            # a traceback kept alive (a notebook's last error) must not keep device memory: drop
            # the partial outputs, and the locals of the finished frames below this one
            outputs.clear()
            if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
                traceback.clear_frames(e.__traceback__.tb_next)
            raise
        finally:
            self.cancelled.set()  # stops readers still running after an error in this thread
            for th in threads:
                th.join()
            if kernels is not None:
                kernels.join()
            if staging is not None:
                staging.close()
            scratch.clear()
            os.close(fd)

    def _prepare_kernels(self, chunks: Sequence[Chunk]) -> "threading.Thread | None":
        """In gpu mode on a GPU, a thread that gets ready exactly the kernel variants the plan will
        launch (compiled by NVRTC/hipRTC on a cold cache), so the first launches do not wait;
        the queueing thread joins it before queueing the first chunk. Its error is ``.error``."""
        if self.opts.mode != "gpu" or not self.backend.is_gpu:
            return None
        from .quant.gpu import kernel_variants

        pieces = []
        for c in chunks:
            pos = 0
            for p in c.pieces:
                pieces.append((p.tensor.ggml_type, p.first_block * quant.type_spec(p.tensor.ggml_type).block_size, pos))
                pos += p.nbytes
        variants = kernel_variants(pieces, self.opts.dtype)

        def run():
            t0 = time.perf_counter_ns()
            try:
                self.backend.prepare_kernels(variants)
            except BaseException as e:
                th.error = e
            self.span("setup", "kernels", -1, "", 0, t0, time.perf_counter_ns())

        th = threading.Thread(target=run, name="gguf-lab-kernels", daemon=True)
        th.error = None
        th.start()
        return th

    def _complete(self, item, done_bytes: int, total: int) -> int:
        """A chunk's work is done: its device spans, then the progress callback."""
        c, lane, evs = item
        done_bytes += c.nbytes
        if self.event_timing and len(evs) > 1:
            self.device_events.append((f"stream {lane.index}" if self.backend.is_gpu else f"lane {lane.index}", c, evs))
        if self.progress is not None and self.progress(done_bytes, total, c.pieces[-1].tensor.name) is False:
            self.cancelled.set()
            raise LoadCancelled(f"{self.model.path}: load cancelled by the progress callback "
                                f"after {done_bytes} of {total} bytes")
        return done_bytes

    def _check_memory(self, extra: int) -> None:
        """Fail before allocating anything when the outputs cannot fit."""
        need = extra + sum((t.n_bytes if self.opts.mode == "raw" else t.n_elements * _out_kind(t, self.opts.mode, self.opts.dtype)[1].itemsize)
                           for t in self.tensors)
        free = self.backend.mem_free()
        if free is not None and need > free:
            from .errors import DeviceMemoryError

            raise DeviceMemoryError(f"{self.model.path}: loading {len(self.tensors)} tensors ({self.opts.mode}, "
                                    f"{self.opts.dtype}) needs {need} bytes of device memory; {free} bytes are free")

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.cancelled.is_set() and self.error is None:
                    raise LoadCancelled(f"{self.model.path}: load cancelled")
                if self.error is not None:
                    return None

    def _staged_bytes(self, p: Piece) -> int:
        """Bytes a piece takes in a cpu-mode staging slot: its values in the output dtype."""
        spec = quant.type_spec(p.tensor.ggml_type)
        if spec.kind == "int":
            return p.nbytes
        return p.n_blocks * spec.block_size * quant.resolve_dtype(self.opts.dtype).itemsize

    def _cpu_piece(self, p: Piece, slot: np.ndarray, pos: int) -> int:
        spec = quant.type_spec(p.tensor.ggml_type)
        raw = self.model.raw(p.tensor.name)[p.first_block * spec.type_size:(p.first_block + p.n_blocks) * spec.type_size]
        if spec.kind == "int":
            slot[pos:pos + raw.nbytes] = raw
            return pos + raw.nbytes
        odt = quant.resolve_dtype(self.opts.dtype)
        n = p.n_blocks * spec.block_size
        dst = slot[pos:pos + n * odt.itemsize].view(odt)
        if spec.kind == "quant":
            # one thread per reader, readers in parallel: large tasks and no GIL-holding fast path
            blocks = np.ascontiguousarray(raw).reshape(p.n_blocks, spec.type_size)
            dequantize_blocks(spec, blocks, dst.reshape(p.n_blocks, spec.block_size), 1,
                              task_elements=1 << 22, alone=False)
        else:  # plain floats: a cast
            quant.dequantize(raw, spec.ggml_type, dtype=self.opts.dtype, threads=1, out=dst)
        return pos + n * odt.itemsize

    def _enqueue(self, c: Chunk, lane, data: np.ndarray, outputs, scratch) -> list[tuple[str, Event]]:
        """Queue a chunk's copy (and kernels) on its lane; returns (stage, event) pairs, the first
        being the start when profiling. Offsets only: no array views are made per piece."""
        mode = self.opts.mode
        evs = [("start", lane.record())] if self.event_timing else []
        rec = self.cupti  # notes each copy and launch, with its chunk and tensor
        pos = 0
        if mode == "gpu":
            dev = scratch[lane.index]
            if rec:
                rec.issue(lane.index, "h2d", c.index, c.pieces[0].tensor.name, data.nbytes)
            lane.copy_h2d(dev, 0, data, 0, data.nbytes)
            evs.append(("h2d", lane.record()))
            for p in c.pieces:
                spec = quant.type_spec(p.tensor.ggml_type)
                out = outputs[p.tensor.name].array
                if rec:
                    rec.issue(lane.index, "d2d" if spec.kind == "int" else "dequant", c.index, p.tensor.name, p.nbytes)
                if spec.kind == "int":  # the bytes are the values
                    lane.copy_d2d(out, p.first_block * spec.type_size, dev, pos, p.nbytes)
                else:  # the kernel reads the piece's blocks from scratch and writes their slice of out
                    lane.dequant(dev, pos, spec.ggml_type, out, p.first_block * spec.block_size, self.opts.dtype,
                                 p.n_blocks)
                pos += p.nbytes
            evs.append(("dequant", lane.record()))
        else:  # raw and cpu: the slot already holds the final bytes of each piece
            for p in c.pieces:
                out = outputs[p.tensor.name].array
                if mode == "raw":
                    lo, n = p.first_block * quant.type_spec(p.tensor.ggml_type).type_size, p.nbytes
                else:
                    spec = quant.type_spec(p.tensor.ggml_type)
                    per = (spec.block_size if spec.kind != "int" else 1) * out.itemsize
                    lo, n = p.first_block * per, p.n_blocks * per
                if rec:
                    rec.issue(lane.index, "h2d", c.index, p.tensor.name, n)
                lane.copy_h2d(out, lo, data, pos, n)
                pos += n
            evs.append(("h2d", lane.record()))
        return evs

    def _device_spans(self) -> list[Span]:
        """Device spans from the recorded events (or CUPTI's records); called when the profile is
        first read, so the load itself never waits on timing queries."""
        if self.cupti is not None:
            return self.cupti.spans()
        spans = []
        for lane_name, c, evs in self.device_events:
            first = c.pieces[0].tensor.name
            for (_, a), (stage, b) in zip(evs, evs[1:]):
                spans.append(Span(lane_name, stage, c.index, first, c.nbytes, a.time_ns(), b.time_ns()))
        self.device_events = []
        return spans

    def _sequential(self) -> tuple[dict[str, DeviceTensor], int]:
        """One tensor at a time, synchronously: CPU dequantization, then a copy from pageable memory."""
        out: dict[str, DeviceTensor] = {}
        total = 0
        opts = self.opts
        self._check_memory(0)
        for i, t in enumerate(self.tensors):
            if self.cancelled.is_set():
                raise LoadCancelled(f"{self.model.path}: load cancelled")
            t0 = time.perf_counter_ns()
            x = quant.dequantize(self.model.raw(t.name), t.ggml_type, dtype=opts.dtype)
            t1 = time.perf_counter_ns()
            logical, store = _out_kind(t, "sequential", opts.dtype)
            arr = self.backend.empty(t.n_elements, store)
            if isinstance(arr, np.ndarray):
                arr[...] = x.reshape(-1).view(store)
            else:
                arr.set(np.ascontiguousarray(x.reshape(-1).view(store)))
            self.backend.synchronize()
            t2 = time.perf_counter_ns()
            self.span("main", "cpu_dequant", i, t.name, t.n_bytes, t0, t1)
            self.span("main", "h2d", i, t.name, t.n_bytes, t1, t2)
            out[t.name] = DeviceTensor(t, arr, logical, "sequential")
            total += t.n_bytes
            if self.progress is not None and self.progress(total, sum(x.n_bytes for x in self.tensors), t.name) is False:
                self.cancelled.set()
                raise LoadCancelled(f"{self.model.path}: load cancelled by the progress callback")
        return out, total


def _cupti_recorder(backend: Backend):
    from . import cupti_trace
    from .errors import BackendError

    if not backend.is_gpu or backend.info().get("vendor") != "NVIDIA":
        raise BackendError(f"profile='cupti' times device work on an NVIDIA GPU; this load runs on "
                           f"{backend.info().get('name')}: use profile=True (events)")
    return cupti_trace.Recorder()


def load(path_or_model, mode: str = "gpu", dtype: str = "float16", streams: int = 4, chunk_mb: float = 16.0,
         readers: int | None = None, staging_mb: float | None = None, order="file", tensors=None, device: int = 0,
         progress: Callable[[int, int, str], object] | None = None, profile: bool | str = True,
         backend: str | Backend = "auto", cancel: threading.Event | None = None, read: str = "mmap") -> LoadResult:
    """Load tensors of a GGUF model onto the device.

    Args:
        path_or_model: a path or an open ``GGUFModel``.
        mode: "gpu" (quantized bytes uploaded, dequantized on the GPU), "raw" (uploaded and kept
            quantized), "cpu" (dequantized on the CPU by the reader threads, then uploaded) or
            "sequential" (one tensor at a time, synchronously: the baseline).
        dtype: "float16", "float32" or "bfloat16" (ignored by "raw").
        streams: lanes (CUDA/HIP streams) that chunks are spread over.
        chunk_mb: the size of a chunk of file bytes (big tensors are split, small ones batched).
        readers: reader threads filling the pinned staging ring (in "cpu" mode they also
            dequantize); default two fewer than the cores, from 2 to 14.
        read: "mmap" (copy out of the file mapping; the file is checked not to have shrunk) or
            "preadv" (read(2) into the staging buffer: a file truncated mid-load is an error, never a crash).
        staging_mb: total pinned staging; default two chunks a stream.
        order: "file", "largest", "layer" or a key function of ``TensorInfo``.
        tensors: names to load, or a predicate of ``TensorInfo``; default all.
        progress: ``progress(bytes_done, bytes_total, tensor)`` after each chunk; return False to
            cancel. ``True`` shows a tqdm bar in a notebook (ipywidgets) or a terminal (see
            ``gguf_gpu_lab.progress``).
        profile: record spans (``result.profile``): True (or "events") times device work with
            CUDA/HIP events, which fire when a stream reaches them; "cupti" (NVIDIA, needs
            ``cupti-python``) records when each copy and kernel really ran, on a ``copy engine``
            and a ``kernels`` lane; False records nothing.
        backend: "auto", "cupy", "host" or a backend object.

    Example:
        >>> r = load("model.gguf", mode="gpu", dtype="float16")   # without a GPU, on the host backend
        >>> r["blk.0.attn_q.weight"].array.shape
        (256, 256)
    """
    opts = LoadOptions(mode, dtype, streams, chunk_mb, readers, read, staging_mb, order, profile).check()
    be = get_backend(backend, device)  # (its notice before any bar)
    bar = None
    if progress is True:  # a tqdm bar: a widget in notebooks, text in terminals
        from .progress import ProgressBar

        bar = progress = ProgressBar(f"load ({mode})")
    # a path is parsed once per process (and again only if the file changes): reloads reuse it
    model = path_or_model if isinstance(path_or_model, GGUFModel) else shared_model(path_or_model)
    try:
        chosen = select(model.tensors, tensors, order)
        ld = _Loader(model, be, opts, chosen, progress, _Stop(cancel))
        if be.is_gpu:  # anchors device events to the host clock (the process's first CUDA call may be this)
            be.clock()
        if opts.profile == "cupti":
            ld.cupti = _cupti_recorder(be)
        clock_host0 = time.perf_counter_ns()  # the profile's zero and the start of the wall time
        try:
            if ld.cupti is not None:
                ld.cupti.start()
            outputs, nbytes = ld.run()
            wall = (time.perf_counter_ns() - clock_host0) / 1e9
        finally:
            if ld.cupti is not None:  # run() has synchronized: every record is complete
                ld.cupti.stop()
        _finish_shapes(outputs)
        out_bytes = sum(v.nbytes for v in outputs.values())
        prof = Profile.from_spans(ld.spans, origin_ns=clock_host0, wall_s=wall, deferred=ld._device_spans, meta={
            "mode": opts.mode, "streams": opts.streams, "readers": opts.readers, "chunk_mb": opts.chunk_mb,
            "backend": be.name, "file_bytes": nbytes, "out_bytes": out_bytes,
            "device_timing": "cupti" if ld.cupti is not None else "events"}) if profile else None
        return LoadResult(outputs, nbytes, out_bytes, wall, opts, be.name, prof, model.path)
    finally:
        if bar is not None:
            bar.close()
