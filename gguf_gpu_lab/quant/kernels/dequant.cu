// Dequantization of every GGML type on the GPU: one source for NVRTC (CUDA) and hipRTC (ROCm).
//
// Compiled once per (type, output dtype) with -D options:
//   GGML_TYPE  the GGMLQuantizationType id
//   OUT_KIND   0 float32, 1 float16, 2 bfloat16 (bit patterns in uint16)
//   VEC_STORE  1 when the output pointer is 16-byte aligned (vector stores), else 0
//   VEC_LOAD   plain types only: 1 when the input pointer is 16-byte aligned (vector loads)
//   BLOCK_SIZE, TYPE_SIZE  the type's block layout, from gguf.GGML_QUANT_SIZES
// and with floating-point contraction off (--fmad=false / -ffp-contract=off), so that each
// multiply and add rounds separately, exactly as gguf-py's NumPy reference does.
//
// A thread block stages a tile of input bytes in shared memory with coalesced 32-bit loads, the
// next tile's loads issued into registers before the current tile is computed (so their latency
// hides behind the work); then each thread computes UNROLL groups of 8 consecutive outputs
// (within one block, or 8 plain values) with the same float32 operations, in the same order, as
// gguf.quants, and writes each group with one or two 16-byte stores.
//
// On AMD GPUs (tests/test_kernel_compile.py builds every variant with hipcc): a block of THREADS
// is 4 wavefronts of 64 on CDNA (gfx90a) or 8 of 32 on RDNA3 (gfx1100); no code depends on the
// wavefront size (no shuffles, votes or warp-synchronous steps: __syncthreads is the only
// exchange). __launch_bounds__ takes one argument here because its second means blocks per
// multiprocessor to CUDA but waves per execution unit to HIP (and a cap of 4-6 blocks gained
// nothing on the H200: BENCHMARKS.md).

#ifndef THREADS
#define THREADS 256
#endif
#define GROUP 8
#define UNROLL 4
#define TILE_ELEMS (THREADS * GROUP * UNROLL)
#define TILE_BLOCKS (TILE_ELEMS / BLOCK_SIZE)
#define TILE_BYTES (TILE_BLOCKS * TYPE_SIZE)
#define TILE_WORDS (TILE_BYTES / 4 + 2)      /* + up to 3 bytes of misalignment each side */
#define WORDS_PER_THREAD ((TILE_WORDS + THREADS - 1) / THREADS)

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

// ---- float conversions, written out so no fp16 header is needed on either compiler ----------

