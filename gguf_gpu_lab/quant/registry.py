"""The type registry: one entry per GGML type, block layouts taken from ``gguf``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedTypeError

T = GGMLQuantizationType

# Types stored as plain NumPy scalars: copied through, never "dequantized".
_PLAIN = {
    T.F32: np.float32,
    T.F16: np.float16,
    T.F64: np.float64,
    T.I8: np.int8,
    T.I16: np.int16,
    T.I32: np.int32,
    T.I64: np.int64,
}

# Byte offsets, inside one block, of each fp16 scale. Used to make random blocks valid (finite
# scales) and by check() to find NaN/Inf scales, as llama.cpp's --check-tensors does.
# IQ1_M packs its fp16 scale into the top nibbles of four uint16 words; see iq1_m_scale().
_F16_SCALES: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,),
    T.IQ1_S: (0,), T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.TQ1_0: (52,), T.TQ2_0: (64,),
}

# Types with a hand-written vectorised NumPy kernel in _cpu.py; the rest call gguf-py per chunk.
OWN_CPU_KERNELS = frozenset({
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
})


@dataclass(frozen=True)
class TypeSpec:
    """What the toolkit knows of one GGML tensor type."""

    ggml_type: GGMLQuantizationType
    block_size: int
    type_size: int
    kind: str  # "float" (dequantizable), "int" (pass-through), "quant"
    storage_dtype: np.dtype | None  # NumPy dtype of plain types, else None
    f16_scale_offsets: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def is_quantized(self) -> bool:
        return self.kind == "quant"

    def n_bytes(self, n_elements: int) -> int:
        return n_elements // self.block_size * self.type_size


def _gguf_dequantizable() -> set[T]:
    from gguf.quants import _type_traits  # the set gguf-py itself can dequantize

    return set(_type_traits) | {T.F32, T.F16}


def _build() -> dict[T, TypeSpec]:
    specs: dict[T, TypeSpec] = {}
    supported = _gguf_dequantizable() | set(_PLAIN)
    for t in T:
        if t not in supported or t not in GGML_QUANT_SIZES:
            continue
        block, size = GGML_QUANT_SIZES[t]
        if t in _PLAIN:
            dt = np.dtype(_PLAIN[t])
            kind = "int" if dt.kind == "i" else "float"
        elif t == T.BF16:
            dt, kind = None, "float"
        else:
            dt, kind = None, "quant"
        specs[t] = TypeSpec(t, block, size, kind, dt, _F16_SCALES.get(t, ()))
    return specs


TYPES: dict[GGMLQuantizationType, TypeSpec] = _build()


def type_spec(ggml_type: int | GGMLQuantizationType | str) -> TypeSpec:
    """The registry entry of a type given as enum, id or name; an unknown type raises."""
    try:
        if isinstance(ggml_type, str):
            t = T[ggml_type.upper()]
        else:
            t = T(int(ggml_type))
    except (KeyError, ValueError):
        raise UnsupportedTypeError(f"unknown GGML type {ggml_type!r}") from None
    spec = TYPES.get(t)
    if spec is None:
        raise UnsupportedTypeError(
            f"GGML type {t.name} (id {int(t)}) is not supported: gguf {_gguf_version()} cannot dequantize it"
        )
    return spec


def iq1_m_scale(blocks: np.ndarray) -> np.ndarray:
    """IQ1_M's fp16 super-block scale, assembled from the top nibbles of its last 8 bytes."""
    s = np.ascontiguousarray(blocks[:, 48:56]).view(np.uint16)
    d = (s[:, 0] >> 12) | ((s[:, 1] >> 8) & 0x00F0) | ((s[:, 2] >> 4) & 0x0F00) | (s[:, 3] & 0xF000)
    return d.astype(np.uint16).view(np.float16)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover
        return "?"
