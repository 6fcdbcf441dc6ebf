"""One keep-alive HTTP/1.1 connection for ranged reads, on the standard library's ``socket`` and
``ssl``: nothing beyond Python is needed wherever the toolkit runs.

It is the loader's hot path, so it does the least Python work a request allows: the request is
one ``sendall``, the response's header one small ``recv`` (parsed with ``str.split``, not
``email.parser`` as ``http.client`` does: a few microseconds against a few hundred), and the body
is received straight into the caller's buffer. Over plain HTTP one ``recv_into(..., MSG_WAITALL)``
receives a whole range with the GIL released (``http.client`` takes the GIL back after every
socket read, which 16 reader threads fight over); over TLS the reads are the ``ssl`` module's.

Every wait on the socket lasts at most ``POLL_S`` (``SO_RCVTIMEO``, or the socket's timeout over
TLS), after which the caller's stop flag is looked at: a cancelled load stops every connection
mid-range within about that time. ``TIMEOUT_S`` without a byte is a failure.

Redirects are followed (the Hub sends downloads to a CDN) and the final URL is returned, so that
the caller can go there directly next time; an ``Authorization`` header is dropped when a redirect
leaves the host, as browsers and ``requests`` do. Proxies from the environment are not used.
"""

from __future__ import annotations

import base64
import functools
import socket
import ssl
import struct
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import NamedTuple

MAX_REDIRECTS = 8
TIMEOUT_S = 60.0  # to connect, and without a byte of the response
POLL_S = 0.1  # the longest a read waits before it looks at the stop flag
HEAD_MAX = 64 << 10  # a response header longer than this is refused
USER_AGENT = "gguf-gpu-lab"
# one receive call for a whole range, the GIL released (Linux, macOS); elsewhere a loop of reads
_WAITALL = getattr(socket, "MSG_WAITALL", 0) if sys.platform != "win32" else 0


class ConnectionFailed(Exception):
    """The connection broke (a reset, a refused connect, a timeout, a body cut short): worth
    another attempt on a new connection. ``why`` names the error, never the URL."""

    def __init__(self, why: str, permanent: bool = False):
        super().__init__(why)
        self.why = why
        self.permanent = permanent  # another attempt will not cure it (a host name that does not resolve)
        self.before_response = False  # nothing of a response came (a kept connection may have gone stale)


_WHY = {ConnectionRefusedError: "connection refused", ConnectionResetError: "connection reset",
        TimeoutError: "timed out", BrokenPipeError: "connection closed"}


def failed(e: BaseException) -> ConnectionFailed:
    """A ``ConnectionFailed`` for an ``OSError``, its ``why`` in words (never the URL): a host
    name that does not resolve is ``permanent``."""
    if isinstance(e, socket.gaierror):
        return ConnectionFailed(f"host not found ({e.strerror or e})", permanent=True)
    if isinstance(e, ssl.SSLError):
        return ConnectionFailed(f"TLS failed ({e.reason or type(e).__name__})")
    for cls, why in _WHY.items():
        if isinstance(e, cls):
            return ConnectionFailed(why)
    return ConnectionFailed(type(e).__name__)


class Stopped(Exception):
    """The caller's stop flag was set while a request waited (the connection is closed)."""


@functools.lru_cache(maxsize=1)  # one context (its CA bundle loaded once) for every connection
def _tls() -> ssl.SSLContext:
    try:
        import certifi  # the CA bundle pip itself trusts, where installed

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


class _Target(NamedTuple):
    """What a request to a URL needs, worked out once per URL (``_target``)."""

    key: tuple  # (https, hostname, port): which connection serves it
    host: str  # the Host header
    path: str  # the request target: path and query
    auth: str | None  # Basic credentials from the URL's user and password


@functools.lru_cache(maxsize=64)
def _target(url: str) -> _Target:
    u = urllib.parse.urlsplit(url)
    https = u.scheme == "https"
    hostname = u.hostname or ""
    shown = f"[{hostname}]" if ":" in hostname else hostname  # an IPv6 literal
    host = shown if u.port is None else f"{shown}:{u.port}"
    auth = None
    if u.username is not None:
        creds = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
        auth = "Basic " + base64.b64encode(creds.encode()).decode()
    return _Target((https, hostname, u.port or (443 if https else 80)), host,
                   (u.path or "/") + (f"?{u.query}" if u.query else ""), auth)


@dataclass
class Response:
    """A response's status and header (names in lower case); ``url``: where it came from after
    redirects; ``length``: the body's bytes (None: until the connection closes)."""

    status: int
    headers: dict[str, str]
    url: str
    length: int | None
    keep: bool  # the connection can serve another request once the body is read
    chunked: bool = False  # a chunked body (never read by ``read_body``: the caller refuses it)

    def getheader(self, name: str, default=None):
        return self.headers.get(name.lower(), default)