__device__ __forceinline__ float h2f(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1Fu;
    u32 man = (u32)h & 0x3FFu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24 is exact
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    u32 bits = (exp == 31) ? (sign | 0x7F800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    return __uint_as_float(bits);
}

// float32 -> float16, round to nearest even; overflow gives inf; NaN stays NaN.
__device__ __forceinline__ u16 f2h(float fv) {
    const u32 f32_inf = 255u << 23;
    const u32 f16_max = (127u + 16u) << 23;                       // 2^16: inf from here on
    const u32 denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    u32 f = __float_as_uint(fv);
    u32 sign = f & 0x80000000u;
    f ^= sign;
    u32 o;
    if (f >= f16_max) {
        o = (f > f32_inf) ? 0x7E00u : 0x7C00u;
    } else if (f < (113u << 23)) {                                 // subnormal or zero in fp16
        // adding the magic aligns the 10 mantissa bits at the bottom; float32 addition rounds
        // to nearest even, which is the rounding wanted
        float t = __uint_as_float(f) + __uint_as_float(denorm_magic);
        o = __float_as_uint(t) - denorm_magic;
    } else {
        u32 mant_odd = (f >> 13) & 1u;
        f += ((u32)(15 - 127) << 23) + 0xFFFu;
        f += mant_odd;
        o = f >> 13;
    }
    return (u16)(o | (sign >> 16));
}

// The hardware conversion where the compiler offers one: libdevice's on CUDA (one cvt.rn
// instruction), the _Float16 cast on ROCm (v_cvt_f16_f32, which rounds as the kernel descriptor
// says: to nearest even, float16 subnormals kept, as the compile gate checks; the cast itself is
// checked against NumPy on the host in tests/test_kernels_static.py); the portable version above
// elsewhere (host builds). A NaN stays a NaN in all three; its payload bits may differ.
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
extern "C" __device__ unsigned short __nv_float2half_rn(float);
#define F2H(x) __nv_float2half_rn(x)
#elif defined(__HIPCC_RTC__) || defined(__HIP_DEVICE_COMPILE__)
__device__ __forceinline__ u16 f2h_hip(float x) {
    _Float16 h = (_Float16)x;
    u16 r;
    __builtin_memcpy(&r, &h, 2);
    return r;
}
#define F2H(x) f2h_hip(x)
#else
#define F2H(x) f2h(x)
#endif

// float32 -> bfloat16, round to nearest even; a NaN becomes the quiet NaN of its sign, as
// ml_dtypes (the reference's bfloat16) converts it.
__device__ __forceinline__ u16 f2bf(float fv) {
    u32 x = __float_as_uint(fv);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)(((x >> 16) & 0x8000u) | 0x7FC0u);
    return (u16)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// float16 -> float32 by the hardware on CUDA (cvt.f32.f16: exact, subnormals kept; a NaN comes
// out as the canonical NaN), against h2f's dozen integer instructions.
// - h2f_scale, a block's float16 scales: h2f was a fifth of the work of a Q4_K group; a NaN scale
//   gives NaN outputs, whose payload the float32 multiply canonicalises anyway.
// - h2f_data, plain F16 values: their NaNs are data (NumPy keeps the payload in float32), so those
//   take h2f; the test costs two integer instructions.
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
__device__ __forceinline__ float h2f_hw(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float h2f_data(u16 h) {
    return ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu)) ? h2f(h) : h2f_hw(h);
}
#if GGML_TYPE == 0 || GGML_TYPE == 1 || GGML_TYPE == 30 || GGML_TYPE == 28
#define h2f_scale h2f_data
#else
#define h2f_scale h2f_hw
#endif
#else
#define h2f_scale h2f
#define h2f_data h2f
#endif
__device__ __forceinline__ float ld_f16(const u8* p) { return h2f_scale((u16)(p[0] | (p[1] << 8))); }
__device__ __forceinline__ u16 ld_u16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }
__device__ __forceinline__ u32 ld_u32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// Small value tables packed into 64-bit immediates: a table in __constant__ memory serialises
// when the lanes of a warp read different entries, which these lookups always do.
__device__ __forceinline__ int lut16(unsigned long long lo, unsigned long long hi, int q) {
    return (int)(i8)(u8)(((q < 8) ? lo : hi) >> (8 * (q & 7)));
}
// IQ4_NL: -127 -104 -83 -65 -49 -35 -22 -10 | 1 13 25 38 53 69 89 113
#define KV_IQ4NL(q) lut16(0xF6EADDCFBFAD9881ull, 0x7159453526190D01ull, (q))
// FP4 (MXFP4, NVFP4), doubled: 0 1 2 3 4 6 8 12 | 0 -1 -2 -3 -4 -6 -8 -12
#define KV_FP4(q) lut16(0x0C08060403020100ull, 0xF4F8FAFCFDFEFF00ull, (q))
#define POW3(k) ((u32)((0x511B090301ull >> (8 * (k))) & 255u))

// Lookup grids are int8 rows (8 or 4 values), read as aligned 32-bit words.
__device__ __forceinline__ float gval(u32 w, int j) { return (float)(i8)(u8)(w >> (8 * (j & 3))); }

// 8 consecutive bytes of the staged tile at any alignment, as two words: three aligned 32-bit
// shared-memory loads and two funnel shifts in place of eight byte loads (the tile is padded by a
// word, so the third load stays inside it).
__device__ __forceinline__ uint2 ld8(const u8* p) {
    const unsigned m = (unsigned)((unsigned long long)p & 3ull);
    const u32* w = (const u32*)(p - m);  // arithmetic on p, so the compiler still sees shared memory
    const unsigned s = 8u * m;
    const u32 a = w[0], b = w[1], c = w[2];
    uint2 r;
    r.x = s ? (a >> s) | (b << (32u - s)) : a;
    r.y = s ? (b >> s) | (c << (32u - s)) : b;
    return r;
}
// byte j (0..7) of two words from ld8, shifted right by sh bits
#define B8(lo, hi, j, sh) ((((j) < 4 ? (lo) : (hi)) >> (8 * ((j) & 3) + (sh))))

// ---- one function per type: GROUP outputs of group g of block b --------------------------------

