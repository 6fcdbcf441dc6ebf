"""Where a model's bytes come from: a byte source.

Everything that reads a model's bytes (the header parser, ``GGUFModel.raw``, the loader's
readers, the lazy cache) reads them through the model's source and never asks what it is. A
source owns what it reads through and says what it is:

- ``size``: the bytes it had when it was opened; ``identity``: what those bytes are (a local
  file's device, inode, size, modification time and status-change time; a remote file's ETag
  or commit);
- ``read_into(offset, dst)``: exactly ``dst.nbytes`` bytes, positional and thread-safe;
  ``read_ranges(ranges, dst)``: several ranges one after another (a remote source asks for a
  run of adjacent ones in one request);
- ``view(offset, n)``: a zero-copy read-only view where the source has one (a mapping), else None;
- ``check()``: raises ``SourceChangedError`` if the bytes may no longer be the ones the header
  was parsed from;
- ``use()``: a context in which the source stays open (``close()`` waits for the last user).

``LocalFile`` reads through one descriptor and the mapping of that same descriptor, so a file
replaced on disk after it was opened (``os.replace``, as downloaders do) is never read: the model
keeps reading the inode its header came from. A file changed in place (truncated, rewritten,
appended to) shows in ``check()``, by its size or modification time; one rewritten with its old
modification time put back (``cp -p``), by its status-change time and a header that is not the
one parsed (the CRC-32 kept at open: a rename, chmod or link moves that time too, and is not a
change; other tensor bytes under the same header, with the time put back, are not seen).
``check()`` is what the loader calls before a load, once per chunk read from the mapping, and
after the last read.

``stopping(stop)``: the reads a thread makes inside look at ``stop`` (an object with
``is_set()``, a load's stop flag) while they wait, and a remote one gives up within about 0.1 s
of it being set (``LoadCancelled``); a local read is short and runs to its end.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
import time
import zlib

import numpy as np

from .errors import GGUFFormatError, GGUFLabError, ModelNotFoundError, SourceChangedError


_STOP = threading.local()


@contextlib.contextmanager
def stopping(stop):
    """Within: this thread's reads give up soon after ``stop.is_set()`` (see the module)."""
    prev = getattr(_STOP, "flag", None)
    _STOP.flag = stop
    try:
        yield
    finally:
        _STOP.flag = prev


def current_stop():
    """The stop flag of this thread's ``stopping`` context, or None."""
    return getattr(_STOP, "flag", None)


