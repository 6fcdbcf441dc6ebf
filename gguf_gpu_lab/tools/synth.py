"""Synthetic GGUF models of any size and quantization mix: llama-shaped by default, or laid out as
another architecture that transformers reads (``arch=``; the layouts are in ``synth_archs``).

Blocks are random but valid: every fp16 scale is a finite value between about 1e-3 and 1.5e-2,
so the model dequantizes without NaN or Inf, in float32 and float16 alike. Output is
deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from .. import quant
from . import synth_archs
from .synth_archs import LlamaConfig
from ..errors import GGUFLabError
from ..outputs import check_new, partial_path, place_new, pwrite_all, warn_partials_left

# fp16 bit patterns 0x1400..0x2400: positive values from ~0.00098 to ~0.0156.
_SCALE_LO, _SCALE_HI = 0x1400, 0x2400
# weights="small": fp16 scales from ~6.1e-5 to ~1.0e-4 (0x0400..0x0690), so quantized weights stay
# below ~0.1 (Q4_K: d * 63 * 15) to ~0.4 (Q6_K) as a trained model's do, and plain floats are N(0, 0.02)
_SMALL_LO, _SMALL_HI = 0x0400, 0x0690
_SMALL_STD = 0.02
WEIGHTS = ("random", "small")


NAMED_CONFIGS = {
    "1B": LlamaConfig(32000, 2048, 22, 32, 4, 5632),
    "3B": LlamaConfig(32000, 3072, 28, 24, 8, 8192),
    "7B": LlamaConfig(32000, 4096, 32, 32, 32, 11008),
    "8B": LlamaConfig(128256, 4096, 32, 32, 8, 14336),
    "13B": LlamaConfig(32000, 5120, 40, 40, 40, 13824),
    "70B": LlamaConfig(32000, 8192, 80, 64, 8, 28672),
}

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


MAX_PARAMS = 2 * 10**12  # about 1.1 TB in Q4_K_M: past any model published in GGUF


def parse_params(text: str | int) -> int:
    """ "7B" -> 7e9, "350M" -> 3.5e8, 1000000 -> 1e6."""
    if isinstance(text, (int, np.integer)):
        n = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(text).upper())
        if not m:
            raise GGUFLabError(f"params (--params): cannot read {text!r}; use a count such as 25M, 1B or 7B")
        n = int(float(m.group(1)) * _SUFFIX.get(m.group(2), 1))
    if n < 1_000_000:
        raise GGUFLabError(f"params (--params): {text!r} is below the smallest model (1M parameters)")
    if n > MAX_PARAMS:
        raise GGUFLabError(f"params (--params): {text!r} is above the largest model synth writes (2T parameters)")
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


def _plan(cfg: LlamaConfig, mix: str, arch: str = "llama") -> list[TensorPlan]:
    if mix not in MIXES:
        raise GGUFLabError(f"mix (--mix): unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
    shapes = synth_archs.tensor_shapes(arch, cfg)
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


def _with_heads(cfg: LlamaConfig, heads: int | None, kv_heads: int | None) -> LlamaConfig:
    heads = cfg.n_head if heads is None else heads
    kv_heads = (cfg.n_head_kv if heads == cfg.n_head else heads) if kv_heads is None else kv_heads
    for what, n in (("--heads", heads), ("--kv-heads", kv_heads)):
        if not (isinstance(n, (int, np.integer)) and n >= 1):
            raise GGUFLabError(f"{what} must be a whole number of at least 1, got {n!r}")
    if cfg.n_embd % heads or heads % kv_heads:
        raise GGUFLabError(f"heads={heads}, kv_heads={kv_heads} (--heads, --kv-heads): the width {cfg.n_embd} must "
                           "divide by the heads, and the heads by the key/value heads")
    if (cfg.n_embd // heads) % 2:
        raise GGUFLabError(f"heads={heads} (--heads): a head of {cfg.n_embd // heads} dimension(s) (the width "
                           f"{cfg.n_embd} by the heads); rotary embeddings turn pairs, so it must be even")
    return dataclasses.replace(cfg, n_head=int(heads), n_head_kv=int(kv_heads))


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


def random_blocks(ggml_type, n_blocks: int, rng: np.random.Generator, small: bool = False) -> np.ndarray:
    """``n_blocks`` random, valid blocks of a type, (n_blocks, type_size) uint8, finite scales
    (``small``: scales that keep the weights the size a trained model's are)."""
    spec = quant.type_spec(ggml_type)
    n = n_blocks * spec.type_size
    # raw 64-bit words from the generator: ~3x faster than integers(0, 256, dtype=uint8)
    b = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n].reshape(n_blocks, spec.type_size)
    make_valid(spec.ggml_type, b, rng, small)
    return b


