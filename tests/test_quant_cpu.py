import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguf_gpu_lab import GGUFLabError, UnsupportedTypeError, quant
from gguf_gpu_lab.tools.verify import mismatches, reference, round_reference

from .quantdata import DEQUANT_TYPES, QUANT_TYPES, finite_random_blocks, libgguf_rows, row_widths

ids = lambda t: t.name  # noqa: E731


def assert_bitexact(ours, ref, what=""):
    bad = mismatches(ours, ref)
    assert bad.size == 0, f"{what}: {bad.size} values differ, first at {bad[0]}: {ours.reshape(-1)[bad[0]]!r} vs {ref.reshape(-1)[bad[0]]!r}"


@pytest.mark.parametrize("ggml_type", DEQUANT_TYPES, ids=ids)
def test_libgguf_data_bitexact(ggml_type, rng):
    for width in row_widths(ggml_type):
        raw, x = libgguf_rows(ggml_type, 3, width, rng)
        ours = quant.dequantize(raw, ggml_type, shape=x.shape)
        assert ours.shape == x.shape and ours.dtype == np.float32
        assert_bitexact(ours, reference(raw, ggml_type), f"{ggml_type.name} width {width}")
        # and the data really was quantized: close to the input, not garbage
        err = np.abs(ours - x).mean() / np.abs(x).mean()
        assert err < 0.9, f"{ggml_type.name}: relative error {err:.3f} of the round trip"


@pytest.mark.parametrize("ggml_type", DEQUANT_TYPES, ids=ids)
def test_random_blocks_bitexact(ggml_type, rng):
    blocks = finite_random_blocks(ggml_type, 777, rng)  # odd count, several thread tasks for 1-wide types
    ours = quant.dequantize(blocks, ggml_type)
    assert_bitexact(ours, reference(blocks, ggml_type), ggml_type.name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("ggml_type", DEQUANT_TYPES, ids=ids)
def test_half_outputs_round_to_nearest_even(ggml_type, dtype, rng):
    blocks = finite_random_blocks(ggml_type, 64, rng)
    ours = quant.dequantize(blocks, ggml_type, dtype=dtype)
    assert ours.dtype == quant.resolve_dtype(dtype)
    assert_bitexact(ours, round_reference(reference(blocks, ggml_type), dtype), f"{ggml_type.name} {dtype}")


def test_bfloat16_rounding_is_nearest_even():
    x = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20], np.float32)  # tie down, tie up, above tie
    got = quant.dequantize(x.view(np.uint8), "F32", dtype="bfloat16").astype(np.float32)
    assert got.tolist() == [1.0, 1.0 + 2**-6, 1.0 + 2**-7]


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_K, T.Q6_K], ids=ids)
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_thread_count_does_not_change_results(threads, t, rng):
    # one thread takes the repeat-the-scales path, a pool the broadcasting one: both exact
    blocks = finite_random_blocks(t, 3001 if t != T.Q4_0 else 24001, rng)  # several chunks
    assert_bitexact(quant.dequantize(blocks, t, threads=threads), reference(blocks, t), f"{t.name} x{threads}")


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=ids)
@pytest.mark.parametrize("alone", [True, False])
def test_large_tasks(alone, t, rng):
    # the loader's cpu mode: one thread, 4 Mi-weight tasks; Q6_K multiplies in slices of them
    from gguf_gpu_lab.quant._cpu import dequantize_blocks

    blocks = finite_random_blocks(t, 2500, rng)
    out = np.full((2500, 256), np.nan, np.float32)
    dequantize_blocks(quant.type_spec(t), blocks, out, 1, task_elements=1 << 22, alone=alone)
    assert_bitexact(out, reference(blocks, t), f"{t.name} alone={alone}")


def test_out_parameter_and_shape(rng):
    blocks = finite_random_blocks(T.Q8_0, 8, rng)
    out = np.full((8, 32), np.nan, np.float32)
    res = quant.dequantize(blocks, "Q8_0", shape=(8, 32), out=out)
    assert np.shares_memory(res, out) and np.isfinite(out).all()
    with pytest.raises(GGUFLabError, match="out must be"):
        quant.dequantize(blocks, "Q8_0", out=np.empty(10, np.float32))
    with pytest.raises(GGUFLabError, match="shape"):
        quant.dequantize(blocks, "Q8_0", shape=(3, 3))
    with pytest.raises(GGUFLabError, match="whole number"):
        quant.dequantize(blocks.reshape(-1)[:-1], "Q8_0")
    with pytest.raises(GGUFLabError, match="dtype"):
        quant.dequantize(blocks, "Q8_0", dtype="int8")


# -- known answers, computed by hand from the block layouts --------------------------------

def _f16_bytes(v):
    return np.array([v], np.float16).view(np.uint8)


def test_known_answer_q8_0():
    blk = np.zeros(34, np.uint8)
    blk[:2] = _f16_bytes(0.5)
    q = np.arange(-16, 16, dtype=np.int8)
    blk[2:] = q.view(np.uint8)
    assert quant.dequantize(blk, "Q8_0").tolist() == [0.5 * v for v in range(-16, 16)]


def test_known_answer_q4_0():
    blk = np.zeros(18, np.uint8)
    blk[:2] = _f16_bytes(2.0)
    lo = np.arange(16) % 16
    hi = 15 - lo
    blk[2:] = (lo | (hi << 4)).astype(np.uint8)
    expect = [2.0 * (v - 8) for v in lo] + [2.0 * (v - 8) for v in hi]
    assert quant.dequantize(blk, "Q4_0").tolist() == expect


