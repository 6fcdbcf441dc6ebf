"""The loader on the GPU: every mode's output equals the CPU dequantization (run with -m gpu)."""

import numpy as np
import pytest

from gguf_gpu_lab import DeviceMemoryError, open_model
from gguf_gpu_lab.loader import load
from gguf_gpu_lab.tools.verify import mismatches

pytestmark = pytest.mark.gpu


def _check_all(m, r, mode, dtype):
    for t in m.tensors:
        got = r[t.name]
        if mode == "raw":
            assert np.array_equal(got.numpy().reshape(-1), m.raw(t.name)), t.name
            continue
        exp = m.dequantize(t.name, dtype)
        bad = mismatches(got.numpy().reshape(-1), exp.reshape(-1))
        assert bad.size == 0, f"{mode} {dtype} {t.name} ({t.type_name}): {bad.size} values differ"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["gpu", "raw", "cpu", "sequential"])
def test_modes_match_cpu_dequantization_all_types(all_types_model, mode, dtype):
    with open_model(all_types_model) as m:
        r = load(m, mode=mode, dtype=dtype, chunk_mb=0.25, streams=4, readers=3, backend="cupy")
        assert r.backend == "cupy" and len(r) == len(m.tensors)
        _check_all(m, r, mode, dtype)


def test_tensors_of_no_elements_on_the_gpu(tmp_path):
    from .test_loader import empty_tensors_file, load_empty_tensors

    load_empty_tensors(empty_tensors_file(tmp_path / "empty.gguf"), "cupy")


@pytest.mark.parametrize("order", ["file", "largest", "layer"])
def test_q4_k_m_model_gpu_mode(small_model, order):
    with open_model(small_model) as m:
        r = load(m, mode="gpu", dtype="float32", chunk_mb=0.1, order=order, backend="cupy")
        _check_all(m, r, "gpu", "float32")
        spans = r.profile.df
        assert set(spans["stage"]) >= {"read", "h2d", "dequant"}
        assert spans["lane"].str.startswith("stream").any()


def test_to_torch_is_zero_copy(small_model):
    torch = pytest.importorskip("torch")
    with open_model(small_model) as m:
        r = load(m, mode="gpu", dtype="bfloat16", backend="cupy", tensors=["blk.0.attn_q.weight"])
        dt = r["blk.0.attn_q.weight"]
        t = dt.to_torch()
        assert t.dtype == torch.bfloat16 and t.data_ptr() == dt.array.data.ptr and t.is_cuda
        ref = torch.from_numpy(m.dequantize("blk.0.attn_q.weight")).bfloat16()
        assert torch.equal(t.cpu(), ref)


def test_lazy_tensor_and_cache_on_gpu(small_model):
    with open_model(small_model) as m:
        a = m.tensor("output.weight", backend="cupy")
        b = m.tensor("output.weight", backend="cupy")
        assert a is b and m.cache_info()["loads"] == 1
        assert np.array_equal(a.numpy().reshape(-1), m.dequantize("output.weight", "float16").reshape(-1))
        h = m.tensor("output.weight", backend="host")  # the host's device 0 is another cache entry
        assert h is not a and isinstance(h.array, np.ndarray) and not isinstance(a.array, np.ndarray)
        assert m.tensor("output.weight", backend="cupy") is a and m.cache_info()["loads"] == 2


def test_out_of_memory_raises_and_cleans_up(small_model):
    import cupy

    pool = cupy.get_default_memory_pool()
    limit = pool.get_limit()
    try:
        pool.set_limit(size=1 << 20)
        with open_model(small_model) as m:
            with pytest.raises(DeviceMemoryError, match="bytes"):
                load(m, mode="gpu", dtype="float32", backend="cupy")
    finally:
        pool.set_limit(size=limit)
    with open_model(small_model) as m:  # and the next load works
        r = load(m, mode="gpu", backend="cupy", tensors=["output.weight"])
        assert r["output.weight"].array.shape == m.info("output.weight").np_shape


