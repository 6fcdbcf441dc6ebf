"""The first load in a process: a warm-up started when a model is opened (on a GPU machine only),
and the first chunks of a plan ramping up to full size so the first copy starts early."""

import os
import subprocess
import sys
import threading
import time

import pytest

from gguf_gpu_lab import GGUFLabError, load, open_model, quant, warmup
from gguf_gpu_lab.device import get_backend
from gguf_gpu_lab.loader.plan import RAMP_MIN_BYTES, chunk_limits, plan_chunks

from .threads import lab_threads


@pytest.fixture
def fresh_warmup(monkeypatch):
    """The warm-up's process state emptied, and restored after the test."""
    monkeypatch.setattr(warmup, "_CURRENT", None)
    monkeypatch.setattr(warmup, "_WARMED", set())
    yield
    warmup.join()


@pytest.fixture
def host_plays_gpu(monkeypatch, fresh_warmup):
    """A machine that looks like it has a GPU, the host backend standing in for CuPy, and the
    host's kept staging ring emptied."""
    monkeypatch.setattr(warmup, "gpu_likely", lambda: True)
    monkeypatch.setattr(warmup, "_BACKEND", "host")
    monkeypatch.delenv("GGUF_LAB_WARMUP", raising=False)
    be = get_backend("host", 0)
    be.release_staging()
    yield be
    be.release_staging()


# -- the switch, and nothing without a GPU ---------------------------------------------------

def test_without_a_gpu_nothing_is_imported_or_started(small_model):
    """A fresh process on a machine without a GPU: opening a model neither imports CuPy nor
    starts a thread."""
    code = (f"import sys, threading, gguf_gpu_lab as lab; m = lab.open_model({str(small_model)!r}); "
            "from gguf_gpu_lab.model import shared_model; shared_model(m.path); "
            "print('cupy' in sys.modules, sorted(t.name for t in threading.enumerate()), "
            "lab.warmup.last())")
    if warmup.gpu_likely():
        pytest.skip("this machine may have a GPU")
    env = {k: v for k, v in os.environ.items() if k != "GGUF_LAB_WARMUP"}  # the default: on
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "['MainThread']", "None"]


