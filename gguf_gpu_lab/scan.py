"""Data checks: NaN/Inf in float tensors and in the fp16 scales of quantized blocks
(what llama.cpp's ``--check-tensors`` looks for)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from . import quant


_CHUNK_BYTES = 64 << 20  # scan in bounded pieces so a huge tensor never needs a huge temporary


@dataclass(frozen=True)
class Problem:
    """One non-finite value: in element ``index`` of a float tensor, or in a block's scale."""

    tensor: str
    type_name: str
    block: int  # block index (for plain float types, the element index)
    where: str  # "value" or "scale@<byte offset in block>"
    value: float

    def __str__(self) -> str:
        what = "element" if self.where == "value" else f"block {self.block} {self.where}"
        idx = f" {self.block}" if self.where == "value" else ""
        return f"{self.tensor} ({self.type_name}): {what}{idx} is {self.value}"


def _nonfinite(vals: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.isfinite(vals))


def check_raw(name: str, ggml_type, raw: np.ndarray, max_problems: int = 100) -> list[Problem]:
    """Problems in one tensor's bytes, at most ``max_problems``."""
    spec = quant.type_spec(ggml_type)
    out: list[Problem] = []
    if spec.kind == "int":
        return out
    raw = raw.reshape(-1)
    per_chunk = max(1, _CHUNK_BYTES // spec.type_size) * spec.type_size
    for start in range(0, raw.size, per_chunk):
        chunk = raw[start:start + per_chunk]
        first_block = start // spec.type_size
        found: list[tuple[int, str, float]] = []
        if spec.kind == "float":
            vals = quant.dequantize(chunk, spec.ggml_type) if spec.ggml_type == T.BF16 else chunk.view(spec.storage_dtype)
            found = [(int(i), "value", float(vals[i])) for i in _nonfinite(vals)[:max_problems]]
        else:
            blocks = chunk.reshape(-1, spec.type_size)
            scales = [(f"scale@{off}", np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16).reshape(-1))
                      for off in spec.f16_scale_offsets]
            if spec.ggml_type == T.IQ1_M:
                scales.append(("scale@48..55", quant.iq1_m_scale(blocks)))
            for where, s in scales:
                found += [(int(i), where, float(s[i])) for i in _nonfinite(s)[:max_problems]]
            found.sort()
        for i, where, v in found:
            out.append(Problem(name, spec.name, first_block + i, where, v))
            if len(out) >= max_problems:
                return out
    return out


def check_model(model, *, max_problems: int = 100) -> list[Problem]:  # model: an open GGUFModel (scan sits below it)
    problems: list[Problem] = []
    for t in model.tensors:
        # a copy (checked after its read), not the mapping: a truncation during the scan is an error, not SIGBUS
        problems += check_raw(t.name, t.ggml_type, model.raw(t.name, mapped=False), max_problems - len(problems))
        if len(problems) >= max_problems:
            break
    return problems
