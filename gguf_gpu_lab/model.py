"""Opening a GGUF file: validation, metadata, the tensor table, zero-copy byte views."""

from __future__ import annotations

import html
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from . import naming, quant
from .errors import GGUFFormatError, GGUFLabError, UnsupportedTypeError

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Smallest possible encodings, used to reject absurd counts before parsing anything.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one-byte value (empty key)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (empty name, 0 dims)
_ARRAY_SUMMARY_LEN = 8  # metadata arrays longer than this are summarised
_LAYER_RE = naming.BLOCK_RE  # a block of any stack: "blk.3." or a vision tower's "v.blk.3."


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. ``shape`` is in GGUF order (fastest dimension first),
    ``np_shape`` in row-major NumPy order; ``offset`` is the absolute file offset of its data.
    ``layer`` is the index of its block and ``group`` the stack of that block (``"blk"`` for a
    decoder, ``"v.blk"`` for a vision tower, ...); both None outside every block."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    np_shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    offset: int
    layer: int | None

    @property
    def group(self) -> str | None:
        b = naming.block(self.name)
        return None if b is None else b[0]

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / self.n_elements if self.n_elements else 0.0


class _CheckedReader(GGUFReader):
    """gguf's reader with bounds checks: a short read raises instead of returning a short array,
    and tensor infos are validated (with names and values in the message) before use."""

    _path = ""

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        end = int(offset) + itemsize * count
        if count < 0 or end > len(self.data):
            raise GGUFFormatError(
                f"truncated: needs {count} x {np.dtype(dtype).name} at offset {offset}, "
                f"past the end of the file ({len(self.data)} bytes)", path=self._path)
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        _validate_tensor_infos(self._path, fields, start_offs, int(self.alignment), len(self.data))
        super()._build_tensors(start_offs, fields)


def _validate_header(path: str, size: int) -> None:
    if size < 24:
        raise GGUFFormatError(f"file is {size} bytes, too short for a GGUF header (24 bytes)", path=path)
    with open(path, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<IIQQ", f.read(24))
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"bad magic 0x{magic:08x} (expected 0x{GGUF_MAGIC:08x}, 'GGUF')", path=path)
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"unsupported GGUF version {version} (supported: 2, 3)", path=path)
    if n_kv * _MIN_KV_BYTES > size:
        raise GGUFFormatError(f"key-value count {n_kv} cannot fit in a {size}-byte file", path=path)
    if n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise GGUFFormatError(f"tensor count {n_tensors} cannot fit in a {size}-byte file", path=path)


