"""A local HTTP server for GGUF files, with Range, the Hugging Face Hub's URL layout and faults:
what the remote tests, the remote notebook and ``bench --remote`` read from.

    with serve({"model.gguf": path}) as srv:          # a thread of this process, on 127.0.0.1
        m = open_model(srv.url("model.gguf"))          # http://127.0.0.1:PORT/files/model.gguf
        os.environ["HF_ENDPOINT"] = srv.endpoint       # hf://org/repo/model.gguf works too

Files are served at ``/files/NAME`` and at the Hub's ``/ORG/REPO/resolve/REVISION/NAME`` (with
``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` and ``X-Linked-Size``, as huggingface_hub expects).
Faults, set on the server object while it runs: ``reset_after`` (the next responses' connections
reset after that many body bytes, ``resets`` times), ``fail_5xx`` (the next N requests answer 500),
``ignore_range``, ``deny`` (repo ids answering 401, as a gated repo does), ``token`` (a bearer
token the hub layout requires), ``rate`` (bytes per second over all connections), ``redirect``
(the Hub's layout answers 302 to ``http://localhost:PORT/cdn/NAME?Expires=T``, another host
name, as the Hub sends downloads to its CDN; ``cdn_expires_s`` sets T, an expired or
``cdn_deny`` times refused CDN URL answers 403), ``validator`` (what tells the file's version:
``"etag"``, the default, ``"last-modified"`` or ``"none"``, as some static servers and proxies
send). ``served`` counts body bytes sent. ``python -m gguf_gpu_lab.tools.http_server DIR``
serves a folder (the benchmark runs the server in its own process, so that its threads do not
share the client's GIL).
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import hashlib
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = hashlib.sha1(b"gguf-gpu-lab test commit").hexdigest()  # every repo's one commit
_BLOCK = 256 << 10  # bytes a paced or faulty response sends at a time


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a load's 16 connections opened at once had their SYNs
    # beyond it dropped and resent after TCP's 1 s timeout (one connection's first range took 1.04 s)
    request_queue_size = 128

    def __init__(self, files: dict[str, str], port: int = 0, rate: float | None = None):
        super().__init__(("127.0.0.1", port), _Handler)
        self.files = dict(files)  # name -> path
        self.rate = rate
        self.reset_after: int | None = None
        self.resets = 0
        self.fail_5xx = 0
        self.ignore_range = False
        self.deny: set[str] = set()
        self.token: str | None = None
        self.redirect = False
        self.validator = "etag"  # what says the file's version: "etag", "last-modified" or "none"
        self.cdn_expires_s = 3600.0
        self.cdn_deny = 0
        self.served = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._lock = threading.Lock()
        self._next_send = 0.0
        self._thread: threading.Thread | None = None

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up (a cancelled load), or a reset made on purpose: not news

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.endpoint}/files/{name}"

    def pace(self, n: int) -> None:
        """Wait for ``n`` bytes' turn at ``rate`` bytes per second, over every connection."""
        if not self.rate:
            return
        with self._lock:
            now = time.perf_counter()
            start = max(now, self._next_send)
            self._next_send = start + n / self.rate
        if start > now:
            time.sleep(start - now)

    def take_fault(self) -> str | None:
        with self._lock:
            if self.fail_5xx > 0:
                self.fail_5xx -= 1
                return "500"
            if self.reset_after is not None and self.resets > 0:
                self.resets -= 1
                return "reset"
        return None

    def count(self, n: int) -> None:
        with self._lock:
            self.served += n

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="test-http-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


