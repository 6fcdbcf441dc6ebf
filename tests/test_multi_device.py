"""Loads over several devices on the host backend, which plays them (runs everywhere): the
placement, the per-device check of free memory, per-device staging rings and cleanup, outputs
bit-exact with a single-device load, the profile's device lanes, the lazy cache and preload,
the command line and the load lab."""


import numpy as np
import pytest

from gguf_gpu_lab import DeviceMemoryError, GGUFLabError, LoadCancelled, open_model
from gguf_gpu_lab.device import get_backend
from gguf_gpu_lab.loader import load, place, resolve_devices

from .faults import failing_on, stopping_at
from .threads import lab_threads


_threads = lab_threads


def _rings_back(devices=(0, 1)) -> bool:
    """Every device's kept staging ring is back with its backend (none still leased)."""
    return not any(get_backend("host", d)._ring_busy for d in devices)


@pytest.fixture
def free(monkeypatch):
    """Set a host device's free memory (bytes; None: unknown), undone after the test."""
    def set_free(device, nbytes):
        monkeypatch.setattr(get_backend("host", device), "free_bytes", nbytes)

    return set_free


def test_default_placement_is_by_layer(small_model):
    with open_model(small_model) as m:
        r = load(m, device=[0, 1], backend="host")
        df = r.placement
        assert list(df.columns) == ["tensor", "device", "layer", "type", "file_bytes", "out_bytes"]
        where = dict(zip(df["tensor"], df["device"]))
        assert where["token_embd.weight"] == 0 and where["output.weight"] == 1 and where["output_norm.weight"] == 1
        layers = df.dropna(subset=["layer"]).groupby("layer")["device"].agg(set)
        assert all(len(s) == 1 for s in layers)  # a block is never split
        devs = [next(iter(s)) for s in layers.sort_index()]
        assert devs == sorted(devs) and set(devs) == {0, 1}  # a run of whole blocks each, in order
        for name, dt in r.items():
            assert dt.device == where[name]
        assert r.devices == (0, 1) and "devices=[0, 1]" in repr(r)


def test_default_placement_follows_free_memory():
    from types import SimpleNamespace as T

    from gguf_gpu_lab.loader.placement import by_layer

    # embeddings, 40 blocks of 3 tensors, final norm and output: 100 bytes each
    names = ["token_embd.weight"] + [f"blk.{i}.{k}.weight" for i in range(40) for k in ("q", "k", "ffn")]
    names += ["output_norm.weight", "output.weight"]
    ts = [T(name=n, offset=i) for i, n in enumerate(names)]
    out = {n: 100 for n in names}
    where = by_layer(ts, [0, 1], out, {0: 3000, 1: 1000})
    share0 = sum(out[n] for n in names if where[n] == 0) / sum(out.values())
    assert abs(share0 - 0.75) <= 300 / sum(out.values())  # within one block of three quarters
    where = by_layer(ts, [0, 1, 2], out, {0: None, 1: 5, 2: 5})  # one unknown: equal shares
    per = [sum(out[n] for n in names if where[n] == d) for d in (0, 1, 2)]
    assert max(per) - min(per) <= 300 and where["output.weight"] == 2 and where["token_embd.weight"] == 0


def test_free_memory_is_reported_per_device(small_model, free):
    with open_model(small_model) as m:
        total = sum(t.n_elements * 2 for t in m.tensors)
        free(0, 3 * total)
        free(1, total)
        s = load(m, device=[0, 1], backend="host", mode="raw").place.summary().set_index("device")
        assert s["fits"].all() and s.loc[0, "free_bytes"] == 3 * total and s.loc[1, "free_bytes"] == total


def test_placement_by_mapping_prefix_dataframe_and_function(small_model):
    with open_model(small_model) as m:
        r = load(m, device=[0, 1], placement={"blk.1": 0, "output.weight": 0, "": 1}, backend="host")
        assert r["blk.1.ffn_up.weight"].device == 0 and r["output.weight"].device == 0
        assert r["blk.0.ffn_up.weight"].device == 1 and r["token_embd.weight"].device == 1
        again = load(m, device=[0, 1], placement=r.placement, backend="host")  # a previous placement, reused
        assert all(again[n].device == r[n].device for n in r)
        odd = load(m, device=[1, 0], placement=lambda t: (t.layer or 0) % 2, backend="host")
        assert all(odd[t.name].device == (t.layer or 0) % 2 for t in m.tensors)
        with pytest.raises(GGUFLabError, match="no device for tensor 'token_embd.weight'"):
            load(m, device=[0, 1], placement={"blk": 0}, backend="host")
        with pytest.raises(GGUFLabError, match="on device 2, which is not one of the load's devices"):
            load(m, device=[0, 1], placement={"": 2}, backend="host")
        with pytest.raises(GGUFLabError, match="pass device="):
            load(m, placement={"": 0}, backend="host")