def make_valid(ggml_type, blocks: np.ndarray, rng: np.random.Generator, small: bool = False) -> None:
    """Overwrite the scale fields of random blocks (n, type_size) with finite values, in place."""
    spec = quant.type_spec(ggml_type)
    t, n = spec.ggml_type, blocks.shape[0]
    lo, hi = (_SMALL_LO, _SMALL_HI) if small else (_SCALE_LO, _SCALE_HI)
    scale = lambda: rng.integers(lo, hi, size=(n, 1), dtype=np.uint16).view(np.uint8)  # noqa: E731
    for off in spec.f16_scale_offsets:
        blocks[:, off:off + 2] = scale()
    if t == T.IQ1_M:
        d = rng.integers(lo, hi, size=n, dtype=np.uint16)
        s = np.ascontiguousarray(blocks[:, 48:56]).view(np.uint16) & np.uint16(0x0FFF)
        for k in range(4):
            s[:, k] |= ((d >> np.uint16(4 * k)) & np.uint16(0xF)) << np.uint16(12)
        blocks[:, 48:56] = s.view(np.uint8)
    elif t == T.MXFP4:  # e8m0 exponent: keep values small enough for float16 output
        blocks[:, 0] = rng.integers(110, 114, size=n, dtype=np.uint8) if small else rng.integers(118, 127, size=n, dtype=np.uint8)
    elif t == T.NVFP4 and small:  # four ue4m3 scales: exponents 1-2, about 0.004-0.015
        blocks[:, :4] = rng.integers(0x08, 0x18, size=(n, 4), dtype=np.uint8)
    elif spec.kind == "float":
        # clear the top exponent bit: finite values of magnitude below 2
        if t == T.F32:
            blocks.view(np.uint32)[...] &= np.uint32(0xBFFFFFFF)
        elif t == T.F64:
            blocks.view(np.uint64)[...] &= np.uint64(0xBFFFFFFFFFFFFFFF)
        else:  # F16, BF16
            blocks.view(np.uint16)[...] &= np.uint16(0xBFFF)


