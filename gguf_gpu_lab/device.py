"""Backends: CuPy (CUDA or ROCm) and a host backend (NumPy) for machines without a GPU.

Both expose the same few operations the loader needs: device arrays, exact-size pinned
staging buffers, lanes (a CUDA/HIP stream, or a worker thread on the host) that run copies and
dequantization in order, and events that guard buffer reuse and time the work on one clock.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import BackendError, DeviceMemoryError

_NOTICE_SHOWN = False


def _cupy_or_reason():
    try:
        import cupy
    except Exception as e:
        return None, f"CuPy is not importable ({type(e).__name__})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy finds no GPU"
    except Exception as e:
        return None, f"CuPy finds no usable GPU ({type(e).__name__})"
    return cupy, None


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    return _cupy_or_reason()[0] is not None


HOST_MAX_DEVICES = 64  # the most devices the host backend plays
_INSTANCES: dict[tuple[str, int], "Backend"] = {}
_INSTANCES_LOCK = threading.Lock()


def get_backend(backend: "str | Backend" = "auto", device: int = 0) -> "Backend":
    """``"cupy"``, ``"host"`` or ``"auto"`` (CuPy where a GPU is usable, else host, with a
    one-line notice the first time). One instance per kind and device, so that loads share its
    pinned staging ring (``release_staging()`` frees it). A ``Backend`` object is returned as is."""
    if isinstance(backend, Backend):
        return backend
    kind = _resolve(backend)
    # a device that is not there is refused here, not deep in a load (the host backend plays up to 64)
    count = device_count(kind) if kind == "cupy" else HOST_MAX_DEVICES
    if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < count:
        where = "GPU indices here are" if kind == "cupy" else "the host backend plays devices"
        raise BackendError(f"device {device!r} is not a device: {where} 0 to {count - 1}")
    with _INSTANCES_LOCK:
        key = (kind, device)
        if key not in _INSTANCES:
            _INSTANCES[key] = CupyBackend(device) if kind == "cupy" else HostBackend(device)
        return _INSTANCES[key]


def device_count(backend: "str | Backend" = "auto") -> int:
    """How many devices a multi-device load can use: the GPUs CuPy sees, or on the host backend
    ``GGUF_LAB_HOST_DEVICES`` (default 1), the devices it plays so that multi-device loads can be
    tried and tested without a GPU."""
    kind = backend.name if isinstance(backend, Backend) else _resolve(backend)
    if kind == "cupy":
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    text = os.environ.get("GGUF_LAB_HOST_DEVICES", "1")
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= HOST_MAX_DEVICES:
        raise BackendError(f"GGUF_LAB_HOST_DEVICES must be a whole number from 1 to {HOST_MAX_DEVICES}, got {text!r}")
    return n


def _resolve(backend: str) -> str:
    global _NOTICE_SHOWN
    if backend not in ("auto", "cupy", "host"):
        raise BackendError(f"backend must be 'auto', 'cupy' or 'host', got {backend!r}")
    if backend == "host":
        return "host"
    cupy, reason = _cupy_or_reason()
    if cupy is None:
        if backend == "cupy":
            raise BackendError(f"backend 'cupy' requested but {reason}")
        if not _NOTICE_SHOWN:
            print(f"gguf-gpu-lab: no GPU ({reason}); using the host backend (NumPy)", file=sys.stderr)
            _NOTICE_SHOWN = True
        return "host"
    return "cupy"


def device_info(backend: str = "auto", device: int = 0) -> dict[str, Any]:
    """Name, vendor, memory, PCIe link where readable, CuPy and driver versions."""
    return get_backend(backend, device).info()


class Event:
    """Completion (and time) of the work a lane had queued when the event was recorded."""

    def synchronize(self) -> None: ...
    def done(self) -> bool: ...
    def time_ns(self) -> int:
        """Host-clock time (perf_counter_ns) at which the event completed."""
        ...


class Backend:
    name = "?"
    is_gpu = False
    device = 0  # the device index this backend's arrays, lanes and staging belong to

    def __init__(self):
        self._ring: list | None = None  # pinned staging kept between loads
        self._ring_busy = False
        self._ring_lock = threading.Lock()

    def lease_staging(self, n_slots: int, slot_bytes: int) -> tuple[list[np.ndarray], bool]:
        """Staging buffers for one load: the backend's kept ring when it is free and large enough
        (allocated at exact size, reused by later loads, and when a load needs more slots or
        larger ones replaced by one that holds both), else a new ring. Returns the
        buffers and whether they are the kept ring; give them back with ``return_staging``."""
        with self._ring_lock:
            if not self._ring_busy:
                ring = self._ring
                if ring is None or len(ring) < n_slots or ring[0].nbytes < slot_bytes:
                    size = (n_slots, slot_bytes)
                    if ring is not None:  # grown to hold both: loads that alternate keep one ring
                        size = (max(n_slots, len(ring)), max(slot_bytes, ring[0].nbytes))
                        self.free_ring(ring)
                    self._ring = None
                    ring = self._ring = self.pinned_ring(*size)
                self._ring_busy = True
                return ring[:n_slots], True
        return self.pinned_ring(n_slots, slot_bytes), False  # a concurrent load

    def return_staging(self, bufs: list[np.ndarray], kept: bool) -> None:
        if kept:
            with self._ring_lock:
                self._ring_busy = False
        else:
            self.free_ring(bufs)

    def release_staging(self) -> int:
        """Free the kept staging ring (when no load is using it); returns the bytes freed."""
        with self._ring_lock:
            if self._ring_busy or self._ring is None:
                return 0
            freed = sum(b.nbytes for b in self._ring)
            self.free_ring(self._ring)
            self._ring = None
            return freed

    def pinned_ring(self, n_slots: int, slot_bytes: int) -> list[np.ndarray]:
        """``n_slots`` exact-size pinned buffers; give them back with ``free_ring``."""
        return [self.pinned(slot_bytes) for _ in range(n_slots)]

    def free_ring(self, ring: list[np.ndarray]) -> None:
        for buf in ring:
            self.free_pinned(buf)

    def prepare_kernels(self, variants) -> None:
        """Have the dequantization kernels ``variants`` (see ``quant.gpu.kernel_variants``) ready
        before their first launch; nothing to do on the host."""

    def range(self, name: str, color: int = 0):
        """A named range around host work, for Nsight Systems (NVTX) or rocprof (roctx); a
        no-op context where neither is available."""
        return contextlib.nullcontext()

    def make_current(self) -> None:
        """Make this backend's device the calling thread's current one: kernel launches and
        event records on a device need it (a no-op on the host)."""

    def on_device(self):
        """A context in which this backend's device is the calling thread's current one, and the
        one before it again after (a no-op context on the host)."""
        return contextlib.nullcontext()

    def info(self) -> dict[str, Any]: ...
    def lanes(self, n: int) -> list["Lane"]: ...
    def empty(self, n: int, dtype) -> Any: ...
    def pinned(self, nbytes: int) -> np.ndarray: ...
    def free_pinned(self, buf: np.ndarray) -> None: ...
    def synchronize(self) -> None: ...
    def mem_free(self) -> int | None: ...
    def to_host(self, a) -> np.ndarray: ...
    def close(self) -> None: ...


class Lane:
    index = 0

    # Offsets are in bytes, except ``out_elem`` (elements of ``out``); arrays are flat buffers.
    def copy_h2d(self, dst, dst_off: int, src: np.ndarray, src_off: int, nbytes: int) -> None: ...
    def copy_d2d(self, dst, dst_off: int, src, src_off: int, nbytes: int) -> None: ...
    def dequant(self, src, src_off: int, ggml_type, out, out_elem: int, dtype: str, n_blocks: int) -> None:
        """Dequantize ``n_blocks`` blocks at byte ``src_off`` of ``src`` into ``out`` from element ``out_elem``."""
    def record(self) -> Event: ...
    def close(self) -> None: ...

    def drain(self) -> None:
        """Wait until the work queued so far has run, keeping the lane open for the next load."""

    def reanchor(self, backend: "Backend") -> None:
        """Time later events on ``backend``'s current clock (a lane kept between loads)."""

    def reset(self) -> None:
        """Forget an operation's error (a host lane keeps the first until then), once the load it
        failed has ended: the lane is ready for the next load."""

    def threads(self) -> set[threading.Thread]:
        """The threads this lane runs (a host lane's worker; none for a stream)."""
        return set()


