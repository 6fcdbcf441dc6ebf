"""Remote byte sources: a GGUF file over HTTP(S), on the Hugging Face Hub, or in an fsspec store.

Each is a ``ByteSource`` (source.py): the header parser, ``GGUFModel.raw`` and the loader's reader
threads read through it as they read a local file, and do not know the difference.

- ``HTTPSource``: ranged ``GET`` requests, one connection per concurrent reader (a pool of
  ``http_conn.Connection``: one is never used by two threads at once), retried with bounded
  backoff on resets, timeouts, 5xx and 429, resuming where the broken response stopped. Every
  response is checked against what was opened: its total size (``Content-Range``) and ETag; a
  difference is a ``SourceChangedError``. A server that answers a range with the whole file is an
  error that says so. A redirect (the Hub's to its CDN) is followed once and its target reused
  by every later request until it is about to expire (a signed URL's ``Expires`` or
  ``X-Amz-Date`` + ``X-Amz-Expires``) or fails; then the file's own URL is asked again. A read
  under a load's stop flag (``source.stopping``) gives up within about ``http_conn.POLL_S``.
- ``remote_hub.hub_source``: ``hf://ORG/REPO/FILE.gguf[@REVISION]`` through ``huggingface_hub`` (its token,
  ``HF_ENDPOINT``, its URL for a file), the revision resolved to a commit at open, so the bytes
  cannot change under a load; gated, 401/403 and 404 answers as one line naming the file.
- ``remote_fsspec.FsspecSource``: any other ``scheme://`` that fsspec has a backend for
  (``s3://``, ``gs://``, ``memory://``...), through its stateless ``cat_file(path, start, end)``.

A load's chunk is read with ``read_ranges``: each run of adjacent ranges (a chunk's pieces
usually are) is one request, received straight into the staging slot.

The header comes from a prefix: 1 MiB first, then the bytes the parser asks for plus 1 MiB, so an
open fetches at most the header and 1 MiB more. Tokens and signed query strings are never shown:
names and errors carry the URL without credentials or query.
"""

from __future__ import annotations

import calendar
import contextlib
import math
import queue
import re
import threading
import time
import urllib.parse

import numpy as np

from .errors import (GGUFFormatError, GGUFLabError, LoadCancelled, RemoteError, RemoteNotFoundError, RemoteWarning,
                     SourceChangedError, warn)
from .http_conn import Connection, ConnectionFailed, Stopped
from .source import ByteSource, current_stop

HEADER_STEP = 1 << 20  # the first header fetch, and how far past the parser's need each later one goes
EXPIRY_MARGIN_S = 60.0  # a redirected URL signed until T is used until T minus this, then resolved again
RETRIES = 6  # attempts in a row without progress before a range fails
# A Last-Modified date tells versions apart only when the server's Date is at least this much later
# (RFC 9110, 8.8.2.2): dates have whole seconds, so two writes within one second share one date.
STRONG_DATE_S = 60
BACKOFF_S = (0.05, 2.0)  # first wait after a failure, and the most any wait grows to
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(where) -> bool:
    """Whether ``where`` names a remote file (``scheme://...``; ``file://`` is local)."""
    return isinstance(where, str) and bool(_URL_RE.match(where)) and where[:7].lower() != "file://"


