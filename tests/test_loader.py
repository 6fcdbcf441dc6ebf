"""The loading pipeline on the host backend (runs everywhere): modes, orders, filters, chunking,
cancellation, the cache, lazy loads, preload, and concurrency."""

import os
import threading

import numpy as np
import pytest

from gguf_gpu_lab import GGUFLabError, LoadCancelled, open_model
from gguf_gpu_lab.loader import load, plan_chunks, select
from gguf_gpu_lab.tools.verify import mismatches

from .gguf_bytes import GGUFBytes, Tensor, f32_tensor
from .threads import lab_threads

_threads = lab_threads


def _check(m, r, mode, dtype, names=None):
    for name in names or [t.name for t in m.tensors]:
        got = r[name]
        if mode == "raw":
            assert np.array_equal(got.numpy().reshape(-1), m.raw(name))
        else:
            assert got.array.shape == m.info(name).np_shape
            bad = mismatches(got.numpy().reshape(-1), m.dequantize(name, dtype).reshape(-1))
            assert bad.size == 0, (mode, dtype, name)


@pytest.mark.parametrize("chunk_mb", [0.02, 0.3, 64.0])  # smaller than most tensors .. larger than all
@pytest.mark.parametrize("mode", ["gpu", "raw", "cpu", "sequential"])
def test_every_mode_matches_cpu_dequantization(all_types_model, mode, chunk_mb):
    with open_model(all_types_model) as m:
        r = load(m, mode=mode, dtype="float32", chunk_mb=chunk_mb, streams=3, readers=2, backend="host")
        assert len(r) == len(m.tensors) and r.backend == "host"
        assert r.file_bytes == sum(t.n_bytes for t in m.tensors)
        _check(m, r, mode, "float32")
    assert not _threads()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(small_model, dtype):
    with open_model(small_model) as m:
        r = load(m, mode="gpu", dtype=dtype, chunk_mb=0.2, backend="host")
        _check(m, r, "gpu", dtype)
        assert r["output.weight"].dtype == dtype


def test_orders_and_filters(small_model):
    with open_model(small_model) as m:
        ts = m.tensors
        assert [t.name for t in select(ts, order="file")] == [t.name for t in sorted(ts, key=lambda t: t.offset)]
        big = select(ts, order="largest")
        assert big[0].n_bytes == max(t.n_bytes for t in ts)
        by_layer = select(ts, order="layer")
        assert by_layer[0].name == "token_embd.weight" and by_layer[-1].layer is None
        layers = [t.layer for t in by_layer if t.layer is not None]
        assert layers == sorted(layers)
        assert [t.name for t in select(ts, order=lambda t: t.name)] == sorted(t.name for t in ts)
        r = load(m, tensors=lambda t: t.layer == 1, backend="host")
        assert set(r) == {t.name for t in ts if t.layer == 1}
        r = load(m, tensors=["output.weight", "blk.0.attn_k.weight"], order="largest", backend="host")
        assert set(r) == {"output.weight", "blk.0.attn_k.weight"}
        with pytest.raises(KeyError, match="nope"):
            load(m, tensors=["nope"], backend="host")
        assert set(load(m, tensors="output.weight", backend="host")) == {"output.weight"}  # one name, not letters
        for bad in (5, b"output.weight", [b"output.weight"]):
            with pytest.raises(GGUFLabError, match="tensors must be"):
                load(m, tensors=bad, backend="host")


def test_layer_order_of_other_stacks(no_block_model):
    with open_model(no_block_model) as m:
        order = [t.name for t in select(m.tensors, order="layer")]
        # embeddings, then each stack in file order (the vision tower starts first), the rest last
        assert order == ["v.patch_embd.weight", "v.blk.0.attn_q.weight", "v.blk.1.attn_q.weight",
                         "enc.blk.0.ffn_up.weight", "v.post_ln.weight", "mm.0.weight"]
        r = load(m, order="layer", backend="host")
        assert set(r) == set(order)