def test_staging_ring_is_registered_host_memory_and_freed():
    import cupy

    from gguf_gpu_lab.device import get_backend

    be = get_backend("cupy")
    before = be.pinned_bytes()
    ring = be.pinned_ring(3, 1 << 20)
    try:
        assert [b.nbytes for b in ring] == [1 << 20] * 3 and be.pinned_bytes() == before + 3 * (1 << 20)
        if not cupy.cuda.runtime.is_hip:  # one registered region: the driver knows every slot as host memory
            for b in ring:
                attrs = cupy.cuda.runtime.pointerGetAttributes(b.ctypes.data)
                assert attrs.type == cupy.cuda.runtime.memoryTypeHost
        ring[1][:] = np.arange(1 << 20, dtype=np.uint64).view(np.uint8)[: 1 << 20]
        dev = cupy.empty(1 << 20, cupy.uint8)
        s = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.runtime.memcpyAsync(dev.data.ptr, ring[1].ctypes.data, 1 << 20, cupy.cuda.runtime.memcpyHostToDevice,
                                      s.ptr)
        s.synchronize()
        assert np.array_equal(cupy.asnumpy(dev), ring[1])
    finally:
        be.free_ring(ring)
    assert be.pinned_bytes() == before


def test_first_load_prepares_the_kernels_it_launches(small_model, monkeypatch):
    """The plan's kernel variants are compiled (or loaded) before the first chunk is queued: a
    setup span says so, and the launches then find every variant ready (none compiled late)."""
    from gguf_gpu_lab.quant import gpu as qgpu

    prepared = []
    real = qgpu.prepare
    monkeypatch.setattr(qgpu, "prepare", lambda variants, device_id: (prepared.extend(variants),
                                                                     real(variants, device_id)))
    qgpu._function.cache_clear()
    qgpu._READY.clear()
    for dtype in ("bfloat16", "float32"):
        r = load(small_model, mode="gpu", dtype=dtype, chunk_mb=0.5, backend="cupy")
        setup = r.profile.df[r.profile.df["lane"] == "setup"]
        stages = set(setup["stage"])  # the setup's host work, each stall a span of its own
        assert {"pin staging", "allocate outputs", "kernels", "queue first copy"} <= stages
        assert stages <= {"plan", "pin staging", "lanes and scratch", "allocate outputs", "kernels", "wait for kernels",
                          "device clock", "wait for warm-up", "queue first copy"}
    assert prepared and qgpu._function.cache_info().currsize == len(set(prepared))
    n = len(prepared)  # a second load finds every variant ready: no thread, no prepare() call
    r = load(small_model, mode="gpu", dtype="float32", chunk_mb=0.5, backend="cupy")
    assert len(prepared) == n and "kernels" not in set(r.profile.df["stage"])


def test_cupti_profile_shows_the_copy_engine(small_model):
    """With profile="cupti" the device spans are CUPTI's: one copy engine lane whose copies run
    one after another (event-timed bars of four streams nearly all overlap; the driver may put an
    odd copy on a second engine, as seen once on the two-GPU H200 host: one copy inside another),
    kernels on their own lane, every span attributed."""
    from gguf_gpu_lab import cupti_trace

    if not cupti_trace.available():
        pytest.skip("cupti-python is not installed")
    for mode in ("gpu", "raw"):
        r = load(small_model, mode=mode, chunk_mb=0.25, backend="cupy", profile="cupti")
        df = r.profile.df
        assert r.profile.meta["device_timing"] == "cupti"
        assert not df["lane"].str.startswith("stream").any()
        h2d = df[df["lane"] == cupti_trace.COPY_LANE].sort_values("start_us")
        assert len(h2d) and (h2d["chunk"] >= 0).all() and int(h2d["bytes"].sum()) == r.file_bytes
        assert (h2d["end_us"] >= h2d["start_us"]).all()
        overlapping = h2d["start_us"].to_numpy()[1:] < h2d["end_us"].to_numpy()[:-1] - 1e-3
        assert overlapping.mean() < 0.25, f"{overlapping.sum()} of {len(h2d) - 1} copies start before the previous ends"
        if mode == "gpu":
            k = df[df["lane"] == cupti_trace.KERNEL_LANE]
            assert (k["chunk"] >= 0).all() and set(k["stage"]) <= {"dequant", "d2d"} and len(k) > 0
            assert 0 <= k["start_us"].min() and k["end_us"].max() <= r.wall_s * 1e6 + 1e3


