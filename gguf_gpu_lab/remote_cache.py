"""Caching a remote file on disk as it is read: the next open is a local file.

``open_model(url, cache=...)`` and ``load(url, cache=...)``: every byte a remote source reads is
also written to a sparse part file (``pwrite`` at its offset), and the ranges written are recorded
beside it; a byte already on disk is read from there, not fetched again. When every byte is in,
the part file is renamed to its final name, and later opens read it as a local file (after one
request that checks the remote file is still the same). An interrupted download resumes: the part
file and its record are kept, and the next open fetches only what is missing.

``cache`` is a path (a file, or a folder that the file goes in under the URL's name) or ``"hf"``:
an ``hf://`` file goes into the Hugging Face cache in huggingface_hub's layout (``blobs/ETAG``,
``snapshots/COMMIT/FILE`` linked to it, ``refs/REVISION``), where ``hf_hub_download`` and
transformers find it. A file at the path that this cache did not write is never replaced. One
source fills a part file at a time (an exclusive ``flock``): a second open of the same URL and
cache, while the first fills it, reads the remote file without the cache.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import threading
import time
import weakref

import numpy as np

from .errors import GGUFLabError
from .outputs import pwrite_all
from .remote import RemoteSource
from .source import ByteSource, LocalFile

PART = ".gguf-lab-part"  # the part file's suffix (not huggingface_hub's ".incomplete": ours is sparse)
RECORD = ".gguf-lab.json"  # beside a finished path cache: what it is a copy of
SAVE_EVERY_S = 0.5  # the part file's record is written at most this often (and when it closes)


def cached(src: RemoteSource, cache) -> ByteSource:
    """``src`` read through the cache ``cache``: a ``LocalFile`` when the finished copy is there
    and of the same file, else a ``CachingSource`` that fills it. A source whose identity says
    no version (``validated`` False) is refused: its copy could not be told from a changed file."""
    try:
        if not src.validated:
            raise GGUFLabError(f"{src.name}: cannot be cached: its server gives no version of the file (neither "
                               "an ETag nor a Last-Modified date), so a cached copy could not be told from a "
                               "changed file; load it without cache=")
        if cache == "hf":
            final, done_hook, shown = _hf_paths(src)
            hit = os.path.isfile(final)
        else:
            final = _path_for(src, os.fspath(cache))
            done_hook = _recorder(final, src.identity)
            hit = os.path.isfile(final) and _is_copy_of(final, src)
            shown = final
        if hit:
            local = LocalFile(shown)  # for the Hub, its snapshot path (FILE's name), the blob behind it
            if local.size == src.size:
                src.close()
                return local
            local.close()
        try:
            return CachingSource(src, final, done_hook)
        except _Busy:  # another open model is filling this cache: read without it rather than wait
            return src
    except BaseException:
        src.close()
        raise


def _path_for(src: RemoteSource, cache: str) -> str:
    """The cached file's path: ``cache`` itself, or in it when it is a folder (one written with a
    trailing slash is made)."""
    if cache.endswith(("/", os.sep)):
        os.makedirs(cache, exist_ok=True)
    if os.path.isdir(cache):
        cache = os.path.join(cache, os.path.basename(src.name.split("@", 1)[0]) or "model.gguf")
    return cache


def _is_copy_of(final: str, src: RemoteSource) -> bool:
    """Whether ``final`` is this cache's finished copy of ``src`` (False: of an older version,
    which is replaced); a file this cache did not write, or its copy of another URL, is an
    error, never replaced."""
    try:
        with open(final + RECORD) as f:
            rec = json.load(f)
    except FileNotFoundError:
        raise GGUFLabError(f"{final}: a file is there that this cache did not write (no {os.path.basename(final)}"
                           f"{RECORD} beside it); remove it or cache {src.name} elsewhere") from None
    except (OSError, ValueError) as e:
        raise GGUFLabError(f"{final}{RECORD}: unreadable cache record ({e})") from None
    if rec.get("name") != src.name:  # another URL's copy (the same file name): not this one's to replace
        raise GGUFLabError(f"{final}: holds the cached copy of {rec.get('name')}, not of {src.name}; "
                           "cache it under another path (cache='FOLDER/NAME.gguf')")
    return tuple(rec.get("identity", ())) == tuple(src.identity)


def _recorder(final: str, identity: tuple):
    def done(name: str) -> None:
        with open(final + RECORD + ".tmp", "w") as f:
            json.dump({"name": name, "identity": list(identity)}, f)
        os.replace(final + RECORD + ".tmp", final + RECORD)
    return done


def _hf_paths(src: RemoteSource):
    """The blob path of an ``hf://`` source in the Hugging Face cache, what links it in when done
    (the snapshot's link, the revision's ref), and the path to show (the link, where it is)."""
    if not hasattr(src, "commit"):
        raise GGUFLabError(f"{src.name}: cache='hf' is for hf:// URLs; pass a path to cache other URLs")
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=src.repo, repo_type="model"))
    etag = (src.etag or src.commit).strip('"')
    blob = os.path.join(storage, "blobs", etag)
    link = os.path.join(storage, "snapshots", src.commit, src.filename)
    rev = src.revision or "main"  # huggingface_hub's default revision
    ref = os.path.join(storage, "refs", rev)

    def done(name: str) -> None:
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
        if rev != src.commit:  # a branch or tag: which commit it named when read
            os.makedirs(os.path.dirname(ref), exist_ok=True)
            try:  # whole or not at all: an empty ref (a full disk) would send huggingface_hub nowhere
                with open(ref + ".tmp", "w") as f:
                    f.write(src.commit)
                os.replace(ref + ".tmp", ref)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(ref + ".tmp")
                raise

    if os.path.isfile(blob) and (not os.path.lexists(link) or (rev != src.commit and _read(ref) != src.commit)):
        done(src.name)  # the blob is there, its link or its revision's ref not (yet): as hf_hub_download leaves them
    return blob, done, link if os.path.exists(link) else blob


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _merge(done: list[list[int]], a: int, b: int) -> list[list[int]]:
    """``done`` (sorted, disjoint [start, end) ranges) with [a, b) added."""
    out, placed = [], False
    for s, e in done:
        if e < a:
            out.append([s, e])
        elif b < s:
            if not placed:
                out.append([a, b])
                placed = True
            out.append([s, e])
        else:
            a, b = min(a, s), max(b, e)
    if not placed:
        out.append([a, b])
    return sorted(out)


def _missing(done: list[list[int]], a: int, b: int) -> list[tuple[int, int]]:
    """The parts of [a, b) that ``done`` does not cover."""
    gaps, pos = [], a
    for s, e in done:
        if e <= pos or s >= b:
            continue
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    if pos < b:
        gaps.append((pos, b))
    return gaps


_LIVE: "weakref.WeakSet[CachingSource]" = weakref.WeakSet()  # the part files open in this process


@atexit.register
def _save_all() -> None:
    """At exit, the record of every part file still open (a shared model is not closed at exit):
    the next process resumes from everything written, not from the last periodic save."""
    for src in list(_LIVE):
        if not src._state.acquire(timeout=1.0):  # a reader thread holds it at exit: never hang the exit
            continue
        try:
            if not src._finished and src._done and src._fd >= 0:
                src._save()
        except Exception:
            pass
        finally:
            src._state.release()


class _Busy(Exception):
    """The part file is locked by another source (of this process or another)."""


class CachingSource(RemoteSource):
    """A remote source whose reads are written to a part file as they come (see the module)."""

    def __init__(self, src: RemoteSource, final: str, done_hook):
        super().__init__()
        self.remote, self.final, self.part = src, final, final + PART
        self.name, self.size, self.identity = src.name, src.size, src.identity
        self._done_hook = done_hook
        self._rec_path = self.part + ".json"
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        self._done: list[list[int]] = []
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:  # one writer a part file: a second would truncate what the first has written
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise _Busy from None
        try:
            with open(self._rec_path) as f:
                rec = json.load(f)
            if rec.get("name") == self.name and tuple(rec.get("identity", ())) == tuple(self.identity) \
                    and os.path.getsize(self.part) == self.size:
                self._done = [list(r) for r in rec["done"]]  # resume: these bytes are on disk
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no record, or of another file: start again
        if not self._done:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.size)  # sparse: every range lands at its offset
        self._saved = time.monotonic()
        self._finished = False
        self._state = threading.Lock()
        _LIVE.add(self)

    @contextlib.contextmanager
    def use(self):
        with super().use(), self.remote.use():  # the remote's connections close when the load ends
            yield self

    @property
    def cached_bytes(self) -> int:
        with self._state:
            return sum(e - s for s, e in self._done)

    def check(self) -> None:
        self.remote.check()

    def _fetch(self, offset: int, view: memoryview) -> None:
        with self._state:
            gaps = _missing(self._done, offset, offset + len(view))
        pos = offset
        for a, b in gaps + [(offset + len(view), None)]:
            if a > pos:  # on disk already
                got = os.preadv(self._fd, [view[pos - offset:a - offset]], pos)
                if got != a - pos:
                    raise GGUFLabError(f"{self.part}: read {got} of {a - pos} bytes at offset {pos}")
            if b is None:
                break
            piece = view[a - offset:b - offset]
            self.remote.read_into(a, np.frombuffer(piece, np.uint8))
            self._write(piece, a)
            self._mark(a, b)
            pos = b

    def _write(self, piece: memoryview, at: int) -> None:
        """All of ``piece`` into the part file at ``at``, or an error naming the file: a short
        write (a full disk) is never taken for a whole one, so no range is recorded that the
        file does not hold."""
        try:
            pwrite_all(self._fd, piece, at)
        except OSError as e:
            raise GGUFLabError(f"{self.part}: caching {self.name}: writing bytes [{at}, {at + len(piece)}) failed "
                               f"after {e.written}: {e.strerror or e}; the part file keeps what was written before, "
                               "and the next open resumes from there") from None

    def _mark(self, a: int, b: int) -> None:
        with self._state:
            self._done = _merge(self._done, a, b)
            complete = self._done == [[0, self.size]]
            if complete and not self._finished:
                try:
                    os.fsync(self._fd)  # a write the disk could not keep fails here, before the name says done
                except OSError as e:
                    self._done = []  # what the part file holds is not known: the next open starts again
                    self._remove(self._rec_path)
                    raise GGUFLabError(f"{self.part}: caching {self.name}: the disk did not keep the bytes "
                                       f"({e.strerror or e}); the cache starts again at the next open") from None
                self._finished = True
                os.replace(self.part, self.final)  # the descriptor follows the inode: reads go on
                self._done_hook(self.name)
                self._remove(self._rec_path)
            elif not complete and time.monotonic() - self._saved > SAVE_EVERY_S:
                self._save()

    def _save(self) -> None:
        """The ranges on disk, for a later open to resume from (after the bytes were written). A
        record that cannot be written (a full disk) leaves the last one, which names fewer ranges."""
        self._saved = time.monotonic()
        tmp = self._rec_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"name": self.name, "identity": list(self.identity), "done": self._done}, f)
            os.replace(tmp, self._rec_path)
        except OSError:
            self._remove(tmp)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _release(self) -> None:
        with self._state:
            if not self._finished and self._done:
                self._save()
        os.close(self._fd)  # and the lock with it
        self._fd = -1
        self.remote.close()
