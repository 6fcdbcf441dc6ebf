"""Vectorised NumPy dequantization, parallel over chunks of blocks.

Every kernel takes ``blocks`` (n, type_size) uint8 and writes ``out`` (n, block_size) float32
with the same float32 operations, in the same order, as ``gguf.quants`` (so results are
bit-exact), but with lookup tables, fewer temporaries and no per-16-rows Python loop.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .registry import OWN_CPU_KERNELS, TypeSpec

# Integer unpacking, then one multiply that converts to float32 inside the ufunc: NumPy's
# fancy-index lookup tables measured ~10x slower per element than this.
_F32 = np.float32
_SH8 = np.arange(8, dtype=np.uint8)
_SH32 = np.arange(32, dtype=np.uint32)
_SH2 = np.array([0, 2, 4, 6], np.uint8)


_ALONE = threading.local()  # .on: this thread dequantizes alone (no pool), so holding the GIL is free


def _scale_rows(x: np.ndarray, width: int) -> np.ndarray | None:
    """Per-sub-block scales repeated to full rows, when this thread runs alone: contiguous
    multiplies beat ``width``-long broadcasting there, but np.repeat holds the GIL, which would
    stall a thread pool."""
    return np.repeat(x, width, axis=1) if getattr(_ALONE, "on", False) else None


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    """The fp16 scale at byte ``off`` of each block, as float32 of shape (n, 1)."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) uint8: all low nibbles, then all high nibbles (ggml order)."""
    n, k = qs.shape
    q = np.empty((n, 2 * k), dtype=np.uint8)
    np.bitwise_and(qs, 15, out=q[:, :k])
    np.right_shift(qs, 4, out=q[:, k:])
    return q


def _signed(q: np.ndarray, offset: int) -> np.ndarray:
    """uint8 codes -> int8 (code - offset), in place."""
    v = q.view(np.int8)
    np.subtract(v, np.int8(offset), out=v)
    return v


def _q4_0(b, out):
    np.multiply(_f16(b, 0), _signed(_nibbles(b[:, 2:18]), 8), out=out, dtype=_F32)


def _q4_1(b, out):
    np.multiply(_f16(b, 0), _nibbles(b[:, 4:20]), out=out, dtype=_F32)
    out += _f16(b, 2)


def _q5_bits(b, qh_off, qs_off):
    qh = np.ascontiguousarray(b[:, qh_off:qh_off + 4]).view(np.uint32)
    q = _nibbles(b[:, qs_off:qs_off + 16])
    q |= ((qh >> _SH32) & np.uint32(1)).astype(np.uint8) << np.uint8(4)
    return q


def _q5_0(b, out):
    np.multiply(_f16(b, 0), _signed(_q5_bits(b, 2, 6), 16), out=out, dtype=_F32)


def _q5_1(b, out):
    np.multiply(_f16(b, 0), _q5_bits(b, 4, 8), out=out, dtype=_F32)
    out += _f16(b, 2)


def _q8_0(b, out):
    np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), out=out, dtype=_F32)


def _q2_k(b, out):
    n = b.shape[0]
    sc, qs = b[:, :16], b[:, 16:80]
    dl = _f16(b, 80) * (sc & np.uint8(15))
    ml = _f16(b, 82) * (sc >> np.uint8(4))
    q = (qs.reshape(n, 2, 1, 32) >> _SH2.reshape(1, 1, 4, 1)) & np.uint8(3)
    o = out.reshape(n, 16, 16)
    np.multiply(dl[:, :, None], q.reshape(n, 16, 16), out=o, dtype=_F32)
    o -= ml[:, :, None]


