"""A bounded GGUF header parser: magic, version, metadata and tensor infos, read straight from the
file mapping with ``struct`` and NumPy.

gguf-py's ``GGUFReader`` makes NumPy views for every part of every value, one per string of a
vocabulary and one per score: seconds to open a large one. Here a numeric array is one
``np.frombuffer`` view made on access, and a string array costs one scan of its lengths at open
(vectorised over windows of the mapping) and is decoded on access. Every read is checked against
the file's size before it happens, and every error names the file, the key or tensor, the offset
and the offending value. gguf-py stays the source of the constants (value and tensor types) and the
test oracle (tests/test_header.py compares every key, value and tensor with ``GGUFReader``).
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFValueType as VT

from . import quant
from .errors import GGUFFormatError, UnsupportedTypeError

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays, deeper than any writer makes them
# Smallest possible encodings, used to reject absurd counts before parsing anything.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one-byte value (empty key)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (empty name, 0 dims)

_SCALAR_CODES = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
                 VT.FLOAT32: "f", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d", VT.BOOL: "?"}
_SCALARS = {t: struct.Struct("<" + c) for t, c in _SCALAR_CODES.items()}
_NP_DTYPES = {t: np.dtype("<" + c) for t, c in _SCALAR_CODES.items()}
_MIN_VALUE_BYTES = {**{t: s.size for t, s in _SCALARS.items()}, VT.STRING: 8, VT.ARRAY: 12}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEAD = struct.Struct("<IIQQ")
_TYPE_OFFSET = struct.Struct("<IQ")
_SCAN_WINDOW = 1 << 20  # bytes of a string array examined at once by the vectorised scan


@dataclass(frozen=True, eq=False)
class Field:
    """One metadata key. Scalars and strings are decoded at open (``scalar``); arrays are located
    (``value_offset``, ``length``, ``element_type``) and decoded by ``value()``, ``head()`` or
    ``numpy()``."""

    key: str
    offset: int  # the key's length field
    type: VT
    value_offset: int  # first byte of the value, after its type
    end: int  # one past the value's last byte
    element_type: VT | None = None
    length: int = 0
    scalar: Any = None
    _header: "Header | None" = field(default=None, repr=False)

    @property
    def is_array(self) -> bool:
        return self.type == VT.ARRAY

    def value(self, errors: str = "strict") -> Any:
        """The whole value as Python data: a number, a bool, a str, or a list (nested for
        arrays of arrays). ``errors`` as ``bytes.decode``'s for strings in arrays: "strict" (a
        string that is not UTF-8 is a ``GGUFFormatError`` naming its index) or "replace" (for display)."""
        if not self.is_array:
            return self.scalar
        return self._header._array_value(self, self.length, errors=errors)

    def head(self, n: int, errors: str = "strict") -> list:
        """The first ``n`` elements of an array, decoded (``errors`` as for ``value``)."""
        return self._header._array_value(self, min(n, self.length), errors=errors)

    def numpy(self) -> np.ndarray:
        """A numeric array as a read-only NumPy view of the file mapping (no copy)."""
        if not self.is_array or self.element_type not in _NP_DTYPES:
            raise TypeError(f"{self.key!r} is not a numeric array ({self.type.name}"
                            f"{'' if self.element_type is None else ' of ' + self.element_type.name})")
        return np.frombuffer(self._header.mapping, _NP_DTYPES[self.element_type], self.length,
                             self.value_offset + 12)


@dataclass(frozen=True)
class TensorRecord:
    """A tensor info as written: ``dims`` in GGUF order, ``rel_offset`` from the data section."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    rel_offset: int
    info_offset: int  # where its tensor info starts in the file


class NeedMore(Exception):
    """Raised by ``Header(prefix, path, size=...)`` when the parse needs bytes past the prefix but
    inside the file: ``want`` is a lower bound on the prefix it needs (not an error: fetch more and
    parse again)."""

    def __init__(self, want: int):
        super().__init__(want)
        self.want = want


def read_header(source) -> "Header":
    """Parse a source's header: its ``header()`` buffer (a local file's whole mapping), or for a
    remote source a prefix that ``header(want)`` grows until the metadata and the tensor table
    are in."""
    buf = source.header()
    while True:
        try:
            return Header(buf, source.name, size=source.size)
        except NeedMore as e:
            had, buf = len(buf), source.header(e.want)
            if len(buf) <= had:  # a source that cannot give more would loop forever
                raise GGUFFormatError(f"the header needs {e.want} bytes; the source gave {len(buf)}",
                                      path=source.name) from None