#if GGML_TYPE == 0 || GGML_TYPE == 1 || GGML_TYPE == 30 || GGML_TYPE == 28  /* F32, F16, BF16, F64 */
#define PLAIN 1
// 8 consecutive values (fewer at the end of the tensor: nvalid)
__device__ __forceinline__ void deq(const u8* b, int g, float* v, const u8* grid, const u8* ksigns, int nvalid) {
    for (int j = 0; j < 8; ++j) {
        if (j >= nvalid) { v[j] = 0.0f; continue; }
        const u8* p = b + j * TYPE_SIZE;
#if GGML_TYPE == 0
        v[j] = __uint_as_float(ld_u32(p));
#elif GGML_TYPE == 1
        v[j] = ld_f16(p);
#elif GGML_TYPE == 28  /* F64: rounded to float32 first, like every other type */
        v[j] = (float)__longlong_as_double((long long)((unsigned long long)ld_u32(p) | ((unsigned long long)ld_u32(p + 4) << 32)));
#else
        v[j] = __uint_as_float((u32)ld_u16(p) << 16);
#endif
    }
}

#elif GGML_TYPE == 2 || GGML_TYPE == 3 || GGML_TYPE == 6 || GGML_TYPE == 7 || GGML_TYPE == 8 || GGML_TYPE == 20 || GGML_TYPE == 39
__device__ __forceinline__ void deq(const u8* b, int g, float* v, const u8* grid, const u8* ksigns, int nvalid) {
    const int e0 = g * 8;                          // first element of the group (0..31)
    const int half = e0 >> 4, base = e0 & 15;      // nibble half, byte index of the first element
    (void)half; (void)base;                        // Q8_0 has whole bytes, indexed by element
#if GGML_TYPE == 2   /* Q4_0 */
    const float d = ld_f16(b);
    for (int j = 0; j < 8; ++j) v[j] = d * (float)(((b[2 + base + j] >> (4 * half)) & 15) - 8);
#elif GGML_TYPE == 3 /* Q4_1 */
    const float d = ld_f16(b), m = ld_f16(b + 2);
    for (int j = 0; j < 8; ++j) v[j] = d * (float)((b[4 + base + j] >> (4 * half)) & 15) + m;
#elif GGML_TYPE == 6 /* Q5_0 */
    const float d = ld_f16(b);
    const u32 qh = ld_u32(b + 2);
    for (int j = 0; j < 8; ++j) {
        int q = ((b[6 + base + j] >> (4 * half)) & 15) | (((qh >> (e0 + j)) & 1u) << 4);
        v[j] = d * (float)(q - 16);
    }
#elif GGML_TYPE == 7 /* Q5_1 */
    const float d = ld_f16(b), m = ld_f16(b + 2);
    const u32 qh = ld_u32(b + 4);
    for (int j = 0; j < 8; ++j) {
        int q = ((b[8 + base + j] >> (4 * half)) & 15) | (((qh >> (e0 + j)) & 1u) << 4);
        v[j] = d * (float)q + m;
    }
#elif GGML_TYPE == 8 /* Q8_0 */
    const float d = ld_f16(b);
    for (int j = 0; j < 8; ++j) v[j] = (float)(i8)b[2 + e0 + j] * d;
#elif GGML_TYPE == 20 /* IQ4_NL */
    const float d = ld_f16(b);
    for (int j = 0; j < 8; ++j) v[j] = d * (float)KV_IQ4NL((b[2 + base + j] >> (4 * half)) & 15);
#elif GGML_TYPE == 39 /* MXFP4: e8m0 scale, already halved for the doubled kvalues */
    const u32 e = b[0];
    const float d = __uint_as_float(e < 2 ? (0x00200000u << e) : ((e - 1u) << 23));
    for (int j = 0; j < 8; ++j) v[j] = d * (float)KV_FP4((b[1 + base + j] >> (4 * half)) & 15);
#endif
}

#elif GGML_TYPE == 40 /* NVFP4: 4 sub-blocks of 16, ue4m3 scales */
__device__ __forceinline__ float ue4m3_half(u32 x) {
    u32 ex = (x >> 3) & 15u, man = x & 7u;
    float raw = ex == 0 ? (float)man * 0.001953125f                       // man * 2^-9
                        : (1.0f + (float)man / 8.0f) * __uint_as_float((ex - 7u + 127u) << 23);
    return (x == 0 || x == 0x7Fu) ? 0.0f : raw * 0.5f;
}
__device__ __forceinline__ void deq(const u8* b, int g, float* v, const u8* grid, const u8* ksigns, int nvalid) {
    const int s = g >> 1, hi = g & 1;
    const float d = ue4m3_half(b[s]);
    for (int j = 0; j < 8; ++j) v[j] = d * (float)KV_FP4((b[4 + s * 8 + j] >> (4 * hi)) & 15);
}

