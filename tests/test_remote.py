"""Remote files: a real HTTP server on 127.0.0.1 (tools/http_server.py) serves synthetic models at
plain URLs and in the Hub's layout (HF_ENDPOINT pointing at it), and injects faults. Tensors
loaded from a URL are bit-identical to the local load in every mode; opening fetches at most the
header and 1 MiB; every fault ends as stated, with nothing leaked."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from gguf_gpu_lab import GGUFLabError, LoadCancelled, SourceChangedError, open_model
from gguf_gpu_lab.errors import RemoteError, RemoteNotFoundError, RemoteWarning
from gguf_gpu_lab.header import Header, NeedMore, read_header
from gguf_gpu_lab.loader import load
from gguf_gpu_lab.model import shared_model
from gguf_gpu_lab.remote import HEADER_STEP, fetch_lanes, redact
from gguf_gpu_lab.source import LocalFile
from gguf_gpu_lab.tools.http_server import COMMIT, serve

from .faults import stopping_at
from .threads import lab_threads

MODES = ["gpu", "raw", "cpu", "sequential"]


_lab_threads = lab_threads


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled_fds(limit: int) -> int:
    """Descriptors once the in-process server has seen the client's connections close (its
    handler threads close their ends when they read the end of the stream)."""
    for _ in range(100):
        n = _fds()
        if n <= limit:
            return n
        time.sleep(0.02)
    return n


@pytest.fixture(scope="module")
def files(small_model, tmp_path_factory):
    """A private copy of the small model (tests change it) and the pristine one."""
    d = tmp_path_factory.mktemp("served")
    shutil.copyfile(small_model, d / "small.gguf")
    return {"small.gguf": str(d / "small.gguf")}


@pytest.fixture(scope="module")
def reference(small_model):
    return {mode: {n: t.numpy().copy() for n, t in load(small_model, mode=mode, dtype="float32", backend="host").items()}
            for mode in MODES}


@pytest.fixture
def srv(files, monkeypatch):
    with serve(files) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield s


def _same(r, ref) -> None:
    assert set(r) == set(ref)
    for n, t in r.items():
        assert np.array_equal(t.numpy(), ref[n], equal_nan=True), n


@pytest.mark.parametrize("scheme", ["http", "hf"])
def test_open_fetches_header_and_at_most_1mib(srv, small_model, scheme):
    url = srv.url("small.gguf") if scheme == "http" else "hf://org/repo/small.gguf"
    with open_model(url) as m, open_model(small_model) as local:
        assert srv.served <= local.data_offset + HEADER_STEP + 1  # + the probe's one byte
        assert m.metadata == local.metadata
        assert m.tensors_df().drop(columns=[]).equals(local.tensors_df())
        assert m.summary()["file_size"] == local.file_size
        before = srv.served
        name = "blk.0.attn_q.weight"
        assert np.array_equal(m.raw(name), local.raw(name))
        assert srv.served - before == local.info(name).n_bytes  # that tensor's bytes only
        assert np.array_equal(m.dequantize(name), local.dequantize(name))


@pytest.mark.parametrize("mode", MODES)
def test_load_bit_identical(srv, reference, mode):
    for url in (srv.url("small.gguf"), "hf://org/repo/small.gguf@main"):
        with open_model(url) as m:
            _same(load(m, mode=mode, dtype="float32", backend="host", readers=3, chunk_mb=0.25), reference[mode])


def test_prefix_grows_until_the_header_parses(tmp_path):
    """A header bigger than the first fetch (a 150,000-token vocabulary): the parse asks for
    more, in a few requests, and opening fetches no more than the header and 1 MiB."""
    import gguf

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"token-{i:06d}" for i in range(150_000)])  # ~3 MB of strings
    w.add_tensor("t", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_model(path) as local, serve({"vocab.gguf": path}) as s, open_model(s.url("vocab.gguf")) as m:
        assert m.data_offset == local.data_offset > 2 * HEADER_STEP
        assert s.served <= local.data_offset + HEADER_STEP + 1
        assert 3 <= len(s.requests) <= 8  # the probe, then a few growing fetches
        assert m.metadata_value("tokenizer.ggml.tokens")[-1] == "token-149999"
        assert np.array_equal(m.dequantize("t"), np.arange(64, dtype=np.float32))
    with pytest.raises(NeedMore):
        Header(path.read_bytes()[:1000], str(path), size=os.path.getsize(path))


def test_faults_retried_and_identical(srv, reference):
    with open_model(srv.url("small.gguf")) as m:
        srv.reset_after, srv.resets = 100_000, 4  # connections reset mid-body: resumed where they broke
        _same(load(m, mode="gpu", dtype="float32", backend="host", readers=2, chunk_mb=0.5), reference["gpu"])
        assert srv.resets == 0
        srv.fail_5xx = 3
        _same(load(m, mode="raw", dtype="float32", backend="host", readers=2), reference["raw"])
        assert srv.fail_5xx == 0


def test_persistent_5xx_fails_naming_the_url(srv):
    threads, fds = _lab_threads(), _fds()
    m = open_model(srv.url("small.gguf"))
    srv.fail_5xx = 10_000
    with pytest.raises(RemoteError, match=r"small\.gguf: bytes .* failed 6 times in a row \(last: HTTP 500\)"):
        load(m, mode="gpu", backend="host", readers=2)
    m.close()
    assert _lab_threads() <= threads and _settled_fds(fds) <= fds


def test_server_that_ignores_range(srv):
    srv.ignore_range = True
    with pytest.raises(RemoteError, match="ignored the Range header"):
        open_model(srv.url("small.gguf"))


def test_file_changed_mid_load(srv, files):
    """The file is rewritten in place after the load's first chunk: a later answer's ETag
    differs, and the load is a SourceChangedError, never other bytes."""
    m = open_model(srv.url("small.gguf"))
    path = files["small.gguf"]
    data = open(path, "rb").read()

    def rewrite(done, total, name):
        if not rewrite.done:
            rewrite.done = True
            with open(path, "r+b") as f:  # same size, new bytes: a new ETag
                f.seek(m.data_offset)
                f.write(b"\x55" * 4096)
    rewrite.done = False
    try:
        with pytest.raises(SourceChangedError, match="ETag"):
            load(m, mode="raw", backend="host", readers=1, chunk_mb=0.0625, progress=rewrite)  # ~40 chunks, a ring of 9
        assert rewrite.done
    finally:
        with open(path, "wb") as f:
            f.write(data)
        m.close()


def test_a_file_that_shrank_is_a_change_not_an_http_error(srv, files):
    """A tensor past the new end of a file that shrank on the server: HTTP 416 is read as the
    change it is (SourceChangedError naming both sizes); both ETags are shown alike."""
    path = files["small.gguf"]
    data = open(path, "rb").read()
    m = open_model(srv.url("small.gguf"))
    try:
        with open(path, "r+b") as f:
            f.truncate(len(data) // 2)
        last = max(m.tensors, key=lambda t: t.offset).name
        with pytest.raises(SourceChangedError, match=rf"its size went from {len(data)} to {len(data) // 2} bytes "
                                                      r"\(HTTP 416 for bytes"):
            m.raw(last)
    finally:
        with open(path, "wb") as f:
            f.write(data)
        m.close()
    m = open_model(srv.url("small.gguf"))
    try:
        with open(path, "r+b") as f:
            f.seek(m.data_offset)
            f.write(b"\x55" * 64)
        with pytest.raises(SourceChangedError, match=r"its ETag went from '[0-9a-f]+' to '[0-9a-f]+'"):
            m.raw(m.tensors[0].name)
    finally:
        with open(path, "wb") as f:
            f.write(data)
        m.close()


def test_access_errors_one_line_without_token(srv):
    srv.deny.add("org/gated")
    with pytest.raises(RemoteError, match=r"^hf://org/gated/small\.gguf: the repository org/gated is gated") as e:
        open_model("hf://org/gated/small.gguf")
    assert "\n" not in str(e.value)
    with pytest.raises(RemoteNotFoundError, match=r"^hf://org/repo/nope\.gguf: file nope\.gguf not found"):
        open_model("hf://org/repo/nope.gguf")
    with pytest.raises(RemoteNotFoundError, match="HTTP 404"):
        open_model(srv.url("nope.gguf"))
    srv.token = "hf_secret_token_123"  # a private repo: the token opens it, and is never shown
    with pytest.raises(RemoteError) as e:
        open_model("hf://org/repo/small.gguf")
    assert "HF_TOKEN" in str(e.value) and "secret" not in str(e.value)
    with open_model("hf://org/repo/small.gguf", token="hf_secret_token_123") as m:
        assert "secret" not in repr(m) + m.path + str(m.source.identity)
        m.raw("output.weight")
    r = load("hf://org/repo/small.gguf", mode="raw", backend="host", token="hf_secret_token_123")  # as open_model
    assert "secret" not in repr(r) + r.profile.df.to_csv() + str(r.profile.chrome_trace())
    with pytest.raises(GGUFLabError, match="token= is for URLs"):
        load(files_path := srv.files["small.gguf"], token="hf_secret_token_123")
    assert os.path.exists(files_path)
    srv.token = None
    with pytest.raises(GGUFLabError, match=r"^hf://org/repo/small\.gguf@: an empty revision after '@'"):
        open_model("hf://org/repo/small.gguf@")
    url = srv.url("small.gguf").replace("http://", "http://user:hf_secret_token_123@") + "?sig=hf_secret_token_123"
    assert "secret" not in redact(url)


def test_open_retries_5xx_then_fails_in_one_line(srv, reference):
    srv.fail_5xx = 2  # transient at open: retried like any range
    with open_model(srv.url("small.gguf")) as m:
        _same(load(m, mode="raw", dtype="float32", backend="host"), reference["raw"])
    assert srv.fail_5xx == 0
    srv.fail_5xx = 10_000
    with pytest.raises(RemoteError, match=r"^http://127\.0\.0\.1:\d+/\S*small\.gguf: opening it failed 6 times in a "
                                          r"row \(last: HTTP 500\)$"):
        open_model(srv.url("small.gguf"))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_urls_are_one_line_without_credentials(monkeypatch):
    threads, fds = _lab_threads(), _fds()
    port = _closed_port()
    cases = {f"http://user:secret@127.0.0.1:{port}/x.gguf": f"^http://127\\.0\\.0\\.1:{port}/x\\.gguf: opening it "
             "failed 6 times in a row \\(last: connection refused\\)$",
             "http://user:secret@127.0.0.1:99999/x.gguf?sig=secret": r"^http://127\.0\.0\.1:99999/x\.gguf: not a URL "
             r"that can be read \(Port out of range",
             "http://user:secret@[::1/x.gguf?sig=secret": r"^http://\[::1/x\.gguf: not a URL that can be read "
             r"\(Invalid IPv6 URL\)$",
             f"ftp://user:secret@127.0.0.1:{port}/x.gguf": rf"^ftp://127\.0\.0\.1:{port}/x\.gguf: cannot reach the "
             r"store \(Connection refused\)$"}
    for url, pattern in cases.items():
        with pytest.raises(RemoteError, match=pattern) as e:
            open_model(url)
        assert "secret" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(RemoteError, match=rf"^hf://org/repo/x\.gguf: cannot reach the Hub at http://127\.0\.0\.1:{port}"):
        open_model("hf://org/repo/x.gguf")
    assert _lab_threads() <= threads and _settled_fds(fds) <= fds


def test_a_host_that_does_not_resolve_fails_at_once(monkeypatch):
    import socket

    calls = []

    def no_such_host(*a, **k):
        calls.append(a)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_such_host)  # no resolver is asked: the test stays offline
    with pytest.raises(RemoteError, match=r"^http://nowhere\.invalid/x\.gguf: cannot connect: host not found") as e:
        open_model("http://tok:secret@nowhere.invalid/x.gguf")
    assert "secret" not in str(e.value)
    assert len(calls) == 1  # not retried: another attempt would not cure it


@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_cancel_stops_every_connection(srv, how):
    threads, fds = _lab_threads(), _fds()
    m = open_model(srv.url("small.gguf"))
    progress, exc = stopping_at(2, how)
    with pytest.raises(exc):
        load(m, mode="gpu", backend="host", readers=3, chunk_mb=0.25, progress=progress)
    assert _lab_threads() <= threads
    assert _settled_fds(fds) <= fds  # every connection closed when the load ended, the model still open
    m.close()


def test_cache_path_then_local_and_resume(srv, tmp_path, reference):
    url = srv.url("small.gguf")
    dest = tmp_path / "copy.gguf"
    progress, _ = stopping_at(3, "cancel")
    with open_model(url, cache=dest) as m:  # interrupted: part of the file on disk
        with pytest.raises(LoadCancelled):
            load(m, mode="raw", backend="host", readers=1, chunk_mb=0.25, progress=progress)
    assert not dest.exists() and os.path.exists(str(dest) + ".gguf-lab-part")
    before = srv.served
    r = load(url, mode="gpu", dtype="float32", backend="host", cache=dest)  # resumes
    _same(r, reference["gpu"])
    size = os.path.getsize(dest)
    assert srv.served - before < size - 0.25 * (1 << 20)  # what was on disk was not fetched again
    assert open(dest, "rb").read() == open(srv.files["small.gguf"], "rb").read()
    before = srv.served
    with open_model(url, cache=dest) as m:  # the next open is local: one request checks the identity
        assert isinstance(m.source, LocalFile) and srv.served - before <= 1
    other = tmp_path / "mine.gguf"
    other.write_bytes(b"not a cache")
    with pytest.raises(GGUFLabError, match="did not write"):
        open_model(url, cache=other)
    assert other.read_bytes() == b"not a cache"


def test_two_urls_of_one_name_do_not_replace_each_others_copy(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
    folder = tmp_path / "c"
    folder.mkdir()
    load(srv.url("small.gguf"), mode="raw", backend="host", cache=folder)
    before = sorted(os.listdir(folder)), (folder / "small.gguf").read_bytes()
    with pytest.raises(GGUFLabError, match=r"small\.gguf: holds the cached copy of http://.*small\.gguf, not of "
                                          r"hf://org/repo/small\.gguf; cache it under another path"):
        open_model("hf://org/repo/small.gguf", cache=folder)
    assert (sorted(os.listdir(folder)), (folder / "small.gguf").read_bytes()) == before


def test_a_cache_folder_named_with_a_slash_is_made(srv, tmp_path, reference):
    dest = tmp_path / "new" / "dir"
    _same(load(srv.url("small.gguf"), mode="raw", dtype="float32", backend="host", cache=f"{dest}/"),
          reference["raw"])
    assert sorted(os.listdir(dest)) == ["small.gguf", "small.gguf.gguf-lab.json"]


def test_cache_hf_layout(srv, tmp_path, monkeypatch, reference):
    from huggingface_hub import constants, try_to_load_from_cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _same(load("hf://org/repo/small.gguf", mode="cpu", dtype="float32", backend="host", cache="hf"), reference["cpu"])
    found = try_to_load_from_cache("org/repo", "small.gguf", cache_dir=str(tmp_path / "hub"), revision="main")
    assert isinstance(found, str) and open(found, "rb").read() == open(srv.files["small.gguf"], "rb").read()
    with open_model("hf://org/repo/small.gguf", cache="hf") as m:
        assert isinstance(m.source, LocalFile) and m.path.endswith(os.path.join("snapshots", COMMIT, "small.gguf"))
    # the blob is there already: another revision's ref is written (hf_hub_download finds it offline)
    load("hf://org/repo/small.gguf@v2", mode="raw", backend="host", cache="hf")
    found = try_to_load_from_cache("org/repo", "small.gguf", cache_dir=str(tmp_path / "hub"), revision="v2")
    assert isinstance(found, str) and os.path.samefile(found, m.path)


def test_offline_mode_opens_the_cached_copy(srv, tmp_path, monkeypatch, reference):
    """HF_HUB_OFFLINE (as huggingface_hub reads it): the Hugging Face cache's copy, found as
    hf_hub_download(local_files_only=True) finds it, with no request; one line where it has none."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    load("hf://org/repo/small.gguf", mode="raw", backend="host", cache="hf")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing there: a request would fail
    srv.requests.clear()
    for url in ("hf://org/repo/small.gguf", "hf://org/repo/small.gguf@main"):
        with open_model(url) as m:
            assert isinstance(m.source, LocalFile) and "snapshots" in m.path
            _same(load(m, mode="cpu", dtype="float32", backend="host"), reference["cpu"])
    assert srv.requests == []
    with pytest.raises(RemoteError, match=r"^hf://org/repo/other\.gguf: HF_HUB_OFFLINE is set and the Hugging Face "
                                          r"cache \(.*hub\) has no copy of other\.gguf at main$"):
        open_model("hf://org/repo/other.gguf", cache="hf")