def test_plan_chunks_splits_and_batches(small_model):
    with open_model(small_model) as m:
        ts = select(m.tensors)
        chunk = 64 << 10
        chunks = plan_chunks(ts, chunk)
        assert all(c.nbytes <= chunk or len(c.pieces) == 1 for c in chunks)
        assert any(len(c.pieces) > 1 for c in chunks)  # small tensors batched
        pieces = [p for c in chunks for p in c.pieces]
        for t in ts:  # every block of every tensor exactly once, in order
            mine = [p for p in pieces if p.tensor.name == t.name]
            assert sum(p.nbytes for p in mine) == t.n_bytes
            assert [p.first_block for p in mine] == sorted(p.first_block for p in mine)


def test_bad_options(small_model):
    for kw, msg in [({"mode": "fast"}, "mode"), ({"streams": 0}, "streams"), ({"readers": 0}, "readers"),
                    ({"chunk_mb": 0}, "chunk_mb"), ({"order": "random"}, "order"), ({"dtype": "int8"}, "dtype")]:
        with pytest.raises(GGUFLabError, match=msg):
            load(small_model, backend="host", **kw)


@pytest.mark.parametrize("kw,line", [
    ({"chunk_mb": 1e-9}, "chunk_mb must be a number from 0.015625 to 1024 (MiB), got 1e-09"),
    ({"chunk_mb": 1e308}, "chunk_mb must be a number from 0.015625 to 1024 (MiB), got 1e+308"),
    ({"chunk_mb": float("inf")}, "chunk_mb must be a number from 0.015625 to 1024 (MiB), got inf"),
    ({"chunk_mb": float("nan")}, "chunk_mb must be a number from 0.015625 to 1024 (MiB), got nan"),
    ({"chunk_mb": "16"}, "chunk_mb must be a number from 0.015625 to 1024 (MiB), got '16'"),
    ({"staging_mb": 0}, "staging_mb must be a number from 0.015625 to 65536 (MiB), got 0"),
    ({"staging_mb": 1e12}, "staging_mb must be a number from 0.015625 to 65536 (MiB), got 1000000000000.0"),
    ({"streams": True}, "streams must be an integer from 1 to 64, got True"),
    ({"readers": 10**9}, "readers must be an integer from 1 to 256, got 1000000000"),
    ({"device": -1}, "device must be an index of 0 or more, a list of indices or 'all', got -1"),
    ({"device": 99999999999999999999}, "device 99999999999999999999 is not a device: the host backend plays devices 0 to 63"),
    ({"device": [0, 10**6]}, "device 1000000 is not a device"),
])
def test_numbers_out_of_range_are_one_line_before_any_work(small_model, monkeypatch, kw, line):
    import gguf_gpu_lab.loader as loader

    monkeypatch.setattr(loader, "Pipeline", lambda *a, **k: pytest.fail("the load started"))
    with pytest.raises(GGUFLabError) as e:
        load(small_model, backend="host", **kw)
    assert line in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["gpu", "cpu", "sequential"])
def test_progress_and_cancel(small_model, mode):
    seen = []

    def progress(done, total, name):
        seen.append((done, total, name))
        return len(seen) < 3

    with open_model(small_model) as m:
        with pytest.raises(LoadCancelled, match="cancelled"):
            load(m, mode=mode, chunk_mb=0.05, progress=progress, backend="host")
        assert len(seen) == 3 and seen[0][0] < seen[1][0] < seen[2][0] and seen[0][1] == sum(t.n_bytes for t in m.tensors)
        r = load(m, mode=mode, backend="host")  # the next load works
        assert len(r) == len(m.tensors)
    assert not _threads()


@pytest.mark.parametrize("mode", ["gpu", "cpu", "sequential"])
def test_a_cancel_stops_the_progress_at_once(small_model, mode):
    """The caller's cancel event set during a load: no chunk is reported after it (the queueing
    thread looked at it only when no chunk was waiting, so readers ahead of it finished the load
    and a bar showed 100% before the LoadCancelled)."""
    ev, seen = threading.Event(), []

    def progress(done, total, name):
        seen.append(done)
        ev.set()

    with open_model(small_model) as m:
        with pytest.raises(LoadCancelled, match="cancelled"):
            load(m, mode=mode, chunk_mb=0.02, readers=2, progress=progress, cancel=ev, backend="host")
        assert len(seen) == 1 and seen[0] < sum(t.n_bytes for t in m.tensors)
    assert not _threads()


