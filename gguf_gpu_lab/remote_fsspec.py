"""A file in an fsspec store (``s3://``, ``gs://``, ``memory://``...) as a remote byte source,
read with fsspec's stateless ``cat_file(path, start, end)`` (fsspec file objects are not
thread-safe)."""

from __future__ import annotations

import time

from .errors import GGUFFormatError, GGUFLabError, RemoteError, RemoteNotFoundError, SourceChangedError
from .remote import RETRIES, RemoteSource, _backoff, redact


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
        except OSError as e:  # a backend that connects when made (ftp, sftp): refused, unreachable
            raise RemoteError(f"{self.name}: cannot reach the store ({e.strerror or type(e).__name__})") from None
        self.identity = self._stat()
        self.size = self.identity[-1]
        if self.identity[2] is None:
            self._unversioned("store gives no ETag, generation or modification time")
        if self.size == 0:
            raise GGUFFormatError("file is 0 bytes, too short for a GGUF header (24 bytes)", path=self.name)

    def _stat(self) -> tuple:
        try:
            info = self.fs.info(self.fpath)
        except FileNotFoundError:
            raise RemoteNotFoundError(f"{self.name}: not found") from None
        except PermissionError:
            raise RemoteError(f"{self.name}: access denied") from None
        except OSError as e:
            raise RemoteError(f"{self.name}: cannot reach the store ({e.strerror or type(e).__name__})") from None
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
