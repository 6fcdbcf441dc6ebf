"""Queueing on streams: reader threads fill pinned staging slots; the caller's thread queues each
chunk's copy and kernels as its read finishes, round robin over the lanes, so no reader waits on
another's Python work. The event after a chunk's copy guards its slot's reuse. Outputs are
allocated while the first reads run, and before any chunk's copy is queued.

    file --readers--> pinned staging slot --lane k: H2D--> device --lane k: dequant--> output
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import quant
from ..device import Backend, Event
from ..errors import LoadCancelled
from ..model import GGUFModel, TensorInfo
from ..profiler import Span
from .plan import Chunk, LoadOptions, plan_chunks
from .result import DeviceTensor, alloc_outputs, check_memory
from .sequential import run_sequential
from .staging import Staging, Stop, cpu_piece, default_readers, read_into, staged_bytes


@dataclass
class _Feed:
    """What the reader threads share: the chunks still to read, the ring, the file, the queue of
    filled slots."""

    chunks: Iterator[Chunk]
    lock: threading.Lock
    staging: Staging
    fd: int
    mm: np.ndarray | None
    ready: queue.Queue
    cpu_mode: bool


class Pipeline:
    def __init__(self, model: GGUFModel, backend: Backend, opts: LoadOptions, tensors: list[TensorInfo],
                 progress: Callable | None, cancelled: Stop):
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
            return run_sequential(self)
        cpu_mode = opts.mode == "cpu"
        out_item = 1 if opts.mode == "raw" else quant.resolve_dtype(opts.dtype).itemsize
        chunk_bytes = max(1, int(opts.chunk_mb * (1 << 20)))
        if cpu_mode:  # the slot holds dequantized values: plan in quantized bytes of about that size
            chunk_bytes = max(1, int(chunk_bytes / max(out_item / 0.5, 1.0)))
        chunks = plan_chunks(self.tensors, chunk_bytes)
        max_chunk = max((c.nbytes for c in chunks), default=0)
        check_memory(self.backend, self.model.path, self.tensors, opts.mode, opts.dtype, opts.streams * max_chunk if opts.mode == "gpu" else 0)
        if not chunks:
            return alloc_outputs(self.backend, self.tensors, opts.mode, opts.dtype), 0
        # a slot holds a chunk's file bytes, or in cpu mode its dequantized values
        slot_bytes = max(sum(staged_bytes(p, opts.dtype) for p in c.pieces) for c in chunks) if cpu_mode else max_chunk
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
            staging = Staging(self.backend, n_slots, slot_bytes)
            self.span("setup", "pin staging", -1, "", 0, t0, time.perf_counter_ns())
            mm = self.model._data() if opts.read == "mmap" else None
            ready_q: queue.Queue = queue.Queue()
            rng = self.backend.range

            # readers start first; outputs are allocated while they fill the first slots
            feed = _Feed(iter(chunks), threading.Lock(), staging, fd, mm, ready_q, cpu_mode)
            threads = [threading.Thread(target=self._reader, args=(i, feed), name=f"gguf-lab-reader{i}", daemon=True)
                       for i in range(readers)]
            for th in threads:
                th.start()
            with rng("allocate outputs", 1):
                t0 = time.perf_counter_ns()
                outputs.update(alloc_outputs(self.backend, self.tensors, opts.mode, opts.dtype))
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

    def _reader(self, rid: int, feed: "_Feed") -> None:
        """A reader thread: fill staging slots with file bytes (or, in cpu mode, dequantized
        values); the queueing thread queues their copies and kernels."""
        try:
            while not self.cancelled.is_set():
                with feed.lock:
                    c = next(feed.chunks, None)
                if c is None:
                    return
                slot_i, slot = feed.staging.acquire(self.cancelled)
                with self.backend.range(f"read chunk {c.index}", 0):
                    t0 = time.perf_counter_ns()
                    pos = 0
                    for p in c.pieces:
                        if feed.cpu_mode:
                            pos = cpu_piece(self.model, p, slot, pos, self.opts.dtype)
                        else:
                            read_into(feed.fd, feed.mm, slot[pos:pos + p.nbytes], p.file_offset)
                            pos += p.nbytes
                    t1 = time.perf_counter_ns()
                self.span(f"reader {rid}", "cpu_dequant" if feed.cpu_mode else "read", c.index,
                          c.pieces[0].tensor.name, c.nbytes, t0, t1)
                feed.ready.put((c, slot_i, slot[:pos]))
        except BaseException as e:  # re-raised by the queueing thread after cleanup
            self.error = self.error or e
            self.cancelled.set()
            feed.ready.put(None)

    def _prepare_kernels(self, chunks: Sequence[Chunk]) -> "threading.Thread | None":
        """In gpu mode on a GPU, a thread that gets ready exactly the kernel variants the plan will
        launch (compiled by NVRTC/hipRTC on a cold cache), so the first launches do not wait;
        the queueing thread joins it before queueing the first chunk. Its error is ``.error``."""
        if self.opts.mode != "gpu" or not self.backend.is_gpu:
            return None
        from ..quant.gpu import kernel_variants

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

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.cancelled.is_set() and self.error is None:
                    raise LoadCancelled(f"{self.model.path}: load cancelled")
                if self.error is not None:
                    return None

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

