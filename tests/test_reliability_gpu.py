"""Resource safety on the GPU (run with -m gpu): repeated loads, injected faults, cancellation,
KeyboardInterrupt and out-of-memory leave no device memory, pinned memory or thread behind."""

import gc
import threading

import numpy as np
import pytest

from gguf_gpu_lab import DeviceMemoryError, LoadCancelled, open_model
from gguf_gpu_lab.device import get_backend
from gguf_gpu_lab.loader import load

from .faults import failing_on, stopping_at

pytestmark = pytest.mark.gpu


def _state():
    """(device bytes in use by CuPy's pool, pinned bytes the backend holds, loader threads)."""
    import cupy

    gc.collect()
    return (cupy.get_default_memory_pool().used_bytes(), get_backend("cupy").pinned_bytes(),
            sorted(t.name for t in threading.enumerate() if t.name.startswith("gguf-lab")))


@pytest.fixture
def warm(small_model):
    """The model, open, after one load of each mode (kernels compiled, staging ring allocated at
    the size every load below uses), and the resource state then."""
    with open_model(small_model) as m:
        for mode in ("gpu", "raw", "cpu", "sequential"):
            load(m, mode=mode, chunk_mb=0.25, readers=4, backend="cupy")
        yield m, _state()


def _correct(m, r, name="output.weight"):
    assert np.array_equal(r[name].numpy().reshape(-1), m.dequantize(name, "float16").reshape(-1))


def test_100_load_and_free_cycles_leave_nothing_behind(warm):
    import cupy

    m, base = warm
    free0 = cupy.cuda.runtime.memGetInfo()[0]
    for i in range(100):
        r = load(m, mode=("gpu", "raw", "cpu")[i % 3], chunk_mb=0.25, readers=4, backend="cupy")
        assert len(r) == len(m.tensors)
        del r
        assert _state() == base, f"after cycle {i}"
    # the pool may keep freed blocks; nothing new was taken from the device
    assert cupy.cuda.runtime.memGetInfo()[0] >= free0 - (2 << 20)


def test_injected_kernel_launch_error(warm, monkeypatch):
    from gguf_gpu_lab.quant import gpu

    m, base = warm
    real = gpu.launch
    monkeypatch.setattr(gpu, "launch", failing_on(7, real, RuntimeError("injected launch failure")))
    with pytest.raises(RuntimeError, match="injected launch failure") as exc:
        load(m, mode="gpu", chunk_mb=0.25, readers=4, backend="cupy")
    # even while the traceback is alive (a notebook keeps the last one), its memory is back
    assert _state() == base
    del exc
    monkeypatch.setattr(gpu, "launch", real)
    _correct(m, load(m, mode="gpu", chunk_mb=0.25, readers=4, backend="cupy"))


def test_injected_reader_error(warm, monkeypatch):
    from gguf_gpu_lab.loader import pipeline as loader  # where the readers call read_chunk

    m, base = warm
    real = loader.read_chunk
    monkeypatch.setattr(loader, "read_chunk", failing_on(5, real, OSError("injected read failure")))
    with pytest.raises(OSError, match="injected read failure"):
        load(m, mode="gpu", chunk_mb=0.25, readers=4, backend="cupy")
    assert _state() == base
    monkeypatch.setattr(loader, "read_chunk", real)
    _correct(m, load(m, mode="gpu", chunk_mb=0.25, readers=4, backend="cupy"))


@pytest.mark.parametrize("mode", ["gpu", "raw", "cpu"])
@pytest.mark.parametrize("at", [1, 3, 8])
@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_cancel_and_keyboard_interrupt_at_several_points(warm, mode, at, how):
    m, base = warm
    progress, stops = stopping_at(at, how)
    with pytest.raises(stops):
        load(m, mode=mode, chunk_mb=0.25, readers=4, progress=progress, backend="cupy")
    assert _state() == base
    _correct(m, load(m, mode="gpu", chunk_mb=0.25, readers=4, backend="cupy"))


