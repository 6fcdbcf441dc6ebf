"""Synthetic llama-shaped GGUF models of any size and quantization mix.

Blocks are random but valid: every fp16 scale is a finite value between about 1e-3 and 1.5e-2,
so the model dequantizes without NaN or Inf, in float32 and float16 alike. Output is
deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from . import quant
from .errors import GGUFLabError

# fp16 bit patterns 0x1400..0x2400: positive values from ~0.00098 to ~0.0156.
_SCALE_LO, _SCALE_HI = 0x1400, 0x2400


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context: int = 4096

    @property
    def n_params(self) -> int:
        kv = self.n_embd * self.n_embd * self.n_head_kv // self.n_head
        per_layer = 2 * self.n_embd * self.n_embd + 2 * kv + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return 2 * self.vocab * self.n_embd + self.n_layer * per_layer + self.n_embd


NAMED_CONFIGS = {
    "1B": LlamaConfig(32000, 2048, 22, 32, 4, 5632),
    "3B": LlamaConfig(32000, 3072, 28, 24, 8, 8192),
    "7B": LlamaConfig(32000, 4096, 32, 32, 32, 11008),
    "8B": LlamaConfig(128256, 4096, 32, 32, 8, 14336),
    "13B": LlamaConfig(32000, 5120, 40, 40, 40, 13824),
    "70B": LlamaConfig(32000, 8192, 80, 64, 8, 28672),
}

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_params(text: str | int) -> int:
    """ "7B" -> 7e9, "350M" -> 3.5e8, 1000000 -> 1e6."""
    if isinstance(text, (int, np.integer)):
        n = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(text).upper())
        if not m:
            raise GGUFLabError(f"--params: cannot read {text!r}; use a count such as 25M, 1B or 7B")
        n = int(float(m.group(1)) * _SUFFIX.get(m.group(2), 1))
    if n < 1_000_000:
        raise GGUFLabError(f"--params: {text!r} is below the smallest model (1M parameters)")
    return n


def llama_config(params: str | int) -> LlamaConfig:
    """A llama-shaped configuration with about ``params`` weights (rows multiples of 256)."""
    key = str(params).upper().strip()
    if key in NAMED_CONFIGS:
        return NAMED_CONFIGS[key]
    target = parse_params(params)
    vocab = 32000 if target >= 400e6 else 4096
    best, best_score = None, float("inf")
    for width in range(256, 16384 + 1, 256):
        n_ff = int(round(width * 8 / 3 / 256)) * 256
        heads = max(1, width // 128)
        base = LlamaConfig(vocab, width, 0, heads, heads, n_ff).n_params
        per_layer = LlamaConfig(vocab, width, 1, heads, heads, n_ff).n_params - base
        layers = max(2, round((target - base) / per_layer))
        cfg = LlamaConfig(vocab, width, layers, heads, heads, n_ff)
        err = abs(cfg.n_params - target) / target
        # llama-like proportions: about one layer per 100 of width, and within 10% of the target
        score = abs(np.log(layers / max(2.0, width / 100))) + (10.0 if err > 0.10 else 0.0) + err
        if score < best_score:
            best, best_score = cfg, score
    return best


def _more_bits(i: int, n: int) -> bool:
    # llama.cpp's use_more_bits(): first and last eighth of layers, and every third between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _uniform(t: T) -> Callable[[str, int, int], T]:
    return lambda name, layer, n_layer: t


def _q4_k_m(name: str, layer: int, n_layer: int) -> T:
    if name == "output.weight":
        return T.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(layer, n_layer):
        return T.Q6_K
    return T.Q4_K


MIXES: dict[str, Callable[[str, int, int], T]] = {
    "F16": _uniform(T.F16), "Q8_0": _uniform(T.Q8_0), "Q6_K": _uniform(T.Q6_K),
    "Q4_0": lambda n, i, L: T.Q6_K if n == "output.weight" else T.Q4_0,
    "Q4_K_M": _q4_k_m,
    "all-types": _uniform(T.F32),  # placeholder: all-types is assigned by _plan()
}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    ggml_type: T
    np_shape: tuple[int, ...]  # row-major; last dimension is the GGUF row (ne[0])


def _plan(cfg: LlamaConfig, mix: str) -> list[TensorPlan]:
    if mix not in MIXES:
        raise GGUFLabError(f"--mix: unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
    e, ff, kv = cfg.n_embd, cfg.n_ff, cfg.n_embd * cfg.n_head_kv // cfg.n_head
    shapes: list[tuple[str, int, tuple[int, ...]]] = [("token_embd.weight", -1, (cfg.vocab, e))]
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        shapes += [
            (p + "attn_norm.weight", i, (e,)), (p + "attn_q.weight", i, (e, e)),
            (p + "attn_k.weight", i, (kv, e)), (p + "attn_v.weight", i, (kv, e)),
            (p + "attn_output.weight", i, (e, e)), (p + "ffn_norm.weight", i, (e,)),
            (p + "ffn_gate.weight", i, (ff, e)), (p + "ffn_up.weight", i, (ff, e)),
            (p + "ffn_down.weight", i, (e, ff)),
        ]
    shapes += [("output_norm.weight", -1, (e,)), ("output.weight", -1, (cfg.vocab, e))]
    plans: list[TensorPlan] = []
    if mix == "all-types":
        cycle = [s.ggml_type for s in quant.TYPES.values() if s.kind != "int" and s.ggml_type != T.F64]
        k = 0
        for name, layer, shape in shapes:
            if len(shape) == 1:
                plans.append(TensorPlan(name, T.F32, shape))
            else:
                plans.append(TensorPlan(name, cycle[k % len(cycle)], shape))
                k += 1
        used = {p.ggml_type for p in plans}
        for s in quant.TYPES.values():  # small extra tensors for the types not used yet
            if s.ggml_type not in used:
                plans.append(TensorPlan(f"extra.{s.name.lower()}", s.ggml_type, (8, max(256, s.block_size))))
        return plans
    fn = MIXES[mix]
    for name, layer, shape in shapes:
        t = T.F32 if len(shape) == 1 else fn(name, layer, cfg.n_layer)
        plans.append(TensorPlan(name, t, shape))
    return plans


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


def random_blocks(ggml_type, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` random, valid blocks of a type, (n_blocks, type_size) uint8, finite scales."""
    spec = quant.type_spec(ggml_type)
    n = n_blocks * spec.type_size
    # raw 64-bit words from the generator: ~3x faster than integers(0, 256, dtype=uint8)
    b = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n].reshape(n_blocks, spec.type_size)
    make_valid(spec.ggml_type, b, rng)
    return b


