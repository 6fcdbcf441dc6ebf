"""Loading tensors onto the device: ``load()`` and what it returns.

The stages, one file each: ``plan`` (options, which tensors in what order, chunks of whole
blocks; ``plans`` keeps the plans of warm loads), ``placement`` (which device each tensor goes to,
in a load over several), ``shard`` (which part of a tensor a load wants, over its bytes),
``staging`` (the pinned ring and the reader threads' reads), ``lanes`` (streams and their scratch,
kept between loads; ``lanes.release()`` frees them), ``pipeline`` (queueing copies and kernels on
the streams), ``sequential`` (the one-tensor-at-a-time baseline) and ``result``
(``DeviceTensor``, ``LoadResult``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from ..device import Backend, device_count, get_backend
from ..errors import BackendError, GGUFLabError
from ..model import GGUFModel, shared_model
from ..profiler import Profile
from ..progress import check_progress, reporter
from .pipeline import Pipeline
from .placement import Placement, place, resolve_devices, several_devices, single_device
from .plan import MODES, ORDERS, Chunk, LoadOptions, Piece, plan_chunks, select
from .result import DeviceTensor, LoadResult, finish_shapes
from .shard import Cut, Shard, ShardError, cut, resolve_cuts
from .staging import Stop, default_readers

__all__ = ["load", "LoadOptions", "LoadResult", "DeviceTensor", "select", "plan_chunks", "Piece", "Chunk",
           "default_readers", "MODES", "ORDERS", "Placement", "place", "plan_placement", "resolve_devices",
           "several_devices", "single_device", "backends_for", "Shard", "ShardError", "Cut", "cut"]


def _cupti_recorder(backend: Backend):
    from .. import cupti_trace

    if not backend.is_gpu or backend.info().get("vendor") != "NVIDIA":
        raise BackendError(f"profile='cupti' times device work on an NVIDIA GPU; this load runs on "
                           f"{backend.info().get('name')}: use profile=True (events)")
    return cupti_trace.Recorder()


def backends_for(backend: "str | Backend", device) -> tuple[tuple[int, ...], list[Backend]]:
    """The devices of a load over several (``device``: a list of indices or ``"all"``) and one
    backend for each; ``backend`` must then be a name, since a backend object is one device's."""
    if isinstance(backend, Backend):
        raise GGUFLabError("a load over several devices takes backend as a name ('auto', 'cupy' or 'host'): "
                           f"a backend object is one device's (device {backend.device})")
    first = get_backend(backend, 0)  # resolves "auto" (and its notice) once
    devices = resolve_devices(device, device_count(first) if first.is_gpu or device == "all" else None)
    return devices, [get_backend(first.name, d) for d in devices]