def _q3_k(b, out):
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    ls = _nibbles(sc[:, :8])
    hs = (sc[:, 8:12].reshape(n, 1, 4) >> _SH2.reshape(1, 4, 1)).reshape(n, 16)
    dl = _f16(b, 108) * _signed(ls | ((hs & np.uint8(3)) << np.uint8(4)), 32)
    ql = (qs.reshape(n, 2, 1, 32) >> _SH2.reshape(1, 1, 4, 1)) & np.uint8(3)
    qh = ((hmask.reshape(n, 1, 32) >> _SH8.reshape(1, 8, 1)) & np.uint8(1)) ^ np.uint8(1)
    q = ql.reshape(n, 256).view(np.int8) - (qh.reshape(n, 256) << np.uint8(2)).view(np.int8)
    np.multiply(dl.reshape(n, 16, 1), q.reshape(n, 16, 16), out=out.reshape(n, 16, 16), dtype=_F32)


def _k_scale_min(sc: np.ndarray):
    """Q4_K/Q5_K 6-bit sub-block scales and mins, (n, 8) each (gguf.quants.Q4_K.get_scale_min)."""
    s = sc.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale, mn


def _q4_k(b, out):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = _f16(b, 0) * sc
    dm = _f16(b, 2) * mn
    qs = b[:, 16:144].reshape(n, 4, 32)
    q = np.empty((n, 4, 2, 32), np.uint8)  # sub-block 2k: low nibbles of run k, 2k+1: high nibbles
    np.bitwise_and(qs, np.uint8(15), out=q[:, :, 0])
    np.right_shift(qs, np.uint8(4), out=q[:, :, 1])
    rows = _scale_rows(d, 32)
    if rows is not None:
        np.multiply(rows, q.reshape(n, 256), out=out, dtype=_F32)
        out -= _scale_rows(dm, 32)
        return
    o = out.reshape(n, 8, 32)
    np.multiply(d[:, :, None], q.reshape(n, 8, 32), out=o, dtype=_F32)
    o -= dm[:, :, None]


