"""Getting a GPU ready while the user looks at a model: the first load in a process as close to
a steady one as the hardware allows.

``open_model`` (and ``shared_model``) start, on a machine with a GPU, a thread that creates the
CUDA/HIP context of the device, makes the plan of a default load of the file (kept by
``loader.plans``) and pins the staging ring it leases (kept by the backend,
``device.Backend.lease_staging``), makes the lanes (streams) and their scratch a default load
leases (kept by ``loader.lanes``), and gets ready the dequantization kernels the file's types
need (``quant.gpu.prepare``: compiled, or read from the disk cache, and loaded); in a notebook
kernel it also imports the progress bar's widgets. A load waits for (joins) a warm-up
in flight rather than race it for the ring and the kernels; a warm-up's error is kept
(``last()``) and never fails a load, which then does the same work itself.

Off with ``GGUF_LAB_WARMUP=0`` or ``open_model(path, warmup=False)`` (``warmup=True`` wins over the
variable); a process that forks after opening a model should turn it off, since a CUDA context
does not survive a fork. Without a GPU it costs nothing: CuPy is neither imported nor looked for
beyond its package's presence and the GPU driver's device files, and no thread starts.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from .errors import GGUFLabError

ENV = "GGUF_LAB_WARMUP"
_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, AMD (ROCm), WSL
_EXIT_WAIT_S = 30.0  # at exit, a warm-up still running is waited for this long: the driver must not be cut off mid-call
_BACKEND = "cupy"  # the backend warmed; tests let the host backend play it


@dataclass
class Warmup:
    """One warm-up: ``steps`` (seconds of each: context, staging, lanes, kernels, widgets), ``error``
    (the exception that ended it, if any), ``done()``."""

    device: int
    types: frozenset
    steps: dict = field(default_factory=dict)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


_LOCK = threading.Lock()
_CURRENT: Warmup | None = None  # the latest warm-up, in flight or done
_WARMED: set = set()  # (device, ggml type) pairs whose kernels a finished warm-up got ready


def _check(warmup) -> None:
    if warmup not in (None, True, False):
        raise GGUFLabError(f"warmup must be None (the default: on where a GPU is, unless {ENV}=0), True or "
                           f"False, got {warmup!r}")


@functools.lru_cache(maxsize=1)
def _cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None  # looks for the package; imports nothing


def gpu_likely() -> bool:
    """Whether a GPU may be usable here, without importing CuPy or touching a driver: CuPy is
    installed, the driver's device files exist, and ``CUDA_VISIBLE_DEVICES`` does not hide
    every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in _DEVICE_FILES) and _cupy_installed()


def enabled(warmup=None) -> bool:
    """Whether opening a model starts a warm-up: ``warmup`` (True or False; None: as
    ``GGUF_LAB_WARMUP`` says, on unless ``0``) and a GPU likely (``gpu_likely``)."""
    _check(warmup)
    if warmup is False or (warmup is None and os.environ.get(ENV, "1").strip() == "0"):
        return False
    return gpu_likely()


