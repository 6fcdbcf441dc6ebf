"""Never wrong bytes: a model reads the file it opened, whatever happens to the path; a file
changed in place is an error naming it; the shared model, the lazy cache and the preload are
made once under concurrency; nothing leaks on the way out."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

import gguf_gpu_lab as lab
from gguf_gpu_lab import GGUFLabError, SourceChangedError, open_model
from gguf_gpu_lab.loader import load
from gguf_gpu_lab.source import LocalFile

from .threads import lab_threads

MODES = ["gpu", "raw", "cpu", "sequential"]
READS = ["mmap", "preadv"]
CHANGES = ["replace", "truncate", "append", "rewrite", "rewrite-old-time"]


_lab_threads = lab_threads


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _copy(src, dst) -> str:
    """A copy of ``src`` whose modification time is an hour old, as a file downloaded earlier is
    (so that a change in place shows in the time even where the clock is coarse)."""
    shutil.copyfile(src, dst)
    old = time.time() - 3600
    os.utime(dst, (old, old))
    return str(dst)


def _change(path: str, how: str, model) -> None:
    """Change the file at ``path`` the way ``how`` says; the tensor data differs afterwards."""
    if how == "replace":  # as downloaders and huggingface_hub update a file: a new inode
        data = bytearray(open(path, "rb").read())
        data[model.data_offset:] = bytes(len(data) - model.data_offset)  # same header, other tensor bytes
        tmp = path + ".new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    elif how == "truncate":
        os.truncate(path, model.data_offset + 1000)
    elif how == "append":
        with open(path, "ab") as f:
            f.write(b"\x01" * 4096)
    elif how in ("rewrite", "rewrite-old-time"):  # in place, same size: other tensor bytes
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(model.data_offset)
            f.write(b"\x55" * (os.path.getsize(path) - model.data_offset))
        if how == "rewrite-old-time":  # another file of the same size (another header: its name) written
            _rename_model_in_place(path)  # over it, and the old modification time put back, as cp -p does
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # pragma: no cover
        raise ValueError(how)


def _rename_model_in_place(path: str) -> None:
    """One letter of the header's ``general.name`` changed, in place."""
    with open(path, "r+b") as f:
        head = f.read(1 << 20)
        at = head.index(b"synthetic")
        f.seek(at)
        f.write(b"S")


@pytest.fixture(scope="module")
def reference(small_model):
    """Every tensor of the pristine file, per mode (float32)."""
    return {mode: {n: t.numpy().copy() for n, t in load(small_model, mode=mode, dtype="float32", backend="host").items()}
            for mode in MODES}


def _same(r, ref) -> None:
    assert set(r) == set(ref)
    for n, t in r.items():
        assert np.array_equal(t.numpy(), ref[n], equal_nan=True), n