def test_devices_are_checked(small_model, monkeypatch):
    assert resolve_devices([1, 0], 2) == (1, 0) and resolve_devices("all", 3) == (0, 1, 2)
    for bad, msg in [([], "empty"), ([0, 0], "twice"), ([0, 2], "not a device here"), ("gpus", "'all'"),
                     ([0, "1"], "not a device")]:
        with pytest.raises(GGUFLabError, match=msg):
            resolve_devices(bad, 2)
    monkeypatch.setenv("GGUF_LAB_HOST_DEVICES", "3")
    r = load(small_model, device="all", backend="host")
    assert r.devices == (0, 1, 2) and {dt.device for dt in r.values()} == {0, 1, 2}
    with pytest.raises(GGUFLabError, match="backend as a name"):
        load(small_model, device=[0, 1], backend=get_backend("host"))


def test_a_placement_that_does_not_fit_names_every_device(small_model, free, monkeypatch):
    from gguf_gpu_lab.loader import pipeline

    allocated = []
    monkeypatch.setattr(pipeline, "alloc_outputs", lambda *a: allocated.append(a) or {})
    free(0, 1 << 40)
    free(1, 1000)
    with open_model(small_model) as m:
        with pytest.raises(DeviceMemoryError) as e:
            load(m, device=[0, 1], backend="host", chunk_mb=0.05)
    msg = str(e.value)
    assert "device 0 needs" in msg and f"{1 << 40} bytes" in msg and "device 1 needs" in msg
    assert "1000 bytes (0.00 GB) free (short)" in msg and str(small_model) in msg
    assert not allocated and not _threads() and _rings_back()  # nothing allocated, nothing left


@pytest.mark.parametrize("mode", ["gpu", "raw", "cpu", "sequential"])
def test_outputs_equal_a_single_device_load(all_types_model, mode):
    with open_model(all_types_model) as m:
        one = load(m, mode=mode, dtype="float32", chunk_mb=0.05, backend="host")
        two = load(m, mode=mode, dtype="float32", chunk_mb=0.05, streams=2, readers=3, device=[0, 1], backend="host")
        assert set(two) == set(one) and two.file_bytes == one.file_bytes and two.out_bytes == one.out_bytes
        for name in one:
            assert two[name].array.shape == one[name].array.shape
            assert np.array_equal(two[name].array.view(np.uint8), one[name].array.view(np.uint8)), name
        assert {dt.device for dt in two.values()} == {0, 1}
    assert not _threads() and _rings_back()