def test_shared_model_keys_urls_by_identity(srv):
    url = srv.url("small.gguf")
    a = shared_model(url)
    assert shared_model(url) is a
    assert shared_model("hf://org/repo/small.gguf") is not a


def test_a_server_without_a_version_is_read_but_not_cached_or_shared(srv, tmp_path, reference):
    """No ETag and no Last-Modified: a change at the old size cannot be seen, so the file is
    read (with a RemoteWarning saying so), never cached nor shared between loads."""
    srv.validator = "none"
    url = srv.url("small.gguf")
    with pytest.warns(RemoteWarning, match="neither an ETag nor a Last-Modified") as said:
        with open_model(url) as m:
            _same(load(m, mode="gpu", dtype="float32", backend="host"), reference["gpu"])
    assert said[0].filename == __file__  # the user's line, not the toolkit's
    dest = tmp_path / "copy.gguf"
    with pytest.warns(RemoteWarning), pytest.raises(GGUFLabError, match="cannot be cached.*without cache="):
        open_model(url, cache=dest)
    assert not os.listdir(tmp_path)  # not even a part file
    with pytest.warns(RemoteWarning):
        assert shared_model(url) is not shared_model(url)  # opened again: its header may be another
        from gguf_gpu_lab.model import GGUFModel

        closed = []
        real_close = GGUFModel.close
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(GGUFModel, "close", lambda self: closed.append(self) or real_close(self))
            _same(load(url, mode="raw", dtype="float32", backend="host"), reference["raw"])
        assert len(closed) == 1 and closed[0].closed  # the load's own model, closed after it