def _decode_strings(blob: bytes, starts: np.ndarray, lengths: np.ndarray) -> list[str] | None:
    """The strings at ``blob[starts[k]:starts[k] + lengths[k]]``, decoded as UTF-8 in one call:
    the strings' bytes joined (their length prefixes left out), decoded at once, and cut at the
    character offsets of the strings' starts (a character starts at every byte that is not a
    continuation byte, 0b10xxxxxx). Exactly the strings decoded one by one when the joined bytes
    are UTF-8 and no string starts with a continuation byte (then every character lies inside one
    string); None otherwise (the caller decodes one by one and says which string is wrong)."""
    n = len(starts)
    if not n:
        return []
    u8 = np.frombuffer(blob, np.uint8)
    if n > 1 and (starts[1:] == starts[:-1] + lengths[:-1] + 8).all() and starts[0] >= 1:
        # back to back, as in one array: each length's last byte made a NUL separator, the rest
        # left out; then one decode and one split, if no string holds a NUL of its own
        keep = np.ones(int(starts[-1] + lengths[-1] - starts[0] + 1), bool)
        drop = (starts[1:] - starts[0])[:, None] - np.arange(1, 8)
        keep[drop.ravel()] = False
        joined = u8[starts[0] - 1:starts[-1] + lengths[-1]][keep].copy()
        joined[(starts - starts[0]) - 7 * np.arange(n)] = 0
        if np.count_nonzero(joined == 0) == n:
            try:
                return joined.tobytes().decode("utf-8").split("\0")[1:]
            except UnicodeDecodeError:
                return None
    first = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    joined = u8[first + np.arange(first.size)] if first.size else u8[:0]
    begins = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=begins[1:])
    is_start = (joined & 0xC0) != 0x80
    nonempty = lengths > 0
    if not is_start[begins[:-1][nonempty]].all():
        return None
    try:
        text = joined.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    chars = np.zeros(joined.size + 1, np.int64)
    np.cumsum(is_start, out=chars[1:])
    at = chars[begins].tolist()
    return [text[a:b] for a, b in zip(at[:-1], at[1:])]