def load(path_or_model, mode: str = "gpu", dtype: str = "float16", streams: int = 4, chunk_mb: float = 16.0,
         readers: int | None = None, staging_mb: float | None = None, order="file", tensors=None,
         device: "int | Sequence[int] | str" = 0, placement=None,
         progress: "bool | Callable[[int, int, str], object] | None" = None, profile: bool | str = True,
         backend: str | Backend = "auto", cancel: threading.Event | None = None, read: str = "mmap",
         shard=None, cache=None, token=None) -> LoadResult:
    """Load tensors of a GGUF model onto the device.

    Args:
        path_or_model: a path, a URL (``http(s)://``, ``hf://``, ``s3://``...: read in ranged
            requests by the reader threads, one connection each) or an open ``GGUFModel``.
        mode: "gpu" (quantized bytes uploaded, dequantized on the GPU), "raw" (uploaded and kept
            quantized), "cpu" (dequantized on the CPU by the reader threads, then uploaded) or
            "sequential" (one tensor at a time, synchronously: the baseline).
        dtype: "float16", "float32" or "bfloat16" (ignored by "raw").
        streams: lanes (CUDA/HIP streams) that chunks are spread over.
        chunk_mb: the size of a chunk of file bytes (big tensors are split, small ones batched).
        readers: reader threads filling the pinned staging ring (in "cpu" mode they also
            dequantize); default two fewer than the cores, from 2 to 14 (14 a device over several).
        read: "mmap" (read out of the file mapping, the file checked before each chunk; a
            truncation racing a read of it, a copy or in "cpu" and "sequential" modes the CPU
            dequantization, can still end the process with SIGBUS) or "preadv" (read(2) into the
            staging buffer, in every mode: a file truncated mid-load is an error, never a crash).
            Either way the model reads the file it opened, and a file changed in place since is a
            ``SourceChangedError``, never other bytes.
        staging_mb: total pinned staging; default two chunks a stream.
        order: "file", "largest", "layer" or a key function of ``TensorInfo``.
        tensors: a name or names to load, or a predicate of ``TensorInfo``; default all.
        device: the device index (one device), or a list of indices or ``"all"``: a load over
            several devices, each tensor on the device ``placement`` gives it, one staging ring
            and set of streams per device, the reader threads shared (``result.placement``).
        placement: with several devices: None (by layer, in proportion to each device's free
            memory; embeddings on the first, the output on the last), a mapping of tensor names
            or dotted prefixes (``"blk.3"``, ``""`` for the rest) to devices, a previous result's
            ``placement`` or a function of ``TensorInfo`` giving a device. Every device's share
            is checked against its free memory before anything is allocated.
        progress: None or False: no report; ``True``: a tqdm bar in a notebook (ipywidgets) or a
            terminal, made before the load starts and drawn from a thread of its own at most 10
            times a second (see ``gguf_gpu_lab.progress``); a callable: called as
            ``progress(bytes_done, bytes_total, tensor)`` after each chunk, on the load's
            completion thread (return False to cancel). Anything else is a ``GGUFLabError``
            before any work.
        profile: record spans (``result.profile``): True (or "events") times device work with
            CUDA/HIP events, which fire when a stream reaches them; "cupti" (NVIDIA, needs
            ``cupti-python``) records when each copy and kernel really ran, on a ``copy engine``
            and a ``kernels`` lane; False records nothing.
        backend: "auto", "cupy", "host" or a backend object.
        shard: load only part of tensors (one device): None (all whole), a mapping of tensor names
            to a ``Shard(dim, index, count)`` or a ``(dim, index, count)`` tuple (None: whole), or a
            function of ``TensorInfo`` giving one. A split of the first NumPy dimension is one byte
            range; of the last, one segment of every row, gathered into the staging slot. The
            array has the shard's shape; ``DeviceTensor.global_shape`` and ``.region`` say where
            it sits; ``result.wanted_bytes``/``whole_bytes`` and the profile's meta say the bytes
            read against the shards' share and the whole tensors'. Every shard is checked
            (``ShardError``) before anything is read.
        cache: for a URL, a path (or ``"hf"``, the Hugging Face cache) that the bytes are written
            to as they stream, so that the next open is local (see ``remote_cache``).
        token: for an ``hf://`` URL, the Hub token (default: ``huggingface_hub``'s own), as
            ``open_model(url, token=...)`` takes it.

    Example:
        >>> r = load("model.gguf", mode="gpu", dtype="float16")   # without a GPU, on the host backend
        >>> r["blk.0.attn_q.weight"].array.shape
        (256, 256)
        >>> r2 = load("model.gguf", device=[0, 1], backend="host")   # the host backend plays two devices
        >>> r2["token_embd.weight"].device, r2["output.weight"].device
        (0, 1)
        >>> r3 = load("model.gguf", shard={"blk.0.attn_q.weight": (-1, 1, 2)})   # columns 128..255
        >>> r3["blk.0.attn_q.weight"].array.shape, r3["blk.0.attn_q.weight"].region
        ((256, 128), (slice(0, 256, None), slice(128, 256, None)))
    """
    check_progress(progress)  # before any work: a wrong kind would otherwise fail mid-load
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise GGUFLabError(f"cancel must be a threading.Event (or None), got {cancel!r}")
    opts = LoadOptions(mode, dtype, streams, chunk_mb, readers, read, staging_mb, order, profile).check()
    several = several_devices(device, placement)
    if several and shard is not None:
        raise GGUFLabError("shard= loads parts of tensors onto one device (a tensor-parallel rank's); "
                           "a load over several devices places whole tensors")
    if several:
        devices, backends = backends_for(backend, device)
        if opts.profile == "cupti":
            raise BackendError("profile='cupti' times one GPU's work; a load over several devices is timed with "
                               "events (profile=True)")
    else:
        one = single_device(device)
        devices, backends = (one,), [get_backend(backend, one)]  # (its notice before any bar)
    be = backends[0]
    bar = None
    # a path is parsed once per process (and again only if the file changes): reloads reuse it
    model = path_or_model if isinstance(path_or_model, GGUFModel) else shared_model(
        path_or_model, **{k: v for k, v in (("cache", cache), ("token", token)) if v is not None})
    # a URL whose server gives no version is opened for this load alone (never shared): closed after it
    own = model is not path_or_model and not model.source.validated
    try:
        chosen = select(model.tensors, tensors, order, model.path)
        cuts = resolve_cuts(chosen, shard, model.path)
        # a bar (a widget in notebooks, text in terminals) is made here, sized, before the load
        # starts; the load only stores its counts, and the bar's own thread draws them
        made = progress is True  # a bar this load makes is this load's to close
        progress = reporter(progress, f"load ({mode})", sum(t.n_bytes for t in chosen))
        bar = progress if made else None
        where = plan_placement(chosen, devices, backends, opts.mode, opts.dtype, placement, opts.streams,
                               opts.chunk_mb) if several else None
        ld = Pipeline(model, backends if several else be, opts, chosen, progress, Stop(cancel), where, cuts)
        if opts.profile == "cupti":
            ld.cupti = _cupti_recorder(be)
        clock_host0 = time.perf_counter_ns()  # the profile's zero and the start of the wall time
        if be.is_gpu:
            _join_warmup(ld)
            t0 = time.perf_counter_ns()
            for b in backends:  # anchors device events to the host clock (the process's first CUDA call may be this)
                b.clock()
            ld.span("setup", "device clock", -1, "", 0, t0, time.perf_counter_ns())
        try:
            if ld.cupti is not None:
                ld.cupti.start()
            outputs, nbytes = ld.run()
            wall = (time.perf_counter_ns() - clock_host0) / 1e9
        finally:
            if ld.cupti is not None:  # run() has synchronized: every record is complete
                ld.cupti.stop()
        finish_shapes(outputs)
        out_bytes = sum(v.nbytes for v in outputs.values())
        wanted = whole = None
        if cuts is not None:
            wanted, whole = sum(c.wanted_bytes for c in cuts.values()), sum(t.n_bytes for t in chosen)
        prof = Profile.from_spans(ld.spans, origin_ns=clock_host0, wall_s=wall, deferred=ld._device_spans, meta={
            "mode": opts.mode, "streams": opts.streams, "chunk_mb": opts.chunk_mb,
            "readers": ld.readers_used or opts.readers,  # the threads that read (default: chosen)
            "backend": be.name, "file_bytes": nbytes, "out_bytes": out_bytes, "devices": list(devices),
            "device_timing": "cupti" if ld.cupti is not None else "events",
            **({"wanted_bytes": wanted, "whole_bytes": whole} if cuts is not None else {})}) if profile else None
        return LoadResult(outputs, nbytes, out_bytes, wall, opts, be.name, prof, model.path, ld.placement,
                          wanted, whole)
    finally:
        if bar is not None:
            bar.close()
        if own:
            model.close()


def _join_warmup(ld: Pipeline) -> None:
    """Wait for a warm-up in flight (``gguf_gpu_lab.warmup``) rather than race it for the staging
    ring and the kernels; the wait has a span of its own. A warm-up's error never fails a load."""
    from .. import warmup

    t0 = time.perf_counter_ns()
    if warmup.join():
        ld.span("setup", "wait for warm-up", -1, "", 0, t0, time.perf_counter_ns())


def plan_placement(tensors, devices, backends, mode: str = "gpu", dtype: str = "float16", placement=None,
                   streams: int = 4, chunk_mb: float = 16.0) -> Placement:
    """The placement of a load over several devices (``backends``: one per device): in
    proportion to free memory, each device keeping room for its lanes' scratch (gpu mode; made
    exact once the chunks are planned), or as ``placement`` says."""
    scratch = streams * int(chunk_mb * (1 << 20)) if mode == "gpu" else 0
    free = {d: b.mem_free() for d, b in zip(devices, backends)}
    return place(tensors, devices, mode, dtype, free, {d: scratch for d in devices}, placement)
