"""GPU dequantization: every type and output dtype, bit-exact against gguf-py (run with -m gpu)."""

import numpy as np
import pytest

from gguf_gpu_lab import GGUFLabError, quant
from gguf_gpu_lab.quant.gpu import GPU_KERNELS
from gguf_gpu_lab.tools.verify import mismatches, reference, round_reference

from .quantdata import finite_random_blocks, libgguf_rows

pytestmark = pytest.mark.gpu

DTYPES = ["float32", "float16", "bfloat16"]
GPU_TYPES = list(GPU_KERNELS) + [s.ggml_type for s in quant.TYPES.values() if s.kind == "int"]
# Poison: NaNs with payloads no dequantizer produces, so an unwritten element always fails.
POISON = {"float32": np.uint32(0x7FBADBAD), "float16": np.uint16(0x7E5A), "bfloat16": np.uint16(0x7FDA)}


def _expected(raw_np, t, dtype):
    ref = reference(raw_np, t)
    if quant.type_spec(t).kind == "int":
        return ref
    if dtype == "float32":
        return ref
    return round_reference(ref, dtype).view(np.uint16)


def _poisoned(cp, n, dtype, extra=0):
    from gguf_gpu_lab.quant.gpu import gpu_dtype

    store = gpu_dtype(dtype)[1]
    buf = cp.empty(n + extra, dtype=np.uint32 if store.itemsize == 4 else np.uint16)
    buf.fill(POISON[dtype])
    return buf.view(store)


def _check(out, expected, what):
    got = out.get().reshape(-1)
    bad = mismatches(got, expected.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} of {got.size} differ, first at {bad[0]}: {got[bad[0]]!r} vs {expected.reshape(-1)[bad[0]]!r}"


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", GPU_TYPES, ids=lambda t: t.name)
def test_every_type_and_dtype(cp, t, dtype, rng):
    from gguf_gpu_lab.quant.gpu import dequantize_gpu

    spec = quant.type_spec(t)
    cases = [finite_random_blocks(t, n, rng) for n in (1, 37, 4099)]  # odd block counts
    if spec.kind != "int" and t.name != "F64":
        for width in (spec.block_size * 3 if spec.block_size > 1 else 96, 4096):
            cases.append(libgguf_rows(t, 5, width, rng)[0])
    for raw in cases:
        raw = np.ascontiguousarray(raw).reshape(-1)
        n = raw.size // spec.type_size * spec.block_size
        exp = _expected(raw, t, dtype)
        if spec.kind == "int":
            got = dequantize_gpu(cp.asarray(raw), t, dtype=dtype)
            _check(got, exp, t.name)
            continue
        out = _poisoned(cp, n, dtype)
        dequantize_gpu(cp.asarray(raw), t, dtype=dtype, out=out)
        _check(out, exp, f"{t.name} {dtype} {n} elements")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [t for t in GPU_TYPES if quant.type_spec(t).kind != "int"], ids=lambda t: t.name)
def test_chunked_sub_ranges_on_streams(cp, t, dtype, rng):
    """Blocks dequantized chunk by chunk, on several streams, into the matching output slices."""
    from gguf_gpu_lab.quant.gpu import dequantize_gpu

    spec = quant.type_spec(t)
    raw = finite_random_blocks(t, 1000, rng).reshape(-1)
    n = 1000 * spec.block_size
    out = _poisoned(cp, n, dtype)
    d_raw = cp.asarray(raw)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(4)]
    bounds = [0, 1, 130, 131, 600, 999, 1000]
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        dequantize_gpu(d_raw, t, dtype=dtype, out=out, stream=streams[k % 4], first_block=lo, n_blocks=hi - lo)
    for s in streams:
        s.synchronize()
    _check(out, _expected(raw, t, dtype), f"{t.name} {dtype} chunked")


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_output_uses_scalar_stores(cp, dtype, rng):
    from gguf_gpu_lab.quant.gpu import dequantize_gpu

    raw = finite_random_blocks("Q4_K", 33, rng).reshape(-1)
    n = 33 * 256
    buf = _poisoned(cp, n, dtype, extra=1)
    out = buf[1:]  # 2 or 4 bytes past an aligned address
    assert out.data.ptr % 16 != 0
    dequantize_gpu(cp.asarray(raw), "Q4_K", dtype=dtype, out=out)
    _check(out, _expected(raw, "Q4_K", dtype), "unaligned")
    assert buf[:1].view(np.uint16 if dtype != "float32" else np.uint32).get()[0] == POISON[dtype]