def _device() -> int:
    """The device a load in this process most likely uses: 0, or under ``torchrun`` the local
    rank's (each rank warms its own GPU, not all of them GPU 0)."""
    try:
        return max(0, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        return 0


def start(model, warmup=None):
    """Start warming up for ``model`` in the background where ``enabled(warmup)``; returns the
    model. One warm-up runs at a time; a file whose types were all warmed starts none."""
    global _CURRENT
    if not enabled(warmup):
        return model
    device = _device()
    types = frozenset(t.ggml_type for t in model.tensors)
    with _LOCK:
        if (_CURRENT is not None and not _CURRENT.done()) or all((device, t) in _WARMED for t in types):
            return model
        w = _CURRENT = Warmup(device, types)
        # the model's tensor table, not the model: a warm-up keeps no file open
        w.thread = threading.Thread(target=_run, args=(w, list(model.tensors), model.source.identity, model.path),
                                    name="gguf-lab-warmup", daemon=True)
        w.thread.start()
    return model


def join(timeout: float | None = None) -> bool:
    """Wait for a warm-up in flight; True if there was one. Never raises its error (``last()``)."""
    with _LOCK:
        w = _CURRENT
    if w is None or w.done():
        return False
    w.thread.join(timeout)
    return True


def last() -> Warmup | None:
    """The latest warm-up of this process (in flight or done), or None."""
    return _CURRENT


def _timed(w: Warmup, step: str, fn) -> None:
    t0 = time.perf_counter()
    fn()
    w.steps[step] = time.perf_counter() - t0


def _run(w: Warmup, tensors, identity=None, path=None) -> None:
    try:
        from .device import get_backend, gpu_available

        if _BACKEND == "cupy" and not gpu_available():  # CuPy installed, device files, but no usable GPU
            w.steps["no_gpu"] = True
            return
        be = get_backend(_BACKEND, w.device)
        _timed(w, "context_s", lambda: be.clock() if be.is_gpu else None)
        chunks: list = []
        _timed(w, "staging_s", lambda: chunks.extend(_pin_ring(be, tensors, identity, path)))
        _timed(w, "lanes_s", lambda: _make_lanes(be, chunks))
        _timed(w, "kernels_s", lambda: be.prepare_kernels(kernel_variants(w.types)))
        with _LOCK:
            _WARMED.update((w.device, t) for t in w.types)
        if "ipykernel" in sys.modules:  # a notebook: the first load bar's widget module, imported now
            _timed(w, "widgets_s", _import_widgets)
    except BaseException as e:  # kept for last(); the load does this work again itself
        w.error = e


def _pin_ring(be, tensors, identity=None, path=None) -> list:
    """Plan a default load of these tensors (``gpu`` mode, every tensor in file order, 16 MiB
    chunks, the default readers and streams; the plan kept by ``loader.plans`` for the load when
    the file's ``identity`` is given), lease and give back the staging ring it needs, which the
    backend keeps for the load; returns the plan's chunks."""
    from .loader.plan import LoadOptions, plan_chunks, select
    from .loader.plans import cached_plan
    from .loader.staging import default_readers

    opts = LoadOptions()
    readers = default_readers()
    chosen = select(tensors, None, opts.order, path)  # as load() chooses them
    chunk_bytes = int(opts.chunk_mb * (1 << 20))
    chunks = (cached_plan(identity, chosen, chunk_bytes, readers) if identity is not None
              else plan_chunks(chosen, chunk_bytes, ramp=readers))
    if not chunks:
        return []
    n_slots = min(min(readers, len(chunks)) + 2 * opts.streams, len(chunks))  # as Pipeline._ring_size
    bufs, kept = be.lease_staging(n_slots, max(c.nbytes for c in chunks))
    be.return_staging(bufs, kept)
    return list(chunks)


def _make_lanes(be, chunks) -> None:
    """The lanes of a default load and each one's scratch for its largest chunk, kept by
    ``loader.lanes`` for the load."""
    from .loader import lanes
    from .loader.plan import LoadOptions

    if chunks:
        opts = LoadOptions()
        lanes.give_back(lanes.lease(be, opts.streams, max(c.nbytes for c in chunks)))


def kernel_variants(types, dtype: str = "float16") -> set:
    """The kernel variants a ``gpu``-mode load of tensors of ``types`` into ``dtype`` may launch,
    whatever the chunking: a block type's pieces start at whole blocks (its output 16-byte
    aligned, one variant); a plain type's (F32, F16...) may start anywhere (all four)."""
    from . import quant
    from .quant.gpu import GPU_KERNELS, _OUT_KIND

    kind = _OUT_KIND[dtype]
    out = set()
    for t in types:
        spec = quant.type_spec(t)
        if spec.kind == "int" or spec.ggml_type not in GPU_KERNELS:
            continue
        if spec.block_size == 1:
            out.update((int(spec.ggml_type), kind, vec, vec_load) for vec in (0, 1) for vec_load in (0, 1))
        else:
            out.add((int(spec.ggml_type), kind, 1, 0))
    return out


def _import_widgets() -> None:
    import tqdm.auto  # noqa: F401
    import tqdm.notebook  # noqa: F401

    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        pass


@atexit.register
def _wait_at_exit() -> None:
    join(_EXIT_WAIT_S)


def _register() -> None:
    from .model import register

    register("opened", start)


_register()