#else /* 256-element super-blocks: 32 groups of 8 */
__device__ __forceinline__ void deq(const u8* b, int g, float* v, const u8* grid, const u8* ksigns, int nvalid) {
    const int e0 = g * 8;                          // first element of the group (0..255)
    (void)e0;                                      // the grid types (IQ1-IQ3) index by group alone
#if GGML_TYPE == 10  /* Q2_K */
    const float d = ld_f16(b + 80), dmin = ld_f16(b + 82);
    const u8 sc = b[e0 >> 4];
    const float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
    const int h = e0 >> 7, s = (e0 & 127) >> 5, i0 = e0 & 31;
    for (int j = 0; j < 8; ++j) v[j] = dl * (float)((b[16 + h * 32 + i0 + j] >> (2 * s)) & 3) - ml;
#elif GGML_TYPE == 11 /* Q3_K */
    const float d = ld_f16(b + 108);
    const int r = e0 >> 4;
    const u8* sc = b + 96;
    const int ls = (sc[r & 7] >> (4 * (r >> 3))) & 15, hs = (sc[8 + (r & 3)] >> (2 * (r >> 2))) & 3;
    const float dl = d * (float)((ls | (hs << 4)) - 32);
    const int h = e0 >> 7, s = (e0 & 127) >> 5, i0 = e0 & 31, hb = e0 >> 5;
    for (int j = 0; j < 8; ++j) {
        int ql = (b[32 + h * 32 + i0 + j] >> (2 * s)) & 3;
        int qh = ((b[i0 + j] >> hb) & 1) ^ 1;
        v[j] = dl * (float)(ql - (qh << 2));
    }
#elif GGML_TYPE == 12 || GGML_TYPE == 13 /* Q4_K, Q5_K */
    const float d = ld_f16(b), dmin = ld_f16(b + 2);
    const u8* s = b + 4;
    const int sb = e0 >> 5, i0 = e0 & 31;
    int sc, mn;
    if (sb < 4) { sc = s[sb] & 63; mn = s[sb + 4] & 63; }
    else { sc = (s[sb + 4] & 15) | ((s[sb - 4] >> 2) & 0x30); mn = (s[sb + 4] >> 4) | ((s[sb] >> 2) & 0x30); }
    const float dsc = d * (float)sc, dm = dmin * (float)mn;
#if GGML_TYPE == 12
    for (int j = 0; j < 8; ++j) v[j] = dsc * (float)((b[16 + (sb >> 1) * 32 + i0 + j] >> (4 * (sb & 1))) & 15) - dm;
#else
    // four 5-bit values a word at once: the nibbles masked in place, the high bits moved to bit 4
    // of each byte (a per-byte version spent half its instructions on loads and bit moves)
    const uint2 l = ld8(b + 48 + (sb >> 1) * 32 + i0), h = ld8(b + 16 + i0);
    const unsigned ls = 4u * (unsigned)(sb & 1);
    const u32 q0 = ((l.x >> ls) & 0x0F0F0F0Fu) | (((h.x >> sb) & 0x01010101u) << 4);
    const u32 q1 = ((l.y >> ls) & 0x0F0F0F0Fu) | (((h.y >> sb) & 0x01010101u) << 4);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = dsc * (float)(int)(B8(q0, q1, j, 0) & 255u) - dm;
#endif
#elif GGML_TYPE == 14 /* Q6_K */
    const float d = ld_f16(b + 208);
    const float dsc = d * (float)(i8)b[192 + (e0 >> 4)];
    const int r = e0 >> 5, i0 = e0 & 31, h = r >> 2, t = r & 3, sh = (t >> 1) * 4, p = r & 1;
    for (int j = 0; j < 8; ++j) {
        int lo = (b[h * 64 + p * 32 + i0 + j] >> sh) & 15;
        int hi = (b[128 + h * 32 + i0 + j] >> (2 * t)) & 3;
        v[j] = dsc * (float)((lo | (hi << 4)) - 32);
    }
#elif GGML_TYPE == 34 /* TQ1_0: base-3 digits, 5 (then 4) to a byte */
    const float d = ld_f16(b + 52);
    if (e0 < 240) {  // digit k of 32 (then 16) bytes: one digit and one run of bytes per group
        const int k = e0 < 160 ? e0 >> 5 : (e0 - 160) >> 4;
        const int byte0 = e0 < 160 ? (e0 & 31) : 32 + ((e0 - 160) & 15);
        const u32 pw = POW3(k);
        const uint2 w = ld8(b + byte0);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 q8 = ((B8(w.x, w.y, j, 0) & 255u) * pw) & 255u;  // uint8 product, wrapping as in gguf-py
            v[j] = d * (float)((int)((q8 * 3u) >> 8) - 1);
        }
    } else {  // the last 16 values: 4 digits of 4 bytes
        for (int j = 0; j < 8; ++j) {
            const int e = e0 - 240 + j;
            const u32 q8 = ((u32)b[48 + (e & 3)] * POW3(e >> 2)) & 255u;
            v[j] = d * (float)((int)((q8 * 3u) >> 8) - 1);
        }
    }
