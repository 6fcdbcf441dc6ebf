"""Loading tensors onto the device: ``load()`` and what it returns.

The stages, one file each: ``plan`` (options, which tensors in what order, chunks of whole
blocks), ``staging`` (the pinned ring and the reader threads' reads), ``pipeline`` (queueing
copies and kernels on the streams), ``sequential`` (the one-tensor-at-a-time baseline) and
``result`` (``DeviceTensor``, ``LoadResult``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..device import Backend, get_backend
from ..model import GGUFModel, shared_model
from ..profiler import Profile
from .pipeline import Pipeline
from .plan import MODES, ORDERS, Chunk, LoadOptions, Piece, plan_chunks, select
from .result import DeviceTensor, LoadResult, finish_shapes
from .staging import Stop, default_readers

__all__ = ["load", "LoadOptions", "LoadResult", "DeviceTensor", "select", "plan_chunks", "Piece", "Chunk",
           "default_readers", "MODES", "ORDERS"]


def _cupti_recorder(backend: Backend):
    from .. import cupti_trace
    from ..errors import BackendError

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
        from ..progress import ProgressBar

        bar = progress = ProgressBar(f"load ({mode})")
    # a path is parsed once per process (and again only if the file changes): reloads reuse it
    model = path_or_model if isinstance(path_or_model, GGUFModel) else shared_model(path_or_model)
    try:
        chosen = select(model.tensors, tensors, order)
        ld = Pipeline(model, be, opts, chosen, progress, Stop(cancel))
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
        finish_shapes(outputs)
        out_bytes = sum(v.nbytes for v in outputs.values())
        prof = Profile.from_spans(ld.spans, origin_ns=clock_host0, wall_s=wall, deferred=ld._device_spans, meta={
            "mode": opts.mode, "streams": opts.streams, "readers": opts.readers, "chunk_mb": opts.chunk_mb,
            "backend": be.name, "file_bytes": nbytes, "out_bytes": out_bytes,
            "device_timing": "cupti" if ld.cupti is not None else "events"}) if profile else None
        return LoadResult(outputs, nbytes, out_bytes, wall, opts, be.name, prof, model.path)
    finally:
        if bar is not None:
            bar.close()
