"""A small cache of load plans, so that a warm load does not plan again: the chunks of a
single-device load of whole tensors, kept per (file identity, tensors in order with their types,
shapes and offsets, chunk bytes, ramp), the most recent ``MAX_PLANS``. A plan is a tuple of
frozen ``Chunk``s and is never changed after it is made; a file changed in place has another
identity, hence another key.
``warmup`` makes the default plan of a file while the user looks at it."""

from __future__ import annotations

import collections
import threading
from typing import Sequence

from ..model import TensorInfo
from .plan import Chunk, plan_chunks

MAX_PLANS = 8
_PLANS: "collections.OrderedDict[tuple, tuple[Chunk, ...]]" = collections.OrderedDict()
_LOCK = threading.Lock()


def plan_key(identity, tensors: Sequence[TensorInfo], chunk_bytes: int, ramp: int) -> tuple:
    """What a plan depends on: the file (its source's identity), which tensors in which order
    (each whole ``TensorInfo``: name, type, shape and offset, as the header just parsed says; a
    file rewritten with its old identity, or a server that gives none, never gets another
    header's plan), the chunk size and the ramp."""
    return (identity, tuple(tensors), chunk_bytes, ramp)


def cached_plan(identity, tensors: Sequence[TensorInfo], chunk_bytes: int, ramp: int) -> tuple[Chunk, ...]:
    """The chunks of ``plan_chunks(tensors, chunk_bytes, ramp=ramp)``, made once per key; the
    least recently used of more than ``MAX_PLANS`` plans is dropped."""
    key = plan_key(identity, tensors, chunk_bytes, ramp)
    with _LOCK:
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
            return hit
    chunks = tuple(plan_chunks(tensors, chunk_bytes, ramp=ramp))  # outside the lock: planning takes ms
    with _LOCK:
        _PLANS[key] = chunks
        _PLANS.move_to_end(key)
        while len(_PLANS) > MAX_PLANS:
            _PLANS.popitem(last=False)
    return chunks


def cached_count() -> int:
    """How many plans are kept."""
    with _LOCK:
        return len(_PLANS)


def clear() -> None:
    """Forget every kept plan."""
    with _LOCK:
        _PLANS.clear()
