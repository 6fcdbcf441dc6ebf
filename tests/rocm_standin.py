"""A small stand-in for CuPy's ROCm build (``cupy-rocm-7-0``): just the surface that
``quant.gpu`` and ``device.CupyBackend`` use, recording what they ask of it. It checks requests,
never numbers. The calls CuPy 14's ROCm build stubs out (``cupy_backends/hip/cupy_hip_runtime.h``
returns ``hipErrorUnknown`` for them) raise here, and are recorded, as on the real thing."""

from __future__ import annotations

import contextlib
import types

import numpy as np

STUBBED = frozenset({
    "hostRegister", "hostUnregister", "deviceSetLimit", "ipcGetEventHandle", "ipcOpenEventHandle",
    "mallocArray", "malloc3DArray", "freeArray", "mallocAsync", "freeAsync", "mallocFromPoolAsync",
    "memcpy2D", "memcpy2DAsync", "memcpy3D", "memcpy3DAsync", "launchHostFunc", "graphUpload",
    "memPoolCreate", "memPoolDestroy", "deviceGetDefaultMemPool", "deviceGetMemPool", "deviceSetMemPool",
    "memPoolTrimTo", "memPoolGetAttribute", "memPoolSetAttribute",
})


class StandIn:
    """``modules`` go into ``sys.modules``; ``compiles``, ``loads``, ``launches``, ``ranges``,
    ``pinned``, ``copies`` and ``stubbed`` record the requests."""

    def __init__(self, arch: str = "gfx90a:sramecc+:xnack-", roctx: bool = True):
        self.arch, self.compiles, self.loads, self.launches = arch, [], [], []
        self.ranges, self.pinned, self.copies, self.stubbed, self.raw_modules = [], [], [], [], []
        rec = self

        class Runtime:
            is_hip = True
            memcpyHostToDevice, memcpyDeviceToDevice = 1, 3

            def __getattr__(self, name):
                if name not in STUBBED:
                    raise AttributeError(f"the stand-in has no runtime.{name}")

                def stub(*args, **kwargs):
                    rec.stubbed.append(name)
                    raise RuntimeError(f"hipErrorUnknown: CuPy's ROCm build stubs {name} out")
                return stub

            def getDeviceProperties(self, device):
                return {"name": b"AMD Instinct MI250X", "gcnArchName": rec.arch.encode(), "multiProcessorCount": 110}

            def memGetInfo(self):
                return 60 << 30, 64 << 30

            def getDeviceCount(self):
                return 1

            def driverGetVersion(self):
                return 70051831

            runtimeGetVersion = driverGetVersion

            def memcpyAsync(self, dst, src, nbytes, kind, stream):
                rec.copies.append((dst, src, nbytes, kind, stream))

        class Device:
            compute_capability = "90"  # what CuPy derives on ROCm: gfx908 and gfx90a alike

            def __init__(self, device_id=0):
                self.id = device_id

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Function:
            def __call__(self, grid, block, args, stream=None, shared_mem=0):
                rec.launches.append((grid, block, args, stream))

        class Module:
            def load(self, binary):
                rec.loads.append(binary)

            def get_function(self, name):
                assert name == "dequant", name
                return Function()

        def compile_using_nvrtc(source, options=(), *args, **kwargs):  # hipRTC on ROCm builds
            rec.compiles.append((source, tuple(options)))
            return b"\x7fELF hsaco %d" % len(rec.compiles), None

        class RawModule:  # would append -fcuda-flush-denormals-to-zero; recorded so tests can say "unused"
            def __init__(self, **kwargs):
                rec.raw_modules.append(kwargs)

        class PinnedMemory:  # cudaHostAlloc, which ROCm builds map to hipHostMalloc
            def __init__(self, size):
                self.size, self.buf = size, bytearray(size)
                rec.pinned.append(size)

        class Stream:
            null = None

            def __init__(self, non_blocking=False):
                self.ptr = 0x5000 + len(rec.copies)

            def synchronize(self):
                pass

        class Event:
            def __init__(self, block=False, disable_timing=False, interprocess=False):
                assert not disable_timing, "timing events must time"
                self.done = True

            def record(self, stream=None):
                pass

            def synchronize(self):
                pass

        @contextlib.contextmanager
        def time_range(message, color_id=None, argb_color=None, sync=False):
            if not roctx:  # as CuPy's time_range does
                raise RuntimeError("nvtx is not installed")
            rec.ranges.append(message)  # roctxRangePushA(message): ROCm builds drop the colour
            yield

        cuda = types.ModuleType("cupy.cuda")
        cuda.runtime, cuda.Device, cuda.Stream, cuda.Event = Runtime(), Device, Stream, Event
        cuda.PinnedMemory, cuda.PinnedMemoryPointer = PinnedMemory, lambda mem, offset: memoryview(mem.buf)[offset:]
        cuda.nvtx = types.SimpleNamespace(available=roctx)
        cuda.get_elapsed_time = lambda start, end: 0.0
        cuda.memory = types.SimpleNamespace(OutOfMemoryError=MemoryError)
        cuda.compiler = types.ModuleType("cupy.cuda.compiler")
        cuda.compiler.compile_using_nvrtc = compile_using_nvrtc
        cuda.function = types.ModuleType("cupy.cuda.function")
        cuda.function.Module, cuda.function.Function = Module, Function
        Stream.null = Stream()
        cupy = types.ModuleType("cupy")
        cupy.__version__, cupy.cuda, cupy.RawModule = "14.2.0", cuda, RawModule
        cupy.uint8, cupy.zeros, cupy.asarray = np.uint8, np.zeros, np.asarray
        cupy.empty = lambda n, dtype=float: np.empty(n, dtype)  # the lanes' scratch
        profiler = types.ModuleType("cupyx.profiler")
        profiler.time_range = time_range
        cupyx = types.ModuleType("cupyx")
        cupyx.profiler = profiler
        self.modules = {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.compiler": cuda.compiler,
                        "cupy.cuda.function": cuda.function, "cupyx": cupyx, "cupyx.profiler": profiler}
