"""GPU dequantization: one CUDA C source (``kernels/dequant.cu``) for NVRTC and hipRTC,
specialised per type and output dtype with ``-D`` options (``kernel_options``) and compiled
lazily on first use through CuPy's runtime-compiler binding (NVRTC on CUDA, hipRTC on ROCm) into
a binary kept in this toolkit's own disk cache (see ``_compiled`` for why not ``cupy.RawModule``)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ..errors import BackendError, GGUFLabError
from .registry import TYPES, type_spec

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "dequant.cu"

# Types with a GPU kernel, and the gguf-py class whose lookup grid the kernel reads (if any).
GPU_KERNELS: dict[T, str | None] = {
    T.F32: None, T.F16: None, T.BF16: None, T.F64: None,
    T.Q4_0: None, T.Q4_1: None, T.Q5_0: None, T.Q5_1: None, T.Q8_0: None,
    T.Q2_K: None, T.Q3_K: None, T.Q4_K: None, T.Q5_K: None, T.Q6_K: None,
    T.IQ2_XXS: "IQ2_XXS", T.IQ2_XS: "IQ2_XS", T.IQ2_S: "IQ2_S", T.IQ3_XXS: "IQ3_XXS", T.IQ3_S: "IQ3_S",
    T.IQ1_S: "IQ1_S", T.IQ1_M: "IQ1_M", T.IQ4_NL: None, T.IQ4_XS: None,
    T.TQ1_0: None, T.TQ2_0: None, T.MXFP4: None, T.NVFP4: None,
}
_OUT_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}
THREADS = 256  # threads per block


def tile_elements(block_size: int) -> int:
    """Outputs per block-iteration: 8 a thread for plain types, 4 groups of 8 a thread for
    block types (as in dequant.cu)."""
    return THREADS * 8 * (1 if block_size == 1 else 4)


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise BackendError(f"GPU dequantization needs CuPy ({e}); install the cuda12, cuda13 or rocm extra") from None
    return cupy


def gpu_dtype(dtype) -> tuple[str, np.dtype]:
    """(name, CuPy storage dtype) of an output dtype; bfloat16 is stored as uint16 bit patterns."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    name = name.lower()
    if name not in _OUT_KIND:
        raise GGUFLabError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return name, np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[name])


@functools.lru_cache(maxsize=None)
def _source() -> str:
    return KERNEL_SOURCE.read_text()


def kernel_options(type_id: int, out_kind: int, vec: int, vec_load: int, *, hip: bool) -> tuple[str, ...]:
    """The compiler options of one kernel variant, exactly as passed at run time: floating-point
    contraction off (each multiply and add rounds on its own, as in the NumPy reference; hipRTC
    and hipcc spell it ``-ffp-contract=off``, NVRTC and nvcc ``--fmad=false``), then the ``-D``
    options that specialise ``dequant.cu``. The compile gate (tests/test_kernel_compile.py)
    passes the same tuple to hipcc and nvcc.

    Example:
        >>> kernel_options(8, 1, 1, 0, hip=True)[:3]
        ('-ffp-contract=off', '-DGGML_TYPE=8', '-DOUT_KIND=1')
    """
    spec = TYPES[T(type_id)]
    return (("-ffp-contract=off",) if hip else ("--fmad=false",)) + (
        f"-DGGML_TYPE={type_id}", f"-DOUT_KIND={out_kind}", f"-DVEC_STORE={vec}", f"-DVEC_LOAD={vec_load}",
        f"-DBLOCK_SIZE={spec.block_size}", f"-DTYPE_SIZE={spec.type_size}", f"-DTHREADS={THREADS}")


def all_variants() -> list[tuple[int, int, int, int]]:
    """Every (type id, output kind, vector store, vector load) that ``launch`` can pick: both
    store widths for every type and dtype (an ``out=`` view need not be 16-byte aligned), both
    load widths for plain types only (block types stage their bytes and ignore VEC_LOAD)."""
    return [(int(t), kind, vec, vec_load)
            for t in GPU_KERNELS for kind in sorted(_OUT_KIND.values()) for vec in (0, 1)
            for vec_load in ((0, 1) if TYPES[t].block_size == 1 else (0,))]