def test_a_last_modified_date_of_this_minute_is_no_version(srv, files, tmp_path):
    """A file written less than a minute before the server's Date: another write in the same
    second keeps the date, so the date tells no version: warned, never cached, never shared."""
    srv.validator = "last-modified"
    path = files["small.gguf"]
    st = os.stat(path)
    os.utime(path, (st.st_atime, time.time() - 5))
    try:
        with pytest.warns(RemoteWarning, match=r"Last-Modified date \(.*\) is not 60 s before its Date"):
            m = open_model(srv.url("small.gguf"))
        with m:
            assert not m.source.validated
        with pytest.warns(RemoteWarning), pytest.raises(GGUFLabError, match="cannot be cached"):
            open_model(srv.url("small.gguf"), cache=tmp_path / "c.gguf")
        assert not list(tmp_path.iterdir())
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_broken_response_resumes_where_it_broke(srv, reference):
    """Each retry asks for the rest of the range, not all of it again; failures count in a row
    without progress, so a server that resets every answer after some bytes still gets there."""
    m = open_model(srv.url("small.gguf"))
    try:
        srv.requests.clear()
        srv.reset_after, srv.resets = 100_000, 12  # more resets in a row than RETRIES, each after progress
        _same(load(m, mode="raw", dtype="float32", backend="host", readers=1, chunk_mb=2), reference["raw"])
        assert srv.resets == 0
        starts = [int(h.split("=")[1].split("-")[0]) for _, _, h in srv.requests if h]
        assert len(starts) > 12 and len(set(starts)) == len(starts), starts[:8]  # never the same byte twice
    finally:
        srv.reset_after, srv.resets = None, 0
        m.close()