def test_reader_error_is_raised_and_cleaned_up(small_model, monkeypatch):
    from gguf_gpu_lab.loader import pipeline as loader  # where the readers call read_chunk

    calls = []

    def broken(source, pieces, slot, mapped):
        calls.append(pieces[0].file_offset)
        if len(calls) == 4:
            raise OSError("disk on fire")
        return sum(p.nbytes for p in pieces)

    monkeypatch.setattr(loader, "read_chunk", broken)
    with pytest.raises(OSError, match="disk on fire"):
        load(small_model, chunk_mb=0.05, backend="host")
    assert not _threads()


def test_profile_spans(small_model):
    r = load(small_model, chunk_mb=0.1, streams=2, readers=2, backend="host")
    df = r.profile.df
    assert list(df.columns) == ["lane", "stage", "chunk", "tensor", "bytes", "start_us", "end_us", "dur_us", "device"]
    assert set(df.loc[df.lane.str.startswith("lane"), "device"]) == {0} and set(df.loc[df.stage == "read", "device"]) == {-1}
    assert {"read", "h2d", "dequant"} <= set(df["stage"])
    assert (df["dur_us"] >= 0).all() and (df["start_us"] >= 0).all()
    assert df.loc[df.stage == "read", "bytes"].sum() == r.file_bytes
    assert load(small_model, backend="host", profile=False).profile is None


def test_lazy_tensor_cache_and_eviction(small_model):
    with open_model(small_model) as m:
        a = m.tensor("output.weight", backend="host")
        assert m.tensor("output.weight", backend="host") is a
        b = m.tensor("output.weight", dtype="float32", backend="host")  # another key
        assert b is not a and b.array.dtype == np.float32
        info = m.cache_info()
        assert info["loads"] == 2 and info["hits"] == 1 and info["entries"] == 2
        assert m.evict("output.weight") == a.nbytes + b.nbytes
        m.cache_budget = a.nbytes + 1  # room for one
        m.tensor("output.weight", backend="host")
        m.tensor("token_embd.weight", backend="host")
        assert m.cache_info()["entries"] == 1


def test_tensor_from_many_threads_loads_once(small_model):
    with open_model(small_model) as m:
        names = [t.name for t in m.tensors][:12]
        got = {}
        barrier = threading.Barrier(8)

        def worker(i):
            barrier.wait()
            for n in names[i % 3:] + names[:i % 3]:
                got[(i, n)] = m.tensor(n, dtype="float32", backend="host")

        ths = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        assert m.cache_info()["loads"] == len(names)
        for n in names:
            assert len({id(got[(i, n)]) for i in range(8)}) == 1
            assert np.array_equal(got[(0, n)].numpy(), m.dequantize(n))


def test_preload_background_with_tensor_calls(small_model):
    with open_model(small_model) as m:
        h = m.preload(order="largest", backend="host", batch_mb=0.2, dtype="float32")
        x = m.tensor("blk.0.ffn_norm.weight", dtype="float32", backend="host")  # jumps the queue
        assert np.array_equal(x.numpy(), m.dequantize("blk.0.ffn_norm.weight"))
        assert h.wait(timeout=60)
        p = h.progress
        assert p.bytes_done == p.bytes_total and p.current is None
        assert m.cache_info()["loads"] == len(m.tensors)
    assert not _threads()


