"""Resource safety on the host backend: injected errors, KeyboardInterrupt, shrinking files."""

import os
import threading

import numpy as np
import pytest

from gguf_gpu_lab import GGUFLabError, LoadCancelled, SourceChangedError, open_model
from gguf_gpu_lab.loader import load

from .faults import failing_on
from .threads import lab_threads


_lab_threads = lab_threads


def test_error_in_a_lane_operation_is_raised_and_cleaned_up(small_model, monkeypatch):
    from gguf_gpu_lab import quant

    real = quant.dequantize
    monkeypatch.setattr(quant, "dequantize", failing_on(5, real, RuntimeError("injected kernel failure")))
    with pytest.raises(RuntimeError, match="injected kernel failure"):
        load(small_model, mode="gpu", chunk_mb=0.05, backend="host")
    assert not _lab_threads()
    monkeypatch.setattr(quant, "dequantize", real)
    assert len(load(small_model, backend="host")) > 0


@pytest.mark.parametrize("at", [1, 4, 9])
def test_keyboard_interrupt_at_random_points(small_model, at):
    seen = []

    def progress(done, total, name):
        seen.append(done)
        if len(seen) == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load(small_model, chunk_mb=0.05, progress=progress, backend="host")
    assert not _lab_threads()
    r = load(small_model, backend="host")
    with open_model(small_model) as m:
        assert np.array_equal(r["output.weight"].numpy().reshape(-1), m.dequantize("output.weight", "float16").reshape(-1))


def test_cancel_event_from_another_thread(small_model):
    cancel = threading.Event()

    def progress(done, total, name):
        cancel.set()  # as a UI's cancel button would, from elsewhere

    with pytest.raises(LoadCancelled):
        load(small_model, chunk_mb=0.05, progress=progress, cancel=cancel, backend="host")
    assert not _lab_threads()


@pytest.mark.parametrize("read", ["preadv", "mmap"])
def test_file_shrinking_after_open_is_an_error_not_a_crash(small_model, tmp_path, read):
    p = tmp_path / "shrinks.gguf"
    p.write_bytes(small_model.read_bytes())
    with open_model(p) as m:
        os.truncate(p, m.data_offset + 1000)
        with pytest.raises(SourceChangedError, match="changed after it was opened: its size went from"):
            load(m, read=read, chunk_mb=0.05, backend="host")
        with pytest.raises(SourceChangedError, match="changed after it was opened"):
            m.dequantize("output.weight")
    assert not _lab_threads()


def test_eight_threads_and_a_preload_load_each_tensor_once(small_model):
    with open_model(small_model) as m:
        names = [t.name for t in m.tensors]
        h = m.preload(backend="host", batch_mb=0.1, dtype="float32")
        got: dict = {}
        errors = []

        def worker(i):
            try:
                for n in names[i::2] + names[::-1][i::3]:
                    got[(i, n)] = m.tensor(n, dtype="float32", backend="host")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ths = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        h.wait()
        assert not errors
        assert m.cache_info()["loads"] == len(names)  # exactly once each
        for (i, n), dt in got.items():
            assert dt is m.tensor(n, dtype="float32", backend="host")
        for n in names[:10]:
            assert np.array_equal(m.tensor(n, dtype="float32", backend="host").numpy(), m.dequantize(n))
    assert not _lab_threads()
