"""Files the toolkit writes: never one put in place of a file it did not make, unless asked.

A single output (``synth OUT``, ``dequant --out``, ``bench --out``, ``fuzz --out``) is refused
when its path exists and ``overwrite`` is False; the check runs before any work, so a refusal
costs nothing. A folder of outputs (the demo's, ``load --profile DIR``) keeps a list of the
files the toolkit wrote there (``MANIFEST``): a later run replaces those, and refuses any other
file of the same name unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid
from typing import Iterable

from .errors import GGUFLabError, OutputExistsError, warn

__all__ = ["MANIFEST", "OutputExistsError", "check_new", "claim_folder", "record_folder",
           "partial_path", "place_new", "pwrite_all", "warn_partials_left"]

MANIFEST = ".gguf-gpu-lab-outputs.json"  # in a folder of outputs: the names the toolkit wrote there


def check_new(path: str | os.PathLike, overwrite: bool = False, what: str = "output", hint: str = "--overwrite") -> str:
    """``path`` as a string, after checking that writing there replaces nothing unless
    ``overwrite``, and that its folder exists; raises ``OutputExistsError`` naming the path.

    Example:
        >>> check_new(tmp_path / "new.json")[-8:]
        'new.json'
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputExistsError(f"{path}: the {what} path is a folder; name a file")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path}: exists; the {what} would replace it ({hint} allows that)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GGUFLabError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GGUFLabError(f"{path}: cannot write into the folder {folder}")
    return path


def _recorded(folder: str) -> set[str]:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return set(json.load(f).get("files", []))
    except (OSError, ValueError, AttributeError):
        return set()


def writable_folder(folder: str, label: str | None = None) -> None:
    """Create ``folder`` if missing and check that it takes files, before the work whose results go
    there; errors name it as ``label`` (default the folder itself)."""
    label = folder if label is None else label
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise GGUFLabError(f"{label}: cannot create the folder ({e.strerror or type(e).__name__})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GGUFLabError(f"{label}: cannot write into the folder")


def claim_folder(folder: str, names: Iterable[str], overwrite: bool = False, hint: str = "--overwrite") -> dict:
    """Check, before any work, that the files ``names`` can be written into ``folder`` (made if
    missing): each is new, or one the toolkit wrote there before (listed in ``MANIFEST``), or
    ``overwrite`` is True. Returns {name: path}; call ``record_folder`` once they are written."""
    writable_folder(folder)
    ours = _recorded(folder)
    paths = {n: os.path.join(folder, n) for n in names}
    theirs = [p for n, p in paths.items() if os.path.lexists(p) and n not in ours]
    if theirs and not overwrite:
        more = f" (and {len(theirs) - 1} more)" if len(theirs) > 1 else ""
        raise OutputExistsError(f"{theirs[0]}{more}: exists and was not written by gguf-gpu-lab; "
                                f"{hint} replaces it")
    return paths


def record_folder(folder: str, names: Iterable[str]) -> None:
    """Add ``names`` to the folder's list of files the toolkit wrote (see ``claim_folder``)."""
    files = sorted(_recorded(folder) | set(names))
    tmp = os.path.join(folder, f"{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"written_by": "gguf-gpu-lab", "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}, f)
    os.replace(tmp, os.path.join(folder, MANIFEST))


def pwrite_all(fd: int, data, offset: int) -> None:
    """All of ``data`` (bytes or a C-contiguous buffer) at ``offset`` of ``fd``: pwrite(2) again
    after a short write, and a write of nothing (a full disk) an ``OSError`` (ENOSPC), never a loop
    or a short write taken for a whole one. An ``OSError`` raised here carries ``written``, the
    bytes written before it."""
    view = memoryview(data).cast("B")
    done = 0
    try:
        while done < len(view):
            k = os.pwrite(fd, view[done:], offset + done)
            if k <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += k
    except OSError as e:
        e.written = done
        raise


def partial_path(final: str) -> str:
    """Where an output that is renamed into place when complete (a model, an export's folder) is
    written meanwhile: a hidden name beside ``final``, unique to this writer."""
    final = os.path.abspath(final)
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial-{uuid.uuid4().hex[:12]}")


def place_new(tmp: str, final: str, what: str = "output") -> None:
    """Move the complete file ``tmp`` to ``final`` where nothing is: a hard link made in one step
    (which fails if a file appeared at ``final`` meanwhile; then ``OutputExistsError``, that file
    untouched, ``tmp`` left to the caller), then ``tmp`` unlinked. Where the filesystem makes no
    hard links, a check and a rename. Nothing stands at ``final`` before: a run killed outright
    leaves only ``tmp`` (named by ``warn_partials_left`` to the next run), never an empty file."""
    appeared = OutputExistsError(f"{final}: a file appeared there while the {what} was written; it was not replaced")
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise appeared from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                           errno.EACCES):
            raise
        if os.path.lexists(final):
            raise appeared from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def warn_partials_left(final: str, what: str) -> None:
    """Warn of the partial outputs (``partial_path``) beside ``final`` that a writer killed
    outright (SIGKILL, a crash) left. Never removed: one may be a writer still running, in
    another process, container or machine."""
    final = os.path.abspath(final)
    parent, prefix = os.path.dirname(final), f".{os.path.basename(final)}.partial-"
    left = [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)]
    if not left:
        return
    size = 0
    for p in left:
        for d, _, names in os.walk(p) if os.path.isdir(p) else [(parent, None, [os.path.basename(p)])]:
            for n in names:
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(d, n)).st_blocks * 512  # what it takes on disk (a sparse file: less)
    more = f" and {len(left) - 1} more" if len(left) > 1 else ""
    warn(f"{left[0]}{more}: left by an unfinished {what} of {final} ({size / 1e9:.2f} GB on disk); "
         f"remove it if no {what} of that path is running")