#elif GGML_TYPE == 35 /* TQ2_0 */
    const float d = ld_f16(b + 64);
    const int h = e0 >> 7, s = (e0 & 127) >> 5, i0 = e0 & 31;
    for (int j = 0; j < 8; ++j) v[j] = d * (float)(((b[h * 32 + i0 + j] >> (2 * s)) & 3) - 1);
#elif GGML_TYPE == 23 /* IQ4_XS */
    const float d = ld_f16(b);
    const int sb = e0 >> 5, i0 = e0 & 31;
    const int l = (b[4 + (sb >> 1)] >> (4 * (sb & 1))) & 15, hh = (ld_u16(b + 2) >> (2 * sb)) & 3;
    const float dl = d * (float)((l | (hh << 4)) - 32);
    const uint2 w = ld8(b + 8 + sb * 16 + (i0 & 15));  // i0 + j: bytes (i0 & 15) + j, nibble i0 >> 4
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = dl * (float)KV_IQ4NL((int)(B8(w.x, w.y, j, 4 * (i0 >> 4)) & 15u));
#elif GGML_TYPE == 16 /* IQ2_XXS */
    const float d = ld_f16(b);
    const int ib = g >> 2, l = g & 3;
    const u32 a0 = ld_u32(b + 2 + 8 * ib), a1 = ld_u32(b + 6 + 8 * ib);
    const float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
    const u32* gr = (const u32*)(grid + 8 * ((a0 >> (8 * l)) & 255u));
    const u8 sg = ksigns[(a1 >> (7 * l)) & 127u];
    const u32 w0 = gr[0], w1 = gr[1];
    for (int j = 0; j < 8; ++j) v[j] = db * gval(j < 4 ? w0 : w1, j) * ((sg >> j) & 1 ? -1.0f : 1.0f);
#elif GGML_TYPE == 17 /* IQ2_XS */
    const float d = ld_f16(b);
    const u16 q = ld_u16(b + 2 + 2 * g);
    const int sc = (b[66 + (g >> 2)] >> (4 * ((g >> 1) & 1))) & 15;
    const float db = d * (0.5f + (float)sc) * 0.25f;
    const u32* gr = (const u32*)(grid + 8 * (q & 511));
    const u8 sg = ksigns[q >> 9];
    const u32 w0 = gr[0], w1 = gr[1];
    for (int j = 0; j < 8; ++j) v[j] = db * gval(j < 4 ? w0 : w1, j) * ((sg >> j) & 1 ? -1.0f : 1.0f);
#elif GGML_TYPE == 22 /* IQ2_S */
    const float d = ld_f16(b);
    const int sc = (b[74 + (g >> 2)] >> (4 * ((g >> 1) & 1))) & 15;
    const float db = d * (0.5f + (float)sc) * 0.25f;
    const int idx = b[2 + g] | (((b[66 + (g >> 2)] >> (2 * (g & 3))) & 3) << 8);
    const u32* gr = (const u32*)(grid + 8 * idx);
    const u8 sg = b[34 + g];
    const u32 w0 = gr[0], w1 = gr[1];
    for (int j = 0; j < 8; ++j) v[j] = db * gval(j < 4 ? w0 : w1, j) * ((sg >> j) & 1 ? -1.0f : 1.0f);
#elif GGML_TYPE == 18 /* IQ3_XXS */
    const float d = ld_f16(b);
    const int ib = g >> 2, l = g & 3;
    const u32 aux = ld_u32(b + 66 + 4 * ib);
    const float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
    const u8 sg = ksigns[(aux >> (7 * l)) & 127u];
    const u32 w0 = *(const u32*)(grid + 4 * b[2 + 2 * g]);
    const u32 w1 = *(const u32*)(grid + 4 * b[3 + 2 * g]);
    for (int j = 0; j < 8; ++j) v[j] = db * gval(j < 4 ? w0 : w1, j) * ((sg >> j) & 1 ? -1.0f : 1.0f);