def redact(url: str) -> str:
    """``url`` without user, password and query string (where tokens and signatures live)."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:  # a malformed URL ("[::1" with no "]"): cut by hand, never shown with its secrets
        m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#]*)([^?#]*)", url)
        return m.group(1) + m.group(2).rpartition("@")[2] + m.group(3) if m else "(a URL that cannot be read)"
    host = u.netloc.rpartition("@")[2]  # as written: a port out of range stays visible (and refused after)
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

    def _unversioned(self, gives: str) -> None:
        """The source's identity names no version (``gives``: what its server or store lacks):
        not ``validated``, and a ``RemoteWarning`` says so at the user's line."""
        self.validated = False
        warn(f"{self.name}: the {gives}, so a change to the file at its old size cannot be seen while it is read; "
             "it will not be cached (cache=) or shared between loads", RemoteWarning)

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
        if dst.nbytes:
            self._fetch_run(offset, memoryview(dst).cast("B"))
        else:
            self._bounds(offset, 0)

    def read_ranges(self, ranges, dst: np.ndarray) -> int:
        """As ``ByteSource.read_ranges``, with each run of adjacent ranges one fetch (one request)."""
        view = memoryview(dst).cast("B")
        pos = 0
        run_off = run_pos = run_n = 0
        for offset, n in ranges:
            if run_n and offset != run_off + run_n:
                self._fetch_run(run_off, view[run_pos:run_pos + run_n])
                run_n = 0
            if not run_n:
                run_off, run_pos = offset, pos
            run_n += n
            pos += n
        if run_n:
            self._fetch_run(run_off, view[run_pos:run_pos + run_n])
        return pos

    def _fetch_run(self, offset: int, view: memoryview) -> None:
        self._bounds(offset, len(view))
        if self._closing and self._users == 0:
            raise GGUFLabError(f"{self.name}: model is closed")
        self._fetch(offset, view)

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


def _strong_date(modified: str, date: str | None) -> bool:
    """Whether a Last-Modified date can tell versions apart: the response's Date (when the server
    answered) at least ``STRONG_DATE_S`` later (RFC 9110, 8.8.2.2); False when either is unreadable."""
    import email.utils

    try:
        return (email.utils.parsedate_to_datetime(date) - email.utils.parsedate_to_datetime(modified)).total_seconds() \
            >= STRONG_DATE_S
    except (TypeError, ValueError, IndexError):
        return False


class _Retry(Exception):
    """A failure worth another attempt (a reset, a timeout, a 5xx); ``why`` says which;
    ``wait``: after the usual backoff (False: at once, as after a redirect that expired)."""

    def __init__(self, why: str, wait: bool = True, got: int | None = None):
        super().__init__(why)
        self.why = why
        self.wait = wait
        self.got = got  # a broken body: how far the view was filled (the retry resumes there)