def test_chunks_never_span_devices_and_interleave(small_model):
    from gguf_gpu_lab.loader.plan import plan_sites

    with open_model(small_model) as m:
        ts = list(m.tensors)
        a, b = ts[: len(ts) // 3], ts[len(ts) // 3:]
        chunks = plan_sites([a, b], 64 << 10)
        assert [c.index for c in chunks] == list(range(len(chunks)))
        names = [{p.tensor.name for p in c.pieces} for c in chunks]
        assert all(n <= {t.name for t in (a, b)[c.site]} for n, c in zip(names, chunks))
        first_half = chunks[: len(chunks) // 2]
        assert {c.site for c in first_half} == {0, 1}  # both devices get work from the start


def test_profile_lanes_are_named_per_device(small_model):
    r = load(small_model, chunk_mb=0.05, streams=2, device=[0, 1], backend="host")
    df = r.profile.df
    lanes = set(df["lane"])
    assert {"gpu0/lane 0", "gpu0/lane 1", "gpu1/lane 0", "gpu1/lane 1"} <= lanes
    assert set(df.loc[df["lane"].str.startswith("gpu1/"), "device"]) == {1}
    assert set(df.loc[df["stage"] == "read", "device"]) == {-1}
    by = r.profile.stage_summary(by_device=True)
    assert {(0, "h2d"), (1, "h2d"), (0, "dequant"), (1, "dequant")} <= set(zip(by["device"], by["stage"]))
    ds = r.device_summary().set_index("device")
    assert ds["h2d_bytes"].sum() == r.file_bytes and (ds["h2d_gb_s"] > 0).all()
    assert (ds["file_bytes"] == ds["h2d_bytes"]).all()
    from gguf_gpu_lab import plots

    order = plots._lane_order(df["lane"])
    assert order[0].startswith("reader") and order[-1] == "setup"
    dev_lanes = [x for x in order if "/" in x]
    assert dev_lanes == sorted(dev_lanes, key=lambda x: (int(x[3]), int(x.split()[-1])))
    trace = r.profile.chrome_trace()["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    assert procs == {0: "host", 1: "gpu0", 2: "gpu1"}


@pytest.mark.parametrize("at", [1, 4])
@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_cancel_and_keyboard_interrupt_hand_back_every_ring(small_model, at, how):
    progress, stops = stopping_at(at, how)
    with pytest.raises(stops):
        load(small_model, chunk_mb=0.05, device=[0, 1], progress=progress, backend="host")
    assert not _threads() and _rings_back()
    assert len(load(small_model, device=[0, 1], backend="host")) > 0


def test_errors_in_a_lane_or_a_reader_hand_back_every_ring(small_model, monkeypatch):
    from gguf_gpu_lab import quant
    from gguf_gpu_lab.loader import pipeline

    real = quant.dequantize
    monkeypatch.setattr(quant, "dequantize", failing_on(6, real, RuntimeError("injected kernel failure")))
    with pytest.raises(RuntimeError, match="injected kernel failure"):
        load(small_model, chunk_mb=0.05, device=[0, 1], backend="host")
    assert not _threads() and _rings_back()
    monkeypatch.setattr(quant, "dequantize", real)
    monkeypatch.setattr(pipeline, "read_chunk", failing_on(5, pipeline.read_chunk, OSError("injected read failure")))
    with pytest.raises(OSError, match="injected read failure"):
        load(small_model, chunk_mb=0.05, device=[0, 1], backend="host")
    assert not _threads() and _rings_back()


def test_failed_allocation_on_the_second_device_frees_the_first(small_model, monkeypatch):
    """Device 1 runs out while its outputs are allocated (its free memory unknown beforehand):
    the outputs already made on device 0 go too, with the rings and the threads."""
    import weakref

    be1 = get_backend("host", 1)
    made = []
    real_empty = type(be1).empty

    def empty(self, n, dtype):
        if self.device == 1:
            raise DeviceMemoryError("out of memory on device 1 (injected)")
        a = real_empty(self, n, dtype)
        made.append(weakref.ref(a.base if a.base is not None else a))
        return a

    monkeypatch.setattr(type(be1), "empty", empty)
    with pytest.raises(DeviceMemoryError, match="device 1"):
        load(small_model, chunk_mb=0.05, device=[0, 1], backend="host")
    import gc

    gc.collect()
    assert made and all(w() is None for w in made)
    assert not _threads() and _rings_back()


def test_lazy_cache_and_preload_follow_the_placement(small_model):
    with open_model(small_model) as m:
        h = m.preload(device=[0, 1], backend="host", batch_mb=0.2, dtype="float32")
        x = m.tensor("output.weight", device=[0, 1], backend="host", dtype="float32")  # jumps the queue
        assert h.wait(timeout=60)
        assert x.device == 1 and m.cache_info()["loads"] == len(m.tensors)
        expected = load(m, device=[0, 1], backend="host").placement
        for name, d in zip(expected["tensor"], expected["device"]):
            t = m.tensor(name, device=[0, 1], backend="host", dtype="float32")
            assert t.device == d, name
        assert m.cache_info()["loads"] == len(m.tensors)  # all served from the cache
        assert np.array_equal(m.tensor("blk.1.attn_v.weight", device=[0, 1], backend="host", dtype="float32").numpy(),
                              m.dequantize("blk.1.attn_v.weight"))
        one = m.tensor("output.weight", backend="host", dtype="float32")  # device 0: another entry
        assert one.device == 0 and one is not x
    assert not _threads()


def test_place_is_pure(small_model):
    with open_model(small_model) as m:
        p = place(m.tensors, [0, 1, 2], "gpu", "float16", {0: 100, 1: 100, 2: 100})
        s = p.summary()
        assert list(s["device"]) == [0, 1, 2] and not s["fits"].any()
        assert p.where["token_embd.weight"] == 0 and p.where["output.weight"] == 2
        with pytest.raises(DeviceMemoryError, match="device 2 needs"):
            p.check("m.gguf")
        assert "layers" in str(p)


def test_cli_load_on_two_devices_prints_the_placement(small_model, capsys):
    from gguf_gpu_lab.cli import main

    assert main(["load", str(small_model), "--device", "0,1", "--backend", "host", "--chunk-mb", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "placement over devices 0, 1" in out and "need_bytes" in out and "h2d_gb_s" in out
    with pytest.raises(SystemExit):
        main(["load", str(small_model), "--device", "0,x", "--backend", "host"])
    assert "--device: expected" in capsys.readouterr().err


def test_load_lab_offers_the_devices(small_model, monkeypatch):
    pytest.importorskip("ipywidgets")
    from gguf_gpu_lab.widgets import LoadLab

    one = LoadLab(str(small_model), backend="host")
    assert one.device is None
    monkeypatch.setenv("GGUF_LAB_HOST_DEVICES", "2")
    lab = LoadLab(str(small_model), backend="host")
    assert [v for _, v in lab.device.options] == [0, 1, "all"]
    lab.device.value = "all"
    lab.chunk_mb.value = 0.25
    r = lab.on_run()
    assert r.devices == (0, 1) and "all" in list(lab.runs)[-1] and "device" in lab.summary.value
    lab.device.value = 1
    r = lab.on_run()  # (the lab drops the arrays of the runs it keeps)
    assert r.profile.meta["devices"] == [1] and r.place is None


def test_one_device_as_a_numpy_integer_and_placement_without_devices(small_model):
    r = load(small_model, device=np.int64(1), backend="host", tensors=["output.weight"])
    assert r.place is None and r["output.weight"].device == 1
    with open_model(small_model) as m:
        assert m.tensor("output.weight", device=np.int64(1), backend="host").device == 1
        with pytest.raises(GGUFLabError, match="pass device="):
            m.tensor("output.weight", placement={"": 0}, backend="host")