#elif GGML_TYPE == 21 /* IQ3_S */
    const float d = ld_f16(b);
    const int ib = g >> 2;
    const int sc = (b[106 + (ib >> 1)] >> (4 * (ib & 1))) & 15;
    const float db = d * (float)(1 + 2 * sc);
    const u8 sg = b[74 + g];
    const int q0 = 2 * g, q1 = 2 * g + 1;
    const u32 w0 = *(const u32*)(grid + 4 * (b[2 + q0] | (((b[66 + (q0 >> 3)] >> (q0 & 7)) & 1) << 8)));
    const u32 w1 = *(const u32*)(grid + 4 * (b[2 + q1] | (((b[66 + (q1 >> 3)] >> (q1 & 7)) & 1) << 8)));
    for (int j = 0; j < 8; ++j) v[j] = db * gval(j < 4 ? w0 : w1, j) * ((sg >> j) & 1 ? -1.0f : 1.0f);
#elif GGML_TYPE == 19 /* IQ1_S */
    const float d = ld_f16(b);
    const u16 qh = ld_u16(b + 34 + 2 * (g >> 2));
    const float dl = d * (float)(2 * ((qh >> 12) & 7) + 1);
    const float delta = (qh & 0x8000) ? -0.125f : 0.125f;
    const u32* gr = (const u32*)(grid + 8 * (b[2 + g] | (((qh >> (3 * (g & 3))) & 7) << 8)));
    const u32 w0 = gr[0], w1 = gr[1];
    for (int j = 0; j < 8; ++j) v[j] = dl * (gval(j < 4 ? w0 : w1, j) + delta);
#elif GGML_TYPE == 29 /* IQ1_M: the fp16 scale is spread over the top nibbles of 4 words */
    const u16 s0 = ld_u16(b + 48), s1 = ld_u16(b + 50), s2 = ld_u16(b + 52), s3 = ld_u16(b + 54);
    const float d = h2f_scale((u16)((s0 >> 12) | ((s1 >> 8) & 0x00F0) | ((s2 >> 4) & 0x0F00) | (s3 & 0xF000)));
    const int t = g >> 1;
    const u16 sw = ld_u16(b + 48 + 2 * (t >> 2));
    const float dl = d * (float)(2 * ((sw >> (3 * (t & 3))) & 7) + 1);
    const int qhv = (b[32 + (g >> 1)] >> (4 * (g & 1))) & 15;
    const float delta = (qhv & 8) ? -0.125f : 0.125f;
    const u32* gr = (const u32*)(grid + 8 * (b[g] | ((qhv & 7) << 8)));
    const u32 w0 = gr[0], w1 = gr[1];
    for (int j = 0; j < 8; ++j) v[j] = dl * (gval(j < 4 ? w0 : w1, j) + delta);
#else
#error "GGML_TYPE has no GPU kernel"
#endif
}
#endif

// ---- stores --------------------------------------------------------------------------------

#if OUT_KIND == 0
typedef float out_t;
#else
typedef u16 out_t;  // float16 or bfloat16 bit patterns
#endif

__device__ __forceinline__ out_t cvt(float x) {
#if OUT_KIND == 0
    return x;
#elif OUT_KIND == 1
    return F2H(x);
#else
    return f2bf(x);
#endif
}

// Two outputs packed into one 32-bit word, the first in the low half. On sm_80 and later one
// instruction converts and packs both (cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32: round to nearest
// even, subnormals kept, as the scalar conversions): for bfloat16 that replaces the integer
// rounding of f2bf, five instructions a value that made bfloat16 outputs the slowest. The one
// difference is a NaN's sign and payload (the instruction's canonical NaN; f2bf gives the quiet
// NaN of the input's sign, as the reference does), which in a block type only a non-finite scale
// produces; in plain types (F32, F16, BF16 tensors, where a NaN can be data) a pair holding a NaN
// takes f2bf. float16 conversions turn NaNs into the instruction's canonical NaN (F2H).
__device__ __forceinline__ u32 pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && OUT_KIND != 0
    u32 r;
#if OUT_KIND == 1
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
#ifdef PLAIN  // a NaN in a plain tensor is data: f2bf keeps its payload
    if (lo != lo || hi != hi) return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
#endif
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
#else
    return (u32)cvt(lo) | ((u32)cvt(hi) << 16);
#endif
}

