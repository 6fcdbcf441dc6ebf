"""Which part of a tensor a load wants (pure): ``Shard(dim, index, count)`` and its ``Cut``, the
shard laid over the tensor's bytes.

A GGUF tensor is stored row by row in blocks along its last NumPy dimension. View the NumPy
shape as ``(outer, n, inner)`` around the split dimension: a shard is ``outer`` segments of
``n / count * inner`` elements, ``n * inner`` apart. With ``outer == 1`` (a split of the first
dimension: transformers' ``colwise``) that is one byte range; otherwise one segment per row
(a split of the last dimension: ``rowwise``). A segment that does not start and end on block
boundaries is read as its covering blocks and sliced after expansion: the extra bytes are
counted (``read_bytes`` against ``wanted_bytes``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

from .. import quant
from ..errors import GGUFLabError
from ..model import TensorInfo


class ShardError(GGUFLabError, ValueError):
    """A shard that does not fit its tensor: the message names the file, the tensor and the sizes."""


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` equal parts of a tensor along NumPy dimension ``dim``
    (negative counts from the end: -1 is the last, the one GGUF blocks run along).

    Example:
        >>> Shard(-1, 1, 4)      # the second quarter of every row
        Shard(dim=-1, index=1, count=4)
    """

    dim: int
    index: int
    count: int

    def __post_init__(self):
        for k in ("dim", "index", "count"):
            v = getattr(self, k)
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise ShardError(f"Shard.{k} must be an integer, got {v!r}")
            object.__setattr__(self, k, operator.index(v))
        if not 1 <= self.count <= 65536:
            raise ShardError(f"Shard.count must be from 1 to 65536, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ShardError(f"Shard.index must be from 0 to {self.count - 1} (count {self.count}), got {self.index}")


ShardLike = Union[Shard, tuple, None]


def as_shard(s: ShardLike) -> Shard | None:
    """A ``Shard`` from a ``Shard``, a ``(dim, index, count)`` tuple or None (the whole tensor)."""
    if s is None or isinstance(s, Shard):
        return s
    if isinstance(s, (tuple, list)) and len(s) == 3:
        return Shard(*s)
    raise ShardError(f"a shard is a Shard, a (dim, index, count) tuple or None, got {s!r}")


@dataclass(frozen=True)
class Cut:
    """A tensor's shard over its bytes: ``outer`` segments, each ``seg`` elements wanted starting
    ``start`` elements into a row of ``row`` elements; read as ``cover`` whole blocks starting at
    block ``first`` of the row, the wanted elements ``head`` elements into them."""

    tensor: TensorInfo
    shard: Shard | None
    outer: int
    row: int
    seg: int
    start: int

    @property
    def spec(self):
        return quant.type_spec(self.tensor.ggml_type)

    @property
    def first(self) -> int:
        return self.start // self.spec.block_size

    @property
    def cover(self) -> int:
        bs = self.spec.block_size
        return -(-(self.start + self.seg) // bs) - self.first

    @property
    def head(self) -> int:
        return self.start - self.first * self.spec.block_size

    @property
    def aligned(self) -> bool:
        """Whether the covering blocks hold exactly the wanted elements (no slicing after expansion)."""
        return self.head == 0 and self.cover * self.spec.block_size == self.seg

    @property
    def row_blocks(self) -> int:
        return self.row // self.spec.block_size

    @property
    def contiguous(self) -> bool:
        """One byte range: a single segment, or segments that touch (the whole tensor)."""
        return self.outer == 1 or self.seg == self.row

    @property
    def np_shape(self) -> tuple[int, ...]:
        """The shard's NumPy shape."""
        shape = list(self.tensor.np_shape)
        if self.shard is not None:
            d = self.shard.dim % len(shape)
            shape[d] //= self.shard.count
        return tuple(shape)

    @property
    def region(self) -> tuple[slice, ...]:
        """Where the shard sits in the whole tensor (NumPy order), as slices."""
        out = [slice(0, n) for n in self.tensor.np_shape]
        if self.shard is not None:
            d = self.shard.dim % len(out)
            k = self.tensor.np_shape[d] // self.shard.count
            out[d] = slice(self.shard.index * k, (self.shard.index + 1) * k)
        return tuple(out)

    @property
    def n_elements(self) -> int:
        return self.outer * self.seg

    @property
    def read_blocks(self) -> int:
        """Blocks read: the covering blocks of every segment."""
        return self.tensor.n_elements // self.spec.block_size if self.shard is None else self.outer * self.cover

    @property
    def read_bytes(self) -> int:
        return self.read_blocks * self.spec.type_size

    @property
    def wanted_bytes(self) -> int:
        """The shard's share of the tensor's bytes (what an exact, block-free read would cost)."""
        return self.tensor.n_bytes * self.n_elements // max(1, self.tensor.n_elements)

    def landing_elements(self) -> int:
        """Elements the expanded covering blocks take (the output, or its scratch when not aligned)."""
        return self.read_blocks * self.spec.block_size


def cut(t: TensorInfo, shard: ShardLike, path: str = "") -> Cut:
    """The ``Cut`` of tensor ``t`` for ``shard``, or a ``ShardError`` naming the file, the tensor
    and the sizes when ``count`` does not divide the split dimension.

    Example:
        >>> t = model["blk.0.attn_q.weight"]          # 256 x 256, Q4_K: 256-weight blocks
        >>> rows = cut(t, Shard(0, 1, 2))            # rows 128..255: one byte range
        >>> rows.outer, rows.seg, rows.start, rows.aligned, rows.read_bytes == t.n_bytes // 2
        (1, 32768, 32768, True, True)
        >>> cols = cut(t, (-1, 1, 2))                # columns 128..255 of every row, inside a block
        >>> cols.outer, cols.seg, cols.head, cols.aligned, cols.read_bytes == t.n_bytes
        (256, 128, 128, False, True)
    """
    s = as_shard(shard)
    if s is not None and s.count == 1:
        s = None
    if s is None:
        return Cut(t, None, 1, t.n_elements, t.n_elements, 0)
    shape = t.np_shape
    where = f"{path}: " if path else ""
    if not -len(shape) <= s.dim < len(shape):
        raise ShardError(f"{where}tensor {t.name!r} has {len(shape)} dimensions {shape}; shard dim {s.dim} is not one")
    d = s.dim % len(shape)
    n = shape[d]
    if n % s.count:
        raise ShardError(f"{where}tensor {t.name!r}: dimension {s.dim} has size {n} (shape {shape}), "
                         f"which {s.count} parts do not divide")
    outer, inner = math.prod(shape[:d]), math.prod(shape[d + 1:])
    seg = n // s.count * inner
    return Cut(t, s, outer, n * inner, seg, s.index * seg)


def resolve_cuts(tensors: Sequence[TensorInfo], shard, path: str = "") -> dict[str, Cut] | None:
    """Each tensor's ``Cut`` from a load's ``shard`` argument: None (all whole), a mapping of names
    to shards (a name it lacks is loaded whole; a name no tensor has is an error), or a function of
    ``TensorInfo`` giving a shard or None. Every tensor is checked before anything is read."""
    if shard is None:
        return None
    if callable(shard):
        get: Callable[[TensorInfo], ShardLike] = shard
    elif isinstance(shard, Mapping):
        names = {t.name for t in tensors}
        unknown = [k for k in shard if k not in names]
        if unknown:
            raise ShardError(f"{path}: shard names tensor {unknown[0]!r}, which this load does not load")
        get = lambda t: shard.get(t.name)  # noqa: E731
    else:
        raise ShardError(f"shard must be None, a mapping of tensor names to shards, or a function of TensorInfo; "
                         f"got {type(shard).__name__}")
    return {t.name: cut(t, get(t), path) for t in tensors}