def url_expiry(url: str) -> float:
    """When a signed URL stops working (seconds since the epoch), from CloudFront's ``Expires``
    or S3's ``X-Amz-Date`` + ``X-Amz-Expires``; infinity when the URL does not say."""
    q = {k.lower(): v for k, v in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)}
    try:
        if "expires" in q:
            return float(q["expires"])
        if "x-amz-date" in q and "x-amz-expires" in q:
            t = time.strptime(q["x-amz-date"], "%Y%m%dT%H%M%SZ")
            return calendar.timegm(t) + float(q["x-amz-expires"])
    except ValueError:
        pass
    return math.inf


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
        # where a redirect led (url, headers to send there, when to stop using it), or None
        self._direct: tuple[str, dict, float] | None = None
        self.resolves = 0  # requests made to ``url`` itself that were redirected (for tests and benchmarks)
        self.size = -1
        self._validator: tuple[str, str] | None = None  # ("ETag", tag) or ("Last-Modified", date)
        try:
            urllib.parse.urlsplit(url).port  # a malformed URL (a port out of range, say) is refused here, by name
        except ValueError as e:
            raise RemoteError(f"{self.name}: not a URL that can be read ({e})") from None
        failures = 0
        try:
            while True:  # one byte tells the size (Content-Range), the ETag, and whether ranges are served
                try:
                    with self._connection() as c:
                        r = self._get(c, 0, 1, probe=True)
                        etag, modified = _norm_etag(r.getheader("ETag")), r.getheader("Last-Modified")
                        self._validator = ("ETag", etag) if etag else ("Last-Modified", modified) if modified else None
                        weak_date = not etag and modified and not _strong_date(modified, r.getheader("Date"))
                        self.size = self._total(r)
                        self._count(c.read_body(r, memoryview(bytearray(1))))
                    break
                except _Retry as e:
                    failures = self._after_failure(e, failures, "opening it", None)
        except BaseException:
            self._release()
            raise
        self.identity = identity or ("http", self.name, self._validator and self._validator[1], self.size)
        if identity is None and self._validator is None:
            self._unversioned("server sends neither an ETag nor a Last-Modified date")
        elif identity is None and weak_date:
            self._unversioned(f"server sends no ETag, and its Last-Modified date ({self._validator[1]}) is not "
                              f"{STRONG_DATE_S} s before its Date: two versions written within that second share it")

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

    def _target(self) -> tuple[str, dict, bool]:
        """Where the next request goes: the redirect's target while it is valid, else the URL."""
        d = self._direct
        if d is not None and time.time() < d[2] - EXPIRY_MARGIN_S:
            return d[0], d[1], True
        return self.url, self._headers, False

    def _get(self, c: Connection, offset: int, n: int, probe: bool = False, stop=None):
        """The response to a GET of [offset, offset + n) after its status is checked; ``_Retry``
        for what another attempt may cure, ``RemoteError`` for what it will not."""
        url, headers, direct = self._target()
        try:
            r = c.get(url, {**headers, "Range": f"bytes={offset}-{offset + n - 1}"}, stop)
        except ConnectionFailed as e:
            if direct:
                self._direct = None
            if probe and e.permanent:
                raise RemoteError(f"{self.name}: cannot connect: {e.why}") from None
            raise _Retry(e.why) from None
        code = r.status
        redirected = r.url != url
        if redirected and not direct:  # redirected: go straight there next time
            self.resolves += 1
            same_host = urllib.parse.urlsplit(r.url).hostname == urllib.parse.urlsplit(url).hostname
            hdrs = headers if same_host else {k: v for k, v in headers.items() if k.lower() != "authorization"}
            self._direct = (r.url, hdrs, url_expiry(r.url))
        if code == 206:
            return r
        c.close()  # the body is not read: the connection cannot serve another request
        if (direct or redirected) and code < 500 and code != 429:  # the redirect's target expired or refused:
            self._direct = None                                     # ask the URL itself again
            raise _Retry(f"the redirected URL answered HTTP {code}", wait=False)
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
        if code == 416:  # bytes inside the size it had at open are past its end now: it changed
            m = re.fullmatch(r"bytes \*/(\d+)", (r.getheader("Content-Range") or "").strip())
            now = f"{m.group(1)} bytes" if m else "fewer bytes than asked for"
            raise SourceChangedError(self.name, f"its size went from {self.size} to {now} (HTTP 416 for bytes "
                                                f"[{offset}, {offset + n}))")
        raise RemoteError(f"{self.name}: HTTP {code} for bytes [{offset}, {offset + n})")

    def _total(self, r) -> int:
        m = _CONTENT_RANGE.fullmatch((r.getheader("Content-Range") or "").strip())
        if m is None or m.group(3) == "*":
            raise RemoteError(f"{self.name}: a ranged answer without the file's size (Content-Range: "
                              f"{r.getheader('Content-Range')!r})")
        return int(m.group(3))

    def _same(self, r, offset: int, n: int) -> None:
        """The response is of the file that was opened, and of the bytes asked for."""
        cr = r.getheader("Content-Range") or ""
        if cr != f"bytes {offset}-{offset + n - 1}/{self.size}":  # the usual answer, seen without a regex
            total = self._total(r)
            if total != self.size:
                raise SourceChangedError(self.name, f"its size went from {self.size} to {total} bytes")
            raise RemoteError(f"{self.name}: asked for bytes [{offset}, {offset + n}), got {cr!r}")
        if self._validator is not None:  # the validator of the first answer, in every answer that has one
            header, was = self._validator
            now = r.getheader(header)
            if now is not None:
                now = _norm_etag(now) if header == "ETag" else now  # as the first answer's was kept
                if now != was:
                    raise SourceChangedError(self.name, f"its {header} went from {was!r} to {now!r}")
        if r.chunked:
            raise RemoteError(f"{self.name}: the server sent bytes [{offset}, {offset + n}) in chunked encoding, "
                              "which ranged reads do not take")
        if r.length is not None and r.length != n:
            raise RemoteError(f"{self.name}: asked for {n} bytes at {offset}, the answer has {r.length}")

    def _fetch(self, offset: int, view: memoryview) -> None:
        """Exactly ``len(view)`` bytes; a broken response is resumed where it stopped, after a
        wait that doubles with each failure in a row (``RETRIES`` failures in a row fail). Under
        a stop flag (``source.stopping``) a set flag ends it with ``LoadCancelled``."""
        got, failures, n = 0, 0, len(view)
        stop = current_stop()
        while got < n:
            try:
                with self._connection() as c:
                    r = self._get(c, offset + got, n - got, stop=stop)
                    try:
                        self._same(r, offset + got, n - got)
                    except BaseException:
                        c.close()
                        raise
                    got = self._body(c, r, view, got, stop)
                failures = 0
            except _Retry as e:
                if e.got is not None and e.got > got:  # bytes came before it broke: resume after them,
                    got, failures = e.got, 0            # and count failures in a row from here
                failures = self._after_failure(e, failures, f"bytes [{offset + got}, {offset + n})", stop)
            except Stopped:
                raise LoadCancelled(f"{self.name}: read of bytes [{offset + got}, {offset + n}) stopped "
                                    "(load cancelled)") from None
            if self._closing and self._users == 0:
                raise GGUFLabError(f"{self.name}: model is closed")

    def _after_failure(self, e: _Retry, failures: int, what: str, stop) -> int:
        """Failures in a row after ``e``: ``RETRIES`` of them raise ``RemoteError`` naming
        ``what``; fewer wait the backoff (unless ``e`` says at once)."""
        failures += 1
        if failures >= RETRIES:
            raise RemoteError(f"{self.name}: {what} failed {failures} times in a row (last: {e.why})") from None
        if e.wait:
            self._sleep(_backoff(failures - 1), stop)
        return failures

    @staticmethod
    def _sleep(seconds: float, stop) -> None:
        if stop is None:
            time.sleep(seconds)
            return
        end = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < end:
            time.sleep(min(0.05, seconds))
        if stop.is_set():
            raise Stopped

    def _body(self, c: Connection, r, view: memoryview, got: int, stop) -> int:
        """Read a response's body into ``view`` from ``got`` (straight into it: no copy in
        between); returns how far it got; a broken body raises ``_Retry`` after keeping what came."""
        end = len(view)
        k = c.read_body(r, view[got:], stop)
        self._count(k)
        got += k
        if got < end:
            raise _Retry(f"the response ended after {got} of {end} bytes", got=got)
        return got

    def _release(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()


def fetch_lanes(profile):
    """Per connection (a reader thread's lane) of a streamed load's profile: requests, bytes
    fetched, busy time, GB/s while busy, and when its first read began and its last ended
    (microseconds from the load's start); a reader's "read" spans are its chunks' requests."""
    import pandas as pd

    from .profiler import union_us

    df = profile.df
    reads = df[df["lane"].str.startswith("reader") & (df["stage"] == "read")]
    rows = []
    for lane, g in reads.groupby("lane", sort=False):
        busy = union_us(g["start_us"].tolist(), g["end_us"].tolist())
        rows.append({"lane": lane, "requests": len(g), "bytes": int(g["bytes"].sum()), "busy_us": busy,
                     "gb_s": g["bytes"].sum() / busy / 1e3 if busy else float("nan"),
                     "first_us": float(g["start_us"].min()), "last_us": float(g["end_us"].max())})
    out = pd.DataFrame(rows, columns=["lane", "requests", "bytes", "busy_us", "gb_s", "first_us", "last_us"])
    return out.sort_values("lane", key=lambda s: s.str.extract(r"(\d+)$")[0].astype(int)).reset_index(drop=True)
