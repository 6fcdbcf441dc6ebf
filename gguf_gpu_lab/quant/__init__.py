"""GGML tensor types: the registry and CPU dequantization."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import GGUFLabError
from ._cpu import default_threads, dequantize_blocks
from .registry import OWN_CPU_KERNELS, TYPES, TypeSpec, iq1_m_scale, type_spec

__all__ = [
    "TYPES", "TypeSpec", "type_spec", "dequantize", "resolve_dtype", "OWN_CPU_KERNELS",
    "iq1_m_scale", "default_threads", "bfloat16",
]

_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


def __getattr__(name: str):
    # ml_dtypes is imported when bfloat16 is first needed: it is most of `import gguf_gpu_lab`'s time
    if name == "bfloat16":
        from ml_dtypes import bfloat16

        return bfloat16
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_dtype(dtype) -> np.dtype:
    """Turn "float32" / "float16" / "bfloat16" (or a NumPy dtype) into a NumPy dtype."""
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype.lower()
    if key in _DTYPES:
        return _DTYPES[key]
    if key == "bfloat16":
        from ml_dtypes import bfloat16

        return np.dtype(bfloat16)
    raise GGUFLabError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


def dequantize(
    raw: np.ndarray,
    ggml_type,
    shape: Sequence[int] | None = None,
    dtype="float32",
    *,
    threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Dequantize the bytes of one tensor on the CPU, in parallel over chunks of blocks.

    Args:
        raw: the tensor's bytes (any shape; viewed as uint8).
        ggml_type: a ``GGMLQuantizationType``, its id or its name.
        shape: the NumPy (row-major) shape of the result; default 1-D.
        dtype: "float32" (bit-exact with ``gguf.quants.dequantize``), "float16" or "bfloat16"
            (the float32 value rounded to nearest even). Integer tensors keep their own dtype.
        threads: worker threads; default all cores.
        out: optional array to write into (C-contiguous, right size and dtype).

    Returns:
        The dequantized array.

    Example:
        >>> import numpy as np
        >>> blk = np.zeros(18, np.uint8); blk[:2] = np.array([1.0], np.float16).view(np.uint8)
        >>> dequantize(blk, "Q4_0")[:3]
        array([-8., -8., -8.], dtype=float32)
    """
    spec = type_spec(ggml_type)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size % spec.type_size:
        raise GGUFLabError(f"{spec.name}: {raw.size} bytes is not a whole number of {spec.type_size}-byte blocks")
    n_blocks = raw.size // spec.type_size
    n_elem = n_blocks * spec.block_size
    shape = (n_elem,) if shape is None else tuple(int(s) for s in shape)
    if int(np.prod(shape, dtype=np.int64)) != n_elem:
        raise GGUFLabError(f"{spec.name}: shape {shape} does not hold {n_elem} elements")
    if spec.kind == "int":
        return raw.view(spec.storage_dtype).reshape(shape).copy() if out is None else _copy_into(out, raw.view(spec.storage_dtype), shape)
    odt = resolve_dtype(dtype)
    if spec.ggml_type.name == "F64":
        with np.errstate(over="ignore"):
            # rounded to float32 first, like every other type (and as the GPU kernel does)
            f32 = raw.view(np.float64).astype(np.float32)
            return f32.astype(odt).reshape(shape) if out is None else _copy_into(out, f32, shape)
    if out is None:
        out = np.empty(shape, dtype=odt)
    elif out.dtype != odt or out.size != n_elem or not out.flags.c_contiguous:
        raise GGUFLabError(f"out must be a C-contiguous {odt} array of {n_elem} elements, got {out.dtype} {out.shape}")
    blocks = raw.reshape(n_blocks, spec.type_size)
    dequantize_blocks(spec, blocks, out.reshape(n_blocks, spec.block_size), threads or default_threads())
    return out.reshape(shape)


def _copy_into(out: np.ndarray, src: np.ndarray, shape) -> np.ndarray:
    if out.size != src.size:
        raise GGUFLabError(f"out has {out.size} elements, the tensor {src.size}")
    out.reshape(-1)[...] = src
    return out.reshape(shape)