def test_preload_cancel_and_foreground(small_model):
    with open_model(small_model) as m:
        h = m.preload(backend="host", batch_mb=0.05)
        h.cancel()
        assert h.done() and h.cancelled and repr(h).startswith("<PreloadHandle cancelled: ")
        loaded = m.cache_info()["loads"]
        assert loaded < len(m.tensors)
        h2 = m.preload(backend="host", background=False)
        assert h2.done() and m.cache_info()["loads"] == len(m.tensors) and not h2.cancelled
        n = len(m.tensors) - loaded
        assert repr(h2).startswith(f"<PreloadHandle done: {n} of {n} tensors, ")
    assert not _threads()


def test_staging_ring_is_kept_between_loads_and_not_shared_by_concurrent_ones():
    from gguf_gpu_lab.device import HostBackend, get_backend

    assert get_backend("host") is get_backend("host")
    be = HostBackend()
    a, kept_a = be.lease_staging(4, 1000)
    b, kept_b = be.lease_staging(4, 1000)  # while a is out: a ring of its own
    assert kept_a and not kept_b and {id(x) for x in a}.isdisjoint(id(x) for x in b)
    be.return_staging(b, kept_b)
    be.return_staging(a, kept_a)
    c, kept_c = be.lease_staging(3, 800)  # smaller: the kept ring again
    assert kept_c and [id(x) for x in c] == [id(x) for x in a[:3]]
    be.return_staging(c, kept_c)
    d, _ = be.lease_staging(4, 5000)  # larger: reallocated
    assert d[0].nbytes == 5000
    be.return_staging(d, True)
    e, _ = be.lease_staging(6, 200)  # more slots, smaller ones: grown to hold both (6 of 5000)
    assert len(e) == 6 and e[0].nbytes == 5000
    be.return_staging(e, True)
    f, kept_f = be.lease_staging(4, 5000)  # and the other shape again: no reallocation
    assert kept_f and [id(x) for x in f] == [id(x) for x in e[:4]]
    be.return_staging(f, kept_f)
    assert be.release_staging() == 6 * 5000 and be.release_staging() == 0


def test_named_ranges_for_system_profilers(small_model):
    """Every load phase is wrapped in a named range (NVTX/roctx on a GPU backend)."""
    from gguf_gpu_lab.device import HostBackend

    class Recording(HostBackend):
        def __init__(self):
            super().__init__()
            self.names = []

        def range(self, name, color=0):
            self.names.append(name)
            return super().range(name, color)

    be = Recording()
    r = load(small_model, chunk_mb=0.5, backend=be)
    n_chunks = len(plan_chunks(list(r[k].info for k in r), int(0.5 * (1 << 20))))
    assert "lanes and scratch" in be.names
    assert sorted(n for n in be.names if n.startswith("read chunk")) == sorted(f"read chunk {i}" for i in range(n_chunks))
    assert sorted(n for n in be.names if n.startswith("queue chunk")) == sorted(f"queue chunk {i}" for i in range(n_chunks))


def test_errors_leave_the_callers_cancel_event_alone(small_model, monkeypatch):
    from gguf_gpu_lab.loader import pipeline as loader  # where the readers call read_chunk

    def broken(source, pieces, slot, mapped):
        raise OSError("disk on fire")

    monkeypatch.setattr(loader, "read_chunk", broken)
    ev = threading.Event()
    with pytest.raises(OSError, match="disk on fire"):
        load(small_model, chunk_mb=0.05, backend="host", cancel=ev)
    assert not ev.is_set() and not _threads()


def test_failed_output_allocation_stops_the_readers(small_model, monkeypatch):
    from gguf_gpu_lab.loader import pipeline as loader  # where the readers call read_chunk
    from gguf_gpu_lab.errors import DeviceMemoryError

    def no_memory(*a, **k):
        raise DeviceMemoryError("out of memory (injected)")

    monkeypatch.setattr(loader, "alloc_outputs", no_memory)
    with pytest.raises(DeviceMemoryError, match="injected"):
        load(small_model, chunk_mb=0.05, backend="host")
    assert not _threads()
    monkeypatch.undo()
    assert len(load(small_model, chunk_mb=0.05, backend="host")) > 0


