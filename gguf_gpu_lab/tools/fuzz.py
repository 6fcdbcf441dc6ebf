"""A seeded fuzzer for the GGUF parser and the CPU load path: mutated copies of a small valid
file (truncated at structural boundaries, flipped bytes, huge counts and lengths, bad offsets,
overlapping tensors, bad type ids, zero or overflowing dimensions). Every case must end in
success or a ``GGUFLabError`` naming the problem, within a time bound, without a memory blow-up.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import GGUFLabError
from ..model import open_model

MUTATIONS = ("truncate", "flip", "string_length", "counts", "tensor_offset", "type_id", "dims", "n_dims",
             "array_length")


def seed_file() -> bytes:
    """A small valid GGUF: string, number and array metadata, tensors of several types."""
    import gguf

    from .synth import random_blocks

    rng = np.random.Generator(np.random.SFC64(0))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "seed.gguf")
        w = gguf.GGUFWriter(path, "llama")
        w.add_name("fuzz seed")
        w.add_uint32("llama.block_count", 1)
        # a vocabulary with empty, long and non-ASCII strings exercises the vectorised string scan
        tokens = ["a", "bb", "", "\u4e2d\u6587"] + [f"\u2581t{i}" * (1 + i % 3) for i in range(200)] + ["x" * 300, ""]
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", [float(i) for i in range(len(tokens))])
        w.add_array("fuzz.nested", [[1, 2], [3], [4, 5, 6]])
        w.add_bool("fuzz.flag", True)
        w.add_float64("fuzz.f64", 0.25)
        w.add_uint64("fuzz.u64", 2**40)
        tensors = [("token_embd.weight", "Q4_0", (4, 64)), ("blk.0.attn_q.weight", "Q4_K", (2, 256)),
                   ("blk.0.attn_norm.weight", "F32", (64,)), ("blk.0.ffn_up.weight", "Q8_0", (2, 64)),
                   ("output.weight", "IQ4_NL", (2, 32))]
        for name, tname, shape in tensors:
            t = gguf.GGMLQuantizationType[tname]
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            n = int(np.prod(shape))
            if tname == "F32":
                w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
            else:
                w.add_tensor_info(name, (*shape[:-1], shape[-1] // bs * ts), np.dtype(np.uint8), n // bs * ts, raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, tname, shape in tensors:
            n = int(np.prod(shape))
            if tname == "F32":
                w.write_tensor_data(np.ones(shape, np.float32))
            else:
                bs = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tname]][0]
                w.write_tensor_data(random_blocks(tname, n // bs, rng).reshape(-1))
        w.close()
        return open(path, "rb").read()


@dataclass
class Layout:
    """Byte positions of a GGUF file's structure, read from a valid file."""

    kv_starts: list[int]
    kv_value_starts: list[tuple[int, int]]  # (offset of the value-type field, type)
    ti_starts: list[int]
    data_offset: int
    size: int
    boundaries: list[int] = field(default_factory=list)


def layout(data: bytes) -> Layout:
    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(data)
    try:
        with open_model(f.name, warmup=False) as m:
            h = m._header
            kv_starts = [f.offset for f in h.fields.values()]
            kv_values = [(f.value_offset - 4, int(f.type)) for f in h.fields.values()]
            ti_starts = [t.info_offset for t in h.tensors]
            data_offset = h.data_offset
            tensor_edges = [e for t in m.tensors for e in (t.offset, t.offset + t.n_bytes)]
    finally:
        os.unlink(f.name)
    bounds = sorted({0, 4, 8, 16, 24, *kv_starts, *ti_starts, data_offset, *tensor_edges, len(data)})
    return Layout(kv_starts, kv_values, ti_starts, data_offset, len(data), bounds)