def _validate_tensor_infos(path: str, fields, data_start: int, alignment: int, size: int) -> None:
    seen: set[str] = set()
    spans = []
    for field in fields:
        _nl, name_data, n_dims, dims, raw_type, rel_off = field.parts
        try:
            name = bytes(name_data).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"tensor name at offset {field.offset} is not UTF-8: {bytes(name_data)[:40]!r}", path=path) from None
        if name in seen:
            raise GGUFFormatError("duplicate tensor name", path=path, tensor=name)
        seen.add(name)
        nd = int(n_dims[0])
        if nd > MAX_DIMS:
            raise GGUFFormatError(f"{nd} dimensions (at most {MAX_DIMS})", path=path, tensor=name)
        type_id = int(raw_type[0])
        try:
            spec = quant.type_spec(type_id)
        except UnsupportedTypeError as e:
            raise GGUFFormatError(f"type id {type_id}: {e}", path=path, tensor=name) from None
        shape = [int(d) for d in dims]
        n_elem = 1
        for d in shape:
            n_elem *= d
        if n_elem >= 2**63:
            raise GGUFFormatError(f"shape {shape} overflows: {n_elem} elements", path=path, tensor=name)
        if shape and shape[0] % spec.block_size:
            raise GGUFFormatError(
                f"row length {shape[0]} is not a multiple of {spec.name}'s block size {spec.block_size}",
                path=path, tensor=name)
        off = int(rel_off[0])
        if off % alignment:
            raise GGUFFormatError(f"data offset {off} is not a multiple of the alignment {alignment}", path=path, tensor=name)
        start = data_start + off
        n_bytes = spec.n_bytes(n_elem)
        if start + n_bytes > size:
            raise GGUFFormatError(
                f"data [{start}, {start + n_bytes}) ends past the end of the file ({size} bytes)",
                path=path, tensor=name)
        spans.append((start, start + n_bytes, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0 and e1 > s1:
            raise GGUFFormatError(f"data [{s1}, {e1}) overlaps tensor {n0!r} [{s0}, {e0})", path=path, tensor=n1)


def _field_value(field) -> Any:
    """A metadata value as Python data; long arrays summarised as length and head."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        n = len(field.data)
        if n > _ARRAY_SUMMARY_LEN:
            head = [field.contents(i) for i in range(min(n, 4))]
            return {"type": "array", "length": n, "element_type": types[-1].name.lower(), "head": head}
        return field.contents()
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v


class GGUFModel:
    """An open GGUF file. Use ``open_model(path)``; close it (or use ``with``) to free the mapping."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise GGUFLabError(f"{self.path}: cannot open: {e.strerror}") from None
        _validate_header(self.path, size)
        reader_cls = type("_Reader", (_CheckedReader,), {"_path": self.path})
        try:
            self._reader = reader_cls(self.path, "r")
        except GGUFLabError:
            raise
        except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, TypeError, struct.error) as e:
            raise GGUFFormatError(f"malformed GGUF ({type(e).__name__}: {e})", path=self.path) from None
        self.file_size = size
        self.version = int(self._reader.fields["GGUF.version"].parts[0][0])
        self.alignment = int(self._reader.alignment)
        self.data_offset = int(self._reader.data_offset)
        self.tensors: list[TensorInfo] = []
        for t in self._reader.tensors:
            gshape = tuple(int(d) for d in t.shape)
            m = _LAYER_RE.match(t.name)
            self.tensors.append(TensorInfo(
                name=t.name, ggml_type=GGMLQuantizationType(int(t.tensor_type)), shape=gshape,
                np_shape=tuple(reversed(gshape)), n_elements=int(t.n_elements), n_bytes=int(t.n_bytes),
                offset=int(t.data_offset), layer=int(m.group(1)) if m else None))
        self._by_name = {t.name: t for t in self.tensors}
        self._metadata: dict[str, Any] | None = None
        self.cache_budget: int | None = None  # bytes of device memory the tensor cache may hold
        self._tensor_cache = None
        self._preload = None

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop any preload, drop cached device tensors and this model's references to the file
        mapping. The mapping itself goes when the last array viewing it does (views from
        ``raw()`` stay valid): unmapping under a live view would crash the process."""
        if getattr(self, "_preload", None) is not None:
            self._preload.cancel()
            self._preload = None
        if getattr(self, "_tensor_cache", None) is not None:
            self._tensor_cache.evict()
        self._reader = None

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._reader is None

    def _data(self) -> np.memmap:
        if self._reader is None:
            raise GGUFLabError(f"{self.path}: model is closed")
        return self._reader.data

    # -- metadata ---------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Key-value metadata (``GGUF.*`` header fields left out)."""
        if self._metadata is None:
            self._data()
            self._metadata = {k: _field_value(f) for k, f in self._reader.fields.items() if not k.startswith("GGUF.")}
        return self._metadata

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    # -- tables -----------------------------------------------------------------------------
    def tensors_df(self):
        """The tensor table as a pandas DataFrame, one row a tensor, in file order."""
        import pandas as pd

        return pd.DataFrame({
            "name": [t.name for t in self.tensors],
            "type": [t.type_name for t in self.tensors],
            "shape": [t.shape for t in self.tensors],
            "np_shape": [t.np_shape for t in self.tensors],
            "n_elements": [t.n_elements for t in self.tensors],
            "n_bytes": [t.n_bytes for t in self.tensors],
            "bits_per_weight": [round(t.bits_per_weight, 3) for t in self.tensors],
            "offset": [t.offset for t in self.tensors],
            "group": pd.Series([t.group for t in self.tensors], dtype=object),  # None outside blocks, not NaN
            "layer": pd.array([t.layer for t in self.tensors], dtype="Int64"),
        })

    def summary(self) -> dict[str, Any]:
        """Counts and bytes by type and by layer (indexed by group and layer: ``("blk", 3)``; tensors
        outside every block left out), bits per weight, file size against tensor bytes."""
        df = self.tensors_df()
        tensor_bytes = int(df["n_bytes"].sum()) if len(df) else 0
        n_elem = int(df["n_elements"].sum()) if len(df) else 0
        by_type = df.groupby("type").agg(count=("name", "size"), n_bytes=("n_bytes", "sum"),
                                         n_elements=("n_elements", "sum")).sort_values("n_bytes", ascending=False)
        by_layer = df.dropna(subset=["layer"]).groupby(["group", "layer"]).agg(count=("name", "size"), n_bytes=("n_bytes", "sum"))
        return {
            "path": self.path, "architecture": self.architecture, "version": self.version,
            "n_tensors": len(self.tensors), "n_elements": n_elem, "tensor_bytes": tensor_bytes,
            "file_size": self.file_size, "overhead_bytes": self.file_size - tensor_bytes,
            "bits_per_weight": 8.0 * tensor_bytes / n_elem if n_elem else 0.0,
            "by_type": by_type, "by_layer": by_layer,
        }

    def _repr_html_(self) -> str:
        s = self.summary()
        rows = "".join(
            f"<tr><td>{html.escape(str(t))}</td><td>{r['count']}</td><td>{_fmt_bytes(r['n_bytes'])}</td></tr>"
            for t, r in s["by_type"].iterrows())
        return (f"<div><b>{html.escape(os.path.basename(self.path))}</b> &middot; "
                f"{html.escape(str(s['architecture']))} &middot; GGUF v{s['version']} &middot; "
                f"{s['n_tensors']} tensors &middot; {s['n_elements'] / 1e6:.1f} M weights &middot; "
                f"{_fmt_bytes(s['file_size'])} &middot; {s['bits_per_weight']:.2f} bits/weight"
                f"<table><tr><th>type</th><th>tensors</th><th>bytes</th></tr>{rows}</table></div>")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tensors)} tensors"
        return f"<GGUFModel {self.path!r} {self.architecture} {state}>"

    # -- data -------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """A zero-copy, read-only uint8 view of the tensor's bytes in the file mapping. The file's
        size is checked first; a file truncated between that check and the use of the view can
        still end the process with SIGBUS (a limit of memory maps; ``load(read="preadv")`` has none)."""
        t = self.info(name)
        data = self._data()
        size = os.stat(self.path).st_size
        if t.offset + t.n_bytes > size:  # touching mapped pages past the end would be SIGBUS
            raise GGUFFormatError(f"file shrank after it was opened: data [{t.offset}, {t.offset + t.n_bytes}) "
                                  f"is past its end ({size} bytes now)", path=self.path, tensor=name)
        return data[t.offset:t.offset + t.n_bytes].view(np.ndarray)

    def dequantize(self, name: str, dtype="float32", *, threads: int | None = None) -> np.ndarray:
        """The tensor as a NumPy array in ``np_shape`` on the CPU (float32, float16 or bfloat16)."""
        t = self.info(name)
        return quant.dequantize(self.raw(name), t.ggml_type, t.np_shape, dtype, threads=threads)

    # -- device: lazy, cached, preloaded -----------------------------------------------------
    def _cache(self):
        from .cache import TensorCache

        if self._tensor_cache is None:
            self._tensor_cache = TensorCache(self.cache_budget)
        self._tensor_cache.budget = self.cache_budget
        return self._tensor_cache

    def tensor(self, name: str, dtype: str = "float16", mode: str = "gpu", *, backend="auto", device: int = 0):
        """One tensor on the device, loaded on first use and then served from the cache (keyed by
        file, tensor, mode and dtype). Concurrent callers share one load; a tensor still queued
        in a running preload is taken out of its queue and loaded at once.

        Example:
            >>> w = model.tensor("blk.0.attn_q.weight")        # on the GPU; without one, the host backend
            >>> w.array.dtype, w.array.shape
            (dtype('float16'), (256, 256))
            >>> model.tensor("blk.0.attn_q.weight") is w       # served from the cache
            True
        """
        from .device import get_backend
        from .loader import load

        self.info(name)
        self._data()
        if self._preload is not None:
            self._preload.take(name)
        be = get_backend(backend, device)
        key = (self.path, name, mode, dtype)
        return self._cache().get_or_load(
            key, lambda: load(self, mode=mode, dtype=dtype, tensors=[name], backend=be, profile=False)[name])

    def preload(self, order="file", *, background: bool = True, dtype: str = "float16", mode: str = "gpu",
                tensors=None, backend="auto", device: int = 0, batch_mb: float = 512, **load_options):
        """Load tensors into the cache, in the background by default. Returns a handle with
        ``progress``, ``wait()`` and ``cancel()``; ``tensor()`` calls jump the queue.

        Example:
            >>> h = model.preload(order="layer")
            >>> h.wait()
            True
            >>> model.cache_info()["entries"] == len(model)
            True
        """
        from .cache import PreloadHandle
        from .device import get_backend
        from .loader import load, select

        if self._preload is not None and not self._preload.done():
            raise GGUFLabError(f"{self.path}: a preload is already running; cancel() or wait() for it first")
        be = get_backend(backend, device)
        cache = self._cache()
        names = [t.name for t in select(self.tensors, tensors, order)]
        names = [n for n in names if (self.path, n, mode, dtype) not in cache]
        sizes = {t.name: t.n_bytes for t in self.tensors}

        def run_batch(batch, cancel):
            keys = {n: (self.path, n, mode, dtype) for n in batch}
            claimed = set(cache.claim(keys.values()))
            todo = [n for n in batch if keys[n] in claimed]
            if not todo:
                return
            try:
                r = load(self, mode=mode, dtype=dtype, tensors=todo, backend=be, cancel=cancel, profile=False,
                         **load_options)
            except BaseException as e:
                for n in todo:
                    cache.fail(keys[n], e)
                raise
            for n in todo:
                cache.fulfill(keys[n], r[n])

        self._preload = PreloadHandle(names, sizes, run_batch, int(batch_mb * (1 << 20)))
        return self._preload.start(background)

    def evict(self, name: str | None = None) -> int:
        """Drop cached device tensors (all, or every mode/dtype of one); returns bytes freed."""
        if self._tensor_cache is None:
            return 0
        return self._tensor_cache.evict(None if name is None else (lambda k: k[1] == name))

    def cache_info(self) -> dict[str, Any]:
        return self._cache().info()

    def check(self, *, max_problems: int = 100) -> list["Problem"]:
        """Scan tensor data for NaN/Inf in float tensors and in quantized block scales."""
        from .check import check_model

        return check_model(self, max_problems=max_problems)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def open_model(path: str | os.PathLike) -> GGUFModel:
    """Open and validate a GGUF file (no tensor data is read).

    Example:
        >>> with open_model("model.gguf") as m:
        ...     print(m.architecture, len(m.tensors))
        ...     w = m.dequantize("blk.0.attn_q.weight")
        llama 21
    """
    return GGUFModel(path)


from .check import Problem  # noqa: E402  (type of check()'s result)