# -- host backend -----------------------------------------------------------------------------

class _HostEvent(Event):
    def __init__(self, fut: Future):
        self._fut = fut

    def synchronize(self) -> None:
        self._fut.result()

    def done(self) -> bool:
        return self._fut.done()

    def time_ns(self) -> int:
        return self._fut.result()


class _HostLane(Lane):
    """A lane on the host: one worker thread runs its operations in order. An operation's error
    is kept and raised by the next event's synchronize(), as a failed stream would."""

    def __init__(self, index: int):
        self.index = index
        self.error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gguf-lab-lane{index}")

    def _submit(self, fn, *args):
        def guarded():
            if self.error is None:
                try:
                    fn(*args)
                except BaseException as e:
                    self.error = e

        self._pool.submit(guarded)

    def copy_h2d(self, dst, dst_off, src, src_off, nbytes):
        d, s = _bytes(dst)[dst_off:dst_off + nbytes], _bytes(src)[src_off:src_off + nbytes]
        self._submit(lambda: np.copyto(d, s))

    copy_d2d = copy_h2d

    def dequant(self, src, src_off, ggml_type, out, out_elem, dtype, n_blocks):
        from . import quant

        spec = quant.type_spec(ggml_type)
        seg = _bytes(src)[src_off:src_off + n_blocks * spec.type_size]
        dst = out.reshape(-1)[out_elem:out_elem + n_blocks * spec.block_size].view(quant.resolve_dtype(dtype))
        self._submit(lambda: quant.dequantize(seg, spec.ggml_type, dtype=dtype, out=dst))  # all cores

    def record(self) -> Event:
        def stamp():
            if self.error is not None:
                raise self.error
            return time.perf_counter_ns()

        return _HostEvent(self._pool.submit(stamp))

    def close(self):
        self._pool.shutdown(wait=True)

    def drain(self):
        self._pool.submit(lambda: None).result()

    def reset(self):
        self.error = None

    def threads(self):
        return set(self._pool._threads)  # ThreadPoolExecutor's own set of its workers


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