// VEC_STORE picks 16-byte stores where dst is 16-byte aligned, which CUDA requires of them. On
// AMD the compiler may merge the 8 scalar stores of VEC_STORE 0 into one 16-byte store as well
// (gfx90a does): ROCm runs the GPU in unaligned-access mode, so that is valid at any address.
// (float32 with 16-byte stores never comes here: STAGE_OUT and the plain kernel's 4-value groups.)
__device__ __forceinline__ void store8(out_t* dst, const float* v) {
#if VEC_STORE && OUT_KIND != 0
    uint4 w;
    w.x = pack2(v[0], v[1]);
    w.y = pack2(v[2], v[3]);
    w.z = pack2(v[4], v[5]);
    w.w = pack2(v[6], v[7]);
    *(uint4*)dst = w;
#elif OUT_KIND == 0
    for (int j = 0; j < 8; ++j) dst[j] = v[j];
#else  // 2-byte aligned: the same packed conversion, stored a half at a time
    for (int j = 0; j < 8; j += 2) {
        const u32 w = pack2(v[j], v[j + 1]);
        dst[j] = (u16)w;
        dst[j + 1] = (u16)(w >> 16);
    }
#endif
}

#ifdef PLAIN
// Plain float types need no staging: each thread reads its values straight from global memory,
// with vector loads where the input is 16-byte aligned. PGROUP values a thread: 8 to 16-bit
// outputs (one 16-byte store a lane), 4 to float32 (one 16-byte store a lane too; 8 would leave
// as two stores 32 bytes apart, half a sector each, as STAGE_OUT below explains).
#define PGROUP (OUT_KIND == 0 ? 4 : 8)
#define PWORDS (PGROUP * TYPE_SIZE / 4)   /* 32-bit words of input a group */
__device__ __forceinline__ void deq_words(const u32* w, float* v) {
#pragma unroll
    for (int j = 0; j < PGROUP; ++j) {
#if GGML_TYPE == 0
        v[j] = __uint_as_float(w[j]);
#elif GGML_TYPE == 28
        v[j] = (float)__longlong_as_double((long long)((unsigned long long)w[2 * j] | ((unsigned long long)w[2 * j + 1] << 32)));
#else
        const u32 h = (w[j >> 1] >> (16 * (j & 1))) & 0xFFFFu;
#if GGML_TYPE == 1
        v[j] = h2f_data((u16)h);
#else
        v[j] = __uint_as_float(h << 16);
#endif
#endif
    }
}

__device__ __forceinline__ void load_words(const u8* p, u32* w) {
#if PWORDS % 4 == 0
#pragma unroll
    for (int k = 0; k < PWORDS / 4; ++k) {
        const uint4 q = ((const uint4*)p)[k];
        w[4 * k] = q.x; w[4 * k + 1] = q.y; w[4 * k + 2] = q.z; w[4 * k + 3] = q.w;
    }
#else  /* 4 16-bit values: 8 bytes */
    const uint2 q = *(const uint2*)p;
    w[0] = q.x; w[1] = q.y;
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS) dequant(const u8* __restrict__ src, out_t* __restrict__ dst,
                                                           long long n_elem, const u8* __restrict__ grid,
                                                           const u8* __restrict__ ksigns) {
    const long long n_groups = (n_elem + PGROUP - 1) / PGROUP;
    const long long stride = (long long)gridDim.x * THREADS;
    for (long long gi = (long long)blockIdx.x * THREADS + threadIdx.x; gi < n_groups; gi += stride) {
        const long long e0 = gi * PGROUP;
        const long long rest = n_elem - e0;
        const int nvalid = rest < PGROUP ? (int)rest : PGROUP;
        float v[GROUP];
#if VEC_LOAD
        if (nvalid == PGROUP) {
            u32 w[PWORDS];
            load_words(src + e0 * TYPE_SIZE, w);
            deq_words(w, v);
        } else
#endif
        {
            deq(src + e0 * TYPE_SIZE, 0, v, grid, ksigns, nvalid);
        }
#if OUT_KIND == 0 && VEC_STORE
        if (nvalid == PGROUP) {
            *(float4*)(dst + e0) = make_float4(v[0], v[1], v[2], v[3]);
            continue;
        }
#elif OUT_KIND != 0
        if (nvalid == PGROUP) {
            store8(dst + e0, v);
            continue;
        }
#endif
        for (int j = 0; j < nvalid; ++j) dst[e0 + j] = cvt(v[j]);
    }
}
#else  /* block types: staged tiles */

