"""Streamed remote loads: one request per run of adjacent pieces, a cancel that stops every
connection mid-range, and the Hub's CDN redirect resolved once and reused. A real HTTP server on
127.0.0.1 (tools/http_server.py), throttled where a test needs ranges that take seconds."""

from __future__ import annotations

import _thread
import shutil
import socket
import threading
import time

import numpy as np
import pytest

from gguf_gpu_lab import LoadCancelled, open_model
from gguf_gpu_lab.errors import RemoteError
from gguf_gpu_lab.device import get_backend
from gguf_gpu_lab.loader import load, plan_chunks
from gguf_gpu_lab.remote import url_expiry
from gguf_gpu_lab.tools.http_server import serve

from .test_remote import _lab_threads, _same


@pytest.fixture(scope="module")
def files(small_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    shutil.copyfile(small_model, d / "small.gguf")
    return {"small.gguf": str(d / "small.gguf")}


@pytest.fixture(scope="module")
def reference(small_model):
    return {n: t.numpy().copy() for n, t in load(small_model, mode="gpu", dtype="float32", backend="host").items()}


def _gets(srv, part: str) -> int:
    return sum(1 for method, path, rng in list(srv.requests) if method == "GET" and part in path)


def test_one_request_per_run_of_adjacent_pieces(files, reference):
    """A chunk of several small tensors, adjacent in the file, is one ranged request."""
    with serve(files) as srv, open_model(srv.url("small.gguf")) as m:
        before = len(srv.requests)
        r = load(m, mode="gpu", dtype="float32", backend="host", readers=2, chunk_mb=0.25)
        _same(r, reference)
        chunks = plan_chunks(m.tensors, int(0.25 * (1 << 20)), ramp=2)
        runs = sum(1 + sum(1 for a, b in zip(c.pieces, c.pieces[1:]) if b.file_offset != a.file_offset + a.nbytes)
                   for c in chunks)
        assert sum(len(c.pieces) for c in chunks) > runs  # some chunks batch several tensors
        assert len(srv.requests) - before == runs


@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_cancel_stops_connections_mid_range(files, how):
    """Throttled so that one range takes seconds: a cancel (the caller's event, or Ctrl-C in
    the thread that called load) ends the load within a fraction of a second, with every
    connection closed, no thread left and the staging ring given back."""
    threads = _lab_threads()
    with serve(files, rate=256 << 10) as srv, open_model(srv.url("small.gguf")) as m:
        ev = threading.Event()
        fired = []
        opened = srv.served

        def fire():
            fired.append(time.perf_counter())
            if how == "cancel":
                ev.set()
            else:
                _thread.interrupt_main()

        timer = threading.Timer(0.5, fire)  # 1 MiB ranges at 128 KiB/s a connection: 8 s each
        timer.start()
        try:
            with pytest.raises(LoadCancelled if how == "cancel" else KeyboardInterrupt):
                load(m, mode="gpu", backend="host", readers=2, chunk_mb=1.0, cancel=ev)
            ended = time.perf_counter()
        finally:
            timer.cancel()
        assert fired and ended - fired[0] < 1.5, ended - fired[0]
        # the server sends 256 KiB at a time: one block a connection, perhaps one more, and no range finished
        assert srv.served - opened <= 3 * (256 << 10)
        assert _lab_threads() <= threads
        assert not get_backend("host")._ring_busy
        assert not m.source._conns  # every connection closed (the server's ends close at their next paced write)


def test_hub_redirect_resolved_once(files, reference, monkeypatch):
    """The Hub answers with a redirect to its CDN (another host name): the source goes there
    directly after the first request, without the token, and loads bit-identically."""
    with serve(files) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        srv.redirect = True
        srv.token = "hf_secret"
        with open_model("hf://org/repo/small.gguf", token="hf_secret") as m:
            r = load(m, mode="gpu", dtype="float32", backend="host", readers=3, chunk_mb=0.25)
            _same(r, reference)
            assert _gets(srv, "/resolve/") == 1 == m.source.resolves
            assert _gets(srv, "/cdn/") > 10
            srv.cdn_deny = 1  # the CDN refuses once (an expired signature): resolved again, then on
            _same(load(m, mode="gpu", dtype="float32", backend="host", readers=1, chunk_mb=0.25), reference)
            assert _gets(srv, "/resolve/") == 2 and srv.cdn_deny == 0
            srv.cdn_deny = 3  # refused again right after the Hub's redirect, three times: still a retry, not "gated"
            _same(load(m, mode="gpu", dtype="float32", backend="host", readers=1, chunk_mb=0.25), reference)
            assert srv.cdn_deny == 0
            srv.cdn_deny = 100  # refused for good: one line saying so, without the gated-repository hint
            with pytest.raises(RemoteError, match=r"failed 6 times in a row \(last: the redirected URL answered "
                                                  r"HTTP 403\)$"):
                m.raw("output.weight")
            srv.cdn_deny = 0


def test_redirect_reused_until_it_is_about_to_expire(files, monkeypatch):
    """A CDN URL signed for less than the safety margin is not reused: each read resolves."""
    with serve(files) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        srv.redirect, srv.cdn_expires_s = True, 30
        with open_model("hf://org/repo/small.gguf") as m:
            before = _gets(srv, "/resolve/")
            for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
                m.raw(name)
            assert _gets(srv, "/resolve/") - before == 2


def test_url_expiry():
    assert url_expiry("https://cdn.example/x?Expires=1800000000&Signature=s") == 1800000000
    assert url_expiry("https://s3.example/x?X-Amz-Date=20261203T210000Z&X-Amz-Expires=3600") == \
        pytest.approx(1796331600 + 3600)
    assert url_expiry("https://example/x") == float("inf")
    assert url_expiry("https://example/x?Expires=soon") == float("inf")


def test_stale_kept_connection_is_replaced(files, reference):
    """A kept connection that the server closed while idle is replaced at once, not counted
    as a failure."""
    with serve(files) as srv, open_model(srv.url("small.gguf")) as m:
        with m.source.use():
            m.raw("output.weight")
            for c in list(m.source._conns):  # every kept connection is ended (as by an idle server)
                if c._sock is not None:
                    c._sock.shutdown(socket.SHUT_WR)
            with open_model(files["small.gguf"]) as local:
                want = local.raw("output.weight")
            failures = len(srv.requests)
            assert np.array_equal(m.raw("output.weight"), want)
            assert len(srv.requests) == failures + 1  # one request, on a new connection, no retry


def test_column_shard_over_http(files, small_model):
    """A column shard's rows are ranges that are not adjacent: each its own request, gathered
    into one staging slot, as from the local file."""
    shard = {"blk.0.attn_q.weight": (-1, 1, 2), "blk.0.ffn_down.weight": (0, 0, 2)}
    with serve(files) as srv, open_model(srv.url("small.gguf")) as m:
        got = load(m, mode="gpu", dtype="float32", backend="host", readers=2, chunk_mb=0.25, shard=shard)
    want = load(small_model, mode="gpu", dtype="float32", backend="host", shard=shard)
    for name in want.keys():
        assert np.array_equal(got[name].numpy(), want[name].numpy()), name