def test_gpu_likely_looks_without_importing(monkeypatch, tmp_path):
    node = tmp_path / "nvidiactl"
    node.touch()
    monkeypatch.setattr(warmup, "_DEVICE_FILES", (str(node),))
    monkeypatch.setattr(warmup, "_cupy_installed", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert warmup.gpu_likely()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not warmup.gpu_likely()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(warmup, "_cupy_installed", lambda: False)
    assert not warmup.gpu_likely()
    monkeypatch.setattr(warmup, "_cupy_installed", lambda: True)
    monkeypatch.setattr(warmup, "_DEVICE_FILES", (str(tmp_path / "none"),))
    assert not warmup.gpu_likely()


def test_switched_off_by_argument_or_environment(small_model, host_plays_gpu, monkeypatch):
    with open_model(small_model, warmup=False):
        assert warmup.last() is None
    monkeypatch.setenv("GGUF_LAB_WARMUP", "0")
    with open_model(small_model):
        assert warmup.last() is None
    with open_model(small_model, warmup=True):  # the argument wins over the environment
        assert warmup.last() is not None
    with pytest.raises(GGUFLabError, match="warmup must be None .*True or False, got 'yes'"):
        open_model(small_model, warmup="yes")


# -- what it does (the host backend playing the GPU) ---------------------------------------------

def test_warmup_pins_the_ring_a_default_load_leases(small_model, host_plays_gpu):
    be = host_plays_gpu
    with open_model(small_model) as m:
        w = warmup.last()
        assert w is not None and w.types == {t.ggml_type for t in m.tensors}
        warmup.join()
        assert w.done() and w.error is None and {"context_s", "staging_s", "kernels_s"} <= set(w.steps)
        ring = be._ring
        assert ring is not None and not be._ring_busy
        r = load(m, backend=be)  # leases that very ring: nothing pinned again
        assert be._ring is ring and len(r) == len(m)
    with open_model(small_model):  # every type of the file warmed: no second warm-up
        assert warmup.last() is w


def test_a_load_joins_a_warmup_in_flight(small_model, host_plays_gpu, monkeypatch):
    real = warmup._pin_ring
    monkeypatch.setattr(warmup, "_pin_ring", lambda *a: (time.sleep(0.3), real(*a))[1])
    with open_model(small_model):
        t0 = time.perf_counter()
        assert warmup.join() is True
        assert time.perf_counter() - t0 > 0.2 and warmup.last().done()
        assert warmup.join() is False  # nothing in flight any more


def test_a_failed_warmup_is_kept_and_never_fails_a_load(small_model, host_plays_gpu, monkeypatch):
    def broken(*args):
        raise RuntimeError("no pinned memory today")

    monkeypatch.setattr(warmup, "_pin_ring", broken)
    with open_model(small_model) as m:
        warmup.join()
        assert "no pinned memory today" in str(warmup.last().error)
        assert len(load(m, backend="host")) == len(m)
    assert not any(t.name == "gguf-lab-warmup" for t in threading.enumerate())


def test_kernel_variants_cover_any_chunking(small_model, all_types_model):
    """The warm-up's kernels are those a gpu-mode load may launch, whatever the chunking: every
    variant that the loader's exact reckoning picks, for several chunk sizes and ramps."""
    from gguf_gpu_lab.quant.gpu import kernel_variants as exact

    for path in (small_model, all_types_model):
        with open_model(path, warmup=False) as m:
            types = {t.ggml_type for t in m.tensors}
            for dtype in ("float16", "float32", "bfloat16"):
                mine = warmup.kernel_variants(types, dtype)
                for chunk, ramp in ((1 << 20, 0), (1 << 16, 5), (12345 * 16, 3)):
                    pieces, pos = [], 0
                    for c in plan_chunks(m.tensors, chunk, ramp=ramp):
                        pos = 0
                        for p in c.pieces:
                            pieces.append((p.tensor.ggml_type,
                                           p.first_block * quant.type_spec(p.tensor.ggml_type).block_size, pos))
                            pos += p.nbytes
                    assert exact(pieces, dtype) <= mine, (path, dtype, chunk, ramp)


# -- the first chunks ramp up ------------------------------------------------------------------

def test_chunk_limits():
    full = 16 << 20
    lim = chunk_limits(full, 14)
    assert len(lim) == 14 and lim == sorted(lim) and lim[0] == full // 15 and lim[-1] < full
    assert chunk_limits(full, 0) == [] and chunk_limits(RAMP_MIN_BYTES, 8) == []
    assert min(chunk_limits(4 << 20, 14)) == RAMP_MIN_BYTES


@pytest.mark.parametrize("ramp", [0, 1, 3, 14])
def test_a_ramped_plan_covers_every_block_once(small_model, ramp):
    with open_model(small_model, warmup=False) as m:
        chunk = 2 << 20
        chunks = plan_chunks(m.tensors, chunk, ramp=ramp)
        limits = chunk_limits(chunk, ramp) + [chunk] * len(chunks)
        for c in chunks:  # within its limit, unless one block of a tensor is larger
            assert c.nbytes <= limits[c.index] or len(c.pieces) == 1
        seen = {}
        for c in chunks:
            for p in c.pieces:
                assert seen.get(p.tensor.name, 0) == p.first_block  # in order, no gap, no overlap
                seen[p.tensor.name] = p.first_block + p.n_blocks
        assert seen == {t.name: t.n_elements // quant.type_spec(t.ggml_type).block_size for t in m.tensors}
        if ramp:
            assert chunks[0].nbytes <= chunk_limits(chunk, ramp)[0] < chunk
        else:
            assert [c.pieces for c in chunks] == [c.pieces for c in plan_chunks(m.tensors, chunk)]


def test_the_loader_ramps_its_first_chunks(small_model):
    r = load(small_model, backend="host", chunk_mb=2, readers=3)
    reads = r.profile.df[r.profile.df["stage"] == "read"].sort_values("chunk")
    lim = chunk_limits(2 << 20, 3)
    assert (reads["bytes"].to_numpy()[:3] <= lim).all() and reads["bytes"].iloc[0] < (2 << 20)


# -- the CuPy path, against the stand-in for CuPy's ROCm build (tests/rocm_standin.py) ------------

def test_warmup_through_cupy_asks_for_context_ring_and_kernels(small_model, fresh_warmup, monkeypatch, tmp_path):
    """What the warm-up asks of CuPy: an event on the null stream (the context and the device
    clock), the pinned ring of a default load (exact-size buffers on ROCm), and one compile and
    load per kernel variant of the file's types; the ring is kept by the backend for the load."""
    from gguf_gpu_lab import device
    from gguf_gpu_lab.loader.staging import default_readers
    from gguf_gpu_lab.quant import gpu as qgpu

    from .rocm_standin import StandIn

    standin = StandIn()
    for name, module in standin.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("GGUF_LAB_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(device, "_cupy_or_reason", lambda: (standin.modules["cupy"], None))
    monkeypatch.setattr(device, "_INSTANCES", {})
    monkeypatch.setattr(warmup, "gpu_likely", lambda: True)
    monkeypatch.delenv("GGUF_LAB_WARMUP", raising=False)
    caches = (qgpu._kernel, qgpu._function, qgpu._tables, device.gpu_available)
    for f in caches:
        f.cache_clear()
    qgpu._READY.clear()
    try:
        with open_model(small_model) as m:
            warmup.join()
            w = warmup.last()
            assert w.error is None and {"context_s", "staging_s", "kernels_s"} <= set(w.steps), (w.error, w.steps)
            types = {t.ggml_type for t in m.tensors}
            chunks = plan_chunks(m.tensors, 16 << 20, ramp=default_readers())
        want = warmup.kernel_variants(types)
        defs = [dict(x[2:].split("=") for x in o if x.startswith("-D")) for _, o in standin.compiles]
        got = {tuple(int(d[k]) for k in ("GGML_TYPE", "OUT_KIND", "VEC_STORE", "VEC_LOAD")) for d in defs}
        assert got == want and len(standin.loads) == len(want)
        n_slots = min(min(default_readers(), len(chunks)) + 8, len(chunks))
        assert standin.pinned == [max(c.nbytes for c in chunks)] * n_slots
        be = device._INSTANCES[("cupy", 0)]
        assert be._ring is not None and not be._ring_busy and be._clock is not None
        assert not standin.stubbed
    finally:
        for f in caches:
            f.cache_clear()  # no stand-in kernels left for the real GPU tests
        qgpu._READY.clear()


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_warmup_on_the_gpu(small_model, fresh_warmup, monkeypatch):
    """Context, ring and kernels ready before the load; the load then leases the kept ring and
    finds every kernel compiled and loaded."""
    from gguf_gpu_lab.quant import gpu

    monkeypatch.delenv("GGUF_LAB_WARMUP", raising=False)
    be = get_backend("cupy", 0)
    be.release_staging()
    with open_model(small_model) as m:
        w = warmup.last()
        assert w is not None, "a GPU machine starts a warm-up"
        warmup.join()
        assert w.error is None and {"context_s", "staging_s", "kernels_s"} <= set(w.steps), w.steps
        ring = be._ring
        assert ring is not None
        before = gpu._function.cache_info().misses
        r = load(m)
        be.synchronize()
        assert be._ring is ring and gpu._function.cache_info().misses == before
        assert len(r) == len(m)


@pytest.mark.gpu
def test_a_load_right_after_open_waits_for_the_warmup(small_model, fresh_warmup, monkeypatch):
    monkeypatch.delenv("GGUF_LAB_WARMUP", raising=False)
    get_backend("cupy", 0).release_staging()
    with open_model(small_model) as m:
        r = load(m)
        assert warmup.last().done()
        stages = set(r.profile.df.loc[r.profile.df["lane"] == "setup", "stage"])
        assert "device clock" in stages


# -- a load while the caller works (hf.from_gguf's first call) --------------------------------------

def test_load_while_work_runs(small_model):
    from gguf_gpu_lab.loader.background import load_while

    with open_model(small_model, warmup=False) as m:
        seen = []
        done, r, load_s, wait_s = load_while(m, {"backend": "host"}, lambda: seen.append(1) or "built")
        assert done == "built" and seen == [1] and len(r) == len(m) and load_s > 0 and wait_s >= 0


def test_load_while_a_failing_work_cancels_the_load(small_model):
    from gguf_gpu_lab.loader.background import load_while

    def slow(done, total, name):
        time.sleep(0.05)

    def broken():
        time.sleep(0.1)
        raise ValueError("no model for you")

    with open_model(small_model, warmup=False) as m:
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="no model for you"):
            load_while(m, {"backend": "host", "chunk_mb": 0.05, "progress": slow}, broken)
        n_chunks = len(plan_chunks(m.tensors, int(0.05 * (1 << 20))))
        assert time.perf_counter() - t0 < 0.05 * n_chunks  # stopped, not run to its end
    assert not lab_threads()
