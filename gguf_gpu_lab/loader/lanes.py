"""Lanes kept between loads: a backend's streams (their events are made per chunk) and, in gpu
mode, each lane's device scratch, leased by a load and given back at its end, so that a warm
load's first copy does not wait for streams and scratch to be made (1.6 ms on the H200).

One set is kept per backend (a device): a load that needs as many lanes and at most as much
scratch a lane takes it; one that needs more replaces it; a load running beside another makes
its own and closes them at its end. A load that failed or was stopped gives its lanes back too,
once their work has drained and their errors are forgotten (lanes that cannot drain are closed):
what a load holds afterwards is what it held before. ``release()`` closes the kept lanes and frees
their scratch;
``warmup`` makes the default set while the user looks at a model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ..device import Backend


@dataclass
class LaneSet:
    """A backend's lanes and, in gpu mode, each lane's scratch (``scratch_bytes`` each; an empty
    list without)."""

    backend: Backend
    lanes: list
    scratch: list = field(default_factory=list)
    scratch_bytes: int = 0
    kept: bool = False

    def nbytes(self) -> int:
        return len(self.scratch) * self.scratch_bytes


_KEPT: dict[int, LaneSet] = {}  # id(backend) -> its kept set, while no load uses it (backends live as long as the process)
_BUSY: set[int] = set()  # backends whose kept set (or the set that will be kept) a load is using
_LOCK = threading.Lock()


def _make(backend: Backend, n: int, scratch_bytes: int) -> LaneSet:
    lanes = backend.lanes(n)
    scratch = [backend.empty(scratch_bytes, np.uint8) for _ in lanes] if scratch_bytes else []
    return LaneSet(backend, lanes, scratch, scratch_bytes)


def _fits(s: LaneSet, n: int, scratch_bytes: int) -> bool:
    return len(s.lanes) == n and (scratch_bytes == 0 or (bool(s.scratch) and s.scratch_bytes >= scratch_bytes))


def lease(backend: Backend, n: int, scratch_bytes: int = 0) -> LaneSet:
    """``n`` lanes of ``backend``, each with ``scratch_bytes`` of device scratch (0: none): the
    kept set when no other load uses it and it fits, else a new one (kept at ``give_back`` unless
    another load was using the kept one). Lanes are anchored to the backend's current clock."""
    key = id(backend)
    s = old = None
    with _LOCK:
        busy = key in _BUSY
        if not busy:
            _BUSY.add(key)
            s = _KEPT.pop(key, None)
            if s is not None and not _fits(s, n, scratch_bytes):
                old, s = s, None
    try:
        if old is not None:  # too few lanes or too little scratch: replaced, its memory freed first
            _close(old)
        if s is None:
            s = _make(backend, n, scratch_bytes)
        s.kept = not busy
    except BaseException:
        if not busy:
            with _LOCK:
                _BUSY.discard(key)
        raise
    for ln in s.lanes:
        ln.reanchor(backend)
    return s


def give_back(s: LaneSet, ok: bool = True) -> None:
    """The end of a load's use of ``s``: kept for the next load when it was leased to be kept,
    else closed. ``ok``: the load ended without an error; otherwise each lane is drained again
    and its error forgotten first (a lane that cannot drain closes the set)."""
    key = id(s.backend)
    keep = s.kept
    if keep and not ok:
        try:
            for ln in s.lanes:
                ln.drain()
                ln.reset()
        except BaseException:
            keep = False
    if not keep:
        _close(s)
    if s.kept:
        with _LOCK:
            if keep:
                _KEPT[key] = s
            _BUSY.discard(key)


def _close(s: LaneSet) -> None:
    for ln in s.lanes:
        ln.close()
    s.lanes, s.scratch = [], []


def release(backend: Backend | None = None) -> int:
    """Close the kept lanes of ``backend`` (None: of every backend) that no load is using and free
    their scratch; returns the scratch bytes freed."""
    with _LOCK:
        keys = [k for k in _KEPT if k not in _BUSY and (backend is None or k == id(backend))]
        sets = [_KEPT.pop(k) for k in keys]
    freed = 0
    for s in sets:
        freed += s.nbytes()
        _close(s)
    return freed


def kept(backend: Backend) -> LaneSet | None:
    """The kept set of ``backend`` (None if there is none, or while a load uses it)."""
    with _LOCK:
        return _KEPT.get(id(backend))


def kept_threads() -> set[threading.Thread]:
    """The threads the kept lanes run (the host backend's lanes are threads; a GPU's are streams)."""
    with _LOCK:
        sets = list(_KEPT.values())
    return {th for s in sets for ln in s.lanes for th in ln.threads()}