def make_valid(ggml_type, blocks: np.ndarray, rng: np.random.Generator) -> None:
    """Overwrite the scale fields of random blocks (n, type_size) with finite values, in place."""
    spec = quant.type_spec(ggml_type)
    t, n = spec.ggml_type, blocks.shape[0]
    scale = lambda: rng.integers(_SCALE_LO, _SCALE_HI, size=(n, 1), dtype=np.uint16).view(np.uint8)  # noqa: E731
    for off in spec.f16_scale_offsets:
        blocks[:, off:off + 2] = scale()
    if t == T.IQ1_M:
        d = rng.integers(_SCALE_LO, _SCALE_HI, size=n, dtype=np.uint16)
        s = np.ascontiguousarray(blocks[:, 48:56]).view(np.uint16) & np.uint16(0x0FFF)
        for k in range(4):
            s[:, k] |= ((d >> np.uint16(4 * k)) & np.uint16(0xF)) << np.uint16(12)
        blocks[:, 48:56] = s.view(np.uint8)
    elif t == T.MXFP4:  # e8m0 exponent: keep values small enough for float16 output
        blocks[:, 0] = rng.integers(118, 127, size=n, dtype=np.uint8)
    elif spec.kind == "float":
        # clear the top exponent bit: finite values of magnitude below 2
        if t == T.F32:
            blocks.view(np.uint32)[...] &= np.uint32(0xBFFFFFFF)
        elif t == T.F64:
            blocks.view(np.uint64)[...] &= np.uint64(0xBFFFFFFFFFFFFFFF)
        else:  # F16, BF16
            blocks.view(np.uint16)[...] &= np.uint16(0xBFFF)