def test_out_of_memory_while_allocating_outputs(warm, monkeypatch):
    """The up-front check is bypassed (as if free memory were unknown), so the pool's limit is
    hit part way through the allocation of the outputs."""
    import cupy

    m, base = warm
    be = get_backend("cupy")
    monkeypatch.setattr(be, "mem_free", lambda: None)
    pool = cupy.get_default_memory_pool()
    limit = pool.get_limit()
    need = sum(t.n_elements * 4 for t in m.tensors)
    try:
        pool.free_all_blocks()  # the limit counts cached free blocks too; start from none
        pool.set_limit(size=pool.used_bytes() + need // 2)
        with pytest.raises(DeviceMemoryError, match="bytes needed"):
            load(m, mode="gpu", dtype="float32", chunk_mb=0.25, readers=4, backend="cupy")
        assert _state() == base
    finally:
        pool.set_limit(size=limit)
    monkeypatch.undo()
    _correct(m, load(m, mode="gpu", chunk_mb=0.25, readers=4, backend="cupy"))


# -- two GPUs: the same faults, nothing left behind on either (skip with fewer) ------------------

def _state2():
    """Per GPU (0 and 1): bytes in use by CuPy's pool and pinned bytes its backend holds; and
    the loader's threads."""
    import cupy

    gc.collect()
    pool = cupy.get_default_memory_pool()
    used = []
    for d in (0, 1):
        with cupy.cuda.Device(d):
            used.append(pool.used_bytes())
    return (used, [get_backend("cupy", d).pinned_bytes() for d in (0, 1)],
            sorted(t.name for t in threading.enumerate() if t.name.startswith("gguf-lab")))


def _free_on_each():
    import cupy

    out = []
    for d in (0, 1):
        with cupy.cuda.Device(d):
            out.append(cupy.cuda.runtime.memGetInfo()[0])
    return out


@pytest.fixture
def warm2(small_model):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("a load over several GPUs needs two")
    with open_model(small_model) as m:
        for mode in ("gpu", "raw", "cpu", "sequential"):
            load(m, mode=mode, chunk_mb=0.25, readers=4, device=[0, 1], backend="cupy")
        yield m, _state2()


def _load2(m, **kw):
    return load(m, chunk_mb=0.25, readers=4, device=[0, 1], backend="cupy", **kw)


def _correct2(m):
    r = _load2(m, mode="gpu")
    for name in ("token_embd.weight", "output.weight"):
        assert np.array_equal(r[name].numpy().reshape(-1), m.dequantize(name, "float16").reshape(-1))
    assert {r["token_embd.weight"].device, r["output.weight"].device} == {0, 1}


def test_two_gpu_load_and_free_cycles_leave_nothing_behind(warm2):
    m, base = warm2
    free0 = _free_on_each()
    for i in range(30):
        r = _load2(m, mode=("gpu", "raw", "cpu")[i % 3])
        assert len(r) == len(m.tensors)
        del r
        assert _state2() == base, f"after cycle {i}"
    assert all(now >= before - (2 << 20) for now, before in zip(_free_on_each(), free0))


def test_two_gpu_injected_launch_and_read_errors(warm2, monkeypatch):
    from gguf_gpu_lab.loader import pipeline
    from gguf_gpu_lab.quant import gpu

    m, base = warm2
    monkeypatch.setattr(gpu, "launch", failing_on(7, gpu.launch, RuntimeError("injected launch failure")))
    with pytest.raises(RuntimeError, match="injected launch failure"):
        _load2(m, mode="gpu")
    assert _state2() == base
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "read_chunk", failing_on(5, pipeline.read_chunk, OSError("injected read failure")))
    with pytest.raises(OSError, match="injected read failure"):
        _load2(m, mode="gpu")
    assert _state2() == base
    monkeypatch.undo()
    _correct2(m)


@pytest.mark.parametrize("mode", ["gpu", "raw", "cpu"])
@pytest.mark.parametrize("at", [1, 3, 8])
@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_two_gpu_cancel_and_keyboard_interrupt(warm2, mode, at, how):
    m, base = warm2
    progress, stops = stopping_at(at, how)
    with pytest.raises(stops):
        _load2(m, mode=mode, progress=progress)
    assert _state2() == base
    _correct2(m)


def test_two_gpu_placement_that_does_not_fit(warm2, monkeypatch):
    m, base = warm2
    monkeypatch.setattr(get_backend("cupy", 1), "mem_free", lambda: 1000)
    with pytest.raises(DeviceMemoryError, match="device 1 needs .* 1000 bytes .* free \\(short\\)"):
        _load2(m, mode="gpu", dtype="float32")
    assert _state2() == base
    monkeypatch.undo()
    _correct2(m)


def test_two_gpu_out_of_memory_on_the_second_while_allocating(warm2, monkeypatch):
    """Device 1's pool limit is reached part way through its outputs (the up-front check
    bypassed): device 0's outputs, both rings and the threads are all given back."""
    import cupy

    m, base = warm2
    be1 = get_backend("cupy", 1)
    monkeypatch.setattr(be1, "mem_free", lambda: None)
    pool = cupy.get_default_memory_pool()
    need = sum(t.n_elements * 4 for t in m.tensors)
    with cupy.cuda.Device(1):
        limit = pool.get_limit()
        try:
            pool.free_all_blocks()
            pool.set_limit(size=pool.used_bytes() + need // 8)
            with pytest.raises(DeviceMemoryError, match="bytes needed"):
                _load2(m, mode="gpu", dtype="float32")
        finally:
            pool.set_limit(size=limit)
    assert _state2() == base
    monkeypatch.undo()
    _correct2(m)