class HostBackend(Backend):
    """NumPy arrays in host memory. ``device`` lets it play one of several devices (multi-device
    loads without a GPU); ``free_bytes`` is the free memory it reports (None: unknown, never
    short), so tests can make a placement not fit."""

    name = "host"
    is_gpu = False

    def __init__(self, device: int = 0, free_bytes: int | None = None):
        super().__init__()
        self.device = device
        self.free_bytes = free_bytes

    def info(self):
        from .quant import default_threads

        return {"backend": "host", "name": "host (NumPy)", "vendor": None, "device": self.device,
                "memory_bytes": None, "threads": default_threads(), "numpy": np.__version__}

    def lanes(self, n):
        return [_HostLane(i) for i in range(n)]

    def empty(self, n, dtype):
        return np.empty(n, dtype=dtype)

    def pinned(self, nbytes):
        return np.empty(nbytes, np.uint8)

    def free_pinned(self, buf):
        pass

    def synchronize(self):
        pass

    def mem_free(self):
        return self.free_bytes

    def to_host(self, a):
        return np.asarray(a)

    def close(self):
        pass


# -- CuPy backend ------------------------------------------------------------------------------

class _CupyEvent(Event):
    def __init__(self, cupy, stream, clock: "_Clock | None"):
        self._ev = cupy.cuda.Event(block=True)  # a waiting thread sleeps, not spins; timing enabled
        self._ev.record(stream)
        self._clock = clock
        self._t: int | None = None

    def synchronize(self):
        self._ev.synchronize()

    def done(self):
        return self._ev.done

    def time_ns(self):
        if self._t is None:
            self._ev.synchronize()
            self._t = self._clock.to_host_ns(self._ev)
        return self._t


class _Clock:
    """Puts device events on the host clock: a reference event recorded, then synchronized, with
    the host time read right after; every event is ref_host + elapsed(ref, event)."""

    def __init__(self, cupy):
        import cupy as cp

        self._cp = cp
        self.ref = cp.cuda.Event()
        self.ref.record(cp.cuda.Stream.null)
        self.ref.synchronize()
        self.host_ns = time.perf_counter_ns()

    def to_host_ns(self, ev) -> int:
        return self.host_ns + int(self._cp.cuda.get_elapsed_time(self.ref, ev) * 1e6)