def test_known_answer_q4_k():
    blk = np.zeros(144, np.uint8)
    blk[0:2] = _f16_bytes(1.0)    # d
    blk[2:4] = _f16_bytes(0.5)    # dmin
    sc = [1, 2, 3, 4, 5, 6, 7, 8]
    mn = [0, 1, 2, 3, 4, 5, 6, 7]
    s = np.zeros(12, np.uint8)
    for j in range(4):          # 6-bit values below 16: no high bits to spread
        s[j], s[j + 4] = sc[j], mn[j]
        s[j + 8] = sc[j + 4] | (mn[j + 4] << 4)
    blk[4:16] = s
    blk[16:] = 0x21             # low nibble 1, high nibble 2
    expect = []
    for j in range(8):
        q = 1 if j % 2 == 0 else 2
        expect += [1.0 * sc[j] * q - 0.5 * mn[j]] * 32
    assert quant.dequantize(blk, "Q4_K").tolist() == expect


def _pack_q6_k(codes, scales, d):
    """One Q6_K block from 256 codes 0..63, as ggml's dequantize_row_q6_K reads it: in each
    half, element l of row r has its low 4 bits in ql[l + 32 (r % 2)] (high nibble when r >= 2)
    and its high 2 bits in bits 2r, 2r+1 of qh[l]."""
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for h in range(2):
        for r in range(4):
            for lane in range(32):
                c = int(codes[128 * h + 32 * r + lane])
                ql[64 * h + 32 * (r % 2) + lane] |= (c & 15) << (4 * (r // 2))
                qh[32 * h + lane] |= (c >> 4) << (2 * r)
    return np.concatenate([ql, qh, np.asarray(scales, np.int8).view(np.uint8), _f16_bytes(d)])


def test_known_answer_q6_k_every_code_at_every_position():
    codes = (np.arange(64)[:, None] + np.arange(256)[None, :]) % 64  # block k: code (k + i) % 64 at i
    scales = np.arange(-8, 8, dtype=np.int8) * 3
    raw = np.stack([_pack_q6_k(c, scales, 0.25) for c in codes])
    expect = np.float32(0.25) * np.repeat(scales.astype(np.float32), 16)[None, :] * (codes - 32).astype(np.float32)
    for threads in (1, 2):  # the repeat-the-scales path and the broadcasting one
        assert quant.dequantize(raw, "Q6_K", shape=(64, 256), threads=threads).tolist() == expect.tolist()


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=ids)
def test_unaligned_input(t, rng):
    # tensor data need not start on an 8-byte boundary; Q6_K reads it as 64-bit words
    blocks = finite_random_blocks(t, 37, rng)
    buf = np.empty(blocks.size + 3, np.uint8)
    raw = buf[3:]
    raw[:] = blocks.reshape(-1)
    assert raw.ctypes.data % 8
    for threads in (1, 2):
        assert_bitexact(quant.dequantize(raw, t, threads=threads), reference(blocks, t), f"{t.name} x{threads}")


# -- registry -----------------------------------------------------------------------------

def test_registry_covers_everything_gguf_can_dequantize():
    from gguf.quants import _type_traits

    for t in list(_type_traits) + [T.F32, T.F16]:
        assert t in quant.TYPES, t.name
    for t in (T.I8, T.I16, T.I32, T.I64, T.F64):
        assert t in quant.TYPES
    from gguf import GGML_QUANT_SIZES

    for t, spec in quant.TYPES.items():
        assert (spec.block_size, spec.type_size) == GGML_QUANT_SIZES[t]


def test_own_kernels_cover_the_required_types():
    need = {T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
    assert need <= quant.OWN_CPU_KERNELS


def test_unknown_types_are_named():
    with pytest.raises(UnsupportedTypeError, match="Q8_1"):
        quant.type_spec(T.Q8_1)  # gguf cannot dequantize it
    with pytest.raises(UnsupportedTypeError, match="12345"):
        quant.type_spec(12345)
    with pytest.raises(UnsupportedTypeError, match="'NOPE'"):
        quant.type_spec("NOPE")


@pytest.mark.parametrize("t,dt", [(T.I8, np.int8), (T.I16, np.int16), (T.I32, np.int32), (T.I64, np.int64)])
def test_integer_pass_through(t, dt):
    v = np.arange(-5, 5, dtype=dt)
    got = quant.dequantize(v.view(np.uint8), t, dtype="float16")
    assert got.dtype == dt and got.tolist() == v.tolist()


def test_f64_is_cast_to_requested_dtype():
    v = np.array([1.5, -2.25, 1e300], np.float64)
    assert quant.dequantize(v.view(np.uint8), "F64").tolist() == [1.5, -2.25, np.float32(np.inf)]
    assert quant.dequantize(v.view(np.uint8), "F64", dtype="float16").dtype == np.float16


def test_quant_types_list_is_complete():
    assert len(QUANT_TYPES) >= 20


def test_ml_dtypes_is_imported_only_when_bfloat16_is_needed():
    """`import gguf_gpu_lab` (and the command line's start) stays light: ml_dtypes took most of it."""
    import subprocess
    import sys

    code = ("import sys, gguf_gpu_lab, gguf_gpu_lab.cli; print('ml_dtypes' in sys.modules); "
            "from gguf_gpu_lab import quant; print(quant.resolve_dtype('bfloat16'), quant.bfloat16.__name__, "
            "'ml_dtypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["False", "bfloat16", "bfloat16", "True"]