class ByteSource:
    """The interface every source offers (see the module's docstring)."""

    name: str  # shown in errors: a path, or a URL without its credentials
    size: int
    identity: tuple
    # whether ``identity`` names one version of the bytes (False: a server that gives no ETag or
    # date, where a change at the old size cannot be seen; such a source is not cached or shared)
    validated: bool = True

    def __init__(self) -> None:
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    # -- what a source implements ---------------------------------------------------------------
    def read_into(self, offset: int, dst: np.ndarray) -> None:
        raise NotImplementedError

    def read_ranges(self, ranges, dst: np.ndarray) -> int:
        """The bytes of each ``(offset, n)`` of ``ranges``, one after another, into ``dst``;
        returns the bytes written."""
        pos = 0
        for offset, n in ranges:
            self.read_into(offset, dst[pos:pos + n])
            pos += n
        return pos

    def view(self, offset: int, n: int) -> np.ndarray | None:
        """A zero-copy read-only view of [offset, offset + n), or None (no mapping)."""
        return None

    def check(self) -> None:
        """Raise ``SourceChangedError`` when the bytes may have changed since the source was opened."""

    def keep_header(self, n: int) -> None:
        """The model parsed its header from the first ``n`` bytes (a source that can check them
        later keeps a fingerprint)."""

    def header(self, want: int = 0):
        """A buffer the header parser reads: the whole file (a local one), or a prefix of at
        least ``want`` bytes (a remote one; ``header.read_header`` asks for more as it needs)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free what the source holds (called once, when closed and no longer in use)."""

    # -- shared by every source -------------------------------------------------------------
    @property
    def mappable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closing

    def _bounds(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise GGUFLabError(f"{self.name}: bytes [{offset}, {offset + n}) are outside the file "
                               f"({self.size} bytes)")

    def read(self, offset: int, n: int, *, mapped: bool = True) -> np.ndarray:
        """Bytes [offset, offset + n) as a read-only uint8 array: a view of the mapping when
        ``mapped`` and the source has one (after a ``check()``, so that a truncated file is an
        error, not a SIGBUS), else a fresh array filled by ``read_into`` and checked after the
        read as well (a change in place while it read is an error, not other bytes)."""
        self._bounds(offset, n)
        self.check()
        if mapped and self.mappable:
            v = self.view(offset, n)
            if v is not None:
                return v
        out = np.empty(n, np.uint8)
        self.read_into(offset, out)
        self.check()
        out.flags.writeable = False
        return out

    @contextlib.contextmanager
    def use(self):
        """While inside, ``close()`` only marks the source closed; the last user frees it, so a
        descriptor is never closed (and its number reused by another file) under a running read."""
        with self._lock:
            if self._closing:
                raise GGUFLabError(f"{self.name}: model is closed")
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                last = self._closing and self._users == 0
            if last:
                self._release()

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            free = self._users == 0
        if free:
            self._release()

    def __enter__(self) -> "ByteSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class LocalFile(ByteSource):
    """A local file: one descriptor, and a read-only mapping of that descriptor."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.name = self.path = os.fspath(path)
        try:  # (non-blocking: opening a FIFO would otherwise wait for a writer, forever)
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path}: cannot open: no such file") from None
        except OSError as e:
            raise GGUFLabError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = next((what for test, what in _KINDS if test(st.st_mode)), "something")
                raise GGUFLabError(f"{self.path}: cannot open: {kind}, not a regular file")
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            if st.st_size == 0:  # an empty file cannot be mapped
                raise GGUFFormatError("file is 0 bytes, too short for a GGUF header (24 bytes)", path=self.path)
            # the size just seen, not the file's size at mmap time: a file still growing (a
            # download) is then the prefix its identity describes, and check() sees it grow
            try:
                mapping = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
            except ValueError:  # it shrank since the stat: "mmap length is greater than file size"
                raise SourceChangedError(self.path, _describe_change((0, 0, st.st_size, st.st_mtime_ns, 0),
                                                                     os.fstat(fd)) or "it shrank") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._mapping = mapping
        self._u8 = np.frombuffer(mapping, np.uint8)  # the whole file, zero-copy
        self.size = st.st_size
        # the status-change time too: a path whose file was rewritten with its old modification
        # time put back (cp -p) is parsed again, and check() looks at such a file's header
        self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        self._ctime_seen = st.st_ctime_ns
        self._kept: tuple[int, int] | None = None  # (bytes, CRC-32) of the parsed header

    @property
    def mappable(self) -> bool:
        return not self._closing

    def header(self, want: int = 0):
        return self._mapping

    def check(self) -> None:
        try:
            st = os.fstat(self._fd)
        except OSError as e:  # closed under us
            raise GGUFLabError(f"{self.name}: model is closed ({e.strerror or e})") from None
        _, _, size, mtime, _ = self.identity
        if st.st_size != size or st.st_mtime_ns != mtime:
            raise SourceChangedError(self.name, _describe_change(self.identity, st))
        if st.st_ctime_ns != self._ctime_seen:
            # the status changed with size and time kept: a rename, chmod, link, xattr, or a rewrite
            # with the old time put back. The header is what the model was parsed from: if it is
            # not the same, neither are the tensors' places and types
            kept = self._kept
            if kept is not None and self._crc(kept[0]) not in (kept[1], None):
                raise SourceChangedError(self.name, "its header was rewritten in place and its modification time "
                                                    "put back")
            self._ctime_seen = st.st_ctime_ns

    def keep_header(self, n: int) -> None:
        """Remember the first ``n`` bytes (the header the model parsed) by their CRC-32 (about
        0.2 ms a MB), which ``check()`` compares when only the file's status-change time moved.
        A file whose status changed since it was opened (during the parse) is an error: the CRC
        would be of bytes other than the ones parsed."""
        crc = self._crc(n)
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.identity[2:]:
            raise SourceChangedError(self.name, _describe_change(self.identity, st) or "its status changed while "
                                                "its header was read")
        self._kept = (n, crc)

    def _crc(self, n: int) -> int | None:
        # (a function of its own: no frame of a raised error keeps a view of the mapping alive)
        u8 = self._u8
        return None if u8 is None else zlib.crc32(u8[:n])

    def view(self, offset: int, n: int) -> np.ndarray | None:
        self._bounds(offset, n)
        u8 = self._u8
        if u8 is None:
            raise GGUFLabError(f"{self.name}: model is closed")
        return u8[offset:offset + n].view(np.ndarray)

    def read_into(self, offset: int, dst: np.ndarray) -> None:
        """preadv(2) straight into ``dst``: a file that ends early is an error naming it, never a crash."""
        n = dst.nbytes
        self._bounds(offset, n)
        view = memoryview(dst).cast("B")
        got = 0
        while got < n:
            r = os.preadv(self._fd, [view[got:]], offset + got)
            if r <= 0:
                raise SourceChangedError(self.name, f"it ended early: read {got} of {n} bytes at offset "
                                                    f"{offset} (was it truncated after it was opened?)")
            got += r

    def _release(self) -> None:
        # the mapping itself goes when the last array viewing it does (views from raw() stay
        # valid): unmapping under a live view would crash the process
        self._u8 = None
        self._mapping = None
        os.close(self._fd)
        self._fd = -1


def _describe_change(identity: tuple, st: os.stat_result) -> str:
    _, _, size0, mtime0, _ = identity
    parts = []
    if st.st_size != size0:
        parts.append(f"its size went from {size0} to {st.st_size} bytes")
    if st.st_mtime_ns != mtime0:
        parts.append(f"it was modified at {_when(st.st_mtime_ns)} (opened as of {_when(mtime0)})")
    return "; ".join(parts)


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) + f".{ns % 10**9 // 10**6:03d}"
