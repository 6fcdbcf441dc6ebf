"""One keep-alive HTTP(S) connection for ranged reads, on the standard library's ``http.client``:
a response body is read with ``readinto`` straight into the caller's buffer (no copy in between),
and nothing beyond Python is needed wherever the toolkit runs. Redirects are followed (the Hub
sends file downloads to a CDN), an ``Authorization`` header is dropped when a redirect leaves
the host, as browsers and ``requests`` do. Proxies from the environment are not used.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import urllib.parse

MAX_REDIRECTS = 8
TIMEOUT_S = 60.0  # to connect, and between two reads of a response
USER_AGENT = "gguf-gpu-lab"


class ConnectionFailed(Exception):
    """The connection broke before a response came (a reset, a refused connect, a timeout):
    worth another attempt on a new connection. ``why`` names the error, never the URL."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _tls() -> ssl.SSLContext:
    try:
        import certifi  # the CA bundle pip itself trusts, where installed

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


class Connection:
    """A connection to one host at a time, used by one thread at a time."""

    def __init__(self) -> None:
        self._conn: http.client.HTTPConnection | None = None
        self._key: tuple | None = None

    def get(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """The response to ``GET url`` after redirects; its body is the caller's to read, or to
        end with ``close()`` (a connection is reused only after a body read to its end)."""
        if not any(k.lower() == "user-agent" for k in headers):
            headers = {"User-Agent": USER_AGENT, **headers}
        for _ in range(MAX_REDIRECTS + 1):
            u = urllib.parse.urlsplit(url)
            conn = self._connect(u)
            h = dict(headers)
            if u.username is not None and not any(k.lower() == "authorization" for k in h):
                creds = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
                h["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
            try:
                conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""), headers=h)
                r = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise ConnectionFailed(type(e).__name__) from None
            loc = r.getheader("Location")
            if r.status in (301, 302, 303, 307, 308) and loc:
                self.close()  # its body is not worth reading; the next host may be another
                new = urllib.parse.urljoin(url, loc)
                if urllib.parse.urlsplit(new).hostname != u.hostname:
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = new
                continue
            return r
        raise ConnectionFailed(f"more than {MAX_REDIRECTS} redirects")

    def _connect(self, u) -> http.client.HTTPConnection:
        https = u.scheme == "https"
        key = (https, u.hostname, u.port)
        if self._conn is None or key != self._key:
            self.close()
            if https:
                self._conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=TIMEOUT_S, context=_tls())
            else:
                self._conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT_S)
            self._key = key
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._key = None