def test_a_full_disk_never_leaves_a_copy_that_looks_complete(srv, files, tmp_path, monkeypatch):
    """A short write and then ENOSPC while caching: one error naming the part file, no range
    recorded that the file does not hold; the next load resumes and the copy is the file's bytes."""
    import errno

    real, calls = os.pwrite, {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 2:
            return real(fd, memoryview(data)[:len(data) // 2], offset)  # a short write
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    dest = tmp_path / "c.gguf"
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(GGUFLabError, match=r"c.gguf.gguf-lab-part: caching .* failed after \d+: No space left"):
        load(srv.url("small.gguf"), mode="raw", backend="host", cache=dest, readers=1, chunk_mb=1)
    monkeypatch.setattr(os, "pwrite", real)
    assert calls["n"] >= 3 and not dest.exists()
    load(srv.url("small.gguf"), mode="raw", backend="host", cache=dest)
    assert dest.read_bytes() == open(files["small.gguf"], "rb").read()


def test_a_process_that_ends_keeps_what_it_cached(srv, tmp_path):
    """A process that loads part of a file through the cache and exits (the shared model never
    closed, the last periodic record older than the last bytes): the next open resumes from all of it."""
    import subprocess
    import sys

    dest = tmp_path / "c.gguf"
    code = ("import gguf_gpu_lab as lab, gguf_gpu_lab.remote_cache as rc\n"
            "rc.SAVE_EVERY_S = 1e9\n"  # no periodic record: what the next process finds is the exit's
            f"lab.load({srv.url('small.gguf')!r}, mode='raw', backend='host', cache={str(dest)!r}, "
            "tensors=lambda t: t.name.startswith('blk.0'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not dest.exists() and (tmp_path / "c.gguf.gguf-lab-part.json").exists()
    with open_model(srv.url("small.gguf"), cache=dest) as m:
        read = np.zeros(m.source.size, bool)  # what the first process read: the first header fetch, blk.0
        read[:HEADER_STEP] = True
        for t in m.tensors:
            if t.name.startswith("blk.0"):
                read[t.offset:t.offset + t.n_bytes] = True  # (offsets in the file)
        assert m.source.cached_bytes >= int(read.sum()) > HEADER_STEP


def test_last_modified_tells_a_change(srv, files, tmp_path):
    """A server that gives Last-Modified and no ETag: a file rewritten at its old size between
    open and load is a SourceChangedError, and a finished cache of the old file is not used."""
    srv.validator = "last-modified"
    path = files["small.gguf"]
    data = open(path, "rb").read()
    st = os.stat(path)
    os.utime(path, (st.st_atime - 600, st.st_mtime - 600))  # a date minutes old: a version (RFC 9110, 8.8.2.2)
    url = srv.url("small.gguf")
    dest = tmp_path / "copy.gguf"
    load(url, mode="raw", backend="host", cache=dest)
    assert dest.read_bytes() == data
    m = open_model(url)
    try:
        with open(path, "r+b") as f:  # same size, other bytes, a later date (HTTP dates are in seconds)
            f.seek(m.data_offset)
            f.write(b"\x55" * 4096)
        os.utime(path, (st.st_atime - 590, st.st_mtime - 590))
        with pytest.raises(SourceChangedError, match="Last-Modified"):
            load(m, mode="raw", backend="host")
        with open_model(url, cache=dest) as again:  # the old copy is not this file
            assert not isinstance(again.source, LocalFile)
            first = again.info(again.tensors[0].name)
            assert bytes(again.raw(first.name))[:16] == b"\x55" * 16
    finally:
        m.close()
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_shared_model_keys_urls_by_cache(srv, tmp_path, reference):
    """A load with cache= after one without gets a model that fills the cache."""
    url = srv.url("small.gguf")
    plain = shared_model(url)
    dest = tmp_path / "copy.gguf"
    assert shared_model(url, cache=dest) is not plain
    _same(load(url, mode="gpu", dtype="float32", backend="host", cache=dest), reference["gpu"])
    assert dest.read_bytes() == open(srv.files["small.gguf"], "rb").read()


def test_fsspec_memory_store(small_model, reference):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/small.gguf", open(small_model, "rb").read())
    try:
        with open_model("memory://models/small.gguf") as m:
            _same(load(m, mode="gpu", dtype="float32", backend="host", readers=2), reference["gpu"])
    finally:
        fs.rm("/models/small.gguf")


def test_fetch_lanes_per_connection(srv):
    with open_model(srv.url("small.gguf")) as m:
        r = load(m, mode="gpu", backend="host", readers=2, chunk_mb=0.25)
    lanes = fetch_lanes(r.profile)
    assert list(lanes["lane"]) == sorted(lanes["lane"]) and lanes["bytes"].sum() == r.file_bytes
    assert (lanes["gb_s"] > 0).all()


def test_streamed_load_overlaps_the_transfer(tmp_path):
    """CI's overlap check on the host backend: throttled to 20 MB/s, the load takes about the
    raw transfer's time; copies and dequantization run after the download would add the local
    load's time, past the bound."""
    from gguf_gpu_lab.tools.bench_remote import measure, server_process
    from gguf_gpu_lab.tools.synth import synth

    path = tmp_path / "m.gguf"
    synth(path, "25M", "Q4_K_M", seed=1)
    with server_process(str(tmp_path), 0.02) as endpoint:
        r = measure(f"{endpoint}/files/m.gguf", str(path), 2, "gpu", "float16", "host", 3, 0.02, 1.0)
    assert r["identical_to_local"]
    # overlapped, the load ends about one chunk's work after the download; in series it would
    # take the whole local load's time more
    assert r["load_s"] - r["transfer_s"] < 0.5 * r["local_load_s"], r


def _parse_by_prefix(data: bytes, step: int):
    """``read_header`` over a source that hands out prefixes ``step`` bytes past what is asked."""
    class Prefix:
        name, size = "fuzzed.gguf", len(data)

        def __init__(self):
            self.have = 0

        def header(self, want=0):
            self.have = min(self.size, max(want, self.have) + step)
            return data[:self.have]

    return read_header(Prefix())


def test_prefix_parse_agrees_with_the_whole_file_on_mutations():
    """Mutated files (the fuzzer's): parsed from growing prefixes they give the same header or
    the same error as parsed whole; never a loop, never another answer."""
    from gguf_gpu_lab.errors import GGUFFormatError
    from gguf_gpu_lab.tools.fuzz import layout, mutate, seed_file

    seed = seed_file()
    lay = layout(seed)
    rng = np.random.Generator(np.random.SFC64(19))
    for i in range(150):
        kind, data = mutate(seed, lay, rng)
        outcomes = []
        for step in (len(data), 37, 4096):
            try:
                h = _parse_by_prefix(data, step) if step != len(data) else Header(data, "fuzzed.gguf")
                outcomes.append(("ok", [(t.name, t.dims, t.type_id, t.rel_offset) for t in h.tensors], h.data_offset,
                                 [(f.key, f.type, f.end) for f in h.fields.values()]))
            except GGUFFormatError as e:
                outcomes.append(("error", str(e)))
        assert outcomes[1] == outcomes[0] and outcomes[2] == outcomes[0], (i, kind, outcomes)


def test_hf_from_gguf_over_http(srv, small_model):
    """transformers' model from a URL: every weight as from the local file."""
    pytest.importorskip("transformers", reason="hf.from_gguf needs the hf extra")
    import torch

    from gguf_gpu_lab import hf

    remote = hf.from_gguf(srv.url("small.gguf"), dtype="float32", device="cpu")
    local = hf.from_gguf(small_model, dtype="float32", device="cpu")
    a, b = remote.state_dict(), local.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_a_url(srv, capsys):
    from gguf_gpu_lab.cli import main

    assert main(["inspect", srv.url("small.gguf")]) == 0
    assert "21 tensors" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_load_over_http_on_the_gpu(srv, small_model, mode):
    """Streamed into the GPU (CuPy): bit-identical to the local load on the GPU."""
    with open_model(srv.url("small.gguf")) as m, open_model(small_model) as local:
        opts = dict(mode=mode, dtype="float16", backend="cupy", readers=4, chunk_mb=0.25)
        a, b = load(m, **opts), load(local, **opts)
        for n in b.keys():
            assert np.array_equal(a[n].numpy(), b[n].numpy(), equal_nan=True), n


def test_bench_remote_result(small_model, tmp_path):
    """bench --remote's JSON on the host backend: both server settings, their ratios and lanes."""
    import json

    from gguf_gpu_lab.tools.bench_remote import bench_remote, format_remote

    path = tmp_path / "small.gguf"
    shutil.copyfile(small_model, path)
    res = bench_remote(str(path), connections=2, rate_gbps=0.05, backend="host", repeat=1, chunk_mb=0.25)
    json.dumps(res)
    assert set(res["runs"]) == {"unthrottled", "throttled"} and res["device"]["name"] and res["machine"]["date"]
    for r in res["runs"].values():
        assert r["identical_to_local"] and r["bytes"] == sum(c["bytes"] for c in r["connections"])
        assert r["load_over_transfer"] == r["load_s"] / r["transfer_s"]
    assert res["runs"]["throttled"]["transfer_gb_s"] < 0.06
    assert "throttled" in format_remote(res)
    with pytest.raises(GGUFLabError, match="connections"):
        bench_remote(str(path), connections=0)


def test_cache_is_for_urls(small_model, tmp_path):
    with pytest.raises(GGUFLabError, match="cache= is for URLs"):
        open_model(str(small_model), cache=tmp_path / "x.gguf")
    with pytest.raises(GGUFLabError, match="cache= is for URLs"):
        load(small_model, backend="host", cache=tmp_path / "x.gguf")


def test_one_writer_per_cache(srv, tmp_path, reference):
    """A second model on a cache that another is filling reads without it: it never truncates
    what the first has written."""
    from gguf_gpu_lab.remote import HTTPSource
    from gguf_gpu_lab.remote_cache import CachingSource

    url, dest = srv.url("small.gguf"), tmp_path / "c.gguf"
    with open_model(url, cache=dest) as first:
        with open_model(url, cache=dest) as second:
            assert isinstance(first.source, CachingSource) and type(second.source) is HTTPSource
            _same(load(second, mode="raw", dtype="float32", backend="host"), reference["raw"])
        _same(load(first, mode="raw", dtype="float32", backend="host"), reference["raw"])
    assert open(dest, "rb").read() == open(srv.files["small.gguf"], "rb").read()


def test_bench_remote_command_line(capsys, tmp_path):
    from gguf_gpu_lab.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--remote", "--connections", "0"])
    assert "--connections" in capsys.readouterr().err
    try:
        import cupy  # noqa: F401
    except ImportError:  # without a GPU the benchmark refuses before writing its 8B model
        assert main(["bench", "--remote", "--out-dir", str(tmp_path)]) == 2
        assert "bench --remote needs a GPU" in capsys.readouterr().err
        assert not list(tmp_path.iterdir())


def test_http_server_command_refuses_bad_input(tmp_path, capsys):
    from gguf_gpu_lab.tools.http_server import main as server_main

    for argv, message in [([str(tmp_path), "--port", "-1"], "--port must be from 0 to 65535, got -1"),
                          ([str(tmp_path / "nope")], "nope: not a folder")]:
        with pytest.raises(SystemExit) as e:
            server_main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