def test_loads_from_a_path_parse_the_file_once(small_model, monkeypatch, tmp_path):
    """A dashboard click or a notebook cell that passes a path reuses the parsed model; a
    changed file is parsed again."""
    import shutil

    from gguf_gpu_lab import header

    calls = []
    real = header.Header.__init__

    def counting(self, *a, **k):
        calls.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(header.Header, "__init__", counting)
    p = tmp_path / "copy.gguf"
    shutil.copy(small_model, p)
    for _ in range(3):
        load(str(p), mode="raw", backend="host", profile=False)
    assert len(calls) == 1
    os.utime(p, ns=(0, 10**9))  # the file changed (its modification time did)
    load(str(p), mode="raw", backend="host", profile=False)
    assert len(calls) == 2


def test_profile_option_is_checked(small_model):
    from gguf_gpu_lab import BackendError

    with pytest.raises(GGUFLabError, match="profile must be"):
        load(small_model, profile="nvtx", backend="host")
    with pytest.raises(BackendError, match="NVIDIA GPU"):
        load(small_model, profile="cupti", backend="host")


def test_cupti_records_are_attributed_to_what_the_loader_issued():
    from gguf_gpu_lab.cupti_trace import COPY_LANE, KERNEL_LANE, attribute

    HTOD, DTOD = 1, 8
    # lane 0 (CUPTI stream 70) issued chunk 0, lane 1 (stream 71) chunk 1 with an integer tensor
    issued = [(0, "h2d", 0, "a", 100), (0, "dequant", 0, "a", 100),
              (1, "h2d", 1, "b", 50), (1, "dequant", 1, "b", 40), (1, "d2d", 1, "i", 10)]
    records = [  # (kind, copy kind, bytes, start, end, name, stream), as CUPTI delivers them
        ("memcpy", HTOD, 50, 10, 20, "", 71), ("memcpy", HTOD, 100, 20, 30, "", 70),
        ("kernel", 0, 0, 21, 25, "dequant", 71), ("memcpy", DTOD, 10, 26, 27, "", 71),
        ("kernel", 0, 0, 31, 33, "dequant", 70),
        ("memcpy", HTOD, 4, 40, 41, "", 5),  # someone else's copy on another stream
        ("kernel", 0, 0, 50, 51, "fill", 70), ("memcpy", 2, 64, 60, 61, "", 70),  # an extra kernel; a D2H copy
    ]
    spans = attribute(records, {70: 0, 71: 1}, issued, offset_ns=1000, htod=HTOD, dtod=DTOD)
    got = [(s.lane, s.stage, s.chunk, s.tensor, s.bytes, s.start_ns) for s in spans]
    assert got == [
        (COPY_LANE, "h2d", 1, "b", 50, 1010), (COPY_LANE, "h2d", 0, "a", 100, 1020),
        (KERNEL_LANE, "dequant", 1, "b", 40, 1021), (KERNEL_LANE, "d2d", 1, "i", 10, 1026),
        (KERNEL_LANE, "dequant", 0, "a", 100, 1031), (COPY_LANE, "h2d", -1, "", 4, 1040),
        (KERNEL_LANE, "kernel", -1, "", 0, 1050)]


def test_preload_progress_counts_the_tensors_of_a_batch():
    from gguf_gpu_lab.cache import PreloadHandle

    names = [f"t{i}" for i in range(65)]
    seen = []
    h = PreloadHandle(names, {n: 10 for n in names}, lambda batch, cancel: seen.append((len(batch), h.progress)), 1 << 20)
    assert h.take("t64")  # taken by a tensor() call: out of both totals
    h.start(background=False)
    ((n, during),) = seen  # one batch
    assert n == 64 and (during.tensors_done, during.tensors_total, during.bytes_done, during.bytes_total) == (0, 64, 0, 640)
    after = h.progress
    assert (after.tensors_done, after.tensors_total, after.bytes_done, after.bytes_total) == (64, 64, 640, 640)


@pytest.mark.parametrize("mode,dtype", [("cpu", "float32"), ("cpu", "float16"), ("sequential", "float32"),
                                        ("gpu", "float32"), ("raw", "float16")])
