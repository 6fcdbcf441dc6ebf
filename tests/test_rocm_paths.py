"""The HIP branches of quant.gpu and device.CupyBackend, run against a stand-in for CuPy's ROCm
build (tests/rocm_standin.py): what they ask of CuPy (compiler options, kernel cache, launches,
pinned memory, profiler ranges), and that they never ask for what the ROCm build stubs out."""

import sys
import types

import numpy as np
import pytest

from gguf_gpu_lab.device import CupyBackend
from gguf_gpu_lab.quant import gpu as qgpu

from .rocm_standin import StandIn


def _clear_kernel_caches():
    for f in (qgpu._kernel, qgpu._function, qgpu._tables, qgpu._sm_count):
        f.cache_clear()
    qgpu._READY.clear()  # what prepare() made ready went with the caches


def _install(monkeypatch, standin):
    for name, module in standin.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return standin


@pytest.fixture
def rocm(monkeypatch, tmp_path):
    monkeypatch.setenv("GGUF_LAB_KERNEL_CACHE", str(tmp_path / "kernels"))
    _clear_kernel_caches()
    standin = _install(monkeypatch, StandIn())
    standin.cache_dir = tmp_path / "kernels"
    yield standin
    _clear_kernel_caches()  # no stand-in kernels left for the real GPU tests
    assert not standin.stubbed, f"called what CuPy's ROCm build stubs out: {standin.stubbed}"


def _defs(options) -> dict[str, str]:
    return dict(o[2:].split("=") for o in options if o.startswith("-D"))


def test_kernel_compiles_through_hiprtc_with_the_run_time_options(rocm):
    fn = qgpu._function(int(qgpu.T.Q4_K), 1, 1, 0, 0)
    assert len(rocm.compiles) == 1
    source, options = rocm.compiles[0]
    assert source == qgpu.KERNEL_SOURCE.read_text()
    assert options == qgpu.kernel_options(int(qgpu.T.Q4_K), 1, 1, 0, hip=True)
    assert options[0] == "-ffp-contract=off" and not any("denormals" in o or "ftz" in o for o in options)
    assert _defs(options) == {"GGML_TYPE": "12", "OUT_KIND": "1", "VEC_STORE": "1", "VEC_LOAD": "0",
                              "BLOCK_SIZE": "256", "TYPE_SIZE": "144", "THREADS": "256"}
    assert not rocm.raw_modules, "cupy.RawModule adds -fcuda-flush-denormals-to-zero on ROCm"
    assert rocm.loads == [b"\x7fELF hsaco 1"] and callable(fn)


def test_kernel_cache_compiles_each_variant_once(rocm):
    variants = [(12, 1, 1, 0), (12, 1, 0, 0), (12, 0, 1, 0), (12, 2, 1, 0), (14, 1, 1, 0), (0, 1, 1, 1), (0, 1, 1, 0)]
    qgpu.prepare(variants, 0)  # side by side, in threads
    assert sorted(_defs(o)["GGML_TYPE"] + _defs(o)["OUT_KIND"] + _defs(o)["VEC_STORE"] + _defs(o)["VEC_LOAD"]
                  for _, o in rocm.compiles) == sorted("%d%d%d%d" % v for v in variants)
    for v in variants + variants:  # in this process: the lru cache
        qgpu._function(*v, 0)
    assert len(rocm.compiles) == len(variants)

    _clear_kernel_caches()  # a new process: the disk cache, one .hsaco per variant
    qgpu.prepare(variants, 0)
    assert len(rocm.compiles) == len(variants) and len(rocm.loads) == 2 * len(variants)
    cached = list(rocm.cache_dir.iterdir())
    assert len(cached) == len(variants) and all(p.suffix == ".hsaco" for p in cached)


def test_kernel_cache_is_per_gpu_target(rocm):
    """gfx908 and gfx90a share CuPy's ROCm "compute capability" but not a code object."""
    qgpu._function(12, 1, 1, 0, 0)
    _clear_kernel_caches()
    rocm.arch = "gfx908:sramecc+:xnack-"
    qgpu._function(12, 1, 1, 0, 0)
    assert len(rocm.compiles) == 2


@pytest.mark.parametrize("dst_off,src_off,vec,vec_load", [(0, 0, 1, 1), (2, 0, 0, 1), (0, 4, 1, 0), (6, 2, 0, 0)])
@pytest.mark.parametrize("t", ["F16", "Q4_K"])
def test_launch_asks_for_the_variant_its_pointers_allow(rocm, t, dst_off, src_off, vec, vec_load):
    """16-byte-aligned pointers get vector stores (and, for plain types, vector loads); others not."""
    spec = qgpu.type_spec(t)
    stream = object()
    qgpu.launch(0x10000 + src_off, 0x20000 + dst_off, t, "float16", 1000, 0, stream)
    (_, options), = rocm.compiles
    d = _defs(options)
    assert (d["VEC_STORE"], d["VEC_LOAD"]) == (str(vec), str(vec_load if spec.block_size == 1 else 0))
    (grid, block, args, on), = rocm.launches
    assert on is stream and block == (qgpu.THREADS,)
    assert (int(args[0]), int(args[1]), int(args[2])) == (0x10000 + src_off, 0x20000 + dst_off, 1000 * spec.block_size)
    assert grid == qgpu.launch_config(1000 * spec.block_size, spec.block_size, 0)[:1]


def test_pinned_ring_allocates_and_never_registers_on_hip(rocm):
    """CuPy's ROCm build stubs hostRegister out: the ring is exact-size cudaHostAlloc buffers."""
    be = CupyBackend(0)
    ring = be.pinned_ring(3, 4096)
    assert [b.nbytes for b in ring] == [4096] * 3 and rocm.pinned == [4096] * 3
    assert be.pinned_bytes() == 3 * 4096
    be.free_ring(ring)
    assert be.pinned_bytes() == 0
    assert be.info()["vendor"] == "AMD"


def test_ranges_reach_roctx_by_name(rocm):
    be = CupyBackend(0)
    with be.range("read chunk 3", 0), be.range("queue chunk 3", 2):
        pass
    assert rocm.ranges == ["read chunk 3", "queue chunk 3"]


def test_no_range_without_roctx(monkeypatch, tmp_path):
    standin = _install(monkeypatch, StandIn(roctx=False))
    with CupyBackend(0).range("read chunk 0", 0):
        pass
    assert standin.ranges == []


def test_lane_copies_and_launches_on_its_stream(rocm):
    be = CupyBackend(0)
    (lane,) = be.lanes(1)
    host = np.zeros(4096, np.uint8)
    dev = types.SimpleNamespace(data=types.SimpleNamespace(ptr=0x40000), itemsize=1)
    out = types.SimpleNamespace(data=types.SimpleNamespace(ptr=0x80000), itemsize=2)
    lane.copy_h2d(dev, 0, host, 0, 144 * 4)
    lane.dequant(dev, 0, "Q4_K", out, 0, "float16", 4)
    lane.record().synchronize()
    assert rocm.copies == [(0x40000, host.ctypes.data, 576, 1, lane.stream.ptr)]
    assert rocm.launches[0][3] is lane.stream