# -- two GPUs (skip with fewer) -------------------------------------------------------------------

@pytest.fixture
def two_gpus():
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    if n < 2:
        pytest.skip(f"a load over several GPUs needs two; this machine has {n}")
    return n


@pytest.mark.parametrize("mode,dtype", [("gpu", "float32"), ("gpu", "float16"), ("gpu", "bfloat16"),
                                        ("raw", "float16"), ("cpu", "float16"), ("sequential", "float32")])
def test_two_gpu_load_equals_one_gpu_load(all_types_model, two_gpus, mode, dtype):
    import cupy

    with open_model(all_types_model) as m:
        one = load(m, mode=mode, dtype=dtype, chunk_mb=0.25, readers=4, backend="cupy")
        two = load(m, mode=mode, dtype=dtype, chunk_mb=0.25, readers=4, device=[0, 1], backend="cupy")
        assert set(two) == set(one) and {dt.device for dt in two.values()} == {0, 1}
        for name, dt in two.items():
            assert dt.device == two.place.where[name] == dt.array.device.id, name
            a, b = cupy.asnumpy(one[name].array), cupy.asnumpy(dt.array)
            assert a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{mode} {dtype} {name}"
        if mode != "sequential":
            df = two.profile.df
            assert {"gpu0/stream 0", "gpu1/stream 0"} <= set(df["lane"])
            ds = two.device_summary().set_index("device")
            assert ds["h2d_bytes"].sum() == two.file_bytes and (ds["h2d_gb_s"] > 0).all()


def test_two_gpu_default_placement_and_all(small_model, two_gpus):
    r = load(small_model, device="all", backend="cupy")
    assert r.devices == tuple(range(two_gpus))
    where = dict(zip(r.placement["tensor"], r.placement["device"]))
    assert where["token_embd.weight"] == 0 and where["output.weight"] == two_gpus - 1
    s = r.place.summary()
    assert s["fits"].all() and (s["free_bytes"] > 0).all()


def test_two_gpu_to_torch_stays_on_each_device(small_model, two_gpus):
    torch = pytest.importorskip("torch")
    with open_model(small_model) as m:
        r = load(m, mode="gpu", dtype="bfloat16", device=[0, 1], backend="cupy")
        for name, dt in r.items():
            t = dt.to_torch()
            assert t.device == torch.device("cuda", dt.device) and t.data_ptr() == dt.array.data.ptr, name
        t = r["output.weight"].to_torch()
        ref = torch.from_numpy(m.dequantize("output.weight")).bfloat16()
        assert torch.equal(t.cpu(), ref)


def test_two_gpu_lazy_cache_and_preload(small_model, two_gpus):
    with open_model(small_model) as m:
        h = m.preload(device=[0, 1], backend="cupy", batch_mb=1)
        x = m.tensor("output.weight", device=[0, 1], backend="cupy")
        assert h.wait(timeout=120) and m.cache_info()["loads"] == len(m.tensors)
        placed = load(m, device=[0, 1], backend="cupy").place.where
        for t in m.tensors:
            dt = m.tensor(t.name, device=[0, 1], backend="cupy")
            assert dt.device == placed[t.name] == dt.array.device.id, t.name
        assert m.cache_info()["loads"] == len(m.tensors)
        assert np.array_equal(x.numpy().reshape(-1), m.dequantize("output.weight", "float16").reshape(-1))


def test_a_gpu_that_is_not_there_is_refused_before_any_work(small_model):
    import cupy

    from gguf_gpu_lab import BackendError

    n = cupy.cuda.runtime.getDeviceCount()
    with pytest.raises(BackendError, match=f"device {n} is not a device: GPU indices here are 0 to {n - 1}"):
        load(small_model, device=n, backend="cupy")


@pytest.mark.parametrize("mode", ["cpu", "sequential", "gpu"])
def test_h2d_spans_count_the_bytes_copied_on_the_gpu(small_model, mode):
    r = load(small_model, mode=mode, dtype="float32", chunk_mb=0.25, backend="cupy")
    h2d = int(r.profile.df.query("stage == 'h2d'")["bytes"].sum())
    assert h2d == (r.file_bytes if mode == "gpu" else r.out_bytes)