def _expect(how, run, ref, path):
    """A replaced file gives the original bytes; a file changed in place an error naming it."""
    if how == "replace":
        _same(run(), ref)
        return
    with pytest.raises(SourceChangedError, match="changed after it was opened") as e:
        run()
    assert path in str(e.value)


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", CHANGES)
def test_file_changed_between_open_and_load(small_model, tmp_path, reference, how, mode, read):
    path = _copy(small_model, tmp_path / "m.gguf")
    name = "blk.0.attn_q.weight"
    with open_model(small_model) as pristine:
        raw0 = pristine.raw(name, mapped=False)
    fds = _fds()
    with open_model(path) as m:
        _change(path, how, m)
        _expect(how, lambda: load(m, mode=mode, read=read, dtype="float32", chunk_mb=0.25, backend="host"),
                reference[mode], path)
        for mapped in (True, False):  # raw() and dequantize() read the same way
            if how == "replace":
                assert np.array_equal(m.dequantize(name), reference["cpu"][name])
                assert np.array_equal(m.raw(name, mapped=mapped), raw0)
            else:
                with pytest.raises(SourceChangedError, match=path.replace(".", r"\.")):
                    m.raw(name, mapped=mapped)[0]  # noqa: B018 (preadv reads; a view is checked first)
    assert not _lab_threads()
    assert _fds() <= fds


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", CHANGES)
def test_file_changed_during_a_load(small_model, tmp_path, reference, monkeypatch, how, mode, read):
    """The change lands between two reads of one load (the third): from the mapping, just
    before a chunk's check; with preadv, just before a read. One reader, so that no other
    thread is copying out of the mapping at that moment (a truncation racing a copy from the
    mapping is the one thing ``read="mmap"`` cannot turn into an error: see ``load``)."""
    path = _copy(small_model, tmp_path / "m.gguf")
    with open_model(path) as m:
        src = m.source
        hook = "check" if read == "mmap" else "read_into"
        real = getattr(src, hook)
        calls = []

        def changing(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                _change(path, how, m)
            return real(*a, **k)

        monkeypatch.setattr(src, hook, changing)
        _expect(how, lambda: load(m, mode=mode, read=read, dtype="float32", chunk_mb=0.05, readers=1,
                                  backend="host"), reference[mode], path)
        assert len(calls) >= 3  # the change did happen inside the load
    assert not _lab_threads()


def test_shared_model_reparses_a_replaced_file_and_old_models_keep_their_bytes(small_model, tmp_path, reference):
    path = _copy(small_model, tmp_path / "m.gguf")
    old = lab.model.shared_model(path)
    assert lab.model.shared_model(path) is old
    _change(path, "replace", old)
    new = lab.model.shared_model(path)
    assert new is not old
    _same(load(old, mode="gpu", dtype="float32", backend="host"), reference["gpu"])  # the file it opened
    zeros = load(path, mode="raw", backend="host")  # a path: the file there now
    assert all(not t.numpy().any() for t in zeros.tensors.values())


def _two_tensor_file(path, first, second) -> None:
    """A file of two 64x64 tensors, 1.0 and 2.0, of the dtypes ``first`` and ``second``: float32
    then float16, and the other way round, give files of one size whose tensors start at other
    offsets with other types."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a.weight", np.full((64, 64), 1.0, first))
    w.add_tensor("b.weight", np.full((64, 64), 2.0, second))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_file_rewritten_with_its_old_time_is_parsed_again(tmp_path):
    """Another file of the same size, names and order written over a loaded one in place, with
    its modification time put back: a load by path parses the new header (the status-change
    time moved) and never reads the new bytes with the old types or plan."""
    v1, v2, path = tmp_path / "v1.gguf", tmp_path / "v2.gguf", tmp_path / "m.gguf"
    _two_tensor_file(v1, np.float32, np.float16)
    _two_tensor_file(v2, np.float16, np.float32)
    assert os.path.getsize(v1) == os.path.getsize(v2)
    shutil.copyfile(v1, path)
    st = os.stat(path)
    first = load(path, backend="host", dtype="float32")
    assert first["a.weight"].numpy().min() == 1.0 and first["b.weight"].numpy().min() == 2.0
    with open(path, "r+b") as f:
        f.write(v2.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    for again in (load(path, backend="host", dtype="float32"),
                  load(open_model(path, warmup=False), backend="host", dtype="float32")):
        for name, value in (("a.weight", 1.0), ("b.weight", 2.0)):
            t = again[name].numpy()
            assert t.min() == value and t.max() == value, name


def _chmod(path):
    os.chmod(path, 0o444)


def _move(path):
    os.rename(path, path + ".moved")


def _link_and_unlink(path):
    os.link(path, path + ".backup")
    os.unlink(path + ".backup")


def _access_time(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))


@pytest.mark.parametrize("act", [_chmod, _move, _link_and_unlink, _access_time])
def test_a_status_change_that_leaves_the_bytes_is_no_error(small_model, tmp_path, reference, act):
    """A rename, chmod, link or access time moves the file's status-change time, as a rewrite
    with its old modification time put back does: the header is the one parsed, so the model
    reads on."""
    path = _copy(small_model, tmp_path / "m.gguf")
    with open_model(path) as m:
        act(path)
        _same(load(m, mode="gpu", dtype="float32", backend="host"), reference["gpu"])
        assert len(m.metadata_value("tokenizer.ggml.tokens")) > 0


def test_a_rewritten_header_is_seen_whatever_the_link_count(small_model, tmp_path):
    """A link made (the link count moves), then the header rewritten in place with its old
    modification time put back: still a SourceChangedError."""
    path = _copy(small_model, tmp_path / "m.gguf")
    with open_model(path) as m:
        st = os.stat(path)
        os.link(path, tmp_path / "backup.gguf")
        _rename_model_in_place(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(SourceChangedError, match="header was rewritten in place"):
            load(m, mode="raw", backend="host")


def test_a_header_rewritten_while_it_is_parsed_is_an_error(small_model, tmp_path, monkeypatch):
    """The header changes (old modification time put back) between the parse and the CRC that
    check() compares later: the open fails, rather than keep a CRC of bytes it did not parse."""
    import gguf_gpu_lab.model as model_mod

    path = _copy(small_model, tmp_path / "m.gguf")
    real = model_mod.read_header

    def parse_then_change(source):
        h = real(source)
        st = os.stat(path)
        _rename_model_in_place(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return h
    monkeypatch.setattr(model_mod, "read_header", parse_then_change)
    fds = _fds()
    with pytest.raises(SourceChangedError, match="status changed while its header was read"):
        open_model(path, warmup=False)
    assert _fds() <= fds


@pytest.mark.parametrize("how", ["rewrite", "rewrite-old-time", "truncate"])
def test_metadata_of_a_file_changed_in_place_is_an_error(small_model, tmp_path, how):
    """metadata_value decodes from the file's mapping: after a change in place it raises, never
    the new bytes read with the old header; what it gave before stays as it was."""
    path = _copy(small_model, tmp_path / "m.gguf")
    with open_model(path) as m:
        tokens, scores = m.metadata_value("tokenizer.ggml.tokens"), m.metadata_value("tokenizer.ggml.scores")
        kept = scores.copy()
        with open(path, "r+b") as f:  # the header itself: the tokens' bytes
            data = f.read(m.data_offset)
            at = data.index(tokens[-1].encode())
        st = os.stat(path)
        if how == "truncate":
            os.truncate(path, m.data_offset + 100)
        else:
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(b"X" * len(tokens[-1].encode()))
            if how == "rewrite-old-time":
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
            with pytest.raises(SourceChangedError, match="changed after it was opened"):
                m.metadata_value(key)
        assert np.array_equal(scores, kept)


def test_shared_model_from_eight_threads_parses_once(small_model, tmp_path, monkeypatch):
    path = _copy(small_model, tmp_path / "m.gguf")
    parses = []
    real = lab.model.GGUFModel.__init__

    def slow_init(self, *a, **k):
        parses.append(1)
        time.sleep(0.05)  # a window in which the other threads ask for the same file
        real(self, *a, **k)

    monkeypatch.setattr(lab.model.GGUFModel, "__init__", slow_init)
    go = threading.Barrier(8)
    got = []

    def worker():
        go.wait()
        got.append(lab.model.shared_model(path))

    ths = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    assert len(parses) == 1 and len(got) == 8 and all(m is got[0] for m in got)


def test_shared_model_parse_error_reaches_every_waiter(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 60)
    go = threading.Barrier(8)
    errors = []

    def worker():
        go.wait()
        try:
            lab.model.shared_model(path)
        except GGUFLabError as e:
            errors.append(e)

    ths = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    assert len(errors) == 8 and all(str(path) in str(e) for e in errors)
    assert not lab.model._PARSING  # nothing left claimed: the next call parses again
    with pytest.raises(GGUFLabError):
        lab.model.shared_model(path)


def test_one_cache_per_model_under_eight_threads(small_model):
    from gguf_gpu_lab import cache

    with open_model(small_model) as m:
        go = threading.Barrier(8)
        states = []

        def worker():
            go.wait()
            states.append(cache._state(m))

        ths = [threading.Thread(target=worker) for _ in range(8)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        assert len(states) == 8 and all(s is states[0] for s in states)
        assert len(m._close_hooks) == 1  # registered once


def test_tensor_preload_and_load_from_eight_threads(small_model):
    with open_model(small_model) as m:
        names = [t.name for t in m.tensors]
        go = threading.Barrier(8)
        handles, refused, errors, got = [], [], [], {}

        def worker(i):
            go.wait()
            try:
                if i % 3 == 0:
                    try:
                        handles.append(m.preload(backend="host", batch_mb=0.05, dtype="float32"))
                    except GGUFLabError as e:
                        assert "already running" in str(e)
                        refused.append(e)
                elif i % 3 == 1:
                    for n in names[i::2]:
                        got[(i, n)] = m.tensor(n, dtype="float32", backend="host")
                else:
                    r = load(m, dtype="float32", backend="host", tensors=names[:5])
                    assert len(r) == 5
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ths = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        for h in handles:
            h.wait()
        assert not errors
        assert handles and len(handles) + len(refused) == 3
        assert m.cache_info()["loads"] == len(names)  # each tensor once, whoever asked first
        for (i, n), t in got.items():
            assert t is m.tensor(n, dtype="float32", backend="host")
            assert np.array_equal(t.numpy(), m.dequantize(n))
    assert not _lab_threads()


def test_first_error_of_the_load_is_kept(small_model, monkeypatch):
    """Every reader fails at once; the error raised is the first recorded, never replaced."""
    from gguf_gpu_lab.loader import pipeline

    go = threading.Barrier(4, timeout=5)
    raised = []

    def broken(source, pieces, slot, mapped):
        try:
            go.wait()
        except threading.BrokenBarrierError:
            pass
        e = OSError(f"reader failure {len(raised)}")
        raised.append(e)
        raise e

    monkeypatch.setattr(pipeline, "read_chunk", broken)
    with pytest.raises(OSError, match="reader failure") as e:
        load(small_model, chunk_mb=0.05, readers=4, backend="host")
    assert e.value in raised
    assert not _lab_threads()


def test_fault_before_the_load_starts_leaks_no_descriptor_or_thread(small_model, monkeypatch):
    from gguf_gpu_lab.loader import pipeline

    with open_model(small_model) as m:
        load(m, backend="host")  # the first load's buffers and imports, out of the count
        fds = _fds()
        for where in ("_prepare_kernels", "_ring_size"):
            def boom(*a, **k):
                raise RuntimeError(f"injected in {where}")

            monkeypatch.setattr(pipeline.Pipeline, where, boom)
            with pytest.raises(RuntimeError, match="injected"):
                load(m, backend="host", mode="gpu")
            monkeypatch.undo()
        assert _fds() == fds and not _lab_threads()
        assert len(load(m, backend="host")) == len(m.tensors)


def test_open_and_close_leak_no_descriptor(small_model, tmp_path):
    import gc

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    gc.collect()
    fds = _fds()
    for _ in range(20):
        with pytest.raises(GGUFLabError):
            open_model(bad)
        with open_model(small_model) as m:
            m.dequantize("blk.0.attn_q.weight")
    gc.collect()
    assert _fds() == fds


def test_close_during_a_load_waits_for_it(small_model):
    """A model closed while a load reads it: the descriptor stays open until the load ends, so
    the load never reads through a number the system has handed to another file."""
    m = open_model(small_model)
    started, release = threading.Event(), threading.Event()

    def progress(done, total, name):
        started.set()
        release.wait(5)

    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", load(m, chunk_mb=0.05, readers=1, progress=progress,
                                                                   backend="host")))
    th.start()
    assert started.wait(5)
    m.close()
    assert m.closed
    release.set()
    th.join()
    assert len(out["r"]) == len(m.tensors)
    with pytest.raises(GGUFLabError, match="closed"):
        load(m, backend="host")
    assert m._source._fd == -1  # freed by the load, the last user


def test_closed_model_still_displays(small_model):
    m = open_model(small_model)
    arch = m.architecture
    m.close()
    assert m.architecture == arch and "closed" in repr(m)
    assert "<table>" in m._repr_html_() and m.summary()["n_tensors"] == len(m.tensors)
    with pytest.raises(GGUFLabError, match="closed"):
        m.raw("output.weight")


def test_local_file_errors_name_the_file(tmp_path):
    with pytest.raises(lab.ModelNotFoundError, match="nope.gguf"):
        LocalFile(tmp_path / "nope.gguf")
    with pytest.raises(GGUFLabError, match="not a regular file"):
        LocalFile(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFLabError, match="0 bytes"):
        LocalFile(tmp_path / "empty.gguf")


def test_a_fifo_is_refused_at_once(tmp_path):
    """Opening a FIFO blocks until a writer comes: the open does not wait, and says what it is."""
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(GGUFLabError, lab.open_model, fifo)), daemon=True)
    t.start()
    t.join(10)
    assert done and "a FIFO, not a regular file" in str(done[0].value) and "pipe.gguf" in str(done[0].value)


def test_a_growing_file_is_the_prefix_its_identity_describes(small_model, tmp_path, monkeypatch):
    """A file that grows between the stat and the mapping (a download still running) maps the
    size the identity records, so the parse sees that prefix and the next check sees the growth:
    a SourceChangedError, never a bare ValueError from a mapping longer than the identity."""
    import gguf_gpu_lab.source as source

    p = tmp_path / "grow.gguf"
    shutil.copy(small_model, p)
    real = source.mmap.mmap

    def grow_then_map(fd, length, **kw):
        with open(p, "ab") as f:
            f.write(b"\0" * 4096)
        return real(fd, length, **kw)

    monkeypatch.setattr(source.mmap, "mmap", grow_then_map)
    src = LocalFile(p)
    assert len(src.header()) == src.size == os.path.getsize(small_model)
    with pytest.raises(lab.SourceChangedError, match="grow.gguf"):
        src.check()
    src.close()


@pytest.mark.parametrize("mode", ["cpu", "sequential", "gpu"])
def test_preadv_survives_a_truncation_at_any_moment(small_model, tmp_path, mode):
    """read="preadv" never touches the mapping, in any mode: a truncation racing the readers
    (from another thread, at a different moment each try) is an error, never SIGBUS."""
    for i in range(6):
        path = _copy(small_model, tmp_path / f"m{i}.gguf")
        with open_model(path) as m:
            at = m.data_offset + 1000
            th = threading.Timer(0.002 * i, os.truncate, (path, at))
            th.start()
            try:
                r = load(m, mode=mode, read="preadv", dtype="float32", chunk_mb=0.05, readers=4, backend="host")
            except SourceChangedError as e:
                assert path in str(e)
            else:  # finished before the truncation
                assert len(r) == len(m.tensors)
            th.join()
    assert not _lab_threads()


def test_file_urls_are_decoded(small_model, tmp_path):
    """file:// URLs as RFC 8089 writes them: percent-escapes decoded, ``localhost`` allowed; another
    host is refused by name (it was read as a relative path)."""
    import pathlib
    import urllib.parse

    p = tmp_path / "sp ace \u00fc.gguf"
    shutil.copy(small_model, p)
    for url in (pathlib.Path(p).as_uri(), "file://localhost" + urllib.parse.quote(str(p))):
        with open_model(url) as m:
            assert m.path == str(p) and len(m.tensors) > 0, url
    with pytest.raises(GGUFLabError, match="'otherhost'"):
        open_model("file://otherhost" + urllib.parse.quote(str(p)))
    odd = tmp_path / "a#1?.gguf"  # a name may hold them: part of the path, not a fragment or query
    shutil.copy(small_model, odd)
    for url in ("file://" + str(odd), "FILE://" + str(odd)):
        with open_model(url) as m:
            assert m.path == str(odd), url


def test_a_file_that_shrinks_before_its_mapping_is_a_change(small_model, tmp_path, monkeypatch):
    import gguf_gpu_lab.source as source

    p = tmp_path / "shrink.gguf"
    shutil.copy(small_model, p)
    real = source.mmap.mmap

    def shrink_then_map(fd, length, **kw):
        os.truncate(p, 1000)
        return real(fd, length, **kw)

    monkeypatch.setattr(source.mmap, "mmap", shrink_then_map)
    with pytest.raises(lab.SourceChangedError, match="shrink.gguf.*size went from"):
        LocalFile(p)
