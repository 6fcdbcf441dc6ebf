"""Build GGUF files byte by byte, so tests can corrupt any field on purpose."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

GGUF_STRING = 8
GGUF_UINT32 = 4
GGUF_ARRAY = 9


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


@dataclass
class Tensor:
    name: str
    dims: tuple[int, ...]  # GGUF order
    type_id: int
    data: bytes
    offset: int | None = None  # relative to the data section; None = next aligned


@dataclass
class GGUFBytes:
    tensors: list[Tensor] = field(default_factory=list)
    kv: list[bytes] = field(default_factory=list)  # encoded key-value entries
    magic: bytes = b"GGUF"
    version: int = 3
    alignment: int = 32
    n_tensors: int | None = None  # override the header counts
    n_kv: int | None = None

    def add_str(self, key: str, value: str) -> "GGUFBytes":
        self.kv.append(gstr(key) + struct.pack("<I", GGUF_STRING) + gstr(value))
        return self

    def add_u32(self, key: str, value: int) -> "GGUFBytes":
        self.kv.append(gstr(key) + struct.pack("<II", GGUF_UINT32, value))
        return self

    def build(self) -> bytes:
        kv = list(self.kv)
        if self.alignment != 32:
            kv.append(gstr("general.alignment") + struct.pack("<II", GGUF_UINT32, self.alignment))
        head = self.magic + struct.pack("<IQQ", self.version,
                                        len(self.tensors) if self.n_tensors is None else self.n_tensors,
                                        len(kv) if self.n_kv is None else self.n_kv)
        body = b"".join(kv)
        offsets, pos = [], 0
        align = self.alignment if self.alignment and not self.alignment & (self.alignment - 1) else 32
        for t in self.tensors:
            off = pos if t.offset is None else t.offset
            offsets.append(off)
            pos = max(pos, off + len(t.data))
            pos += (-pos) % align
        for t, off in zip(self.tensors, offsets):
            body += gstr(t.name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims)
            body += struct.pack("<IQ", t.type_id, off)
        out = head + body
        out += b"\0" * ((-len(out)) % align)
        data = bytearray(pos)
        for t, off in zip(self.tensors, offsets):
            data[off:off + len(t.data)] = t.data
        return out + bytes(data)

    def write(self, path) -> str:
        with open(path, "wb") as f:
            f.write(self.build())
        return str(path)


def f32_tensor(name: str, n: int, offset: int | None = None) -> Tensor:
    return Tensor(name, (n,), 0, struct.pack(f"<{n}f", *([1.0] * n)), offset)
