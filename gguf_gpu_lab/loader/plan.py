"""Planning a load (pure): the options, which tensors in what order, and chunks of whole blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .. import quant
from ..errors import GGUFLabError, TensorNotFoundError, not_found
from ..model import TensorInfo
from .shard import Cut

MODES = ("gpu", "raw", "cpu", "sequential")
ORDERS = ("file", "largest", "layer")
CHUNK_MB = (1 / 64, 1024.0)  # 16 KiB to 1 GiB: below, per-chunk costs swamp a load; above, staging outgrows memory
STAGING_MB = (1 / 64, 65536.0)  # total pinned staging: at most 64 GiB


def _in_range(name: str, value, low: float, high: float) -> None:
    """A real number (not a bool) from ``low`` to ``high``, else one line naming the argument."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and low <= value <= high):  # nan fails both comparisons
        raise GGUFLabError(f"{name} must be a number from {low:g} to {high:g} (MiB), got {value!r}")


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
        if not (isinstance(self.streams, int) and not isinstance(self.streams, bool) and 1 <= self.streams <= 64):
            raise GGUFLabError(f"streams must be an integer from 1 to 64, got {self.streams!r}")
        if self.readers is not None and not (isinstance(self.readers, int) and not isinstance(self.readers, bool)
                                             and 1 <= self.readers <= 256):
            raise GGUFLabError(f"readers must be an integer from 1 to 256, got {self.readers!r}")
        if self.read not in ("mmap", "preadv"):
            raise GGUFLabError(f"read must be 'mmap' or 'preadv', got {self.read!r}")
        _in_range("chunk_mb", self.chunk_mb, *CHUNK_MB)
        if self.staging_mb is not None:
            _in_range("staging_mb", self.staging_mb, *STAGING_MB)
        if not (callable(self.order) or self.order in ORDERS):
            raise GGUFLabError(f"order must be one of {', '.join(ORDERS)} or a callable, got {self.order!r}")
        if self.profile not in (True, False, "events", "cupti"):
            raise GGUFLabError(f"profile must be True, False, 'events' or 'cupti', got {self.profile!r}")
        if self.mode != "raw":
            quant.resolve_dtype(self.dtype)
        return self


@dataclass(frozen=True)
class Piece:
    """Whole blocks of one tensor read together: ``rows`` runs of ``n_blocks // rows`` blocks,
    ``stride`` file bytes apart (one run, ``stride`` 0, unless the piece is a column shard's
    segments), the first starting at block ``first_block`` of the tensor and at ``file_offset``.
    They land, expanded and gathered, from block ``out_block`` of the output (``first_block`` when
    the whole tensor is loaded)."""

    tensor: TensorInfo
    first_block: int
    n_blocks: int
    file_offset: int
    nbytes: int
    out_block: int | None = None
    rows: int = 1
    stride: int = 0

    def __post_init__(self):
        if self.out_block is None:
            object.__setattr__(self, "out_block", self.first_block)


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


