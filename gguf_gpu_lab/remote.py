"""Remote byte sources: a GGUF file over HTTP(S), on the Hugging Face Hub, or in an fsspec store.

Each is a ``ByteSource`` (source.py): the header parser, ``GGUFModel.raw`` and the loader's reader
threads read through it as they read a local file, and do not know the difference.

- ``HTTPSource``: ranged ``GET`` requests, one connection per concurrent reader (a pool of
  ``http_conn.Connection``: one is never used by two threads at once), retried with bounded
  backoff on resets, timeouts, 5xx and 429, resuming where the broken response stopped. Every
  response is checked against what was opened: its total size (``Content-Range``) and ETag; a
  difference is a ``SourceChangedError``. A server that answers a range with the whole file is an
  error that says so.
- ``remote_hub.hub_source``: ``hf://ORG/REPO/FILE.gguf[@REVISION]`` through ``huggingface_hub`` (its token,
  ``HF_ENDPOINT``, its URL for a file), the revision resolved to a commit at open, so the bytes
  cannot change under a load; gated, 401/403 and 404 answers as one line naming the file.
- ``FsspecSource``: any other ``scheme://`` that fsspec has a backend for (``s3://``, ``gs://``,
  ``memory://``...), through its stateless ``cat_file(path, start, end)`` (fsspec file objects are
  not thread-safe).

The header comes from a prefix: 1 MiB first, then the bytes the parser asks for plus 1 MiB, so an
open fetches at most the header and 1 MiB more. Tokens and signed query strings are never shown:
names and errors carry the URL without credentials or query.
"""

from __future__ import annotations

import contextlib
import http.client
import queue
import re
import threading
import time
import urllib.parse

import numpy as np

from .errors import GGUFFormatError, GGUFLabError, RemoteError, RemoteNotFoundError, SourceChangedError
from .http_conn import Connection, ConnectionFailed
from .source import ByteSource

HEADER_STEP = 1 << 20  # the first header fetch, and how far past the parser's need each later one goes
READ_BLOCK = 4 << 20  # a response body is read into the buffer this much at a time (bytes counted per block)
RETRIES = 6  # attempts in a row without progress before a range fails
BACKOFF_S = (0.05, 2.0)  # first wait after a failure, and the most any wait grows to
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(where) -> bool:
    """Whether ``where`` names a remote file (``scheme://...``; ``file://`` is local)."""
    return isinstance(where, str) and bool(_URL_RE.match(where)) and not where.startswith("file://")


