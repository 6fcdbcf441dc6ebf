"""The layout of a safetensors export, as pure functions of names, shapes and sizes (no I/O):
which shard holds each tensor, every shard's header and each tensor's offset, and the batches the
weights are dequantized in. ``gguf_gpu_lab.export`` writes what this plans.

The format: an 8-byte little-endian header length, a JSON header (``dtype``, ``shape`` and
``data_offsets`` of every tensor, ``__metadata__``), padded with spaces to a multiple of 8 as the
safetensors library writes it, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from .errors import GGUFLabError

ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # safetensors' names
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"  # transformers' file names
_SIZE_RANGE = (1000, 10**13)  # max_shard_size and budget: 1 kB to 10 TB


def parse_size(value, what: str) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2 GB"``, ``"1000"`` or an int (huggingface_hub's
    units, as ``save_pretrained(max_shard_size=...)`` reads them: KB, MB, GB, TB, 1 GB = 10^9
    bytes), in ``_SIZE_RANGE``; else ``GGUFLabError`` naming ``what`` and the value."""
    try:
        return size_bytes(value)
    except ValueError as e:
        raise GGUFLabError(f"{what} {e}") from None


def size_bytes(value) -> int:
    """``parse_size`` without a name: ``ValueError`` saying what is wrong with ``value``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str):
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            n = parse_size_to_int(value.replace(" ", "").upper())
        except ValueError:
            n = None
        if n is None or not value.strip()[:1].isdigit():
            raise ValueError(f"must be a size such as '5GB' (units KB, MB, GB, TB) or a number of bytes, "
                             f"got {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        raise ValueError(f"must be a size such as '5GB' or a number of bytes, got {value!r}")
    if not _SIZE_RANGE[0] <= n <= _SIZE_RANGE[1]:
        raise ValueError(f"must be from 1KB to 10TB, got {value!r} ({n} bytes)")
    return n


@dataclass(frozen=True)
class Entry:
    """One tensor of the export: its transformers name, the GGUF tensor it comes from, and where its
    bytes go."""
    name: str
    gguf: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int  # from the start of the file


@dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]
    headers: dict[str, bytes]  # file -> its first bytes (length and JSON header)
    sizes: dict[str, int]  # file -> its size
    index: dict | None  # model.safetensors.index.json, None for one shard

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def safetensors_header(items: list[tuple[str, tuple[int, ...], int]], st_dtype: str) -> tuple[bytes, list[int]]:
    """The first bytes of a safetensors file holding ``items`` ((name, shape, nbytes), laid out in
    that order) and each one's offset in the file. The JSON is padded with spaces to a multiple of
    8 bytes, as the safetensors library writes it, so every tensor starts aligned."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape, nbytes in items:
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    starts, pos = [], start
    for _, _, nbytes in items:
        starts.append(pos)
        pos += nbytes
    return struct.pack("<Q", len(text)) + text, starts


def plan_layout(tensors: list[tuple[str, str, tuple[int, ...]]], dtype: str, max_shard_size: int,
                total_parameters: int | None = None) -> Layout:
    """Shards and offsets for ``tensors`` ((transformers name, GGUF name, shape), in the model's
    state-dict order), split by huggingface_hub's ``split_state_dict_into_shards_factory`` (in that
    order, a new shard when the next tensor would pass ``max_shard_size``, a larger tensor alone;
    transformers 5.25's ``save_pretrained`` sorts the names first, so its shards group differently)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    size = _ITEMSIZE[dtype]
    nbytes = {name: size * math.prod(int(d) for d in shape) for name, _, shape in tensors}
    split = split_state_dict_into_shards_factory(nbytes, get_storage_size=lambda n: n,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    by_name = {name: (gguf, shape) for name, gguf, shape in tensors}
    entries, headers, sizes = [], {}, {}
    for file, names in split.filename_to_tensors.items():
        head, starts = safetensors_header([(n, by_name[n][1], nbytes[n]) for n in names], ST_DTYPES[dtype])
        headers[file] = head
        sizes[file] = len(head) + sum(nbytes[n] for n in names)
        entries += [Entry(n, by_name[n][0], tuple(by_name[n][1]), nbytes[n], file, s) for n, s in zip(names, starts)]
    index = None
    if split.is_sharded:
        meta = {"total_parameters": total_parameters, **split.metadata} if total_parameters is not None else split.metadata
        index = {"metadata": meta, "weight_map": dict(split.tensor_to_filename)}
    return Layout(tuple(entries), headers, sizes, index)


def batches(entries, limit: int) -> list[list[Entry]]:
    """Consecutive entries of at most ``limit`` bytes together (a larger one alone)."""
    out: list[list[Entry]] = []
    size = 0
    for e in entries:
        if not out or size + e.nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(e)
        size += e.nbytes
    return out