def test_shape_allocation_and_errors(cp, rng):
    from gguf_gpu_lab.quant.gpu import dequantize_gpu

    raw = cp.asarray(finite_random_blocks("Q8_0", 8, rng).reshape(-1))
    x = dequantize_gpu(raw, "Q8_0", shape=(8, 32))
    assert x.shape == (8, 32) and x.dtype == cp.float16
    with pytest.raises(GGUFLabError, match="raw must be"):
        dequantize_gpu(raw.get(), "Q8_0")
    with pytest.raises(GGUFLabError, match="whole number"):
        dequantize_gpu(raw[:-1], "Q8_0")
    with pytest.raises(GGUFLabError, match="out must be"):
        dequantize_gpu(raw, "Q8_0", out=cp.empty(7, cp.float16))
    with pytest.raises(GGUFLabError, match="outside"):
        dequantize_gpu(raw, "Q8_0", out=cp.empty(256, cp.float16), first_block=4, n_blocks=5)
    with pytest.raises(GGUFLabError, match="needs out="):
        dequantize_gpu(raw, "Q8_0", first_block=1, n_blocks=2)


def test_bfloat16_to_torch_is_zero_copy(cp, rng):
    torch = pytest.importorskip("torch")
    from gguf_gpu_lab.quant.gpu import as_torch, dequantize_gpu

    raw = finite_random_blocks("Q6_K", 4, rng).reshape(-1)
    out = dequantize_gpu(cp.asarray(raw), "Q6_K", dtype="bfloat16")
    t = as_torch(out, "bfloat16")
    assert t.dtype == torch.bfloat16 and t.data_ptr() == out.data.ptr
    assert torch.equal(t.float().cpu(), torch.from_numpy(reference(raw, "Q6_K")).bfloat16().float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_plain_types_keep_special_values(cp, name, dtype, rng):
    """NaNs with payloads, infinities, subnormals and signed zeros in plain tensors are data: to
    float32 and bfloat16 they come out bit for bit as NumPy converts them (the kernels' hardware
    conversions are bypassed for NaNs); to float16 a NaN stays a NaN (its payload is the
    conversion instruction's, as documented in dequant.cu)."""
    from gguf_gpu_lab.quant.gpu import dequantize_gpu

    t = quant.type_spec(name).ggml_type
    bits = {"F32": [0x7FC00001, 0xFFA00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x00000001, 0x80400000, 0x80000000],
            "F16": [0x7E01, 0xFD55, 0x7C01, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x8000],
            "BF16": [0x7FC1, 0xFFA5, 0x7F81, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x8000]}[name]
    store = np.uint32 if name == "F32" else np.uint16
    special = np.array(bits, store)
    normal = finite_random_blocks(t, 4093, rng).view(store).reshape(-1)
    vals = np.concatenate([normal[:1000], special, normal[1000:], np.tile(special, 5)])  # odd offsets too
    raw = vals.view(np.uint8)
    exp = _expected(raw, t, dtype)
    for vec_out in (0, 1):  # 16-byte and scalar stores
        out = _poisoned(cp, vals.size, dtype, extra=vec_out)[vec_out:]
        dequantize_gpu(cp.asarray(raw), t, dtype=dtype, out=out)
        got = out.get().reshape(-1)
        if dtype == "float16":
            w = got.view(np.uint16)
            nan_got = ((w & 0x7C00) == 0x7C00) & ((w & 0x3FF) != 0)
            e = exp.view(np.uint16)
            nan_exp = ((e & 0x7C00) == 0x7C00) & ((e & 0x3FF) != 0)
            assert np.array_equal(nan_got, nan_exp), f"{name} -> float16: NaNs at other places"
            _check(cp.asarray(np.where(nan_got, 0, w).astype(np.uint16)), np.where(nan_exp, 0, e).astype(np.uint16),
                   f"{name} -> float16 (NaNs aside)")
        else:
            _check(cp.asarray(got), exp, f"{name} -> {dtype}, {'scalar' if vec_out else 'vector'} stores")
