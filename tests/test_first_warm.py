"""A warm load's first copy: the plan kept per file and options (loader.plans), the lanes and their
scratch kept on the device between loads (loader.lanes), the kernels already ready skipped, reader 0
alone until the first copy is queued, and the warm-up making the default plan and lanes. Host tests
run everywhere; the ``gpu`` ones need a GPU."""

import os
import shutil
import threading

import numpy as np
import pytest

from gguf_gpu_lab import load, open_model, warmup
from gguf_gpu_lab.device import get_backend
from gguf_gpu_lab.loader import lanes, plans
from gguf_gpu_lab.loader import default_readers
from gguf_gpu_lab.loader.plan import plan_chunks

from .faults import failing_on
from .threads import lab_threads


@pytest.fixture
def host():
    """The host backend of device 0 with no kept lanes before and after the test."""
    be = get_backend("host", 0)
    lanes.release()
    yield be
    lanes.release()


# -- plans ---------------------------------------------------------------------------------------

def test_a_warm_load_takes_its_plan_from_the_cache(small_model, monkeypatch):
    from gguf_gpu_lab.loader import plans as plans_mod

    plans.clear()
    made = []
    real = plans_mod.plan_chunks
    monkeypatch.setattr(plans_mod, "plan_chunks", lambda *a, **k: made.append(1) or real(*a, **k))
    with open_model(small_model, warmup=False) as m:
        a = load(m, backend="host", chunk_mb=2, readers=3)
        b = load(m, backend="host", chunk_mb=2, readers=3)
        assert len(made) == 1 and plans.cached_count() == 1
        load(m, backend="host", chunk_mb=1, readers=3)  # other options: another plan
        load(m, backend="host", chunk_mb=2, readers=3, tensors=[m.tensors[0].name])  # other tensors
        assert len(made) == 3 and plans.cached_count() == 3
        for name in a:
            assert np.array_equal(a[name].numpy(), b[name].numpy())
        # the cached plan is the one plan_chunks makes
        chunks = plans.cached_plan(m.source.identity, sorted(m.tensors, key=lambda t: t.offset), 2 << 20, 3)
        assert list(chunks) == real(sorted(m.tensors, key=lambda t: t.offset), 2 << 20, ramp=3)


def test_at_most_eight_plans_are_kept(small_model):
    plans.clear()
    with open_model(small_model, warmup=False) as m:
        for i in range(plans.MAX_PLANS + 3):
            plans.cached_plan(m.source.identity, m.tensors, (1 << 20) + i * 4096, 0)
        assert plans.cached_count() == plans.MAX_PLANS
        first = plans.plan_key(m.source.identity, m.tensors, 1 << 20, 0)
        assert first not in plans._PLANS  # the least recently used went first