def _tensor_bytes(p: TensorPlan, seed: int) -> np.ndarray:
    spec = quant.type_spec(p.ggml_type)
    n_elem = int(np.prod(p.np_shape))
    rng = np.random.Generator(np.random.SFC64(_tensor_seed(seed, p.name)))
    if spec.kind == "int":
        return rng.integers(0, 100, size=n_elem).astype(spec.storage_dtype).reshape(p.np_shape)
    if p.ggml_type == T.F32 and len(p.np_shape) == 1:  # norms: near 1, as in a trained model
        return (1.0 + 0.05 * rng.standard_normal(n_elem)).astype(np.float32)
    return random_blocks(p.ggml_type, n_elem // spec.block_size, rng).reshape(-1)


def _tokens(n: int) -> list[str]:
    """Token strings of varied length, some non-ASCII (as a real vocabulary has), all distinct."""
    pieces = ("", "\u2581", "\u2581the", "ing", "\u00e9t\u00e9", "\u4e2d\u6587", "\U0001f600")
    return [f"<tok{i}>" if i < 256 else f"{pieces[i % len(pieces)]}{i}" for i in range(n)]


def file_bytes(plans: list[TensorPlan], tokens: list[str], alignment: int = 32) -> int:
    """The file's size, from above by at most a few KB: the header (small metadata values, the
    token list with its scores and types, the tensor infos) and each tensor's data, aligned."""
    header = 4096  # magic, counts and the small metadata values, with room to spare
    header += sum(8 + len(t.encode()) for t in tokens) + 2 * 4 * len(tokens)
    header += sum(8 + len(p.name.encode()) + 4 + 8 * len(p.np_shape) + 4 + 8 for p in plans)
    data = sum(-(-quant.type_spec(p.ggml_type).n_bytes(int(np.prod(p.np_shape))) // alignment) * alignment
               for p in plans)
    return header + alignment + data


def _check_space(path: str, need: int) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if os.path.isfile(path):  # an old file there is replaced
        free += os.path.getsize(path)
    if need > free:
        raise GGUFLabError(f"{path}: the model needs {need / 1e9:.2f} GB ({need} bytes), {folder} has "
                           f"{free / 1e9:.2f} GB free ({free} bytes)")


@dataclass(frozen=True)
class SynthResult:
    path: str
    config: LlamaConfig
    mix: str
    n_tensors: int
    n_params: int
    file_size: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.file_size / self.seconds / 1e6 if self.seconds else float("inf")


def synth(
    path: str | os.PathLike,
    params: str | int = "25M",
    mix: str = "Q4_K_M",
    seed: int = 0,
    *,
    vocab: int | None = None,
    data: bool = True,
    progress: Callable[[int, int, str], object] | None = None,
) -> SynthResult:
    """Write a synthetic llama-shaped GGUF model.

    Args:
        path: output file.
        params: size, as a count ("25M", "7B") or a named config (1B, 3B, 7B, 8B, 13B, 70B).
        mix: one of ``MIXES``: F16, Q8_0, Q6_K, Q4_0, Q4_K_M, all-types.
        seed: the same seed gives the same bytes.
        vocab: vocabulary size (default: the configuration's); sets the token list, its scores
            and token types, and the embedding and output rows, as a real model of that
            vocabulary has them (262144 for a Gemma-3-sized vocabulary).
        data: False writes the header only and leaves the tensor data a hole of the right size
            (a sparse file that reads as zeros): for benchmarks of opening, which read no data.
        progress: called as ``progress(bytes_done, bytes_total, tensor_name)`` after each tensor.

    Raises ``GGUFLabError`` before writing anything when the folder has less free space than the
    file needs (both named).

    Example:
        >>> r = synth(tmp_path / "m.gguf", "10M", "Q4_0")
        >>> r.config.n_layer, r.n_tensors
        (2, 21)
    """
    t0 = time.perf_counter()
    cfg = llama_config(params)
    if vocab is not None:
        if not (isinstance(vocab, (int, np.integer)) and 1 <= vocab <= 1 << 24):
            raise GGUFLabError(f"--vocab must be a whole number from 1 to {1 << 24}, got {vocab!r}")
        cfg = dataclasses.replace(cfg, vocab=int(vocab))
    plans = _plan(cfg, mix)
    path = os.fspath(path)
    tokens = _tokens(cfg.vocab)
    _check_space(path, file_bytes(plans, tokens))  # before writing: a 1T model would fill the disk first
    w = GGUFWriter(path, "llama")
    w.add_name(f"synthetic llama {params} {mix}")
    w.add_string("general.source", "gguf-gpu-lab synth")
    w.add_uint32("general.seed", int(seed))
    w.add_context_length(cfg.context)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(np.linspace(0.0, -1.0, cfg.vocab, dtype=np.float32).tolist())
    w.add_token_types([3] * min(3, cfg.vocab) + [1] * max(0, cfg.vocab - 3))  # 3: control, 1: normal
    total = 0
    for p in plans:
        spec = quant.type_spec(p.ggml_type)
        n_elem = int(np.prod(p.np_shape))
        nbytes = spec.n_bytes(n_elem)
        total += nbytes
        if spec.storage_dtype is not None:
            w.add_tensor_info(p.name, p.np_shape, spec.storage_dtype, nbytes)
        else:
            byte_shape = (*p.np_shape[:-1], p.np_shape[-1] // spec.block_size * spec.type_size)
            w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=p.ggml_type)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        if not data:
            pad = lambda n: n + (-n) % w.data_alignment  # noqa: E731
            end = pad(w.fout[0].tell()) + sum(pad(quant.type_spec(p.ggml_type).n_bytes(int(np.prod(p.np_shape))))
                                                for p in plans)
            w.fout[0].truncate(end)
            plans = []
        for p in plans:
            data = _tensor_bytes(p, seed)
            w.write_tensor_data(data)
            done += data.nbytes
            if progress is not None:
                progress(done, total, p.name)
    except BaseException:
        w.close()
        try:
            os.unlink(path)  # never leave a half-written model behind
        except OSError:
            pass
        raise
    w.close()
    size = os.path.getsize(path)
    return SynthResult(path, cfg, mix, len(plans), sum(int(np.prod(p.np_shape)) for p in plans), size,
                       time.perf_counter() - t0)