class Connection:
    """A connection to one host at a time, used by one thread at a time."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._key: tuple | None = None
        self._tls = False
        self._head = bytearray(HEAD_MAX)
        self._extra = memoryview(b"")  # body bytes that came with the header

    # -- requests --------------------------------------------------------------------------------
    def get(self, url: str, headers: dict[str, str], stop=None) -> Response:
        """The response to ``GET url`` after redirects; its body is the caller's to read with
        ``read_body``, or to end with ``close()``."""
        if not any(k.lower() == "user-agent" for k in headers):
            headers = {"User-Agent": USER_AGENT, **headers}
        for _ in range(MAX_REDIRECTS + 1):
            t = _target(url)
            h = headers
            if t.auth is not None and not any(k.lower() == "authorization" for k in h):
                h = {**h, "Authorization": t.auth}
            r = self._exchange(t, h, stop)
            loc = r.headers.get("location")
            if r.status in (301, 302, 303, 307, 308) and loc:
                self.close()  # its body is not worth reading; the next host may be another
                new = urllib.parse.urljoin(url, loc)
                if _target(new).key[1] != t.key[1]:
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = new
                continue
            r.url = url
            return r
        raise ConnectionFailed(f"more than {MAX_REDIRECTS} redirects")

    def _exchange(self, t: "_Target", headers: dict[str, str], stop) -> Response:
        fresh = self._sock is None or self._key != t.key
        sock = self._connect(t)
        head = f"GET {t.path} HTTP/1.1\r\nHost: {t.host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        try:
            sock.sendall((head + "\r\n").encode("latin-1"))
            return self._response(sock, stop)
        except (ConnectionFailed, OSError) as e:
            self.close()
            if not fresh and (isinstance(e, OSError) or e.before_response):
                # a kept connection that the server closed while it was idle: once more, on a new one
                return self._exchange(t, headers, stop)
            if isinstance(e, ConnectionFailed):
                raise
            raise failed(e) from None

    def _response(self, sock, stop) -> Response:
        buf, got, end = self._head, 0, -1
        view = memoryview(buf)
        while end < 0:
            if got == len(buf):
                self.close()
                raise ConnectionFailed(f"a response header longer than {HEAD_MAX} bytes")
            try:
                k = self._recv(sock, view[got:], 0, stop)
            except ConnectionFailed as e:
                e.before_response = got == 0
                raise
            if k == 0:
                self.close()
                e = ConnectionFailed("closed before a response" if got == 0 else "closed in a response header")
                e.before_response = got == 0
                raise e
            got += k
            end = buf.find(b"\r\n\r\n", max(0, got - k - 3), got)
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = lines[0].split(None, 2)
        if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
            self.close()
            raise ConnectionFailed(f"not an HTTP response ({lines[0][:40]!r})")
        hdrs: dict[str, str] = {}
        last = None
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and last:  # an obsolete folded line continues the last header
                hdrs[last] += " " + line.strip()
                continue
            name, _, value = line.partition(":")
            last = name.strip().lower()
            hdrs[last] = f"{hdrs[last]}, {value.strip()}" if last in hdrs else value.strip()
        length = hdrs.get("content-length")
        chunked = "chunked" in hdrs.get("transfer-encoding", "").lower()
        keep = (status[0] != "HTTP/1.0" and "close" not in hdrs.get("connection", "").lower()
                and length is not None and not chunked)
        self._extra = view[end + 4:got]
        return Response(int(status[1]), hdrs, "", int(length) if length is not None and not chunked else None, keep,
                        chunked)

    def read_body(self, r: Response, view: memoryview, stop=None) -> int:
        """The body, or its first ``len(view)`` bytes, into ``view``; returns the bytes received
        (fewer when the connection ended early; the connection is then closed). ``Stopped`` when
        ``stop`` was set meanwhile."""
        n = len(view) if r.length is None else min(len(view), r.length)
        extra = self._extra
        got = min(n, len(extra))
        view[:got] = extra[:got]
        self._extra = memoryview(b"")
        sock, flags = self._sock, 0 if self._tls else _WAITALL
        try:
            while got < n:
                k = self._recv(sock, view[got:n], flags, stop)
                if k == 0:
                    break
                got += k
        except ConnectionFailed:
            self.close()
            return got
        if got < n or not r.keep or r.length != n:
            self.close()  # the rest of the body is not read, or the server closes: not reused
        return got

    def _recv(self, sock, view: memoryview, flags: int, stop) -> int:
        """One receive into ``view``: what came within ``POLL_S`` (with ``MSG_WAITALL``, all of
        ``view`` unless that time ran out); 0 when the peer closed."""
        deadline = None
        while True:
            try:
                k = sock.recv_into(view, len(view), flags) if flags else sock.recv_into(view)
            except (BlockingIOError, TimeoutError, socket.timeout):  # POLL_S without a byte
                k = None
            except OSError as e:
                self.close()
                raise failed(e) from None
            if stop is not None and stop.is_set():
                self.close()
                raise Stopped
            if k is not None:
                return k
            now = time.monotonic()
            deadline = deadline or now + TIMEOUT_S
            if now >= deadline:
                self.close()
                raise ConnectionFailed("TimeoutError")

    def _connect(self, t: "_Target") -> socket.socket:
        if self._sock is not None and t.key == self._key:
            return self._sock
        self.close()
        https, hostname, port = t.key
        try:
            sock = socket.create_connection((hostname, port), timeout=TIMEOUT_S)
        except OSError as e:
            raise failed(e) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one small write
            if https:
                sock = _tls().wrap_socket(sock, server_hostname=hostname)
                sock.settimeout(POLL_S)  # the ssl module's reads honour the socket's timeout
            else:
                # a blocking socket whose receives give up after POLL_S: MSG_WAITALL then waits
                # in the kernel for a whole range (a socket with a Python timeout never does)
                sock.settimeout(None)
                sec, usec = int(POLL_S), int(POLL_S % 1 * 1e6)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(TIMEOUT_S), 0))
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise failed(e) from None
        self._sock, self._key, self._tls = sock, t.key, https
        return sock

    def close(self) -> None:
        sock, self._sock, self._key = self._sock, None, None
        self._extra = memoryview(b"")
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