def select(tensors: Sequence[TensorInfo], names=None, order="file", path=None) -> list[TensorInfo]:
    """The tensors to load, in load order. ``names``: a name, a list of names or a predicate; ``path``:
    the file, named by the error for a name it does not have."""
    if names is None:
        chosen = list(tensors)
    elif callable(names):
        chosen = [t for t in tensors if names(t)]
    else:
        if isinstance(names, str):  # one name, not its letters
            names = [names]
        elif isinstance(names, bytes) or not isinstance(names, Iterable):
            raise GGUFLabError(f"tensors must be a name, a list of names or a predicate, got {names!r}")
        names = list(names)
        if not all(isinstance(n, str) for n in names):
            raise GGUFLabError(f"tensors must be names (str), got {next(n for n in names if not isinstance(n, str))!r}")
        by_name = {t.name: t for t in tensors}
        missing = [n for n in names if n not in by_name]
        if missing:
            e = not_found(TensorNotFoundError, path or "the model", "tensor named", missing[0], by_name)
            raise TensorNotFoundError(e.args[0] + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
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


def plan_chunks(tensors: Sequence[TensorInfo], chunk_bytes: int, cuts: Mapping[str, Cut] | None = None,
                ramp: int = 0) -> list[Chunk]:
    """Split big tensors into chunks of whole blocks of at most ``chunk_bytes``; batch small
    ones together up to ``chunk_bytes``. ``cuts``: the shard of each tensor (``shard.resolve_cuts``;
    a tensor without one is whole): a row shard is one range, a column shard's pieces gather
    whole segments (or, a segment over ``chunk_bytes``, runs of its blocks). ``ramp``: the first
    that many chunks of whole tensors smaller, growing to full size (``chunk_limits``)."""
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
        c = cuts.get(t.name) if cuts else None
        if c is not None and c.shard is not None:
            pieces = shard_pieces(c, chunk_bytes)
            if c.read_bytes > chunk_bytes:
                flush()
                for p in pieces:
                    chunks.append(Chunk(len(chunks), (p,)))
            else:
                if size + c.read_bytes > chunk_bytes:
                    flush()
                batch.extend(pieces)
                size += c.read_bytes
            continue
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


def shard_pieces(c: Cut, chunk_bytes: int) -> list[Piece]:
    """The pieces of a shard, each at most ``chunk_bytes`` unless one block is more: a contiguous
    shard split into runs of blocks; a strided one into groups of whole segments (one gathered
    copy each), or a segment over ``chunk_bytes`` into runs of its blocks."""
    t, spec = c.tensor, c.spec
    ts = spec.type_size
    per = max(1, chunk_bytes // ts)
    row_bytes = c.row_blocks * ts
    if c.contiguous:
        b0, nb = c.first, c.cover
        return [Piece(t, b0 + k, min(per, nb - k), t.offset + (b0 + k) * ts, min(per, nb - k) * ts, k)
                for k in range(0, nb, per)]
    seg_bytes = c.cover * ts
    if seg_bytes > chunk_bytes:
        out = []
        for r in range(c.outer):
            b0 = r * c.row_blocks + c.first
            out += [Piece(t, b0 + k, min(per, c.cover - k), t.offset + (b0 + k) * ts, min(per, c.cover - k) * ts,
                          r * c.cover + k) for k in range(0, c.cover, per)]
        return out
    rows_per = max(1, chunk_bytes // seg_bytes)
    return [Piece(t, r * c.row_blocks + c.first, nr * c.cover, t.offset + r * row_bytes + c.first * ts, nr * seg_bytes,
                  r * c.cover, nr, row_bytes)
            for r in range(0, c.outer, rows_per) for nr in (min(rows_per, c.outer - r),)]


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


def output_bytes(t: TensorInfo, mode: str, dtype: str, c: Cut | None = None) -> int:
    """Bytes a tensor's output takes on the device in a mode (of its shard ``c``: the covering
    blocks' bytes in raw mode; their expansion, plus the shard itself when it is not aligned)."""
    if c is None or c.shard is None:
        return t.n_bytes if mode == "raw" else t.n_elements * out_kind(t, mode, dtype)[1].itemsize
    if mode == "raw":
        return c.read_bytes
    item = out_kind(t, mode, dtype)[1].itemsize
    return (c.landing_elements() + (0 if c.aligned else c.n_elements)) * item


def copied_bytes(c: Chunk, mode: str, dtype: str) -> int:
    """Bytes a chunk's host-to-device copy moves: its file bytes, or in cpu mode the values the
    readers dequantized (a float32 output copies several times the file's quantized bytes)."""
    if mode != "cpu":
        return c.nbytes
    return sum(p.n_blocks * quant.type_spec(p.tensor.ggml_type).block_size
               * out_kind(p.tensor, mode, dtype)[1].itemsize for p in c.pieces)


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