def test_a_changed_file_is_planned_again(small_model, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(small_model, path)
    plans.clear()
    with open_model(path, warmup=False) as m:
        load(m, backend="host", chunk_mb=2)
    os.utime(path, ns=(1, 1))  # another mtime: another identity
    with open_model(path, warmup=False) as m:
        r = load(m, backend="host", chunk_mb=2)
        assert plans.cached_count() == 2 and len(r) == len(m)


def test_a_plan_is_keyed_by_the_tensors_themselves(small_model):
    """Two headers with one identity (a server that gives no version, a file rewritten with its
    old times) and the same names, whose tensors lie elsewhere: each gets its own plan."""
    import dataclasses

    plans.clear()
    with open_model(small_model, warmup=False) as m:
        moved = [dataclasses.replace(t, offset=t.offset + 32) for t in m.tensors]
        a = plans.cached_plan(("same",), m.tensors, 1 << 20, 0)
        b = plans.cached_plan(("same",), moved, 1 << 20, 0)
        assert plans.cached_count() == 2
        assert [p.file_offset + 32 for c in a for p in c.pieces] == [p.file_offset for c in b for p in c.pieces]


# -- lanes kept between loads ------------------------------------------------------------------

def test_a_second_load_reuses_the_lanes_and_scratch(small_model, host):
    load(small_model, backend=host, mode="gpu", chunk_mb=0.5, streams=3)
    kept = lanes.kept(host)
    assert kept is not None and len(kept.lanes) == 3 and len(kept.scratch) == 3
    ids = [id(ln) for ln in kept.lanes] + [id(s) for s in kept.scratch]
    r = load(small_model, backend=host, mode="gpu", chunk_mb=0.5, streams=3)
    again = lanes.kept(host)
    assert again is kept and [id(ln) for ln in again.lanes] + [id(s) for s in again.scratch] == ids
    assert len(r) > 0


def test_other_options_make_other_lanes(small_model, host):
    load(small_model, backend=host, mode="gpu", chunk_mb=0.5, streams=3)
    first = lanes.kept(host)
    load(small_model, backend=host, mode="gpu", chunk_mb=0.5, streams=2)  # fewer lanes: a new set
    second = lanes.kept(host)
    assert second is not first and len(second.lanes) == 2 and first.lanes == []  # the old set was closed
    load(small_model, backend=host, mode="gpu", chunk_mb=1.0, streams=2)  # larger chunks: more scratch
    third = lanes.kept(host)
    assert third is not second and third.scratch_bytes > second.scratch_bytes
    load(small_model, backend=host, mode="raw", chunk_mb=0.5, streams=2)  # needs no scratch: the set fits
    assert lanes.kept(host) is third
    load(small_model, backend="host", device=1, mode="gpu", chunk_mb=0.5, streams=2)  # another device
    other = lanes.kept(get_backend("host", 1))
    assert other is not None and other is not third and lanes.kept(host) is third


def test_release_closes_the_lanes_and_frees_the_scratch(small_model, host):
    load(small_model, backend=host, mode="gpu", chunk_mb=0.5, streams=3)
    kept = lanes.kept(host)
    threads = lanes.kept_threads()
    assert threads and all(t.is_alive() for t in threads)  # the host's lanes are threads
    assert lanes.release() == 3 * kept.scratch_bytes
    assert lanes.kept(host) is None and kept.scratch == [] and not any(t.is_alive() for t in threads)
    assert lanes.release() == 0 and not lab_threads()


def test_a_failed_load_gives_its_lanes_back_clear(small_model, host, monkeypatch):
    """A lane operation fails (a host lane keeps its error): the load raises it, the set is
    kept with its error forgotten, and the next load on it is correct."""
    from gguf_gpu_lab import quant

    want = load(small_model, backend=host, mode="gpu", chunk_mb=0.05)
    kept = lanes.kept(host)
    monkeypatch.setattr(quant, "dequantize", failing_on(3, quant.dequantize, RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        load(small_model, backend=host, mode="gpu", chunk_mb=0.05)
    assert lanes.kept(host) is kept and all(ln.error is None for ln in kept.lanes) and not lab_threads()
    monkeypatch.undo()
    r = load(small_model, backend=host, mode="gpu", chunk_mb=0.05)
    assert lanes.kept(host) is kept
    for name in want:
        assert np.array_equal(r[name].numpy(), want[name].numpy())


def test_lanes_that_cannot_drain_are_closed(host):
    class Stuck:
        def drain(self):
            raise RuntimeError("device lost")

        def close(self):
            self.closed = True

    s = lanes.LaneSet(host, [Stuck()], kept=True)
    lanes._BUSY.add(id(host))
    lanes.give_back(s, ok=False)
    assert lanes.kept(host) is None and s.lanes == [] and id(host) not in lanes._BUSY


def test_loads_side_by_side_each_have_lanes(small_model, host):
    with open_model(small_model, warmup=False) as m:
        want = load(m, backend=host, mode="gpu", chunk_mb=0.05)
        results, errors = [], []

        def run():
            try:
                results.append(load(m, backend=host, mode="gpu", chunk_mb=0.05))
            except BaseException as e:
                errors.append(e)

        ts = [threading.Thread(target=run) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors and len(results) == 3
        for r in results:
            for name in want:
                assert np.array_equal(r[name].numpy(), want[name].numpy())
    assert lanes.kept(host) is not None and not lab_threads()  # one set kept, the others closed
    assert not lanes._BUSY


# -- the first read alone ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gpu", "raw"])
def test_other_readers_start_once_the_first_copy_is_queued(small_model, mode):
    r = load(small_model, backend="host", mode=mode, chunk_mb=0.25, readers=4)
    df = r.profile.df
    queued = df[(df["lane"] == "setup") & (df["stage"] == "queue first copy")]
    assert len(queued) == 1 and int(queued["chunk"].iloc[0]) == 0
    reads = df[df["stage"] == "read"]
    first = reads[reads["chunk"] == 0]
    assert first["lane"].iloc[0] == "reader 0"
    # (reader 0 may read every chunk of a small file before the others get going)
    before = reads[reads["start_us"] < queued["end_us"].iloc[0] - 1]  # (µs rounding)
    assert len(before) and set(before["lane"]) == {"reader 0"}
    assert r.file_bytes == int(reads["bytes"].sum())


def test_a_failing_first_read_stops_the_readers_that_never_started(small_model, monkeypatch):
    from gguf_gpu_lab.loader import pipeline

    monkeypatch.setattr(pipeline, "read_chunk", failing_on(1, pipeline.read_chunk, OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        load(small_model, backend="host", mode="raw", chunk_mb=0.25, readers=4)
    assert not lab_threads()


# -- the warm-up makes the default plan and lanes ---------------------------------------------

def test_the_warmup_makes_the_default_plan_and_lanes(small_model, monkeypatch):
    monkeypatch.setattr(warmup, "_CURRENT", None)
    monkeypatch.setattr(warmup, "_WARMED", set())
    monkeypatch.setattr(warmup, "gpu_likely", lambda: True)
    monkeypatch.setattr(warmup, "_BACKEND", "host")
    monkeypatch.delenv("GGUF_LAB_WARMUP", raising=False)
    be = get_backend("host", 0)
    lanes.release()
    plans.clear()
    try:
        with open_model(small_model) as m:
            warmup.join()
            w = warmup.last()
            assert w.error is None and "lanes_s" in w.steps
            kept = lanes.kept(be)
            assert kept is not None and len(kept.lanes) == 4 and plans.cached_count() == 1
            chunks = plan_chunks(sorted(m.tensors, key=lambda t: t.offset), 16 << 20, ramp=default_readers())
            assert kept.scratch_bytes == max(c.nbytes for c in chunks)
            r = load(m, backend=be)  # the default load: the warm-up's plan and lanes
            assert plans.cached_count() == 1 and lanes.kept(be) is kept and len(r) == len(m)
    finally:
        warmup.join()
        lanes.release()
        be.release_staging()


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_lanes_are_kept_reused_and_released(small_model):
    import cupy

    be = get_backend("cupy", 0)
    lanes.release()
    pool = cupy.get_default_memory_pool()
    with open_model(small_model, warmup=False) as m:
        r = load(m, backend=be, chunk_mb=0.5)
        del r
        kept = lanes.kept(be)
        assert kept is not None and len(kept.lanes) == 4 and len(kept.scratch) == 4
        streams = [ln.stream.ptr for ln in kept.lanes]
        used = pool.used_bytes()
        pinned = be.pinned_bytes()
        r = load(m, backend=be, chunk_mb=0.5)
        want = {k: cupy.asnumpy(v.array) for k, v in r.items()}
        del r
        assert lanes.kept(be) is kept and [ln.stream.ptr for ln in kept.lanes] == streams
        assert pool.used_bytes() == used and be.pinned_bytes() == pinned  # nothing leaked by the second load
        r = load(m, backend=be, chunk_mb=0.5, streams=2)  # other options: a new set, the old one freed
        assert all(np.array_equal(cupy.asnumpy(v.array), want[k]) for k, v in r.items())
        del r
        assert lanes.kept(be) is not kept and len(lanes.kept(be).lanes) == 2 and kept.scratch == []
        in_pool = -(-kept.scratch_bytes // 512) * 512  # CuPy's pool hands out multiples of 512 bytes
        assert pool.used_bytes() == used - 2 * in_pool
        assert lanes.release(be) == 2 * kept.scratch_bytes
        assert lanes.kept(be) is None and pool.used_bytes() == used - 4 * in_pool
        assert be.pinned_bytes() == pinned


@pytest.mark.gpu
def test_gpu_lanes_of_another_device(small_model):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    a, b = get_backend("cupy", 0), get_backend("cupy", 1)
    lanes.release()
    load(small_model, backend=a, chunk_mb=0.5)
    load(small_model, backend=b, chunk_mb=0.5)
    ka, kb = lanes.kept(a), lanes.kept(b)
    assert ka is not None and kb is not None and ka is not kb
    assert all(s.device.id == 1 for s in kb.scratch) and all(s.device.id == 0 for s in ka.scratch)
    lanes.release()
