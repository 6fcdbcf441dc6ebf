"""Test data for dequantizers: real quantized rows (libgguf) and random blocks with finite scales."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from gguf_gpu_lab import quant

# Every type the registry dequantizes, apart from integer pass-through and F64.
DEQUANT_TYPES = [s.ggml_type for s in quant.TYPES.values() if s.kind != "int" and s.ggml_type != T.F64]
QUANT_TYPES = [t for t in DEQUANT_TYPES if quant.TYPES[t].kind == "quant"]


def row_widths(ggml_type) -> list[int]:
    b = max(quant.type_spec(ggml_type).block_size, 32)
    return [b, 3 * b, 4096]


def libgguf_rows(ggml_type, n_rows: int, width: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random normal floats quantized by libgguf's native reference quantizer: (bytes, floats)."""
    import libgguf

    x = rng.standard_normal((n_rows, width)).astype(np.float32)
    spec = quant.type_spec(ggml_type)
    if spec.kind == "float":
        return libgguf.store_rows(x, ggml_type).view(np.uint8), x
    imatrix = None
    if libgguf.quantize_requires_imatrix(ggml_type):
        imatrix = (rng.random(width) + 0.5).astype(np.float32)
    return libgguf.quantize_rows(x, ggml_type, imatrix=imatrix), x


def _finite_f16(h: np.ndarray) -> None:
    """Make fp16 bit patterns finite in place (clear one exponent bit where all are set)."""
    bad = (h & np.uint16(0x7C00)) == np.uint16(0x7C00)
    h[bad] &= np.uint16(0xBFFF)


def finite_random_blocks(ggml_type, n_blocks: int, rng) -> np.ndarray:
    """Uniformly random bytes, then every scale (or plain float value) made finite. Unlike
    synth.random_blocks, scales span the whole finite fp16 range, subnormals and signs included."""
    spec = quant.type_spec(ggml_type)
    b = rng.integers(0, 256, size=(n_blocks, spec.type_size), dtype=np.uint8)
    t = spec.ggml_type
    if t == T.F32:
        v = b.view(np.uint32)
        v[(v & np.uint32(0x7F800000)) == np.uint32(0x7F800000)] &= np.uint32(0xBFFFFFFF)
    elif t == T.F64:
        v = b.view(np.uint64)
        v[(v & np.uint64(0x7FF0000000000000)) == np.uint64(0x7FF0000000000000)] &= np.uint64(0xBFFFFFFFFFFFFFFF)
    elif t == T.F16:
        _finite_f16(b.view(np.uint16))
    elif t == T.BF16:
        v = b.view(np.uint16)
        v[(v & np.uint16(0x7F80)) == np.uint16(0x7F80)] &= np.uint16(0xBFFF)
    for off in spec.f16_scale_offsets:
        h = np.ascontiguousarray(b[:, off:off + 2]).view(np.uint16)
        _finite_f16(h)
        b[:, off:off + 2] = h.view(np.uint8)
    if t == T.IQ1_M:
        d = quant.iq1_m_scale(b).view(np.uint16)
        bad = (d & np.uint16(0x7C00)) == np.uint16(0x7C00)
        b[bad, 55] &= np.uint8(0xBF)  # bit 14 of the scale is bit 14 of the last uint16
    return b
