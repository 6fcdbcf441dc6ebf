"""Test data for dequantizers: real quantized rows (libgguf) and random blocks with finite scales.

libgguf builds a neighbour table for a grid type the first time a process quantizes one (IQ1_S
and IQ1_M 19 s, IQ2_XS and IQ2_S 6 s each, IQ2_XXS 3 s on 2 cores; the rows' size does not
matter), so the rows of GRID_TYPES are quantized once and stored in data/libgguf-grid-rows.npz;
``python -m tests.quantdata`` writes that file again.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from gguf_gpu_lab import quant

# Every type the registry dequantizes, apart from integer pass-through and F64.
DEQUANT_TYPES = [s.ggml_type for s in quant.TYPES.values() if s.kind != "int" and s.ggml_type != T.F64]
QUANT_TYPES = [t for t in DEQUANT_TYPES if quant.TYPES[t].kind == "quant"]


def row_widths(ggml_type) -> list[int]:
    b = max(quant.type_spec(ggml_type).block_size, 32)
    return [b, 3 * b, 4096]


GRID_TYPES = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S)
STORED_ROWS = Path(__file__).parent / "data" / "libgguf-grid-rows.npz"
_STORED_SHAPE, _STORED_SEED = (5, 4096), 2026


def _stored_inputs(ggml_type) -> tuple[np.ndarray, np.ndarray]:
    """The floats and importance weights the stored rows of a grid type are quantized from."""
    rng = np.random.Generator(np.random.SFC64([_STORED_SEED, int(ggml_type)]))
    x = rng.standard_normal(_STORED_SHAPE).astype(np.float32)
    return x, (rng.random(_STORED_SHAPE[1]) + 0.5).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _stored(ggml_type) -> tuple[np.ndarray, np.ndarray]:
    x = _stored_inputs(ggml_type)[0]
    with np.load(STORED_ROWS) as f:
        q, digest = f[ggml_type.name], str(f[f"{ggml_type.name}_x_sha256"])
    if hashlib.sha256(x.tobytes()).hexdigest() != digest:
        raise RuntimeError(f"{STORED_ROWS.name}: NumPy no longer draws the floats {ggml_type.name} was quantized "
                           "from; write the file again with python -m tests.quantdata")
    return q, x


def write_stored_rows(path: Path = STORED_ROWS) -> None:
    """Quantize the stored rows of every grid type with libgguf (about 35 s on 2 cores)."""
    from importlib.metadata import version

    import libgguf

    arrays = {"libgguf_version": np.array(version("libgguf"))}
    for t in GRID_TYPES:
        x, imatrix = _stored_inputs(t)
        arrays[t.name] = libgguf.quantize_rows(x, t, imatrix=imatrix)
        arrays[f"{t.name}_x_sha256"] = np.array(hashlib.sha256(x.tobytes()).hexdigest())
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, **arrays)


def libgguf_rows(ggml_type, n_rows: int, width: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random normal floats quantized by libgguf's native reference quantizer: (bytes, floats).
    For GRID_TYPES, the first rows and columns of the stored ones (each block is quantized on
    its own, so a slice of a quantized row is the quantized slice)."""
    import libgguf

    if ggml_type in GRID_TYPES:
        q, x = _stored(ggml_type)
        spec = quant.type_spec(ggml_type)
        if n_rows > x.shape[0] or width > x.shape[1] or width % spec.block_size:
            raise ValueError(f"{spec.name}: the stored rows are {x.shape}, not enough for ({n_rows}, {width})")
        return np.ascontiguousarray(q[:n_rows, :width // spec.block_size * spec.type_size]), x[:n_rows, :width].copy()
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


if __name__ == "__main__":
    write_stored_rows()
    print(f"wrote {STORED_ROWS}")