def redact(url: str) -> str:
    """``url`` without user, password and query string (where tokens and signatures live)."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, host, u.path, "", ""))


class RemoteSource(ByteSource):
    """What every remote source shares: the growing header prefix and byte counters.
    Subclasses implement ``_fetch(offset, view)`` (exactly ``len(view)`` bytes into ``view``)."""

    def __init__(self) -> None:
        super().__init__()
        self._prefix = bytearray()
        self._prefix_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.bytes_fetched = 0  # every byte received, header included (for tests and benchmarks)

    def header(self, want: int = 0):
        """A prefix of at least ``want`` bytes (1 MiB at first), grown by the missing range only."""
        with self._prefix_lock:
            have = len(self._prefix)
            if have == 0 or want > have:
                target = min(self.size, max(want, have) + HEADER_STEP) if have else min(self.size, HEADER_STEP)
                more = np.empty(target - have, np.uint8)
                self.read_into(have, more)
                self._prefix += more.tobytes()
            return bytes(self._prefix)

    def read_into(self, offset: int, dst: np.ndarray) -> None:
        n = dst.nbytes
        self._bounds(offset, n)
        if self._closing and self._users == 0:
            raise GGUFLabError(f"{self.name}: model is closed")
        if n:
            self._fetch(offset, memoryview(dst).cast("B"))

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_fetched += n

    def _fetch(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError


def _backoff(attempt: int) -> float:
    return min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** attempt)


def _norm_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    etag = etag.strip()
    return (etag[2:] if etag.startswith("W/") else etag).strip('"')


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _Retry(Exception):
    """A failure worth another attempt (a reset, a timeout, a 5xx); ``why`` says which."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class HTTPSource(RemoteSource):
    """A file over HTTP(S), read in ranges (see the module's docstring).

    Args:
        url: the file's URL (credentials in it are used, never shown).
        headers: sent with every request (an ``Authorization`` header, say); never shown.
        name: what errors call it (default: the URL without credentials and query).
        hint: added to 401/403 errors (the Hub's: a token may be needed).
        identity: what the bytes are, when the caller knows better (the Hub's commit).
    """

    def __init__(self, url: str, *, headers: dict | None = None, name: str | None = None, hint: str = "",
                 identity: tuple | None = None):
        super().__init__()
        self.url = url
        self.name = name or redact(url)
        self._headers = {"Accept-Encoding": "identity", **(headers or {})}
        self._hint = hint
        self._pool: queue.SimpleQueue = queue.SimpleQueue()  # idle connections: one per concurrent reader
        self._conns: list[Connection] = []
        self.size = -1
        self._etag: str | None = None
        try:
            # one byte tells the size (Content-Range), the ETag, and whether ranges are served
            with self._connection() as c:
                r = self._get(c, 0, 1, probe=True)
                self._etag = _norm_etag(r.getheader("ETag"))
                modified = r.getheader("Last-Modified")
                self.size = self._total(r)
                self._count(len(r.read()))
        except BaseException:
            self._release()
            raise
        self.identity = identity or ("http", self.name, self._etag or modified, self.size)

    @contextlib.contextmanager
    def use(self):
        """As ``ByteSource.use``; when a user (a load) ends and no other is left, the idle
        connections are closed: a finished, failed or cancelled load leaves none open."""
        with super().use():
            try:
                yield self
            finally:
                with self._lock:
                    last = self._users == 1
                if last:
                    self._drop_idle()

    def _drop_idle(self) -> None:
        while True:
            try:
                c = self._pool.get_nowait()
            except queue.Empty:
                return
            self._forget(c)

    def _forget(self, c: Connection) -> None:
        c.close()
        with self._lock:
            if c in self._conns:
                self._conns.remove(c)

    # -- requests --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connection(self):
        """A connection of this thread's alone for the duration; closed after a failure, so
        that a broken connection (or one with a body left unread) is never reused."""
        try:
            c = self._pool.get_nowait()
        except queue.Empty:
            c = Connection()
            with self._lock:
                self._conns.append(c)
        ok = False
        try:
            yield c
            ok = True
        finally:
            if ok and not self._closing:
                self._pool.put(c)
            else:
                self._forget(c)

    def _get(self, c: Connection, offset: int, n: int, probe: bool = False):
        """The response to a GET of [offset, offset + n) after its status is checked; ``_Retry``
        for what another attempt may cure, ``RemoteError`` for what it will not."""
        try:
            r = c.get(self.url, {**self._headers, "Range": f"bytes={offset}-{offset + n - 1}"})
        except ConnectionFailed as e:
            raise _Retry(e.why) from None
        code = r.status
        if code == 206:
            return r
        c.close()  # the body is not read: the connection cannot serve another request
        if code >= 500 or code == 429:
            raise _Retry(f"HTTP {code}")
        if code == 200:
            raise RemoteError(f"{self.name}: the server ignored the Range header (it answered a request for "
                              f"bytes [{offset}, {offset + n}) with the whole file, HTTP 200): it cannot be read "
                              "in ranges")
        if code == 404:
            raise RemoteNotFoundError(f"{self.name}: not found (HTTP 404)")
        if code in (401, 403):
            raise RemoteError(f"{self.name}: access denied (HTTP {code}){self._hint}")
        if code == 416 and probe:  # an empty file has no byte 0
            raise GGUFFormatError("file is 0 bytes, too short for a GGUF header (24 bytes)", path=self.name)
        raise RemoteError(f"{self.name}: HTTP {code} for bytes [{offset}, {offset + n})")

    def _total(self, r) -> int:
        m = _CONTENT_RANGE.fullmatch((r.getheader("Content-Range") or "").strip())
        if m is None or m.group(3) == "*":
            raise RemoteError(f"{self.name}: a ranged answer without the file's size (Content-Range: "
                              f"{r.getheader('Content-Range')!r})")
        return int(m.group(3))

    def _same(self, r, offset: int, n: int) -> None:
        """The response is of the file that was opened, and of the bytes asked for."""
        total = self._total(r)
        if total != self.size:
            raise SourceChangedError(self.name, f"its size went from {self.size} to {total} bytes")
        etag = _norm_etag(r.getheader("ETag"))
        if self._etag is not None and etag is not None and etag != self._etag:
            raise SourceChangedError(self.name, f"its ETag went from {self._etag!r} to {etag!r}")
        m = _CONTENT_RANGE.fullmatch(r.getheader("Content-Range").strip())
        if (int(m.group(1)), int(m.group(2))) != (offset, offset + n - 1):
            raise RemoteError(f"{self.name}: asked for bytes [{offset}, {offset + n}), got "
                              f"{r.getheader('Content-Range')!r}")

    def _fetch(self, offset: int, view: memoryview) -> None:
        """Exactly ``len(view)`` bytes; a broken response is resumed where it stopped, after a
        wait that doubles with each failure in a row (``RETRIES`` failures in a row fail)."""
        got, failures, n = 0, 0, len(view)
        while got < n:
            try:
                with self._connection() as c:
                    r = self._get(c, offset + got, n - got)
                    try:
                        self._same(r, offset + got, n - got)
                    except BaseException:
                        c.close()
                        raise
                    got = self._body(c, r, view, got)
                failures = 0
            except _Retry as e:
                failures += 1
                if failures >= RETRIES:
                    raise RemoteError(f"{self.name}: bytes [{offset + got}, {offset + n}) failed {failures} times "
                                      f"in a row (last: {e.why})") from None
                time.sleep(_backoff(failures - 1))
            if self._closing and self._users == 0:
                raise GGUFLabError(f"{self.name}: model is closed")

    def _body(self, c: Connection, r, view: memoryview, got: int) -> int:
        """Read a response's body into ``view`` from ``got`` (``readinto``: no copy in between);
        returns how far it got; a broken body raises ``_Retry`` after keeping what came."""
        end = len(view)
        try:
            while got < end:
                k = r.readinto(view[got:min(end, got + READ_BLOCK)])
                if not k:
                    break
                got += k
                self._count(k)
        except (OSError, http.client.HTTPException) as e:  # a reset, a timeout, an incomplete read
            c.close()
            raise _Retry(type(e).__name__) from None
        if got < end:
            c.close()
            raise _Retry(f"the response ended after {got} of {end} bytes")
        return got

    def _release(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()


class FsspecSource(RemoteSource):
    """A file in an fsspec store (``s3://``, ``gs://``, ``memory://``...), read with the stateless
    ``cat_file(path, start, end)``; its identity (ETag, generation or modification time, and
    size) is checked at open, before and after a load."""

    def __init__(self, url: str):
        super().__init__()
        try:
            import fsspec
        except ImportError:
            raise GGUFLabError(f"{redact(url)}: reading {url.split(':', 1)[0]}:// URLs needs fsspec "
                               "(pip install 'gguf-gpu-lab[remote]') and its backend for the scheme") from None
        self.name = redact(url)
        try:
            self.fs, self.fpath = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise GGUFLabError(f"{self.name}: no fsspec backend for this URL ({e})") from None
        self.identity = self._stat()
        self.size = self.identity[-1]
        if self.size == 0:
            raise GGUFFormatError("file is 0 bytes, too short for a GGUF header (24 bytes)", path=self.name)

    def _stat(self) -> tuple:
        try:
            info = self.fs.info(self.fpath)
        except FileNotFoundError:
            raise RemoteNotFoundError(f"{self.name}: not found") from None
        except PermissionError:
            raise RemoteError(f"{self.name}: access denied") from None
        tag = next((info[k] for k in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")
                    if info.get(k) is not None), None)
        return ("fsspec", self.name, str(tag) if tag is not None else None, int(info["size"]))

    def check(self) -> None:
        now = self._stat()
        if now != self.identity:
            raise SourceChangedError(self.name, f"it was {self.identity[2:]} (tag, size), it is {now[2:]}")

    def _fetch(self, offset: int, view: memoryview) -> None:
        for failures in range(RETRIES):
            try:
                data = self.fs.cat_file(self.fpath, start=offset, end=offset + len(view))
                break
            except (ConnectionError, TimeoutError) as e:  # fsspec backends retry too; this bounds the rest
                if failures == RETRIES - 1:
                    raise RemoteError(f"{self.name}: bytes [{offset}, {offset + len(view)}) failed "
                                      f"{RETRIES} times ({type(e).__name__})") from None
                time.sleep(_backoff(failures))
        if len(data) != len(view):
            raise SourceChangedError(self.name, f"asked for {len(view)} bytes at offset {offset}, got {len(data)}")
        view[:] = data
        self._count(len(data))


def fetch_lanes(profile):
    """Per connection (a reader thread's lane) of a streamed load's profile: bytes fetched, busy
    time and GB/s while busy; a reader's "read" spans are its ranged requests."""
    import pandas as pd

    from .profiler import union_us

    df = profile.df
    reads = df[df["lane"].str.startswith("reader") & (df["stage"] == "read")]
    rows = []
    for lane, g in reads.groupby("lane", sort=False):
        busy = union_us(g["start_us"].tolist(), g["end_us"].tolist())
        rows.append({"lane": lane, "requests": len(g), "bytes": int(g["bytes"].sum()), "busy_us": busy,
                     "gb_s": g["bytes"].sum() / busy / 1e3 if busy else float("nan")})
    out = pd.DataFrame(rows, columns=["lane", "requests", "bytes", "busy_us", "gb_s"])
    return out.sort_values("lane", key=lambda s: s.str.extract(r"(\d+)$")[0].astype(int)).reset_index(drop=True)
