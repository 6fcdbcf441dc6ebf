"""Opening a GGUF file: validation, metadata, the tensor table, zero-copy byte views."""

from __future__ import annotations

import collections
import difflib
import html
import math
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from . import naming, quant
from .errors import GGUFLabError, MetadataNotFoundError, ModelNotFoundError, TensorNotFoundError, not_found
from .header import Field, read_header
from .scan import Problem, check_model
from .opening import open_source
from .source import ByteSource

_ARRAY_SUMMARY_LEN = 8  # metadata arrays longer than this are summarised
_NUMERIC = frozenset(GGUFValueType) - {GGUFValueType.STRING, GGUFValueType.ARRAY}
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


def _summarise(f: Field) -> Any:
    """A metadata value as Python data; arrays longer than a few elements as length and head. A
    string in an array that is not UTF-8 shows with U+FFFD in its place (a vocabulary's broken
    token must not hide the rest of the file); ``metadata_value`` names it as an error."""
    if f.is_array and f.length > _ARRAY_SUMMARY_LEN:
        return {"type": "array", "length": f.length, "element_type": f.element_type.name.lower(),
                "head": f.head(4, errors="replace")}
    return f.value(errors="replace")


class GGUFModel:
    """An open GGUF file. Use ``open_model(path)``; close it (or use ``with``) to free the file.

    Every byte is read through the model's ``source``, the descriptor and mapping its header was
    parsed from: a file replaced on disk afterwards is never read, and one changed in place is an
    error (``SourceChangedError``), never different bytes (the one exception, other tensor bytes
    under the same header written with the old modification time put back, is in ``source``)."""

    def __init__(self, path: "str | os.PathLike | ByteSource"):
        source = open_source(path)
        try:
            self._header = read_header(source)
            source.keep_header(min(self._header.data_offset, source.size))
        except BaseException:
            source.close()
            raise
        self._source = source
        self.path = source.name
        h = self._header
        self.file_size = h.size
        self.version = h.version
        self.alignment = h.alignment
        self.data_offset = h.data_offset
        self.tensors: list[TensorInfo] = []
        for t in h.tensors:
            spec = quant.type_spec(t.type_id)
            n_elem = math.prod(t.dims)
            m = _LAYER_RE.match(t.name)
            self.tensors.append(TensorInfo(
                name=t.name, ggml_type=GGMLQuantizationType(t.type_id), shape=t.dims, np_shape=tuple(reversed(t.dims)),
                n_elements=n_elem, n_bytes=spec.n_bytes(n_elem), offset=h.data_offset + t.rel_offset,
                layer=int(m.group(1)) if m else None))
        self._by_name = {t.name: t for t in self.tensors}
        self._metadata: dict[str, Any] | None = None
        self.cache_budget: int | None = None  # bytes of device memory the lazy tensor cache may hold
        self._close_hooks: list = []  # run by close(): the lazy device cache registers its own
        self._lock = threading.Lock()

    # -- lifetime -------------------------------------------------------------------------
    def on_close(self, hook) -> None:
        """Run ``hook()`` when the model is closed (the lazy device cache stops its preload and
        drops its tensors this way; the model knows nothing of devices)."""
        with self._lock:
            self._close_hooks.append(hook)

    def close(self) -> None:
        """Run the close hooks (the lazy device cache stops any preload and drops its tensors),
        then close the file. What was read at open stays readable: the tensor table, the
        metadata summary, ``repr``. Views from ``raw()`` stay valid: the mapping goes when the
        last of them does (unmapping under a live view would crash the process)."""
        with self._lock:
            hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            hook()
        if self._header is not None and not self._source.closed:
            try:
                self.metadata  # noqa: B018  (kept for display after close)
            except GGUFLabError:  # a value that cannot be decoded: shown as an error while open, not at close
                pass
        self._source.close()
        self._header = None

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._source.closed

    @property
    def source(self) -> ByteSource:
        """The byte source every read goes through (``GGUFLabError`` once the model is closed)."""
        if self._source.closed:
            raise GGUFLabError(f"{self.path}: model is closed")
        return self._source

    # -- metadata ---------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Key-value metadata in file order. Arrays of more than 8 elements are summarised as
        ``{"type": "array", "length", "element_type", "head"}``; ``metadata_value(key)`` gives
        a whole one."""
        if self._metadata is None:
            self.source  # noqa: B018  (raises once closed)
            self._metadata = {k: _summarise(f) for k, f in self._header.fields.items()}
        return self._metadata

    def metadata_value(self, key: str, errors: str = "strict") -> Any:
        """One metadata value in full: a string array as a list of str (decoded now, not at
        open), a numeric array as a read-only NumPy array (a copy, which the file cannot change
        later), a nested array as nested lists. A file changed in place since it was opened is a
        ``SourceChangedError``, as for tensors: never the new bytes read with the old header.
        ``errors``: "strict" (a string in an array that is not UTF-8 is a ``GGUFFormatError``
        naming its index) or "replace" (U+FFFD in its place).

        Example:
            >>> model.metadata_value("tokenizer.ggml.tokens")[:2]
            ['<tok0>', '<tok1>']
            >>> model.metadata_value("tokenizer.ggml.scores").dtype
            dtype('float32')
        """
        if self._header is None:
            self.source  # noqa: B018  (raises: the model is closed)
        try:
            f = self._header.fields[key]
        except KeyError:  # a GGUFLabError, and a KeyError as a mapping's would be
            raise not_found(MetadataNotFoundError, self.path, "metadata key", key, self._header.fields) from None
        src = self.source
        live = src.mappable  # the header is the file's mapping (a remote header is a copy in memory)
        if live:
            src.check()
        if f.is_array and f.element_type in _NUMERIC:
            value = f.numpy().copy()  # a 262,144-token vocabulary's scores: 1 MB, 0.1 ms
            value.flags.writeable = False
        else:
            value = f.value(errors=errors)
        if live:
            src.check()  # and not while it was decoded
        return value

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
        """The ``TensorInfo`` of a tensor (no data read); ``TensorNotFoundError`` (a ``KeyError``)
        naming the closest names when there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}{hint}") from None

    def __getitem__(self, name: str) -> TensorInfo:
        """``m[name]`` is ``m.info(name)``: the tensor's type, shape, size and offset."""
        return self.info(name)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return [t.name for t in self.tensors]

    # -- tables -----------------------------------------------------------------------------
    def tensors_df(self):
        """The tensor table as a pandas DataFrame, one row a tensor, in file order."""
        import pandas as pd

        return pd.DataFrame({  # (str columns as objects, a file without tensors included)
            "name": pd.Series([t.name for t in self.tensors], dtype=object),
            "type": pd.Series([t.type_name for t in self.tensors], dtype=object),
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
        """Counts and bytes by type and by layer, bits per weight, file size against tensor bytes.
        ``by_layer`` is indexed by group and layer (``("blk", 3)``), with the tensors outside every
        block in an ``("embeddings", -1)`` row first and an ``("other", -1)`` row last (norms,
        output, projector), so its bytes add up to the model's."""
        import pandas as pd

        df = self.tensors_df()
        tensor_bytes = int(df["n_bytes"].sum()) if len(df) else 0
        n_elem = int(df["n_elements"].sum()) if len(df) else 0
        by_type = df.groupby("type").agg(count=("name", "size"), n_bytes=("n_bytes", "sum"),
                                         n_elements=("n_elements", "sum")).sort_values("n_bytes", ascending=False)
        agg = dict(count=("name", "size"), n_bytes=("n_bytes", "sum"))
        by_layer = df.dropna(subset=["layer"]).astype({"layer": "int64"}).groupby(["group", "layer"]).agg(**agg)
        loose = df[df["layer"].isna()]
        embd = loose["name"].str.contains("embd", regex=False)  # as naming.layer_key orders them
        parts = [(g, part) for g, part in (("embeddings", loose[embd]), ("other", loose[~embd])) if len(part)]
        if parts:  # layer -1: outside every block (an integer level, so the index stays sortable)
            rows = [part.assign(group=g, layer=-1).groupby(["group", "layer"]).agg(**agg) for g, part in parts]
            by_layer = pd.concat(rows[:1] + [by_layer] + rows[1:] if parts[0][0] == "embeddings" else [by_layer] + rows)
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
        try:
            arch = self.architecture
        except GGUFLabError:  # closed before its metadata was ever read: a repr never raises
            arch = "?"
        return f"<GGUFModel {self.path!r} {arch} {state}>"

    # -- data -------------------------------------------------------------------------------
    def raw(self, name: str, *, mapped: bool = True) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array: a zero-copy view of the file mapping
        (``mapped``; the file is checked first, so a file changed since it was opened is an error),
        or with ``mapped=False`` a copy read with preadv (a truncation at any moment is an error,
        never a crash: a mapping touched past a file's new end would end the process with SIGBUS).
        A mapped view is the file's pages: bytes written into the file later show through it, and
        reading it after a truncation is SIGBUS. Take a copy (``mapped=False``) to keep it."""
        t = self.info(name)
        return self.source.read(t.offset, t.n_bytes, mapped=mapped)

    def dequantize(self, name: str, dtype="float32", *, threads: int | None = None) -> np.ndarray:
        """The tensor as a NumPy array in ``np_shape`` on the CPU (float32, float16 or bfloat16).
        It dequantizes a copy of the tensor's bytes (``raw(name, mapped=False)``, checked after
        the read): a file changed in place or truncated meanwhile is a ``SourceChangedError``,
        never a mix of old and new bytes nor a SIGBUS in the middle of the dequantization."""
        t = self.info(name)
        return quant.dequantize(self.raw(name, mapped=False), t.ggml_type, t.np_shape, dtype, threads=threads)

    # -- device: lazy, cached, preloaded -----------------------------------------------------
    def tensor(self, name: str, dtype: str = "float16", mode: str = "gpu", *, backend="auto", device=0,
               placement=None):
        """One tensor on the device, loaded on first use and then served from the cache (keyed by
        file, tensor, mode, dtype and device). Concurrent callers share one load; a tensor still
        queued in a running preload is taken out of its queue and loaded at once. With several
        devices (``device=[0, 1]`` or ``"all"``, and ``placement`` as for ``load``) the tensor
        goes to its placed device; the placement is made once, over every tensor of the model,
        and kept, so ``tensor()`` and ``preload()`` with the same devices agree.

        Example:
            >>> w = model.tensor("blk.0.attn_q.weight")        # on the GPU; without one, the host backend
            >>> w.array.dtype, w.array.shape
            (dtype('float16'), (256, 256))
            >>> model.tensor("blk.0.attn_q.weight") is w       # served from the cache
            True
        """
        return _device_cache().tensor(self, name, dtype, mode, backend, device, placement)

    def preload(self, order="file", *, background: bool = True, dtype: str = "float16", mode: str = "gpu",
                tensors=None, backend="auto", device=0, placement=None, batch_mb: float = 512, **load_options):
        """Load tensors into the cache, in the background by default. Returns a handle with
        ``progress``, ``wait()`` and ``cancel()``; ``tensor()`` calls jump the queue. With several
        devices each tensor goes to its placed device (see ``tensor``). ``batch_mb``: about how
        much each batch loads (MiB: more than 0, at most 1048576). ``load_options``: how each
        batch is read (``streams``, ``chunk_mb``, ``readers``, ``staging_mb``, ``read``) and
        ``progress``; it caches whole tensors, so ``shard=`` is refused.

        Example:
            >>> h = model.preload(order="layer")
            >>> h.wait()
            True
            >>> model.cache_info()["entries"] == len(model)
            True
        """
        return _device_cache().preload(self, order, background, dtype, mode, tensors, backend, device, batch_mb,
                                       load_options, placement)

    def evict(self, name: str | None = None) -> int:
        """Drop cached device tensors (all, or every mode/dtype of one); returns bytes freed."""
        return _device_cache().evict(self, name)

    def cache_info(self) -> dict[str, Any]:
        """The lazy cache's state: ``entries`` (tensors cached), ``bytes`` (their size),
        ``budget`` (``cache_budget``, bytes; None: no limit), ``hits`` and ``misses`` of
        ``tensor()``, ``loads`` (loads run for it), ``evictions`` (tensors dropped to stay within
        the budget) and ``in_flight`` (tensors being loaded now)."""
        return _device_cache().info(self)

    def check(self, *, max_problems: int = 100) -> list[Problem]:
        """Scan tensor data for NaN/Inf in float tensors and in quantized block scales."""
        return check_model(self, max_problems=max_problems)


# What the layers above the model register when the package is imported: the model describes a
# file and imports nothing that loads, so neither model -> cache -> loader -> model nor
# model -> warmup -> loader -> model is a circle. "cache": the lazy device cache (cache.py), which
# tensor(), preload(), evict() and cache_info() hand over to; "opened": the warm-up (warmup.py),
# started when a model is opened.
_HOOKS: dict[str, Any] = {}


def register(kind: str, impl) -> None:
    """Set the implementation of a hook (``"cache"`` or ``"opened"``)."""
    if kind not in ("cache", "opened"):
        raise ValueError(f"unknown hook {kind!r}")
    _HOOKS[kind] = impl


def _device_cache():
    if "cache" not in _HOOKS:  # pragma: no cover - the package's __init__ registers it
        raise GGUFLabError("the device cache is not registered: import gguf_gpu_lab")
    return _HOOKS["cache"]


def _opened(model: "GGUFModel", warmup: bool | None = None) -> "GGUFModel":
    start = _HOOKS.get("opened")
    return model if start is None else start(model, warmup)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


_SHARED: "collections.OrderedDict[tuple, GGUFModel]" = collections.OrderedDict()
_PARSING: dict[tuple, Future] = {}  # keys being parsed: a second caller waits for the first
_SHARED_LOCK = threading.Lock()
_SHARED_MAX = 8


def _shared_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: cannot open: no such file") from None
    except OSError as e:
        raise GGUFLabError(f"{path}: cannot open: {e.strerror or e}") from None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def shared_model(path: str | os.PathLike, **remote) -> GGUFModel:
    """An open model for ``path`` shared by the calls that take a path (``load(path)``, a
    dashboard's clicks): parsed once per process, by one thread while others wait for it, and
    parsed again when the file at the path changes (its inode, size, modification or
    status-change time: a model already handed out keeps reading the file it opened). A URL is
    keyed by the URL, the identity of what it serves (ETag or commit, and size: one request
    asks) and the cache it is written to, with ``remote`` (``cache``, ``token``) as for
    ``open_model``; a URL whose server gives no version is opened anew each call. The last few
    files are kept open; never close one.

    Example:
        >>> shared_model("model.gguf") is shared_model("model.gguf")
        True"""
    from .remote import is_url

    src = None
    if is_url(path):
        src = open_source(path, **remote)
        if not src.validated:  # a server that gives no version: each call opens its own model
            return _opened(GGUFModel(src))
        cache = remote.get("cache")  # a load with cache= gets a model that writes the cache
        if cache == "hf":  # where huggingface_hub's cache is now: another one is another cache
            from huggingface_hub import constants

            where = ("hf", os.path.realpath(constants.HF_HUB_CACHE))
        else:
            where = None if cache is None else os.path.realpath(os.fspath(cache))
        key = ("url", src.name, src.identity, where)
    else:
        if remote:
            open_source(path, **remote)  # the error: cache= and token= are for URLs
        path = os.fspath(path)
        key = _shared_key(path)
    with _SHARED_LOCK:
        m = _SHARED.get(key)
        if m is not None and not m.closed:
            _SHARED.move_to_end(key)
        else:
            m = None
            fut = _PARSING.get(key)
            owner = fut is None
            if owner:
                fut = _PARSING[key] = Future()
    if m is not None or not owner:
        if src is not None:
            src.close()
        return m if m is not None else fut.result()
    try:
        m = _opened(GGUFModel(path if src is None else src))  # on a GPU machine: the warm-up, in the background
    except BaseException as e:
        with _SHARED_LOCK:
            del _PARSING[key]
        fut.set_exception(e)
        raise
    with _SHARED_LOCK:
        del _PARSING[key]
        if src is None:  # keyed by what was opened: a file replaced between the stat and the open is the newer one
            _SHARED[(key[0], *m.source.identity)] = m
        else:
            _SHARED[key] = m
        while len(_SHARED) > _SHARED_MAX:  # dropped, not closed: a load may still be using it
            _SHARED.popitem(last=False)
    fut.set_result(m)
    return m


def open_model(path: str | os.PathLike, *, cache=None, token=None, warmup: bool | None = None) -> GGUFModel:
    """Open and validate a GGUF file (no tensor data is read): a path, or a URL (``http(s)://``,
    ``hf://ORG/REPO/FILE.gguf[@REVISION]``, an fsspec URL such as ``s3://``) whose header is
    fetched in ranges (at most the header and 1 MiB more). For a URL, ``cache`` (a path, or
    ``"hf"`` for the Hugging Face cache) keeps what is read on disk, and ``token`` is the Hub's
    (default: huggingface_hub's own); see ``remote`` and ``remote_cache``. On a machine with a GPU
    this also starts getting it ready for a load in the background (``gguf_gpu_lab.warmup``; off
    with ``warmup=False`` or ``GGUF_LAB_WARMUP=0``).

    Example:
        >>> with open_model("model.gguf") as m:
        ...     print(m.architecture, len(m.tensors))
        ...     w = m.dequantize("blk.0.attn_q.weight")
        llama 21
    """
    remote = {k: v for k, v in (("cache", cache), ("token", token)) if v is not None}
    return _opened(GGUFModel(open_source(path, **remote) if remote else path), warmup)