def _tensor_bytes(p: TensorPlan, seed: int, small: bool = False) -> np.ndarray:
    spec = quant.type_spec(p.ggml_type)
    n_elem = int(np.prod(p.np_shape))
    rng = np.random.Generator(np.random.SFC64(_tensor_seed(seed, p.name)))
    if spec.kind == "int":
        return rng.integers(0, 100, size=n_elem).astype(spec.storage_dtype).reshape(p.np_shape)
    if p.ggml_type == T.F32 and len(p.np_shape) == 1:  # norms: near 1, as in a trained model
        return (1.0 + 0.05 * rng.standard_normal(n_elem)).astype(np.float32)
    if small and spec.kind == "float":
        dt = spec.storage_dtype if spec.storage_dtype is not None else quant.resolve_dtype("bfloat16")  # BF16
        return (_SMALL_STD * rng.standard_normal(n_elem)).astype(dt).view(np.uint8)
    return random_blocks(p.ggml_type, n_elem // spec.block_size, rng, small).reshape(-1)


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


def _data_layout(w: GGUFWriter, plans: list[TensorPlan]) -> tuple[list[int], int]:
    """Where each tensor's data starts in the file, and where the file ends, once the tensor
    infos are written: each tensor aligned, as GGUFWriter lays them out."""
    pad = lambda n: n + (-n) % w.data_alignment  # noqa: E731
    pos = pad(w.fout[0].tell())
    offsets = []
    for p in plans:
        offsets.append(pos)
        pos += pad(quant.type_spec(p.ggml_type).n_bytes(int(np.prod(p.np_shape))))
    return offsets, pos


def _write_parallel(fd: int, plans: list[TensorPlan], offsets: list[int], seed: int, small: bool, threads: int,
                    total: int, progress) -> None:
    """Each tensor's bytes made and written at its offset by a pool of threads (the generator
    and pwrite release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    def one(i: int) -> tuple[int, str]:
        data = _tensor_bytes(plans[i], seed, small)
        pwrite_all(fd, data, offsets[i])
        return data.nbytes, plans[i].name

    done = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="gguf-lab-synth") as pool:
        for fut in as_completed([pool.submit(one, i) for i in range(len(plans))]):
            n, name = fut.result()
            done += n
            if progress is not None:
                progress(done, total, name)


_OVERWRITE_HINT = "overwrite=True, or --overwrite,"


def _target(path: str) -> str:
    """The file ``synth --overwrite`` replaces: through a symbolic link, the file it points to
    (as writing to the path would), refused where that file is read-only or its folder missing."""
    target = os.path.realpath(path)
    if not os.path.isdir(os.path.dirname(target)):
        raise GGUFLabError(f"{path}: the folder of {target} does not exist")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise GGUFLabError(f"{path}: {'the file it links to is' if target != os.path.abspath(path) else 'it is'} "
                           "read-only; it is not replaced")
    return target


def _check_space(path: str, need: int) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if need > free:  # the old file, if any, stays until the new one is complete
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
    arch: str = "llama",
    heads: int | None = None,
    kv_heads: int | None = None,
    weights: str = "random",
    threads: int = 1,
    overwrite: bool = False,
) -> SynthResult:
    """Write a synthetic GGUF model, llama-shaped unless ``arch`` says otherwise.

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
        arch: one of ``synth_archs.ARCHS`` (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3): the
            tensors and metadata keys a file of that architecture has, as transformers reads them.
        heads, kv_heads: attention heads and key/value heads (default: the configuration's; the
            embedding width must divide by ``heads``, and ``heads`` by ``kv_heads``).
        weights: "random" (random valid blocks, scales up to ~0.016) or "small" (weights the size a
            trained model's are, so that a forward pass in float16 stays finite).
        threads: tensors made and written side by side (the same bytes as one thread): a 40 GB
            70B file for a benchmark in seconds rather than minutes.
        overwrite: replace a file already at ``path``; by default an existing path is refused
            (``OutputExistsError``) before anything is written, whatever the file holds.

    Raises ``GGUFLabError`` before writing anything when the folder has less free space than the
    file needs (both named), or when ``path`` exists and ``overwrite`` is False.

    Example:
        >>> r = synth(tmp_path / "m.gguf", "10M", "Q4_0")
        >>> r.config.n_layer, r.n_tensors
        (2, 21)
        >>> g = synth(tmp_path / "g.gguf", "1M", "Q8_0", arch="gemma3", heads=4, kv_heads=2)
    """
    t0 = time.perf_counter()
    if weights not in WEIGHTS:
        raise GGUFLabError(f"weights (--weights) must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    for name, value, low, high in (("seed", seed, 0, 2**32 - 1), ("threads", threads, 1, 256)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise GGUFLabError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    cfg = _with_heads(llama_config(params), heads, kv_heads)
    if vocab is not None:
        if not (isinstance(vocab, (int, np.integer)) and 1 <= vocab <= 1 << 24):
            raise GGUFLabError(f"vocab (--vocab) must be a whole number from 1 to {1 << 24}, got {vocab!r}")
        cfg = dataclasses.replace(cfg, vocab=int(vocab))
    plans = _plan(cfg, mix, synth_archs.check_arch(arch))
    tokens = synth_archs.tokens(arch, cfg.vocab, _tokens(cfg.vocab))
    path = os.fspath(path)
    check_new(path, overwrite, "model", _OVERWRITE_HINT)
    target = _target(path) if overwrite else path
    _check_space(target, file_bytes(plans, tokens))  # before writing: a 1T model would fill the disk first
    warn_partials_left(target, "synth")
    # written beside it and moved into place when complete: an interrupted run leaves the old file
    # (overwrite) or nothing; without overwrite, a file appearing meanwhile is not replaced (place_new)
    tmp, w = partial_path(target), None
    try:
        w = GGUFWriter(tmp, synth_archs.gguf_arch(arch))
        # transformers reads a llama file as Mistral only when its name is exactly "mistral"
        w.add_name("mistral" if arch == "mistral" else f"synthetic {arch} {params} {mix}")
        w.add_string("general.source", "gguf-gpu-lab synth")
        w.add_uint32("general.seed", int(seed))
        synth_archs.add_metadata(w, arch, cfg, tokens)
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
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        if not data or threads > 1:
            offsets, end = _data_layout(w, plans)
            w.fout[0].truncate(end)  # a hole of the right size: zeros, as the padding is
            w.fout[0].flush()
            if data:
                _write_parallel(w.fout[0].fileno(), plans, offsets, seed, weights == "small", threads, total, progress)
        for p in (plans if data and threads <= 1 else []):
            data = _tensor_bytes(p, seed, weights == "small")
            w.write_tensor_data(data)
            done += data.nbytes
            if progress is not None:
                progress(done, total, p.name)
        w.close()
        if overwrite:
            if os.path.exists(target):  # the old file's owner and permissions stay with its path
                old = os.stat(target)
                with contextlib.suppress(OSError):  # (only root gives a file to another user)
                    os.chown(tmp, old.st_uid, old.st_gid)
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
            os.replace(tmp, target)
        else:
            place_new(tmp, path, "model")
    except BaseException:
        if w is not None:
            with contextlib.suppress(Exception):  # (a close that fails too must not hide the first error)
                w.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # never leave a half-written model behind
        raise
    size = os.path.getsize(path)
    return SynthResult(path, cfg, mix, len(plans), sum(int(np.prod(p.np_shape)) for p in plans), size,
                       time.perf_counter() - t0)
