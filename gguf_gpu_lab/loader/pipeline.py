"""Queueing on streams: reader threads fill pinned staging slots; the caller's thread queues each
chunk's copy and kernels as its read finishes, round robin over the lanes, so no reader waits on
another's Python work. The event after a chunk's copy guards its slot's reuse. A tensor's output
is allocated just before the copy of its first chunk is queued, so the first copy waits for no
other tensor's allocation and the rest are made while copies run.

    file --readers--> pinned staging slot --lane k: H2D--> device --lane k: dequant--> output

Over several devices each has its own part (a ``_Site``: backend, tensors, staging ring, lanes,
scratch); the reader threads and the queueing thread are shared, and the chunks of the devices
are interleaved in the read order so that every device's lanes stay busy.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .. import quant
from ..device import Backend, Event
from ..errors import LoadCancelled
from ..model import GGUFModel, TensorInfo
from ..profiler import Span
from ..progress import LoadBar
from ..source import ByteSource, stopping
from . import lanes as kept_lanes
from .placement import Placement
from .plan import Chunk, LoadOptions, copied_bytes, plan_chunks, plan_sites
from .plans import cached_plan
from .shard import Cut
from .result import DeviceTensor, alloc_outputs, check_memory
from .sequential import run_sequential
from .staging import Staging, Stop, cpu_piece, default_readers, read_chunk, staged_bytes


@dataclass
class _Feed:
    """What the reader threads share: the chunks still to read, the rings, the file, the queue of
    filled slots."""

    chunks: Iterator[Chunk]
    lock: threading.Lock
    stagings: list[Staging]  # one ring per device, by chunk.site
    source: ByteSource
    mapped: bool  # read out of the file mapping (else preadv)
    ready: queue.Queue
    cpu_mode: bool


@dataclass
class _Site:
    """One device's part of a load: its backend, the tensors placed on it, and while the load
    runs its staging ring, lanes and scratch. ``prefix`` names its lanes in the profile ("" in a
    single-device load, whose lanes keep their names; ``gpu1/`` for device 1 of several)."""

    backend: Backend
    tensors: list[TensorInfo]
    prefix: str = ""
    staging: Staging | None = None
    lanes: list = field(default_factory=list)
    scratch: list = field(default_factory=list)
    laneset: "kept_lanes.LaneSet | None" = None  # lanes and scratch leased for the load
    max_chunk: int = 0
    submitted: int = 0

    def lane_name(self, index: int) -> str:
        return f"{self.prefix}{'stream' if self.backend.is_gpu else 'lane'} {index}"


class Pipeline:
    def __init__(self, model: GGUFModel, backend: "Backend | Sequence[Backend]", opts: LoadOptions,
                 tensors: list[TensorInfo], progress: Callable | None, cancelled: Stop,
                 placement: Placement | None = None, cuts: dict[str, Cut] | None = None):
        """``backend``: one backend, or with ``placement`` one per device of the placement;
        ``cuts``: each tensor's shard (None: every tensor whole)."""
        self.model, self.opts, self.tensors, self.cuts = model, opts, tensors, cuts
        if placement is None:
            self.sites = [_Site(backend, list(tensors))]
        else:
            self.sites = [_Site(be, placement.on(d), f"gpu{d}/") for be, d in zip(backend, placement.devices)]
        self.backend = self.sites[0].backend
        self.placement = placement
        self.progress = progress
        self.cancelled = cancelled
        self.spans: list[Span] = []
        self.device_events: list = []  # (lane name, chunk, [(stage, event)]): spans once read
        self.cupti = None  # a cupti_trace.Recorder when the device work is timed by CUPTI
        self.readers_used: int | None = None  # the reader threads this load ran (set by run())
        self.event_timing = bool(opts.profile) and opts.profile != "cupti"
        self._span_lock = threading.Lock()
        self.error: BaseException | None = None  # the first error of any thread: set by fail()
        self.source = model.source  # every read goes through the descriptor the header came from
        self._start_rest: Callable[[], None] = lambda: None  # starts the readers still waiting

    def fail(self, e: BaseException) -> None:
        """Keep the first error of any thread (the one re-raised), and stop the load."""
        with self._span_lock:
            if self.error is None:
                self.error = e
        self.cancelled.set()

    @property
    def mapped(self) -> bool:
        """Whether readers copy out of the file mapping (read="mmap" and a source that has one)."""
        return self.opts.read == "mmap" and self.source.mappable

    def backend_for(self, t: TensorInfo) -> Backend:
        """The backend of the device ``t`` is placed on."""
        if self.placement is None:
            return self.backend
        return self.sites[self.placement.devices.index(self.placement.where[t.name])].backend

    def check_memory(self, chunks: Sequence[Chunk]) -> None:
        """Before anything is allocated: every device's outputs, and in gpu mode its lanes'
        scratch, against its free memory."""
        opts = self.opts
        for c in chunks:
            site = self.sites[c.site]
            site.max_chunk = max(site.max_chunk, c.nbytes)
        if self.placement is None:
            check_memory(self.backend, self.model.path, self.tensors, opts.mode, opts.dtype,
                         opts.streams * self.sites[0].max_chunk if opts.mode == "gpu" else 0, self.cuts)
            return
        reserve = {d: opts.streams * s.max_chunk if opts.mode == "gpu" else 0
                   for d, s in zip(self.placement.devices, self.sites)}
        self.placement = dataclasses.replace(self.placement, reserve=reserve)
        self.placement.check(self.model.path)

    def span(self, lane: str, stage: str, chunk: int, tensor: str, nbytes: int, t0: int, t1: int) -> None:
        if self.opts.profile:
            with self._span_lock:
                self.spans.append(Span(lane, stage, chunk, tensor, nbytes, t0, t1))

    def run(self) -> tuple[dict[str, DeviceTensor], int]:
        """The load, start to end. The file is checked against what was opened before the first
        read and after the last: a load returns the bytes the header describes, or an error."""
        # a close() meanwhile waits for the load to end; a remote read stops soon after a cancel
        with self.source.use(), stopping(self.cancelled):
            self.source.check()
            outputs, total = run_sequential(self) if self.opts.mode == "sequential" else self._run()
            self.source.check()
            return outputs, total

    def _run(self) -> tuple[dict[str, DeviceTensor], int]:
        opts = self.opts
        cpu_mode = opts.mode == "cpu"
        out_item = 1 if opts.mode == "raw" else quant.resolve_dtype(opts.dtype).itemsize
        t_plan = time.perf_counter_ns()
        chunk_bytes = max(1, int(opts.chunk_mb * (1 << 20)))
        if cpu_mode:  # the slot holds dequantized values: plan in quantized bytes of about that size
            chunk_bytes = max(1, int(chunk_bytes / max(out_item / 0.5, 1.0)))
        want_readers = opts.readers or default_readers(len(self.sites))
        # first chunks ramp up, one a reader: the first copy waits for a small read, not a full one;
        # a load of whole tensors onto one device takes its plan from the cache (plans.py)
        if self.placement is not None:
            chunks = plan_sites([s.tensors for s in self.sites], chunk_bytes)
        elif self.cuts is None:
            chunks = cached_plan(self.source.identity, self.tensors, chunk_bytes, want_readers)
        else:
            chunks = plan_chunks(self.tensors, chunk_bytes, self.cuts, ramp=want_readers)
        self.check_memory(chunks)
        self.span("setup", "plan", -1, "", 0, t_plan, time.perf_counter_ns())
        if not chunks:
            return self._alloc_outputs(), 0
        readers = self.readers_used = min(want_readers, len(chunks))
        total = sum(c.nbytes for c in chunks)
        threads: list[threading.Thread] = []  # the reader threads started
        outputs: dict[str, DeviceTensor] = {}
        kernels = None
        ok = False
        try:
            kernels = self._prepare_kernels(chunks)  # compiles (or loads) while the first reads run
            t0 = time.perf_counter_ns()
            for k, site in enumerate(self.sites):
                mine = [c for c in chunks if c.site == k]
                site.staging = Staging(site.backend, *self._ring_size(mine, readers)) if mine else None
            self.span("setup", "pin staging", -1, "", 0, t0, time.perf_counter_ns())
            ready_q: queue.Queue = queue.Queue()

            # readers start first; outputs are allocated while they fill the first slots
            feed = _Feed(iter(chunks), threading.Lock(), [s.staging for s in self.sites], self.source, self.mapped,
                         ready_q, cpu_mode)
            waiting = [threading.Thread(target=self._reader, args=(i, feed), name=f"gguf-lab-reader{i}",
                                        daemon=True) for i in range(readers)]

            def start_readers(n: int) -> None:
                while waiting and n > 0:
                    th = waiting.pop(0)
                    threads.append(th)
                    th.start()
                    n -= 1

            # reader 0 alone reads the first (small) chunk; the others start once its copy is
            # queued, so that the first read and the queueing of its copy do not share the
            # interpreter with every other reader (cpu mode, whose first chunk is dequantized
            # by its reader, starts them all)
            start_readers(readers if cpu_mode else 1)
            self._start_rest = lambda: start_readers(len(waiting))
            # the outputs are allocated as their chunks are queued (_outputs_for), under copies
            # already running: only the lanes and their scratch come before the first copy; both
            # are kept between loads (lanes.py), so a warm load only leases them
            with self.backend.range("lanes and scratch", 1):
                t0 = time.perf_counter_ns()
                for site in self.sites:
                    # gpu mode: quantized bytes land in scratch, per lane, before the kernel expands them
                    # (a byte at least: chunks of tensors of no bytes still pass through a lane)
                    site.laneset = kept_lanes.lease(site.backend, opts.streams,
                                                    max(site.max_chunk, 1) if opts.mode == "gpu" else 0)
                    site.lanes, site.scratch = site.laneset.lanes, site.laneset.scratch
                if self.cupti is not None:
                    self.cupti.bind(self.sites[0].lanes)
                self.span("setup", "lanes and scratch", -1, "", 0, t0, time.perf_counter_ns())
            if kernels is not None:
                t0 = time.perf_counter_ns()
                kernels.join()
                self.span("setup", "wait for kernels", -1, "", 0, t0, time.perf_counter_ns())
                if kernels.error is not None:
                    raise kernels.error
            try:
                with self.backend.on_device():  # launches and event records need their device current
                    self._queue_all(len(chunks), ready_q, outputs, total)
            except BaseException:
                self.cancelled.set()
                raise
            finally:
                self._start_rest()  # (a load that stopped before its first copy: the rest see the stop)
                for th in threads:
                    th.join()
                for site in self.sites:
                    for ln in site.lanes:
                        ln.drain()
                    site.backend.synchronize()
            if self.error is not None:
                raise self.error
            if self.cancelled.is_set():
                raise LoadCancelled(f"{self.model.path}: load cancelled")
            ok = True
            rest = self._alloc_outputs(skip=outputs)  # tensors no chunk carried (none of their bytes to read)
            return {t.name: outputs.get(t.name) or rest[t.name] for t in self.tensors}, total
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
            for site in self.sites:
                if site.staging is not None:
                    site.staging.close()
                site.staging = None
                if site.laneset is not None:  # kept for the next load, or closed after an error
                    kept_lanes.give_back(site.laneset, ok)
                site.laneset, site.scratch, site.lanes = None, [], []

    def _ring_size(self, chunks: Sequence[Chunk], readers: int) -> tuple[int, int]:
        """(slots, slot bytes) of a device's staging ring: a slot holds one of its chunks' file
        bytes, or in cpu mode their dequantized values; enough slots for every reader to fill one
        while each lane has one in flight."""
        opts = self.opts
        slot_bytes = max(1, (max(sum(staged_bytes(p, opts.dtype) for p in c.pieces) for c in chunks)
                             if opts.mode == "cpu" else max(c.nbytes for c in chunks)))  # (tensors of no bytes: 1)
        n_slots = (readers + 2 * opts.streams if opts.staging_mb is None
                   else max(2, int(opts.staging_mb * (1 << 20) // slot_bytes)))
        return min(n_slots, len(chunks)), slot_bytes

    def _alloc_outputs(self, skip=()) -> dict[str, DeviceTensor]:
        out: dict[str, DeviceTensor] = {}
        for site in self.sites:
            out.update(alloc_outputs(site.backend, [t for t in site.tensors if t.name not in skip], self.opts.mode,
                                     self.opts.dtype, self.cuts))
        return out

    def _outputs_for(self, c: Chunk, outputs: dict) -> None:
        """The outputs of a chunk's tensors that are not there yet, allocated on its device just
        before its copy is queued: the first copy waits for no other tensor's allocation (tens of
        milliseconds for 16 GB in a first load), and the rest happens while copies run. The
        whole load's memory was checked against the free memory before anything was read."""
        new = [p.tensor for p in c.pieces if p.tensor.name not in outputs]
        if not new:
            return
        t0 = time.perf_counter_ns()
        outputs.update(alloc_outputs(self.sites[c.site].backend, list(dict.fromkeys(new)), self.opts.mode,
                                     self.opts.dtype, self.cuts))
        self.span("setup", "allocate outputs", c.index, new[0].name, 0, t0, time.perf_counter_ns())

    def _queue_all(self, n_chunks: int, ready_q: queue.Queue, outputs: dict, total: int) -> None:
        """One thread queues every chunk, in the order its read finished, round robin over its
        device's lanes; completions are reported in queueing order."""
        sites = self.sites
        switch = len(sites) > 1  # one device is made current once, by the caller
        rng = self.backend.range
        pending: collections.deque = collections.deque()
        done_bytes = submitted = 0
        while submitted < n_chunks:
            item = self._get(ready_q)
            if item is None:
                break
            c, slot_i, data = item
            site = sites[c.site]
            lane = site.lanes[site.submitted % len(site.lanes)]
            if switch:
                site.backend.make_current()
            with rng(f"queue chunk {c.index}", 2):
                self._outputs_for(c, outputs)  # its own span: "queue first copy" starts after it
                t0 = time.perf_counter_ns()
                evs = self._enqueue(c, lane, data, outputs, site.scratch)
            if submitted == 0:  # when the first copy was queued: on the host backend its lane may start it later
                self.span("setup", "queue first copy", c.index, c.pieces[0].tensor.name, 0, t0,
                          time.perf_counter_ns())
            # the slot is free again once its copy is done (the kernel reads device scratch)
            site.staging.release(slot_i, dict(evs)["h2d"])
            pending.append((c, lane, evs))
            site.submitted += 1
            submitted += 1
            if submitted == 1:  # the first copy is queued: the other readers start
                self._start_rest()
            while pending and not self.cancelled.is_set() and pending[0][2][-1][1].done():
                done_bytes = self._complete(pending.popleft(), done_bytes, total)
        while pending and not self.cancelled.is_set():  # (an error sets it too): no progress reported after a stop
            pending[0][2][-1][1].synchronize()
            done_bytes = self._complete(pending.popleft(), done_bytes, total)

    def _reader(self, rid: int, feed: "_Feed") -> None:
        with stopping(self.cancelled):  # a remote read in progress gives up soon after a stop
            self._read(rid, feed)

    def _read(self, rid: int, feed: "_Feed") -> None:
        """A reader thread: fill staging slots with file bytes (or, in cpu mode, dequantized
        values); the queueing thread queues their copies and kernels."""
        try:
            while not self.cancelled.is_set():
                with feed.lock:
                    c = next(feed.chunks, None)
                if c is None:
                    return
                slot_i, slot = feed.stagings[c.site].acquire(self.cancelled)
                with self.backend.range(f"read chunk {c.index}", 0):
                    t0 = time.perf_counter_ns()
                    if feed.mapped:  # once per chunk: its pieces are then read out of the mapping
                        feed.source.check()
                    if feed.cpu_mode:
                        pos = 0
                        for p in c.pieces:
                            pos = cpu_piece(feed.source, p, slot, pos, self.opts.dtype, feed.mapped)
                    else:
                        pos = read_chunk(feed.source, c.pieces, slot, feed.mapped)
                    t1 = time.perf_counter_ns()
                self.span(f"reader {rid}", "cpu_dequant" if feed.cpu_mode else "read", c.index,
                          c.pieces[0].tensor.name, c.nbytes, t0, t1)
                feed.ready.put((c, slot_i, slot[:pos]))
        except BaseException as e:  # re-raised by the queueing thread after cleanup
            self.fail(e)
            feed.ready.put(None)

    def _prepare_kernels(self, chunks: Sequence[Chunk]) -> "threading.Thread | None":
        """In gpu mode on a GPU, a thread that gets ready exactly the kernel variants the plan will
        launch on each device (compiled by NVRTC/hipRTC on a cold cache), so the first launches do
        not wait; the queueing thread joins it before queueing the first chunk. Its error is
        ``.error``."""
        if self.opts.mode != "gpu" or not self.backend.is_gpu:
            return None
        from ..quant.gpu import kernel_variants, kernels_ready

        pieces: list[list] = [[] for _ in self.sites]
        for c in chunks:
            pos = 0
            for p in c.pieces:
                pieces[c.site].append((p.tensor.ggml_type, p.out_block * quant.type_spec(p.tensor.ggml_type).block_size,
                                       pos))
                pos += p.nbytes
        variants = [[v for v in kernel_variants(ps, self.opts.dtype) if not kernels_ready(v, site.backend.device)]
                    for ps, site in zip(pieces, self.sites)]
        if not any(variants):  # every variant made by an earlier load or the warm-up: no thread
            return None

        def run():
            t0 = time.perf_counter_ns()
            try:
                for site, vs in zip(self.sites, variants):
                    if vs:
                        site.backend.prepare_kernels(vs)
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
            self.device_events.append((self.sites[c.site].lane_name(lane.index), c, evs))
        if self.progress is not None:
            t0, name = time.perf_counter_ns(), c.pieces[-1].tensor.name
            verdict = self.progress(done_bytes, total, name)
            if not isinstance(self.progress, LoadBar):  # a caller's callable runs on this thread: timed
                self.span("setup", "progress callback", c.index, name, 0, t0, time.perf_counter_ns())
            if verdict is False:
                self.cancelled.set()
                raise LoadCancelled(f"{self.model.path}: load cancelled by the progress callback "
                                    f"after {done_bytes} of {total} bytes")
        return done_bytes

    def _get(self, q: queue.Queue):
        """The next chunk read, or None after an error; a cancel is seen before every chunk (not
        only when none is waiting: a load whose readers keep ahead would queue the rest first)."""
        while True:
            if self.error is not None:
                return None
            if self.cancelled.is_set():
                raise LoadCancelled(f"{self.model.path}: load cancelled")
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass

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
                if not p.nbytes:  # a tensor of no elements: its (empty) output is all there is
                    continue
                spec = quant.type_spec(p.tensor.ggml_type)
                out = outputs[p.tensor.name].array
                if rec:
                    rec.issue(lane.index, "d2d" if spec.kind == "int" else "dequant", c.index, p.tensor.name, p.nbytes)
                if spec.kind == "int":  # the bytes are the values
                    lane.copy_d2d(out, p.out_block * spec.type_size, dev, pos, p.nbytes)
                else:  # the kernel reads the piece's blocks from scratch and writes their slice of out
                    lane.dequant(dev, pos, spec.ggml_type, out, p.out_block * spec.block_size, self.opts.dtype,
                                 p.n_blocks)
                pos += p.nbytes
            evs.append(("dequant", lane.record()))
        else:  # raw and cpu: the slot already holds the final bytes of each piece
            for p in c.pieces:
                out = outputs[p.tensor.name].array
                if mode == "raw":
                    lo, n = p.out_block * quant.type_spec(p.tensor.ggml_type).type_size, p.nbytes
                else:
                    spec = quant.type_spec(p.tensor.ggml_type)
                    per = (spec.block_size if spec.kind != "int" else 1) * out.itemsize
                    lo, n = p.out_block * per, p.n_blocks * per
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
                n = copied_bytes(c, self.opts.mode, self.opts.dtype) if stage == "h2d" else c.nbytes
                spans.append(Span(lane_name, stage, c.index, first, n, a.time_ns(), b.time_ns()))
        self.device_events = []
        return spans