@functools.lru_cache(maxsize=None)
def _kernel(type_id: int, out_kind: int, vec: int, vec_load: int, device_id: int):
    cupy = _cupy()
    from cupy.cuda import function

    options = kernel_options(type_id, out_kind, vec, vec_load, hip=bool(cupy.cuda.runtime.is_hip))
    with cupy.cuda.Device(device_id):
        mod = function.Module()
        mod.load(_compiled(options, device_id))
        return mod, mod.get_function("dequant")


def _arch(cupy, device_id: int) -> str:
    """What a compiled binary is valid for: the compute capability on CUDA; on ROCm the full
    target ID (``gfx90a:sramecc+:xnack-``), since the compute capability CuPy derives there
    does not tell gfx908 from gfx90a, nor xnack on from off."""
    if cupy.cuda.runtime.is_hip:
        name = cupy.cuda.runtime.getDeviceProperties(device_id)["gcnArchName"]
        return name.decode() if isinstance(name, bytes) else str(name)
    return cupy.cuda.Device(device_id).compute_capability


def _compiled(options: tuple[str, ...], device_id: int) -> bytes:
    """Compile with NVRTC (CUDA) or hipRTC (ROCm: CuPy's ``compile_using_nvrtc`` calls hipRTC
    there), cached on disk. Not through ``cupy.RawModule``: its cached path appends ``-ftz=true``
    on CUDA and ``-fcuda-flush-denormals-to-zero`` on ROCm (CuPy 14.2), which flush float32
    subnormals (MXFP4 scales, F64 values) and break exactness; on gfx90a hipcc shows the flag
    turning ``.amdhsa_float_denorm_mode_32`` from 3 (kept) to 0 (flushed)."""
    import hashlib
    import os

    cupy = _cupy()
    hip = bool(cupy.cuda.runtime.is_hip)
    # no compiler version in the key: asking for it loads NVRTC (~0.1 s), and a binary any
    # compiler made for this architecture is as valid as a new one
    key = hashlib.sha256("\0".join((_source(), *options, _arch(cupy, device_id), cupy.__version__)).encode())
    cache_dir = os.environ.get("GGUF_LAB_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gguf-gpu-lab", "kernels")
    path = os.path.join(cache_dir, key.hexdigest() + (".hsaco" if hip else ".cubin"))
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        pass
    from cupy.cuda import compiler

    with cupy.cuda.Device(device_id):
        binary = compiler.compile_using_nvrtc(_source(), options=options)
    if isinstance(binary, tuple):  # (binary, name mapping)
        binary = binary[0]
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(binary)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only home still works, just without the disk cache
    return binary


@functools.lru_cache(maxsize=None)
def _tables(type_id: int, device_id: int):
    """(grid, ksigns) device arrays for a type, uploaded once per device. Grids are gguf-py's
    own tables, stored as int8 rows (every entry is a small integer, checked here)."""
    cupy = _cupy()
    cls_name = GPU_KERNELS[T(type_id)]
    with cupy.cuda.Device(device_id):
        if cls_name is None:
            dummy = cupy.zeros(8, cupy.uint8)
            return dummy, dummy
        return cupy.asarray(grid_bytes(cls_name)), cupy.asarray(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8))


def grid_bytes(cls_name: str) -> np.ndarray:
    """gguf-py's lookup grid of an IQ type as int8 rows, viewed as uint8."""
    cls = getattr(gq, cls_name)
    cls.init_grid()
    g = np.asarray(cls.grid, dtype=np.float32).reshape(-1)
    b = g.astype(np.int8)
    if not np.array_equal(b.astype(np.float32), g):  # pragma: no cover - a gguf change
        raise GGUFLabError(f"{cls_name}: gguf's grid has values that are not small integers")
    return b.view(np.uint8)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    cupy = _cupy()
    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


