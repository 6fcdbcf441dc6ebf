"""Kernel-source checks that need no GPU: coverage of the registry, portability lint, and the
kernel logic itself compiled for the host CPU (a C++ compiler stands in for NVRTC/hipRTC)."""

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from gguf_gpu_lab import quant
from gguf_gpu_lab.quant.gpu import GPU_KERNELS, KERNEL_SOURCE
from gguf_gpu_lab.tools.verify import mismatches, reference, round_reference

from .quantdata import finite_random_blocks, libgguf_rows


def test_every_registry_type_has_a_gpu_kernel():
    missing = [s.name for s in quant.TYPES.values() if s.kind != "int" and s.ggml_type not in GPU_KERNELS]
    assert not missing


def _code(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _unguarded_asm(code: str) -> list[int]:
    """Lines with inline assembly outside every ``#if`` that names a CUDA-only macro."""
    stack: list[bool] = []  # per open #if: whether it (or an enclosing one) is CUDA-only
    bad = []
    for i, line in enumerate(code.splitlines(), 1):
        s = line.strip()
        if re.match(r"#\s*if", s):
            stack.append((bool(stack) and stack[-1]) or bool(re.search(r"__CUDA_ARCH__|__CUDACC(_RTC)?__", s)))
        elif re.match(r"#\s*(else|elif)", s):  # the other branch of a CUDA-only test is not CUDA-only
            stack[-1] = len(stack) > 1 and stack[-2]
        elif re.match(r"#\s*endif", s):
            stack.pop()
        elif re.search(r"\basm\b", s) and not (stack and stack[-1]):
            bad.append(i)
    return bad


def test_unguarded_asm_is_found():
    assert _unguarded_asm('asm("x");') == [1]
    assert _unguarded_asm('#if defined(__CUDA_ARCH__)\nasm("x");\n#else\nasm("y");\n#endif') == [4]
    assert _unguarded_asm('#ifdef __CUDACC__\n#if A\nasm("x");\n#endif\n#endif') == []


def test_no_cuda_only_constructs():
    code = _code(KERNEL_SOURCE.read_text())
    assert not _unguarded_asm(code), "inline PTX outside a CUDA-only #if does not compile with hipRTC"
    assert "warpSize" not in code, "warpSize is 64 on CDNA, 32 on RDNA: never a constant"
    shuffles = re.findall(r"__shfl\w*\s*\(([^,]*)", code)
    assert all("FULL_MASK" in m for m in shuffles), "shuffle masks only through the portability macro"
    assert "name_expressions" not in code and "template" not in code, "specialise with -D options"


def test_every_helper_is_device_code():
    code = _code(KERNEL_SOURCE.read_text())
    for m in re.finditer(r"^(?!\s*#)([^\n;{}]*?)\b(\w+)\s*\([^;{]*\)\s*\{", code, re.M):
        prefix = m.group(1)
        if m.group(2) in ("if", "for", "while", "switch"):
            continue
        assert "__device__" in prefix or "__global__" in prefix, f"{m.group(2)} is not marked __device__"


_SHIM = r"""
#include <pthread.h>
#include <string.h>
#define __device__
#define __global__
#define __forceinline__ inline
#define __constant__ static
#define __shared__ static
#define __restrict__
#define __launch_bounds__(n)
struct dim3_ { unsigned x; };
static thread_local dim3_ threadIdx{0};
static dim3_ blockIdx{0}, blockDim{THREADS}, gridDim{1};
static pthread_barrier_t g_barrier;
inline void __syncthreads() { pthread_barrier_wait(&g_barrier); }
struct float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long v) { double d; memcpy(&d, &v, 8); return d; }
"""

# One thread block of THREADS real threads, with a barrier for __syncthreads().
_LAUNCH = r"""
struct Args { const u8* src; void* dst; long long n; const u8* grid; const u8* ksigns; unsigned tid; };
static void* body(void* p) {
    Args* a = (Args*)p;
    threadIdx.x = a->tid;
    dequant(a->src, (out_t*)a->dst, a->n, a->grid, a->ksigns);
    return 0;
}
extern "C" void launch(const u8* src, void* dst, long long n, const u8* grid, const u8* ksigns) {
    pthread_barrier_init(&g_barrier, 0, THREADS);
    pthread_t ts[THREADS];
    Args args[THREADS];
    for (int i = 0; i < THREADS; ++i) {
        args[i] = Args{src, dst, n, grid, ksigns, (unsigned)i};
        pthread_create(&ts[i], 0, body, &args[i]);
    }
    for (int i = 0; i < THREADS; ++i) pthread_join(ts[i], 0);
    pthread_barrier_destroy(&g_barrier);
}
"""


@pytest.fixture(scope="module")
def cxx():
    exe = shutil.which("g++") or shutil.which("clang++")
    if exe is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to build the kernel source for the CPU")
    return exe


@pytest.mark.parametrize("t", list(GPU_KERNELS), ids=lambda t: t.name)
def test_kernel_logic_on_host(cxx, t, tmp_path, rng):
    """The kernel source, built for the CPU with one emulated thread, is bit-exact with gguf-py
    for every output dtype, float16 converted as on ROCm (the _Float16 cast). The GPU run of the
    same source is tests/test_gpu_dequant.py."""
    from gguf import quants as gq

    from gguf_gpu_lab.quant.gpu import THREADS, grid_bytes

    spec = quant.TYPES[t]
    wrapper = tmp_path / "kernel.cpp"
    wrapper.write_text(_SHIM + f'#include "{KERNEL_SOURCE}"\n' + _LAUNCH)
    grid = grid_bytes(GPU_KERNELS[t]) if GPU_KERNELS[t] else np.zeros(8, np.uint8)
    ksigns = np.frombuffer(gq.IQ2_XXS.ksigns, np.uint8).copy()
    cases = [finite_random_blocks(t, 37, rng), finite_random_blocks(t, 4099, rng)]  # one and several tiles
    if t.name != "F64":
        cases.append(libgguf_rows(t, 2, 512 if spec.block_size > 1 else 64, rng)[0])
    # float32 both ways: 16-byte stores go through STAGE_OUT's shared buffers (block types) or
    # 4-value groups (plain types); scalar stores do neither
    for kind, dtype, vec in [(0, "float32", 0), (0, "float32", 1), (1, "float16", 1), (2, "bfloat16", 0)]:
        so = tmp_path / f"k{kind}{vec}.so"
        # float16 through the _Float16 cast hipRTC compiles; the portable conversion is checked
        # on its own in test_float16_conversion_rounds_like_numpy
        hip = ["-D__HIPCC_RTC__"] if dtype == "float16" else []
        subprocess.run([cxx, "-O1", "-pthread", "-shared", "-fPIC", "-ffp-contract=off", *hip,
                        f"-DGGML_TYPE={int(t)}", f"-DOUT_KIND={kind}", f"-DVEC_STORE={vec}", f"-DVEC_LOAD={vec}",
                        f"-DBLOCK_SIZE={spec.block_size}", f"-DTYPE_SIZE={spec.type_size}", f"-DTHREADS={THREADS}",
                        str(wrapper), "-o", str(so)], check=True, capture_output=True)
        lib = ctypes.CDLL(str(so))
        for raw in cases:
            raw = np.ascontiguousarray(raw).reshape(-1)
            n = raw.size // spec.type_size * spec.block_size
            out = np.full(n, np.nan, np.float32) if kind == 0 else np.full(n, 0x7E5A, np.uint16)
            vp = ctypes.c_void_p
            lib.launch(vp(raw.ctypes.data), vp(out.ctypes.data),
                       ctypes.c_longlong(n), vp(grid.ctypes.data), vp(ksigns.ctypes.data))
            ref = reference(raw, t)
            if kind:
                ref = round_reference(ref, dtype).view(np.uint16)
            bad = mismatches(out, ref)
            assert bad.size == 0, f"{t.name} {dtype} (vector stores {vec}): {bad.size} differ, first at {bad[0]}"


# The float32 -> float16 conversion each compiler gets (dequant.cu's F2H): the _Float16 cast that
# hipRTC compiles (selected by the macro hipRTC predefines), or the portable bit version.
_CONVERT = r"""
#define F2H_STR2(x) #x
#define F2H_STR(x) F2H_STR2(x)
extern "C" const char* f2h_path() { return F2H_STR(F2H(x)); }
extern "C" void convert(const float* x, unsigned short* y, long long n) {
    for (long long i = 0; i < n; ++i) y[i] = F2H(x[i]);
}
"""


def _float16_cases(rng) -> np.ndarray:
    """float32 bit patterns at every float16 rounding boundary: each finite float16, each tie
    between neighbours (the overflow tie 65520 included) and the float32 values either side of
    it, in both signs; float32 subnormals, infinities, quiet and signalling NaNs; 2^20 random
    patterns."""
    h = np.arange(0x7C00, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    hi = np.append(lo[1:], 65536.0)  # 65504's upper neighbour, were the exponent wider
    ties = ((lo + hi) / 2).astype(np.float32)  # exact: a float16 tie needs 12 significant bits
    near = [np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(0))]
    pos = np.concatenate([lo.astype(np.float32), ties, *near]).view(np.uint32)
    special = np.array([1, 0x7FFFFF, 0x800000, 0x7F7FFFFF, 0x7F800000,  # float32 subnormals, max, inf
                        0x7FC00000, 0x7FC02000, 0x7FFFFFFF, 0x7FE00001,  # quiet NaNs, payloads
                        0x7F800001, 0x7FA00000, 0x7F802000, 0x7FBFFFFF], np.uint32)  # signalling
    pos = np.concatenate([pos, special])
    return np.concatenate([pos, pos | 0x80000000, rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32)])


