"""Planning a load (pure): the options, which tensors in what order, and chunks of whole blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import quant
from ..errors import GGUFLabError, TensorNotFoundError
from ..model import TensorInfo

MODES = ("gpu", "raw", "cpu", "sequential")
ORDERS = ("file", "largest", "layer")


@dataclass(frozen=True)
class LoadOptions:
    mode: str = "gpu"
    dtype: str = "float16"
    streams: int = 4
    chunk_mb: float = 16.0
    readers: int | None = None  # default: default_readers()
    read: str = "mmap"
    staging_mb: float | None = None  # default: 2 slots a lane
    order: Any = "file"
    profile: bool | str = True  # True or "events": CUDA/HIP events; "cupti": CUPTI activity records

    def check(self) -> "LoadOptions":
        if self.mode not in MODES:
            raise GGUFLabError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (isinstance(self.streams, int) and 1 <= self.streams <= 64):
            raise GGUFLabError(f"streams must be an integer from 1 to 64, got {self.streams!r}")
        if self.readers is not None and not (isinstance(self.readers, int) and 1 <= self.readers <= 256):
            raise GGUFLabError(f"readers must be an integer from 1 to 256, got {self.readers!r}")
        if self.read not in ("mmap", "preadv"):
            raise GGUFLabError(f"read must be 'mmap' or 'preadv', got {self.read!r}")
        if not self.chunk_mb > 0:
            raise GGUFLabError(f"chunk_mb must be positive, got {self.chunk_mb!r}")
        if self.staging_mb is not None and not self.staging_mb > 0:
            raise GGUFLabError(f"staging_mb must be positive, got {self.staging_mb!r}")
        if not (callable(self.order) or self.order in ORDERS):
            raise GGUFLabError(f"order must be one of {', '.join(ORDERS)} or a callable, got {self.order!r}")
        if self.profile not in (True, False, "events", "cupti"):
            raise GGUFLabError(f"profile must be True, False, 'events' or 'cupti', got {self.profile!r}")
        if self.mode != "raw":
            quant.resolve_dtype(self.dtype)
        return self


@dataclass(frozen=True)
class Piece:
    """A run of whole blocks of one tensor: ``[first_block, first_block + n_blocks)``."""

    tensor: TensorInfo
    first_block: int
    n_blocks: int
    file_offset: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """Pieces read, copied and expanded together. ``site``: the position of the chunk's device
    in the load's device list (0 in a single-device load); a chunk never spans devices."""

    index: int
    pieces: tuple[Piece, ...]
    site: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def select(tensors: Sequence[TensorInfo], names=None, order="file") -> list[TensorInfo]:
    """The tensors to load, in load order. ``names``: a list of names or a predicate."""
    if names is None:
        chosen = list(tensors)
    elif callable(names):
        chosen = [t for t in tensors if names(t)]
    else:
        by_name = {t.name: t for t in tensors}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise TensorNotFoundError(f"no tensor named {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        chosen = [by_name[n] for n in dict.fromkeys(names)]
    if callable(order):
        return sorted(chosen, key=order)
    if order == "file":
        return sorted(chosen, key=lambda t: t.offset)
    if order == "largest":
        return sorted(chosen, key=lambda t: (-t.n_bytes, t.offset))
    if order == "layer":  # embeddings, each stack's blocks (a decoder's, a vision tower's...), the rest
        from ..naming import layer_key

        return sorted(chosen, key=layer_key(chosen))
    raise GGUFLabError(f"order must be one of {', '.join(ORDERS)} or a callable, got {order!r}")


RAMP_MIN_BYTES = 1 << 20  # a ramp chunk no smaller than this: below it a copy's own overhead shows


def chunk_limits(chunk_bytes: int, ramp: int = 0) -> list[int]:
    """The byte limits of the first chunks of a plan: with ``ramp`` readers, chunk ``i < ramp``
    gets ``(i + 1) / (ramp + 1)`` of ``chunk_bytes`` (at least ``RAMP_MIN_BYTES``), so the first
    reads finish one after another, the first after a small read, and each reader stays that
    far ahead of the next; every later chunk gets ``chunk_bytes``."""
    if ramp < 1 or chunk_bytes <= RAMP_MIN_BYTES:
        return []
    return [min(chunk_bytes, max(RAMP_MIN_BYTES, chunk_bytes * (i + 1) // (ramp + 1))) for i in range(ramp)]


def plan_chunks(tensors: Sequence[TensorInfo], chunk_bytes: int, ramp: int = 0) -> list[Chunk]:
    """Split big tensors into chunks of whole blocks of at most ``chunk_bytes``; batch small
    ones together up to ``chunk_bytes``. ``ramp``: the first that many chunks smaller, growing
    to full size (``chunk_limits``)."""
    chunks: list[Chunk] = []
    batch: list[Piece] = []
    size = 0
    first = chunk_limits(chunk_bytes, ramp)

    def limit() -> int:  # of the chunk being filled
        return first[len(chunks)] if len(chunks) < len(first) else chunk_bytes

    def flush():
        nonlocal batch, size
        if batch:
            chunks.append(Chunk(len(chunks), tuple(batch)))
        batch, size = [], 0

    for t in tensors:
        spec = quant.type_spec(t.ggml_type)
        n_blocks = t.n_elements // spec.block_size
        if t.n_bytes > limit():
            flush()
            b0 = 0
            while b0 < n_blocks:
                nb = min(max(1, limit() // spec.type_size), n_blocks - b0)
                chunks.append(Chunk(len(chunks), (Piece(t, b0, nb, t.offset + b0 * spec.type_size, nb * spec.type_size),)))
                b0 += nb
        else:
            if size + t.n_bytes > limit():
                flush()
            batch.append(Piece(t, 0, n_blocks, t.offset, t.n_bytes))
            size += t.n_bytes
    flush()
    return chunks


def plan_sites(tensors_per_site: Sequence[Sequence[TensorInfo]], chunk_bytes: int) -> list[Chunk]:
    """Chunks of each device planned apart, then interleaved in proportion to each device's
    bytes, so every device's lanes get work from the start and all finish together; indices
    renumbered in the interleaved (read) order."""
    per = [plan_chunks(ts, chunk_bytes) for ts in tensors_per_site]
    totals = [max(1, sum(c.nbytes for c in cs)) for cs in per]
    done = [0] * len(per)
    pos = [0] * len(per)
    out: list[Chunk] = []
    while True:
        open_sites = [k for k in range(len(per)) if pos[k] < len(per[k])]
        if not open_sites:
            return out
        k = min(open_sites, key=lambda k: (done[k] / totals[k], k))  # the device furthest behind
        c = per[k][pos[k]]
        out.append(Chunk(len(out), c.pieces, k))
        pos[k] += 1
        done[k] += c.nbytes


def output_bytes(t: TensorInfo, mode: str, dtype: str) -> int:
    """Bytes a tensor's output takes on the device in a mode."""
    return t.n_bytes if mode == "raw" else t.n_elements * out_kind(t, mode, dtype)[1].itemsize


def out_kind(t: TensorInfo, mode: str, dtype: str) -> tuple[str, np.dtype]:
    """(logical dtype, storage dtype) of a tensor's output in a mode."""
    spec = quant.type_spec(t.ggml_type)
    if mode == "raw":
        return "raw", np.dtype(np.uint8)
    if spec.kind == "int":
        return spec.storage_dtype.name, spec.storage_dtype
    if dtype == "bfloat16":
        return "bfloat16", np.dtype(np.uint16)
    return dtype, quant.resolve_dtype(dtype)