def mutate(data: bytes, lay: Layout, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutated copy and the name of its mutation."""
    kind = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    b = bytearray(data)
    huge = [2**63, 2**64 - 1, 2**40, lay.size + 1, 2**32, 2**31 - 1]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if kind == "truncate":
        cut = max(0, min(lay.size - 1, pick(lay.boundaries) + int(rng.integers(-2, 3))))
        return kind, bytes(b[:cut])
    if kind == "flip":
        end = lay.data_offset if rng.random() < 0.9 else lay.size
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, end))
            b[i] ^= 1 << int(rng.integers(8))
        return kind, bytes(b)
    if kind == "string_length":  # a key's length field
        struct.pack_into("<Q", b, pick(lay.kv_starts + lay.ti_starts), pick(huge))
        return kind, bytes(b)
    if kind == "counts":
        struct.pack_into("<Q", b, 8 if rng.random() < 0.5 else 16,
                         pick(huge + [len(lay.ti_starts) + 1, len(lay.kv_starts) + 1, 0]))
        return kind, bytes(b)
    # tensor info fields: name length u64, name, n_dims u32, dims u64 x n, type u32, offset u64
    ti = pick(lay.ti_starts)
    name_len = struct.unpack_from("<Q", b, ti)[0]
    nd_at = ti + 8 + name_len
    n_dims = struct.unpack_from("<I", b, nd_at)[0]
    dims_at = nd_at + 4
    type_at = dims_at + 8 * n_dims
    off_at = type_at + 4
    if kind == "n_dims":
        struct.pack_into("<I", b, nd_at, pick([0, 5, 8, 2**32 - 1, n_dims + 1]))
    elif kind == "dims":
        struct.pack_into("<Q", b, dims_at + 8 * int(rng.integers(n_dims)), pick(huge + [0, 1, 3, 2**62]))
    elif kind == "type_id":
        struct.pack_into("<I", b, type_at, pick([4, 5, 9, 15, 31, 33, 99, 255, 2**31, 2**32 - 1]))
    elif kind == "tensor_offset":
        other = struct.unpack_from("<Q", b, off_at)[0]
        struct.pack_into("<Q", b, off_at, pick(huge + [0, 1, 31, other + 32, other - 32 if other >= 32 else 0]))
    elif kind == "array_length":
        arrays = [(at, t) for at, t in lay.kv_value_starts if t == 9]  # GGUFValueType.ARRAY
        if arrays:
            at, _ = pick(arrays)
            struct.pack_into("<Q", b, at + 4 + 4, pick(huge))  # value type u32, element type u32, count u64
    return kind, bytes(b)


@dataclass
class FuzzReport:
    cases: int
    outcomes: Counter
    by_mutation: dict[str, Counter]
    failures: list[tuple[int, str, str]]  # (case, mutation, exception) of cases that broke the contract
    slowest_s: float
    peak_bytes: int

    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"cases": self.cases, "outcomes": dict(self.outcomes),
                "by_mutation": {k: dict(v) for k, v in self.by_mutation.items()},
                "failures": [list(f) for f in self.failures], "slowest_case_s": self.slowest_s,
                "peak_traced_bytes": self.peak_bytes}


def run(cases: int, seed: int = 0, *, time_limit_s: float = 2.0, memory_limit: int = 256 << 20,
        progress: Callable[[int], object] | None = None) -> FuzzReport:
    """Run ``cases`` mutated files through open, every metadata value in full, every tensor's CPU
    dequantization and check()."""
    data = seed_file()
    lay = layout(data)
    rng = np.random.Generator(np.random.SFC64(seed))
    outcomes: Counter = Counter()
    by_mut: dict[str, Counter] = {m: Counter() for m in MUTATIONS}
    failures = []
    slowest = 0.0
    peak = 0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "case.gguf")
        tracemalloc.start()
        try:
            for i in range(cases):
                kind, blob = mutate(data, lay, rng)
                with open(path, "wb") as f:
                    f.write(blob)
                tracemalloc.reset_peak()
                t0 = time.perf_counter()
                try:
                    with open_model(path, warmup=False) as m:
                        for k in m.metadata:  # arrays are decoded on access: decode each in full
                            m.metadata_value(k)
                        for t in m.tensors:
                            m.dequantize(t.name)
                        m.check()
                    result = "ok"
                except GGUFLabError as e:
                    result = type(e).__name__
                    if not str(e) or path not in str(e):
                        failures.append((i, kind, f"{type(e).__name__} without the file in its message: {e}"))
                except Exception as e:  # the contract is broken: report, keep going
                    result = f"other:{type(e).__name__}"
                    failures.append((i, kind, f"{type(e).__name__}: {e}"[:300]))
                dt = time.perf_counter() - t0
                slowest = max(slowest, dt)
                cur_peak = tracemalloc.get_traced_memory()[1]
                peak = max(peak, cur_peak)
                if dt > time_limit_s:
                    failures.append((i, kind, f"took {dt:.2f} s"))
                if cur_peak > memory_limit:
                    failures.append((i, kind, f"allocated {cur_peak} bytes"))
                outcomes[result] += 1
                by_mut[kind][result] += 1
                if progress is not None:
                    progress(i + 1)
        finally:
            tracemalloc.stop()
    return FuzzReport(cases, outcomes, by_mut, failures, slowest, peak)