// The aligned 32-bit words covering tile t's bytes, into registers. The few bytes before and
// after the tile in its first and last word share an aligned word with valid bytes, so the
// read cannot fault; they are never used.
__device__ __forceinline__ void load_tile(const u8* src, long long t, long long total_bytes, u32* r, int* mis) {
    const long long b0 = t * (long long)TILE_BYTES;
    const long long left = total_bytes - b0;
    const int nbytes = left < TILE_BYTES ? (int)left : TILE_BYTES;
    const u8* gsrc = src + b0;
    *mis = (int)((unsigned long long)gsrc & 3ull);
    const u32* wsrc = (const u32*)(gsrc - *mis);
    const int nwords = (*mis + nbytes + 3) >> 2;
#pragma unroll
    for (int k = 0; k < WORDS_PER_THREAD; ++k) {
        const int w = k * THREADS + threadIdx.x;
        r[k] = w < nwords ? wsrc[w] : 0u;
    }
}

// float32 outputs (32 bytes a group) written straight from registers leave as two 16-byte stores
// per lane, 32 bytes apart, so each store instruction of a warp covers half of every sector it
// touches; for the types that do least work a group (TQ2_0) that pattern bounded the kernel at
// 0.58 of a device copy. STAGE_OUT passes each step's groups through shared memory (two 8 KiB
// buffers, alternating, so one barrier a step suffices) and stores them with consecutive 16-byte
// stores across the block. 16-bit outputs are one 16-byte store a lane already.
#define STAGE_OUT (OUT_KIND == 0 && VEC_STORE)

// n_elem: elements to produce (a whole number of blocks). Grid-stride loop over tiles.
extern "C" __global__ void __launch_bounds__(THREADS) dequant(const u8* __restrict__ src, out_t* __restrict__ dst,
                                                           long long n_elem, const u8* __restrict__ grid,
                                                           const u8* __restrict__ ksigns) {
    __shared__ u32 tile[WORDS_PER_THREAD * THREADS + 1];  // + 1: ld8's third word
#if STAGE_OUT
    __shared__ float4 ostage[2][THREADS * GROUP / 4];
#endif
    const long long n_tiles = (n_elem + TILE_ELEMS - 1) / TILE_ELEMS;
    const long long total_bytes = n_elem / BLOCK_SIZE * TYPE_SIZE;
    u32 r[WORDS_PER_THREAD];
    int mis = 0, next_mis = 0;
    if ((long long)blockIdx.x < n_tiles) load_tile(src, blockIdx.x, total_bytes, r, &next_mis);
    for (long long t = blockIdx.x; t < n_tiles; t += gridDim.x) {
        __syncthreads();  // the previous tile's readers are done with the buffer
#pragma unroll
        for (int k = 0; k < WORDS_PER_THREAD; ++k) tile[k * THREADS + threadIdx.x] = r[k];
        mis = next_mis;
        __syncthreads();
        if (t + gridDim.x < n_tiles) load_tile(src, t + gridDim.x, total_bytes, r, &next_mis);  // in flight meanwhile
        const u8* tb = (const u8*)tile + mis;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int local = (u * THREADS + threadIdx.x) * GROUP;  // element offset inside the tile
            const long long e0 = t * (long long)TILE_ELEMS + local;
#if STAGE_OUT
            // n_elem is a whole number of blocks (multiples of 32 elements): a group is all in or
            // all out, and so is each 4-element store below
            const long long step0 = t * (long long)TILE_ELEMS + u * THREADS * GROUP;
            if (step0 >= n_elem) break;  // the same for the whole block: no thread skips a barrier
            float4* buf = ostage[u & 1];
            if (e0 < n_elem) {
                float v[GROUP];
                deq(tb + (local / BLOCK_SIZE) * TYPE_SIZE, (local % BLOCK_SIZE) / GROUP, v, grid, ksigns, GROUP);
                buf[2 * threadIdx.x] = make_float4(v[0], v[1], v[2], v[3]);
                buf[2 * threadIdx.x + 1] = make_float4(v[4], v[5], v[6], v[7]);
            }
            __syncthreads();  // (the other buffer's readers passed the previous step's barrier)
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const int q = k * THREADS + threadIdx.x;
                if (step0 + 4 * q < n_elem) ((float4*)(dst + step0))[q] = buf[q];
            }
            continue;
#endif
            if (e0 >= n_elem) break;
            float v[GROUP];  // a whole group: blocks are whole multiples of 8 elements
            deq(tb + (local / BLOCK_SIZE) * TYPE_SIZE, (local % BLOCK_SIZE) / GROUP, v, grid, ksigns, GROUP);
            store8(dst + e0, v);
        }
    }
}
#endif