def _q5_k(b, out):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = _f16(b, 0) * sc
    dm = _f16(b, 2) * mn
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(n, 4, 1, 32)
    ql = (qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
    q = ql.reshape(n, 8, 32) | (((qh.reshape(n, 1, 32) >> _SH8.reshape(1, 8, 1)) & np.uint8(1)) << np.uint8(4))
    o = out.reshape(n, 8, 32)
    np.multiply(d[:, :, None], q, out=o, dtype=_F32)
    o -= dm[:, :, None]


# Q6_K in 64-bit words: 8 codes an operation, on a transposed copy whose rows are n long
_U64 = np.uint64
_LO4 = _U64(0x0F0F0F0F0F0F0F0F)
_HI2 = _U64(0x3030303030303030)
_SH_NIB = np.array([0, 4], _U64).reshape(1, 2, 1, 1, 1)
_SH_QH = np.array([6, 4, 2, 0], _U64).reshape(1, 4, 1, 1)


def _q6_codes(b: np.ndarray) -> np.ndarray:
    """Q6_K codes minus 32, (n, 256) int8. Cut per block, the fields are 32-byte pieces and
    NumPy's per-call overhead dominates; on the transposed 64-bit words every call is n long,
    and the two transposes cost less than the overhead they remove. Per-byte masks make it
    endian-neutral."""
    n = b.shape[0]
    w = np.ascontiguousarray(b[:, :192].view(_U64).T)  # (24, n): ql words 0-15, qh words 16-23
    # (half, nibble, ql run, word, block) = (half, row of 32 codes, word, block)
    q = np.empty((2, 2, 2, 4, n), _U64)
    np.right_shift(w[:16].reshape(2, 1, 2, 4, n), _SH_NIB, out=q)
    q &= _LO4
    hi = np.left_shift(w[16:].reshape(2, 1, 4, n), _SH_QH)  # qh bits 2r, 2r+1 of row r to 4, 5
    hi >>= _U64(2)
    hi &= _HI2
    q |= hi.reshape(q.shape)
    codes = np.ascontiguousarray(q.reshape(32, n).T).view(np.int8)
    codes -= np.int8(32)
    return codes


def _q6_k(b, out):
    n = b.shape[0]
    d = _f16(b, 208) * b[:, 192:208].view(np.int8)  # (n, 16) float32: gguf multiplies d * scales first
    codes = _q6_codes(b)
    rows = _scale_rows(d, 16)
    # exact cast, then a float32 multiply in place (the same product as gguf's d * q): a plain
    # cast streams into ``out`` about twice as fast as a multiply that converts the int8 itself.
    # In slices of a lone thread's task, so the multiply finds ``out`` still in cache when a
    # pool's tasks are larger.
    step = MIN_TASK // 256
    for lo in range(0, n, step):
        o = out[lo:lo + step]
        np.copyto(o, codes[lo:lo + step], casting="unsafe")
        if rows is not None:
            o *= rows[lo:lo + step]
        else:
            o = o.reshape(-1, 16, 16)
            o *= d[lo:lo + step, :, None]


def _f32(b, out):
    out[...] = b.view(np.float32)


def _f16_t(b, out):
    out[...] = b.view(np.float16)


def _bf16(b, out):
    np.left_shift(b.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


_KERNELS: dict[T, Callable[[np.ndarray, np.ndarray], None]] = {
    T.F32: _f32, T.F16: _f16_t, T.BF16: _bf16,
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
assert set(_KERNELS) == set(OWN_CPU_KERNELS)


def _gguf_kernel(spec: TypeSpec) -> Callable[[np.ndarray, np.ndarray], None]:
    def run(b: np.ndarray, out: np.ndarray) -> None:
        # one row for the whole chunk: gguf-py loops in Python over groups of 16 rows
        row = np.ascontiguousarray(b).reshape(1, -1)
        out[...] = gq.dequantize(row, spec.ggml_type).reshape(out.shape)

    return run


def block_kernel(spec: TypeSpec) -> Callable[[np.ndarray, np.ndarray], None]:
    """The float32 block kernel of a type: (n, type_size) uint8 -> (n, block_size) float32."""
    return _KERNELS.get(spec.ggml_type) or _gguf_kernel(spec)


# Weights per task: at least MIN_TASK to amortise NumPy's per-call overhead (during which the
# GIL is held), at most MAX_TASK to bound temporaries, and otherwise about two tasks a thread.
# Measured on 16 cores (benchmarks/cpu_task_sweep.py, BENCHMARKS.md): 64 Ki-weight tasks stop
# scaling past a few threads; 1-4 Mi-weight tasks scale.
MIN_TASK = 1 << 18
MAX_TASK = 1 << 22


def auto_task_elements(n_elements: int, threads: int) -> int:
    if threads <= 1:  # no GIL to share: the size whose temporaries stay in cache
        return MIN_TASK
    return int(min(MAX_TASK, max(MIN_TASK, -(-n_elements // (2 * threads)))))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def dequantize_blocks(spec: TypeSpec, blocks: np.ndarray, out: np.ndarray, threads: int,
                      task_elements: int | None = None, alone: bool | None = None) -> None:
    """Dequantize ``blocks`` (n, type_size) into ``out`` (n, block_size) of any float dtype.
    ``alone``: no other thread of this process dequantizes meanwhile (default: ``threads <= 1``);
    callers that run several one-thread calls at once (the loader's cpu mode) pass False."""
    n = blocks.shape[0]
    kernel = block_kernel(spec)
    direct = out.dtype == np.float32
    task = task_elements or auto_task_elements(n * spec.block_size, threads)
    step = max(1, task // spec.block_size)

    def task(lo: int) -> None:
        hi = min(n, lo + step)
        if direct:
            kernel(blocks[lo:hi], out[lo:hi])
        else:
            tmp = np.empty((hi - lo, spec.block_size), dtype=np.float32)
            kernel(blocks[lo:hi], tmp)
            with np.errstate(over="ignore"):  # beyond the half range is inf, as in a cast on the GPU
                out[lo:hi] = tmp  # NumPy and ml_dtypes round to nearest even

    starts = range(0, n, step)
    if threads <= 1 or len(starts) <= 1:
        _ALONE.on = (threads <= 1) if alone is None else alone
        try:
            for lo in starts:
                task(lo)
        finally:
            _ALONE.on = False
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(starts)), thread_name_prefix="gguf-lab-dequant") as pool:
        for f in [pool.submit(task, lo) for lo in starts]:
            f.result()
