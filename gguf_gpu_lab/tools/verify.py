"""Comparison with gguf-py's reference dequantization."""

from __future__ import annotations

import numpy as np
from gguf import quants as gq

from .. import quant


def gguf_py_dequantizes(ggml_type) -> bool:
    """Whether gguf-py's ``dequantize`` takes the type: not the integer types, not F64 (for
    those ``reference`` reads the values themselves)."""
    spec = quant.type_spec(ggml_type)
    return spec.kind != "int" and spec.ggml_type.name != "F64"


def reference(raw: np.ndarray, ggml_type) -> np.ndarray:
    """gguf-py's float32 dequantization of raw bytes, flattened (the integer types: their values,
    in their own dtype; F64: its values as float32)."""
    spec = quant.type_spec(ggml_type)
    if spec.kind == "int":
        return np.asarray(raw).view(spec.storage_dtype).reshape(-1)
    if not gguf_py_dequantizes(spec.ggml_type):  # F64
        with np.errstate(over="ignore"):
            return np.asarray(raw).view(np.float64).astype(np.float32).reshape(-1)
    blocks = np.ascontiguousarray(raw).reshape(-1, spec.type_size)
    return np.asarray(gq.dequantize(blocks, spec.ggml_type), dtype=np.float32).reshape(-1)


def round_reference(ref32: np.ndarray, dtype) -> np.ndarray:
    """The float32 reference rounded to nearest even in ``dtype`` (float16 or bfloat16)."""
    with np.errstate(over="ignore"):
        return ref32.astype(quant.resolve_dtype(dtype))


def mismatches(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Indices where two arrays differ bit for bit (NaN equals NaN of the same bits). Arrays of
    equal item size are compared as bit patterns, so float16 results can be checked against
    bfloat16/float16 references held as uint16."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.dtype.itemsize != b.dtype.itemsize or a.size != b.size:
        raise ValueError(f"cannot compare {a.dtype}[{a.size}] with {b.dtype}[{b.size}]")
    w = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return np.flatnonzero(a.view(w) != b.view(w))


def verify_tensor(model, name: str, dtype="float32") -> tuple[bool, str]:
    """Dequantize one tensor with this toolkit and with gguf-py; report bit-exactness."""
    t = model.info(name)
    raw = model.raw(name)
    ours = quant.dequantize(raw, t.ggml_type, dtype=dtype)
    ref = reference(raw, t.ggml_type)
    if quant.type_spec(t.ggml_type).kind != "int" and ours.dtype != np.float32:
        ref = round_reference(ref, dtype)
    bad = mismatches(ours, ref)
    if bad.size == 0:
        return True, f"verify {name}: bit-exact with gguf-py ({ref.size} values, {ours.dtype})"
    i = int(bad[0])
    return False, (f"verify {name}: {bad.size} of {ref.size} values differ from gguf-py; "
                   f"first at {i}: {ours.reshape(-1)[i]!r} vs {ref[i]!r}")