class _CupyLane(Lane):
    def __init__(self, cupy, index: int, device: int, clock: _Clock):
        self._cp = cupy
        self.index = index
        self._dev = device
        with cupy.cuda.Device(device):
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._clock = clock
        self._rt = cupy.cuda.runtime

    def copy_h2d(self, dst, dst_off, src, src_off, nbytes):
        if nbytes:  # (a tensor of no elements: an empty array's pointer may be null)
            self._rt.memcpyAsync(dst.data.ptr + dst_off, src.ctypes.data + src_off, nbytes,
                                 self._rt.memcpyHostToDevice, self.stream.ptr)

    def copy_d2d(self, dst, dst_off, src, src_off, nbytes):
        if nbytes:
            self._rt.memcpyAsync(dst.data.ptr + dst_off, src.data.ptr + src_off, nbytes,
                                 self._rt.memcpyDeviceToDevice, self.stream.ptr)

    def dequant(self, src, src_off, ggml_type, out, out_elem, dtype, n_blocks):
        from .quant.gpu import launch

        launch(src.data.ptr + src_off, out.data.ptr + out_elem * out.itemsize, ggml_type, dtype, n_blocks,
               self._dev, self.stream)

    def record(self):
        return _CupyEvent(self._cp, self.stream, self._clock)

    def close(self):
        self.stream.synchronize()

    def drain(self):
        self.stream.synchronize()

    def reanchor(self, backend):
        self._clock = backend._clock or backend.clock()


