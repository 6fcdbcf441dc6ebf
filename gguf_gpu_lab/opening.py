"""Which byte source a path or URL gets: ``open_source`` is the one door. A local path is a
``source.LocalFile``; ``http(s)://`` an ``remote.HTTPSource``; ``hf://`` the Hub's file through
``remote_hub``; any other URL an fsspec store's (``remote_fsspec.FsspecSource``); with ``cache`` a remote
source that keeps what it reads on disk (``remote_cache``). The sources know nothing of each
other; only this module knows them all.
"""

from __future__ import annotations

import os
import urllib.parse

from .errors import GGUFLabError
from .remote import HTTPSource, is_url
from .remote_cache import cached
from .remote_fsspec import FsspecSource
from .remote_hub import hub_offline, hub_source, offline_file
from .source import ByteSource, LocalFile


def open_source(where: "str | os.PathLike | ByteSource", **remote) -> ByteSource:
    """The source for a path, a URL (``http(s)://``, ``hf://``, an fsspec URL; ``remote``: its
    ``cache`` and ``token``, see ``open_remote``), or a source, as it is."""
    if isinstance(where, ByteSource):
        return where
    if not isinstance(where, (str, os.PathLike)):
        raise GGUFLabError(f"a model is opened from a path, a URL or a ByteSource, got {where!r}")
    if is_url(where):
        return open_remote(where, **remote)
    if remote:
        given = " and ".join(f"{k}=" for k in remote)
        raise GGUFLabError(f"{where}: {given} {'are' if len(remote) > 1 else 'is'} for URLs, not local files")
    if isinstance(where, str) and where[:7].lower() == "file://":
        where = file_url_path(where)
    return LocalFile(where)


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` URL (RFC 8089): ``file:///p`` or ``file://localhost/p``,
    percent-escapes decoded (``%20`` a space); another host is an error, as it is no local file.
    A ``#`` or ``?`` is part of the path (a file's name may hold one), not a fragment or query."""
    host, slash, path = url[len("file://"):].partition("/")
    if host.lower() not in ("", "localhost"):
        raise GGUFLabError(f"{url}: a file:// URL here names a file on this machine (file:///PATH or "
                           f"file://localhost/PATH), not one on {host!r}")
    return urllib.parse.unquote(slash + path)


def open_remote(url: str, *, cache=None, token=None) -> ByteSource:
    """The source of a URL: ``http(s)://``, ``hf://`` or an fsspec URL; with ``cache`` (a path,
    or ``"hf"`` for the Hugging Face cache) a source that writes what it reads to disk and is a
    local file once complete (see ``remote_cache``)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        src = HTTPSource(url)
    elif scheme == "hf":
        if hub_offline():  # as huggingface_hub does: the cached copy, whatever cache= says, or an error
            return LocalFile(offline_file(url))
        src = hub_source(url, token)
    else:
        src = FsspecSource(url)
    if cache is None:
        return src
    return cached(src, cache)