@pytest.mark.parametrize("path", ["hiprtc", "portable"])
def test_float16_conversion_rounds_like_numpy(cxx, path, tmp_path, rng):
    """float32 -> float16 as the kernel converts (the _Float16 cast on ROCm, the bit version in
    host builds) against NumPy's astype: round to nearest even at every tie, subnormals kept,
    overflow to inf, quiet NaNs bit for bit. Signalling NaNs: NumPy keeps them signalling; an
    IEEE conversion (the _Float16 cast) quiets them, keeping sign and payload; the bit version
    gives 0x7E00 with the sign for every NaN."""
    from gguf_gpu_lab.quant.gpu import THREADS

    src = tmp_path / "convert.cpp"
    src.write_text(_SHIM + f'#include "{KERNEL_SOURCE}"\n' + _CONVERT)
    so = tmp_path / "convert.so"
    macro = ["-D__HIPCC_RTC__"] if path == "hiprtc" else []
    r = subprocess.run([cxx, "-O1", "-pthread", "-shared", "-fPIC", "-ffp-contract=off", *macro, "-DGGML_TYPE=0",
                        "-DOUT_KIND=1", "-DVEC_STORE=0", "-DVEC_LOAD=0", "-DBLOCK_SIZE=1", "-DTYPE_SIZE=4",
                        f"-DTHREADS={THREADS}", str(src), "-o", str(so)], capture_output=True, text=True)
    if r.returncode and "_Float16" in r.stderr:
        pytest.skip(f"{cxx} has no _Float16 on this machine")
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(so))
    lib.f2h_path.restype = ctypes.c_char_p
    assert lib.f2h_path().decode().startswith("f2h_hip(" if path == "hiprtc" else "f2h(")

    bits = _float16_cases(rng)
    got = np.empty(bits.size, np.uint16)
    vp = ctypes.c_void_p
    lib.convert(vp(bits.ctypes.data), vp(got.ctypes.data), ctypes.c_longlong(bits.size))
    with np.errstate(over="ignore", invalid="ignore"):
        ref = bits.view(np.float32).astype(np.float16).view(np.uint16)
    sign = ((bits >> 16) & 0x8000).astype(np.uint16)
    nan = np.isnan(bits.view(np.float32))
    if path == "hiprtc":
        quiet_nan = nan & ((bits & 0x400000) != 0)
        ref = np.where(nan & ~quiet_nan, sign | 0x7E00 | ((bits >> 13) & 0x1FF), ref).astype(np.uint16)
    else:
        ref = np.where(nan, sign | 0x7E00, ref).astype(np.uint16)
    bad = mismatches(got, ref)
    assert bad.size == 0, (f"{path}: {bad.size} of {bits.size} differ, first float32 0x{bits[bad[0]]:08x}: "
                           f"0x{got[bad[0]]:04x}, want 0x{ref[bad[0]]:04x}")
    assert nan.sum() > 4000 and (got[~nan] == 0x7C00).sum() > 100  # the cases reach NaN and overflow