class Header:
    """The parsed header of a GGUF file: ``version``, ``fields`` (key to ``Field``, file order),
    ``tensors`` (``TensorRecord``), ``alignment`` and ``data_offset``.

    ``mapping`` is the whole file, or with ``size`` (the file's size) a prefix of it: a parse that
    needs a byte past the prefix but inside the file raises ``NeedMore`` (see ``read_header``)."""

    def __init__(self, mapping, path: str, size: int | None = None):
        self.mapping = mapping  # anything with the buffer protocol: mmap, bytes
        self.path = path
        self._have = len(mapping)  # bytes in hand: the whole file, or a prefix of it
        self.size = self._have if size is None else size
        if self._have > self.size:
            raise ValueError(f"{path}: a prefix of {self._have} bytes is longer than the file ({self.size} bytes)")
        self._u8 = np.frombuffer(mapping, np.uint8)
        self.fields: dict[str, Field] = {}
        self.tensors: list[TensorRecord] = []
        # fields reach their header through a weak proxy: no cycle, so the mapping (and the
        # descriptor it holds) goes as soon as the model drops the header, not at the next GC
        self._ref = weakref.proxy(self)
        self._parse()

    # -- bounded reads -------------------------------------------------------------------------
    def _fail(self, message: str, tensor: str | None = None):
        raise GGUFFormatError(message, path=self.path, tensor=tensor)

    def _need(self, off: int, n: int, what: str) -> None:
        if n < 0 or off + n > self.size:
            self._fail(f"truncated: {what} needs {n} bytes at offset {off}, past the end of the file "
                       f"({self.size} bytes)")
        self._more(off + n)

    def _more(self, end: int) -> None:
        """Ask for a longer prefix when byte ``end - 1`` is in the file but not in hand."""
        if end > self._have and self._have < self.size:  # the whole file in hand: bounds checks speak
            raise NeedMore(min(end, self.size))

    def _u32(self, off: int, what: str) -> int:
        self._need(off, 4, what)
        return _U32.unpack_from(self.mapping, off)[0]

    def _u64(self, off: int, what: str) -> int:
        self._need(off, 8, what)
        return _U64.unpack_from(self.mapping, off)[0]

    def _bytes(self, off: int, what: str) -> tuple[bytes, int]:
        """A length-prefixed string's bytes and the offset after it."""
        n = self._u64(off, f"{what}'s length")
        self._need(off + 8, n, what)
        return bytes(self.mapping[off + 8:off + 8 + n]), off + 8 + n

    def _text(self, off: int, what: str) -> tuple[str, int]:
        raw, end = self._bytes(off, what)
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError as e:
            self._fail(f"{what} at offset {off} is not UTF-8 (byte 0x{raw[e.start]:02x} at {e.start}): {raw[:40]!r}")

    # -- structure -----------------------------------------------------------------------------
    def _parse(self) -> None:
        if self.size < 24:
            self._fail(f"file is {self.size} bytes, too short for a GGUF header (24 bytes)")
        self._more(24)
        magic, version, n_tensors, n_kv = _HEAD.unpack_from(self.mapping, 0)
        if magic != GGUF_MAGIC:
            self._fail(f"bad magic 0x{magic:08x} (expected 0x{GGUF_MAGIC:08x}, 'GGUF')")
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            self._fail(f"big-endian GGUF (version {swapped} written big-endian): not supported; convert it "
                       "with gguf-py's gguf-convert-endian")
        if version not in SUPPORTED_VERSIONS:
            self._fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        if n_kv * _MIN_KV_BYTES > self.size:
            self._fail(f"key-value count {n_kv} cannot fit in a {self.size}-byte file")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > self.size:
            self._fail(f"tensor count {n_tensors} cannot fit in a {self.size}-byte file")
        self.version, self.n_tensors, self.n_kv = version, n_tensors, n_kv
        off = 24
        for i in range(n_kv):
            off = self._parse_kv(i, off)
        self._more(off + n_tensors * _MIN_TENSOR_INFO_BYTES)  # a prefix: ask for the table at once
        for i in range(n_tensors):
            off = self._parse_tensor_info(i, off)
        self._more(off)  # every value located so far must be in hand (decoded later, from the prefix)
        self.alignment = self._alignment()
        self.data_offset = off + (-off) % self.alignment
        if self.tensors and self.data_offset > self.size:
            self._fail(f"data section at offset {self.data_offset} starts past the end of the file ({self.size} bytes)")
        self._validate_tensors()

    def _parse_kv(self, i: int, off: int) -> int:
        start = off
        key, off = self._text(off, f"key {i}")
        raw_type = self._u32(off, f"key {key!r}'s value type")
        vtype = self._value_type(raw_type, f"key {key!r} (offset {start})")
        if key in self.fields:
            self._fail(f"duplicate key {key!r} at offset {start}")
        value_offset = off + 4
        what = f"key {key!r}"
        if vtype == VT.ARRAY:
            etype, n, end = self._skip_array(value_offset, what, 1)
            f = Field(key, start, vtype, value_offset, end, etype, n, None, self._ref)
        else:
            scalar, end = self._scalar(vtype, value_offset, what)
            f = Field(key, start, vtype, value_offset, end, None, 0, scalar, self._ref)
        self.fields[key] = f
        return end

    def _value_type(self, raw: int, what: str) -> VT:
        try:
            return VT(raw)
        except ValueError:
            self._fail(f"{what}: unknown value type {raw} (known: 0-{max(VT)})")

    def _scalar(self, vtype: VT, off: int, what: str) -> tuple[Any, int]:
        if vtype == VT.STRING:
            return self._text(off, what)
        s = _SCALARS[vtype]
        self._need(off, s.size, what)
        return s.unpack_from(self.mapping, off)[0], off + s.size

    def _skip_array(self, off: int, what: str, depth: int) -> tuple[VT, int, int]:
        """(element type, count, end offset) of the array at ``off``: every length checked, nothing decoded."""
        if depth > MAX_NESTING:
            self._fail(f"{what}: arrays nested deeper than {MAX_NESTING} levels at offset {off}")
        etype = self._value_type(self._u32(off, f"{what}'s element type"), f"{what}'s elements (offset {off})")
        n = self._u64(off + 4, f"{what}'s length")
        first = off + 12
        if n * _MIN_VALUE_BYTES[etype] > self.size - first:
            self._fail(f"{what}: array of {n} {etype.name} elements at offset {off} cannot fit in the "
                       f"{self.size - first} bytes left in the file")
        self._more(first + n * _MIN_VALUE_BYTES[etype])  # a prefix: ask for at least this much at once
        if etype == VT.STRING:
            return etype, n, self._scan_strings(first, n, what)[2]
        if etype == VT.ARRAY:
            end = first
            for j in range(n):
                end = self._skip_array(end, f"{what}[{j}]", depth + 1)[2]
            return etype, n, end
        return etype, n, first + n * _SCALARS[etype].size

    def _scan_strings(self, off: int, n: int, what: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Starts and lengths of ``n`` length-prefixed strings from ``off``, and the end offset.

        Vectorised over windows of the mapping: a string shorter than 256 bytes has a length field
        whose upper seven bytes are zero, so its start is among the positions followed by seven
        zero bytes (the candidates). From a known start, each string's end is the next start; a
        run of candidates is confirmed by following those ends, which steps over candidates that
        lie inside strings. A string the test cannot see (256 bytes or longer) is read with
        ``struct``, in bursts that double while the vectorised test keeps failing, so any mix of
        lengths costs at most a few windows more than reading every string one by one."""
        starts, lengths = [], []
        done, pos, burst = 0, off, 1
        while done < n:
            k, pos = self._scan_window(pos, n - done, starts, lengths, what, done)
            done += k
            if k >= 64:
                burst = 1
                continue
            for _ in range(min(burst, n - done)):  # strings the window could not confirm
                ln = self._u64(pos, f"{what}[{done}]'s length")
                if ln > self.size - pos - 8:
                    self._fail(f"truncated: {what}[{done}] at offset {pos} claims {ln} bytes, past the end of "
                               f"the file ({self.size} bytes)")
                starts.append(np.array([pos], np.int64))
                lengths.append(np.array([ln], np.int64))
                pos += 8 + ln
                done += 1
            burst = min(2 * burst, 1 << 16)
        if pos > self.size:
            self._fail(f"truncated: {what}'s last string ends at offset {pos}, past the end of the file ({self.size} bytes)")
        empty = np.zeros(0, np.int64)
        return (np.concatenate(starts) if starts else empty), (np.concatenate(lengths) if lengths else empty), pos

    def _scan_window(self, pos: int, todo: int, starts: list, lengths: list, what: str, done: int) -> tuple[int, int]:
        """Confirm up to ``todo`` short strings from ``pos`` in one window; returns how many and
        the offset after the last one (``pos`` when the first is not a short string)."""
        if pos + 8 > self.size:
            self._fail(f"truncated: {what}[{done}] would start at offset {pos}, past the end of the file "
                       f"({self.size} bytes)")
        self._more(pos + 8)
        w = self._u8[pos:min(self._have, pos + min(_SCAN_WINDOW, todo * 263 + 8))]
        z = w == 0
        m = z[1:len(w) - 6].copy()
        for k in range(2, 8):
            m &= z[k:len(w) - 7 + k]
        cand = np.flatnonzero(m)
        if not len(cand) or cand[0] != 0:
            return 0, pos
        ends = cand + 8 + w[cand]
        breaks = np.flatnonzero(ends[:-1] != cand[1:])
        runs, i = [], 0
        while True:  # follow the ends over the candidates that lie inside strings
            bi = int(np.searchsorted(breaks, i))
            b = int(breaks[bi]) if bi < len(breaks) else len(cand) - 1
            runs.append(np.arange(i, b + 1))
            j = int(np.searchsorted(cand, ends[b]))
            if b == len(cand) - 1 or j == len(cand) or cand[j] != ends[b]:
                break
            i = j
        idx = np.concatenate(runs)[:todo] if len(runs) > 1 else runs[0][:todo]
        starts.append(cand[idx] + pos)
        lengths.append(w[cand[idx]].astype(np.int64))
        return len(idx), pos + int(ends[idx[-1]])

    def _array_value(self, f: Field, count: int, off: int | None = None, etype: VT | None = None,
                     what: str | None = None, errors: str = "strict") -> list:
        """The first ``count`` elements of the array whose element type field is at ``off``."""
        off = f.value_offset if off is None else off
        what = what or f"key {f.key!r}"
        etype = f.element_type if etype is None else etype
        first = off + 12
        if etype == VT.STRING:
            starts, lengths, end = self._scan_strings(first, count, what)
            blob = self.mapping[first:end]  # one copy of the region, then a slice a string
            fast = _decode_strings(blob, starts + 8 - first, lengths)
            if fast is not None:
                return fast
            pairs = list(zip((starts + 8 - first).tolist(), (starts + 8 - first + lengths).tolist()))
            try:
                return [blob[a:b].decode("utf-8", errors) for a, b in pairs]
            except UnicodeDecodeError:
                for j, (a, b) in enumerate(pairs):
                    try:
                        blob[a:b].decode("utf-8")
                    except UnicodeDecodeError:
                        self._fail(f"{what}[{j}] at offset {first + a - 8} is not UTF-8: {blob[a:min(b, a + 40)]!r}")
        if etype == VT.ARRAY:
            out, pos = [], first
            for j in range(count):
                sub_type, sub_n, end = self._skip_array(pos, f"{what}[{j}]", 2)
                out.append(self._array_value(f, sub_n, pos, sub_type, f"{what}[{j}]", errors))
                pos = end
            return out
        return np.frombuffer(self.mapping, _NP_DTYPES[etype], count, first).tolist()

    def _parse_tensor_info(self, i: int, off: int) -> int:
        start = off
        name, off = self._text(off, f"tensor name {i}")
        n_dims = self._u32(off, f"tensor {name!r}'s dimension count")
        if n_dims > MAX_DIMS:
            self._fail(f"{n_dims} dimensions (at most {MAX_DIMS})", tensor=name)
        off += 4
        self._need(off, 8 * n_dims + _TYPE_OFFSET.size, f"tensor {name!r}'s info")
        dims = struct.unpack_from(f"<{n_dims}Q", self.mapping, off)
        type_id, rel = _TYPE_OFFSET.unpack_from(self.mapping, off + 8 * n_dims)
        self.tensors.append(TensorRecord(name, dims, type_id, rel, start))
        return off + 8 * n_dims + _TYPE_OFFSET.size

    def _alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        if f.type != VT.UINT32:
            self._fail(f"general.alignment must be a UINT32, got {f.type.name}")
        if f.scalar == 0 or f.scalar & (f.scalar - 1):
            self._fail(f"general.alignment {f.scalar} is not a power of two")
        return f.scalar

    def _validate_tensors(self) -> None:
        seen: set[str] = set()
        spans = []
        for t in self.tensors:
            name = t.name
            if name in seen:
                self._fail("duplicate tensor name", tensor=name)
            seen.add(name)
            try:
                spec = quant.type_spec(t.type_id)
            except UnsupportedTypeError as e:
                self._fail(f"type id {t.type_id}: {e}", tensor=name)
            n_elem = extent = 1  # extent: the product of the non-zero dimensions, which NumPy
            for d in t.dims:     # bounds too, for a shape of no elements as for any other
                n_elem *= d
                extent *= d or 1
            if extent >= 2**63:
                self._fail(f"shape {list(t.dims)} overflows: {extent} elements"
                           f"{' in its non-zero dimensions' if not n_elem else ''}", tensor=name)
            if t.dims and t.dims[0] % spec.block_size:
                self._fail(f"row length {t.dims[0]} is not a multiple of {spec.name}'s block size {spec.block_size}",
                           tensor=name)
            if t.rel_offset % self.alignment:
                self._fail(f"data offset {t.rel_offset} is not a multiple of the alignment {self.alignment}", tensor=name)
            start = self.data_offset + t.rel_offset
            n_bytes = spec.n_bytes(n_elem)
            if start + n_bytes > self.size:
                self._fail(f"data [{start}, {start + n_bytes}) ends past the end of the file ({self.size} bytes)",
                           tensor=name)
            spans.append((start, start + n_bytes, name))
        spans.sort()
        last = None  # the span reaching furthest so far: a tensor of no bytes between two does not hide them
        for s1, e1, n1 in spans:
            if e1 == s1:
                continue
            if last is not None and s1 < last[1]:
                self._fail(f"data [{s1}, {e1}) overlaps tensor {last[2]!r} [{last[0]}, {last[1]})", tensor=n1)
            if last is None or e1 > last[1]:
                last = (s1, e1, n1)