def test_h2d_spans_count_the_bytes_copied(small_model, mode, dtype):
    """cpu and sequential modes copy dequantized values: their h2d spans say so (a float32 load
    copies several times the file's bytes), so h2d GB/s is not understated; gpu and raw copy the file's."""
    r = load(small_model, mode=mode, dtype=dtype, chunk_mb=0.25, backend="host")
    h2d = int(r.profile.df.query("stage == 'h2d'")["bytes"].sum())
    assert h2d == (r.out_bytes if mode in ("cpu", "sequential") else r.file_bytes)
    if mode in ("cpu", "sequential") and dtype == "float32":
        assert h2d > 3 * r.file_bytes


def test_profile_records_the_readers_that_read(small_model):
    from gguf_gpu_lab.loader.staging import default_readers
    from gguf_gpu_lab.widgets import LoadLab

    assert load(small_model, backend="host", chunk_mb=0.25).profile.meta["readers"] == default_readers()
    assert load(small_model, backend="host", readers=3, chunk_mb=0.25).profile.meta["readers"] == 3
    assert LoadLab(str(small_model), backend="host").readers.value == default_readers()  # its first run is load()'s


def test_preload_refuses_what_would_cache_other_than_whole_tensors(small_model):
    with open_model(small_model, warmup=False) as m:
        name = m.tensors[0].name
        for options in ({"shard": {name: (0, 1, 2)}}, {"profile": True}, {"cache": "x"}):
            with pytest.raises(GGUFLabError, match=f"preload takes the load options .*not {next(iter(options))} "):
                m.preload(backend="host", background=False, **options)
        assert m.cache_info()["entries"] == 0
        m.preload(backend="host", background=False, tensors=[name], chunk_mb=1, readers=2, read="preadv")
        assert m.tensor(name, backend="host").array.shape == m.info(name).np_shape


def test_a_preload_over_the_cache_budget_says_so(small_model):
    with open_model(small_model, warmup=False) as m:
        m.cache_budget = 1 << 20
        with pytest.warns(UserWarning, match=r"this preload makes .* MiB of tensors, more than the cache's budget "
                                             r"\(1\.0 MiB, cache_budget\)") as said:
            m.preload(backend="host", background=False)
        assert said[0].filename == __file__
        assert m.cache_info()["evictions"] > 0
        m.cache_budget = None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # within the budget (none): nothing to say
            m.preload(backend="host", background=False)


def empty_tensors_file(path) -> str:
    """Tensors of no elements beside one that has some: an F32 of 5 rows of none, a Q8_0 of no rows."""
    g = GGUFBytes().add_str("general.architecture", "llama")
    g.tensors += [Tensor("e", (0, 5), 0, b""), Tensor("q", (32, 0), 8, b""), f32_tensor("f", 64)]
    return g.write(path)


def load_empty_tensors(path, backend: str) -> None:
    """Every mode loads them alone and with the others, in their shapes (a gpu-mode load of tensors
    of no bytes alone leased no scratch and failed with an IndexError; with ``staging_mb`` every
    mode divided by their chunks' size, 0)."""
    with open_model(path) as m:
        for mode in ("gpu", "raw", "cpu", "sequential"):
            for names, staging in ((["e"], None), (["e", "q"], 1), (None, None)):
                r = load(m, mode=mode, tensors=names, backend=backend, dtype="float32", staging_mb=staging)
                assert sorted(r) == sorted(names or ["e", "q", "f"]), (mode, names)
                if mode != "raw":
                    assert r["e"].array.shape == (5, 0), (mode, names)
                    assert "q" not in r or r["q"].array.shape == (0, 32), (mode, names)
                if names is None:
                    f = r["f"].numpy().reshape(-1)
                    assert np.array_equal(f.view(np.float32) if mode == "raw" else f, np.ones(64, np.float32)), mode
        assert m.tensor("e", backend=backend).array.shape == (5, 0)


def test_tensors_of_no_elements(tmp_path):
    load_empty_tensors(empty_tensors_file(tmp_path / "empty.gguf"), "host")