def etag_of(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha1(f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves a reader's requests
    disable_nagle_algorithm = True  # else a small body waits for the client's delayed ACK (40 ms)

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _resolve(self) -> tuple[str | None, dict]:
        """The file's path (None: 404) and the Hub's headers when the URL is in its layout."""
        srv: Server = self.server
        path = self.path.split("?", 1)[0]
        if path.startswith("/files/"):
            return srv.files.get(path[len("/files/"):]), {}
        if path.startswith("/cdn/"):
            return self._cdn(path[len("/cdn/"):])
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo in srv.deny or (srv.token and self.headers.get("Authorization") != f"Bearer {srv.token}"):
                return "", {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted"}
            if name not in srv.files:
                return None, {"X-Error-Code": "EntryNotFound"}
            etag = etag_of(srv.files[name])
            hub = {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{etag}"',
                   "X-Linked-Size": str(os.path.getsize(srv.files[name]))}
            if srv.redirect:
                expires = int(time.time() + srv.cdn_expires_s)
                hub["Location"] = f"http://localhost:{srv.server_address[1]}/cdn/{name}?Expires={expires}&Signature=x"
                return "302", hub
            return srv.files[name], hub
        return None, {}

    def _cdn(self, name: str) -> tuple[str | None, dict]:
        srv: Server = self.server
        query = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p)
        with srv._lock:
            deny, srv.cdn_deny = srv.cdn_deny > 0, max(0, srv.cdn_deny - 1)
        if deny or float(query.get("Expires", 0)) < time.time():
            return "403", {}
        return srv.files.get(name), {}

    def _serve(self, body: bool) -> None:
        srv: Server = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.command, self.path, rng))
        path, extra = self._resolve()
        if path == "":
            return self._status(401, extra)
        if path in ("302", "403"):
            return self._status(int(path), extra)
        if path is None:
            return self._status(404, extra)
        fault = srv.take_fault() if body else None
        if fault == "500":
            return self._status(500, {})
        size = os.path.getsize(path)
        start, end = 0, size
        if rng and not srv.ignore_range:
            try:
                a, b = rng.split("=", 1)[1].split("-")
                start, end = int(a), (int(b) + 1 if b else size)
            except ValueError:
                return self._status(400, {})
            if start >= size or end > size or start >= end:
                return self._status(416, {"Content-Range": f"bytes */{size}"})
        self.send_response(206 if rng and not srv.ignore_range else 200)
        for k, v in extra.items():
            self.send_header(k, v)
        if srv.validator == "etag":
            self.send_header("ETag", f'"{etag_of(path)}"')
        elif srv.validator == "last-modified":
            self.send_header("Last-Modified", email.utils.formatdate(os.stat(path).st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if rng and not srv.ignore_range:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            self._send(path, start, end, srv.reset_after if fault == "reset" else None)

    def _send(self, path: str, start: int, end: int, reset_after: int | None) -> None:
        srv: Server = self.server
        with open(path, "rb") as f:
            if not srv.rate and reset_after is None:  # the fast path: sendfile(2), no copy, no GIL
                srv.count(end - start)
                self.wfile.flush()
                self.connection.sendfile(f, start, end - start)
                return
            pos = start
            while pos < end:
                n = min(_BLOCK, end - pos)
                if reset_after is not None and pos - start + n > reset_after:
                    n = reset_after - (pos - start)
                    if n > 0:
                        self.wfile.write(os.pread(f.fileno(), n, pos))
                        srv.count(n)
                    self.wfile.flush()
                    # an RST, not a FIN: the client sees a reset connection mid-body
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                srv.pace(n)
                self.wfile.write(os.pread(f.fileno(), n, pos))
                srv.count(n)
                pos += n

    def _status(self, code: int, extra: dict) -> None:
        self.send_response(code)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextlib.contextmanager
def serve(files: dict[str, str], rate: float | None = None):
    """A running ``Server`` for ``files`` (name -> path) on a free port of 127.0.0.1."""
    srv = Server({k: os.fspath(v) for k, v in files.items()}, rate=rate).start()
    try:
        yield srv
    finally:
        srv.stop()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="serve a folder's files at /files/NAME and the Hub's layout")
    ap.add_argument("folder")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed on the first line)")
    ap.add_argument("--rate-gbps", type=float, default=None, help="throttle to this many GB/s (0.001-1000)")
    a = ap.parse_args(argv)
    if a.rate_gbps is not None and not 0.001 <= a.rate_gbps <= 1000:
        ap.error("--rate-gbps must be between 0.001 and 1000")
    if not 0 <= a.port <= 65535:
        ap.error(f"--port must be from 0 to 65535, got {a.port}")
    if not os.path.isdir(a.folder):
        ap.error(f"{a.folder}: not a folder")
    files = {n: os.path.join(a.folder, n) for n in os.listdir(a.folder)}
    try:
        srv = Server(files, a.port, rate=a.rate_gbps * 1e9 if a.rate_gbps else None)
    except OSError as e:
        ap.error(f"cannot listen on 127.0.0.1:{a.port}: {e.strerror or e}")
    print(srv.endpoint, flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