def launch_config(n_elem: int, block_size: int, device_id: int) -> tuple[int, int]:
    """(blocks, threads): one block per tile, at most 8 blocks per multiprocessor of this device;
    the kernel's grid-stride loop over tiles covers the rest."""
    tiles = max(1, -(-n_elem // tile_elements(block_size)))
    return min(tiles, _sm_count(device_id) * 8), THREADS


def dequantize_gpu(raw, ggml_type, shape: Sequence[int] | None = None, dtype="float16", out=None, stream=None,
                   *, first_block: int = 0, n_blocks: int | None = None):
    """Dequantize a tensor's bytes on the GPU.

    Args:
        raw: a CuPy uint8 array of the tensor's bytes (whole blocks).
        ggml_type: a ``GGMLQuantizationType``, its id or its name.
        shape: the NumPy (row-major) shape of the result; default 1-D. Ignored when ``out`` is given.
        dtype: "float16" (default), "float32" (bit-exact with gguf-py) or "bfloat16" (returned as
            uint16 bit patterns; ``as_torch`` views them as ``torch.bfloat16`` without a copy).
        out: write here instead of allocating: a C-contiguous CuPy array of the whole tensor.
        stream: the ``cupy.cuda.Stream`` to run on; default the current stream.
        first_block, n_blocks: dequantize only blocks ``[first_block, first_block + n_blocks)``
            of ``raw`` into the matching elements of ``out`` (the loader's chunk-by-chunk path).

    Returns:
        ``out``, or a new array of ``shape``.

    Example:
        >>> import cupy, numpy as np
        >>> blk = np.zeros(34, np.uint8); blk[:2] = np.array([1.0], np.float16).view(np.uint8)
        >>> blk[2:4] = (3, 254)                               # the first two int8 weights: 3, -2
        >>> dequantize_gpu(cupy.asarray(blk), "Q8_0", dtype="float32")[:3]
        array([ 3., -2.,  0.], dtype=float32)
    """
    cupy = _cupy()
    spec = type_spec(ggml_type)
    name, store = gpu_dtype(dtype)
    if not isinstance(raw, cupy.ndarray) or raw.dtype != cupy.uint8 or not raw.flags.c_contiguous:
        raise GGUFLabError(f"{spec.name}: raw must be a C-contiguous CuPy uint8 array, got {type(raw).__name__} "
                           f"{getattr(raw, 'dtype', '')}")
    raw = raw.reshape(-1)
    if raw.size % spec.type_size:
        raise GGUFLabError(f"{spec.name}: {raw.size} bytes is not a whole number of {spec.type_size}-byte blocks")
    total_blocks = raw.size // spec.type_size
    n_elem = total_blocks * spec.block_size
    if n_blocks is None:
        n_blocks = total_blocks - first_block
    if first_block < 0 or n_blocks < 0 or first_block + n_blocks > total_blocks:
        raise GGUFLabError(f"{spec.name}: blocks [{first_block}, {first_block + n_blocks}) outside the "
                           f"tensor's {total_blocks} blocks")
    sub_range = (first_block, n_blocks) != (0, total_blocks)
    if spec.kind == "int":  # pass-through, in the tensor's own dtype
        if sub_range:
            raise GGUFLabError(f"{spec.name}: integer tensors are copied whole, not by block range")
        view = raw.view(spec.storage_dtype)
        if out is None:
            return view.reshape(tuple(shape) if shape is not None else -1).copy()
        out.reshape(-1)[...] = view
        return out
    if out is None:
        if sub_range:
            raise GGUFLabError(f"{spec.name}: a block sub-range needs out= (the whole tensor's output)")
        shape = (n_elem,) if shape is None else tuple(int(s) for s in shape)
        if int(np.prod(shape, dtype=np.int64)) != n_elem:
            raise GGUFLabError(f"{spec.name}: shape {shape} does not hold {n_elem} elements")
        with (stream if stream is not None else contextlib.nullcontext()):
            out = cupy.empty(shape, dtype=store)
    elif (not isinstance(out, cupy.ndarray) or out.dtype != store or out.size != n_elem
          or not out.flags.c_contiguous):
        raise GGUFLabError(f"{spec.name}: out must be a C-contiguous CuPy {store} array of {n_elem} elements "
                           f"({name}), got {getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    if n_blocks == 0:
        return out
    src = raw[first_block * spec.type_size:(first_block + n_blocks) * spec.type_size]
    dst = out.reshape(-1)[first_block * spec.block_size:(first_block + n_blocks) * spec.block_size]
    launch(src.data.ptr, dst.data.ptr, spec.ggml_type, name, n_blocks, out.device.id, stream)
    return out


def launch(src_ptr: int, dst_ptr: int, ggml_type, dtype: str, n_blocks: int, device_id: int, stream=None) -> None:
    """Queue the kernel for ``n_blocks`` blocks at ``src_ptr`` into ``dst_ptr`` (device
    addresses) on ``stream``; no checks. The loader's per-chunk path: no array views to build,
    so the host time a launch takes stays small next to the copy it follows."""
    spec = type_spec(ggml_type)
    kind = _OUT_KIND[dtype]
    vec = int(dst_ptr % 16 == 0)
    vec_load = int(spec.block_size == 1 and src_ptr % 16 == 0)
    fn = _function(int(spec.ggml_type), kind, vec, vec_load, device_id)
    grid_tab, ksigns = _tables(int(spec.ggml_type), device_id)
    n_out = n_blocks * spec.block_size
    blocks, threads = launch_config(n_out, spec.block_size, device_id)
    fn((blocks,), (threads,), (np.uint64(src_ptr), np.uint64(dst_ptr), np.int64(n_out), grid_tab, ksigns),
       stream=stream)


def kernel_variants(pieces, dtype: str) -> set[tuple[int, int, int, int]]:
    """The (type id, output kind, vector store, vector load) kernels that ``launch`` will pick for
    ``pieces``: (ggml type, output element offset, byte offset in a 16-byte-aligned source)
    triples, outputs and sources starting 16-byte aligned (CuPy allocations are)."""
    kind, item = _OUT_KIND[dtype], gpu_dtype(dtype)[1].itemsize
    out = set()
    for ggml_type, out_elem, src_off in pieces:
        spec = type_spec(ggml_type)
        if spec.kind == "int":
            continue
        out.add((int(spec.ggml_type), kind, int(out_elem * item % 16 == 0),
                 int(spec.block_size == 1 and src_off % 16 == 0)))
    return out


_READY: set = set()  # (variant, device) pairs that prepare() made ready


def kernels_ready(variant, device_id: int) -> bool:
    """Whether ``prepare`` has made this (type id, output kind, vector store, vector load)
    variant ready on the device already (a load then starts no thread for it)."""
    return (tuple(variant), device_id) in _READY


def prepare(variants, device_id: int) -> None:
    """Compile (or take from the disk cache) and load these kernels and their lookup tables, so
    that a load's first launches find them ready; the loader runs this while its first reads run.
    Variants compile side by side in threads: on the lent machines the 8B Q4_K_M file's took
    0.51 s against 1.19 s one after another (BENCHMARKS.md). Variants already ready are skipped
    (no thread pool is made when none is left)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(v):
        type_id, kind, vec, vec_load = v
        _function(type_id, kind, vec, vec_load, device_id)
        _tables(type_id, device_id)
        _READY.add((tuple(v), device_id))

    variants = sorted(v for v in variants if not kernels_ready(v, device_id))
    if len(variants) <= 1:
        for v in variants:
            one(v)
        return
    with ThreadPoolExecutor(min(len(variants), 8), thread_name_prefix="gguf-lab-compile") as pool:
        list(pool.map(one, variants))


@functools.lru_cache(maxsize=None)
def _function(type_id: int, out_kind: int, vec: int, vec_load: int, device_id: int):
    """The compiled kernel as a ``cupy.cuda.Function`` (whose call takes a stream)."""
    return _kernel(type_id, out_kind, vec, vec_load, device_id)[1]


def as_torch(array, dtype="float16"):
    """A zero-copy ``torch.Tensor`` view (DLPack) of a GPU output; bfloat16 bit patterns become
    ``torch.bfloat16``."""
    import torch

    t = torch.from_dlpack(array)
    return t.view(torch.bfloat16) if gpu_dtype(dtype)[0] == "bfloat16" else t