class CupyBackend(Backend):
    name = "cupy"
    is_gpu = True

    def __init__(self, device: int = 0):
        import cupy

        super().__init__()
        self._cp = cupy
        self.device = device
        self._clock: _Clock | None = None
        self._pinned: dict[int, Any] = {}
        self._regions: dict[int, _RegisteredRegion] = {}
        self._lock = threading.Lock()
        self._time_range = None
        try:  # NVTX on CUDA, roctx on ROCm, where CuPy was built with them
            from cupyx.profiler import time_range

            if cupy.cuda.nvtx.available:
                self._time_range = time_range
        except Exception:
            pass

    def info(self):
        cp = self._cp
        with cp.cuda.Device(self.device):
            props = cp.cuda.runtime.getDeviceProperties(self.device)
            free, total = cp.cuda.runtime.memGetInfo()
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        pcie = None
        try:
            pci = f"{props.get('pciDomainID', 0):04x}:{props.get('pciBusID', 0):02x}:{props.get('pciDeviceID', 0):02x}.0"
            base = f"/sys/bus/pci/devices/{pci}/"
            speed = open(base + "current_link_speed").read().strip()
            width = open(base + "current_link_width").read().strip()
            pcie = f"{speed} x{width}"
        except Exception:
            pass
        return {"backend": "cupy", "name": name, "vendor": "AMD" if cp.cuda.runtime.is_hip else "NVIDIA",
                "device": self.device, "memory_bytes": int(total), "memory_free_bytes": int(free),
                "multiprocessors": int(props["multiProcessorCount"]), "pcie": pcie, "cupy": cp.__version__,
                "driver": int(cp.cuda.runtime.driverGetVersion()), "runtime": int(cp.cuda.runtime.runtimeGetVersion())}

    def prepare_kernels(self, variants) -> None:
        from .quant.gpu import prepare

        prepare(variants, self.device)

    def range(self, name: str, color: int = 0):
        if self._time_range is None:
            return contextlib.nullcontext()
        return self._time_range(name, color_id=color)

    def make_current(self) -> None:
        self._cp.cuda.runtime.setDevice(self.device)

    def on_device(self):
        return self._cp.cuda.Device(self.device)

    def clock(self) -> _Clock:
        with self._cp.cuda.Device(self.device):
            self._clock = _Clock(self._cp)
        return self._clock

    def lanes(self, n):
        clock = self._clock or self.clock()
        return [_CupyLane(self._cp, i, self.device, clock) for i in range(n)]

    def empty(self, n, dtype):
        cp = self._cp
        try:
            with cp.cuda.Device(self.device):
                return cp.empty(n, dtype=dtype)
        except cp.cuda.memory.OutOfMemoryError:
            need = int(n) * np.dtype(dtype).itemsize
            raise DeviceMemoryError(f"out of GPU memory: {need} bytes needed, {self.mem_free()} bytes free "
                                    f"on device {self.device}") from None

    def pinned(self, nbytes):
        # exact size, straight from cudaHostAlloc: CuPy's pinned pool rounds up to powers of two
        mem = self._cp.cuda.PinnedMemory(max(1, nbytes))
        ptr = self._cp.cuda.PinnedMemoryPointer(mem, 0)
        arr = np.frombuffer(ptr, dtype=np.uint8, count=nbytes)
        with self._lock:
            self._pinned[arr.ctypes.data] = mem
        return arr

    def free_pinned(self, buf):
        with self._lock:
            self._pinned.pop(buf.ctypes.data, None)

    def pinned_ring(self, n_slots, slot_bytes):
        """On CUDA, one anonymous mapping, its pages faulted in by several threads, then
        registered with ``cudaHostRegister``: on the lent H100 host 352 MiB took about 25 ms this
        way against 200-390 ms through ``cudaHostAlloc`` (which zeroes and pins on one thread;
        BENCHMARKS.md). CuPy's ROCm build has no ``hostRegister``: there, and wherever
        registering fails, exact-size ``cudaHostAlloc`` buffers."""
        with self._cp.cuda.Device(self.device):  # pinned for this device's context
            if self._cp.cuda.runtime.is_hip:
                return super().pinned_ring(n_slots, slot_bytes)
            try:
                region = _RegisteredRegion(self._cp, n_slots * slot_bytes)
            except Exception:
                return super().pinned_ring(n_slots, slot_bytes)
        ring = [region.array[i * slot_bytes:(i + 1) * slot_bytes] for i in range(n_slots)]
        with self._lock:
            self._regions[ring[0].ctypes.data] = region
        return ring

    def free_ring(self, ring):
        with self._lock:
            region = self._regions.pop(ring[0].ctypes.data, None) if ring else None
        if region is None:
            super().free_ring(ring)
        else:
            with self._cp.cuda.Device(self.device):
                region.release()

    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(m.size for m in self._pinned.values()) + sum(r.nbytes for r in self._regions.values())

    def synchronize(self):
        with self._cp.cuda.Device(self.device):
            self._cp.cuda.Device().synchronize()

    def mem_free(self):
        with self._cp.cuda.Device(self.device):
            pool = self._cp.get_default_memory_pool()
            free = int(self._cp.cuda.runtime.memGetInfo()[0]) + int(pool.free_bytes())
            limit = int(pool.get_limit())
            return min(free, max(0, limit - int(pool.used_bytes()))) if limit else free

    def to_host(self, a):
        return self._cp.asnumpy(a)

    def close(self):
        with self._lock:
            self._pinned.clear()
            regions, self._regions = list(self._regions.values()), {}
        for r in regions:
            r.release()


class _RegisteredRegion:
    """Page-locked host memory from an anonymous mapping: pages faulted in by several threads
    (transparent huge pages where the kernel allows), then registered with the driver. The
    mapping lives as long as any view of it; ``release()`` unregisters it."""

    def __init__(self, cupy, nbytes: int):
        import mmap

        from .quant import default_threads

        self._rt = cupy.cuda.runtime
        self.nbytes = nbytes
        self._mm = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        self.array = np.frombuffer(self._mm, np.uint8, nbytes)
        n = max(1, min(16, default_threads(), nbytes >> 24))
        bounds = [nbytes * i // n // 4096 * 4096 for i in range(n)] + [nbytes]
        with ThreadPoolExecutor(n, thread_name_prefix="gguf-lab-pin") as pool:  # first touch: page faults
            list(pool.map(lambda i: self.array[bounds[i]:bounds[i + 1]:4096].fill(0), range(n)))
        self._rt.hostRegister(self.array.ctypes.data, nbytes, 0)
        self._registered = True

    def release(self) -> None:
        if self._registered:
            self._registered = False
            self._rt.hostUnregister(self.array.ctypes.data)
