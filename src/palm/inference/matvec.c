// Decode-time matrix products for a few rows: y[m, out] = x[m, in] @ w[out, in]^T, w in the model's own
// [out, in] layout, y in bf16. Built by palm/inference/matvec.py with the system C compiler on first use.
//
// Why not oneDNN/aten: at batch 1 a decode step is one pass over every weight, and their bf16 and int8
// kernels read it at 20-27 GB/s on a 2-core Zen 4 EPYC where this loop reads 40+ (llama.cpp's rate).
// What makes the difference is eight weight rows in flight at once, each read front to back, with the next
// eight hinted to the outer caches as they go (rows of 2-4 KB are too short for the prefetcher to learn).
//
// Every output is reduced in the same order whatever m is (lane-wise over `in`, then the lanes summed), so a
// row's result does not depend on which rows share its batch: continuous batching stays bit-exact against a
// request run alone. The tiles below differ only in how many rows share a weight load.
//
// One file, no -march: each kernel names its own target, and matvec.py picks by what the CPU reports.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 8   // weight rows per tile
#define BLOCK 64 // int8: activations are quantized per block of 64, as llama.cpp's q8 does per 32

typedef int64_t i64;
typedef uint16_t bf16;

#define TILE_INLINE static inline __attribute__((always_inline))

static inline bf16 to_bf16(float f) { // round to nearest even, as torch's .to(bfloat16)
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x40); // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16)(bits >> 16);
}

int palm_matvec_version(void) { return 3; }

// Each kernel runs on `threads` OpenMP threads (torch's intra-op count: the library shares torch's libgomp).

// ---- bf16 weights, bf16 activations: AVX512-BF16 (Zen 4, Sapphire Rapids and later) ----------------

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

T512 TILE_INLINE void bf16_tile(const bf16 *x, const bf16 *w, bf16 *y, i64 in, i64 out, const int rows,
                                const int mt) {
    __m512 acc[2][ROWS];
    for (int r = 0; r < mt; r++)
        for (int j = 0; j < rows; j++) acc[r][j] = _mm512_setzero_ps();
    i64 whole = in & ~(i64)31, k = 0;
    for (; k < whole; k += 32) {
        __m512bh xv[2];
        for (int r = 0; r < mt; r++) xv[r] = (__m512bh)_mm512_loadu_si512(x + r * in + k);
        for (int j = 0; j < rows; j++) {
            _mm_prefetch((const char *)(w + (j + ROWS) * in + k), _MM_HINT_T2);
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + j * in + k);
            for (int r = 0; r < mt; r++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv[r], wv);
        }
    }
    if (k < in) {
        __mmask32 mask = (__mmask32)((1u << (in - k)) - 1);
        __m512bh xv[2];
        for (int r = 0; r < mt; r++) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * in + k);
        for (int j = 0; j < rows; j++) {
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * in + k);
            for (int r = 0; r < mt; r++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv[r], wv);
        }
    }
    for (int r = 0; r < mt; r++)
        for (int j = 0; j < rows; j++) y[r * out + j] = to_bf16(_mm512_reduce_add_ps(acc[r][j]));
}

T512 void palm_bf16_avx512(const bf16 *x, const bf16 *w, bf16 *y, i64 m, i64 in, i64 out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 o = 0; o < out; o += ROWS) {
        const bf16 *wo = w + o * in;
        if (out - o < ROWS) { // the last few rows of a matrix whose height is not a multiple of 8
            for (i64 r = 0; r < m; r++) bf16_tile(x + r * in, wo, y + r * out + o, in, out, (int)(out - o), 1);
            continue;
        }
        i64 r = 0;
        for (; r + 2 <= m; r += 2) bf16_tile(x + r * in, wo, y + r * out + o, in, out, ROWS, 2);
        if (r < m) bf16_tile(x + r * in, wo, y + r * out + o, in, out, ROWS, 1);
    }
}

// ---- bf16 weights on AVX2 (no native bf16): widened to fp32 by a shift, fp32 multiply-adds ---------------

#define T256 __attribute__((target("avx2,fma")))

T256 static inline __m256 widen(const bf16 *p, i64 left) {
    __m128i h;
    if (left >= 8) h = _mm_loadu_si128((const __m128i *)p);
    else {
        bf16 tmp[8] = {0};
        memcpy(tmp, p, (size_t)left * 2);
        h = _mm_loadu_si128((const __m128i *)tmp);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

T256 static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T256 TILE_INLINE void bf16_tile_avx2(const bf16 *x, const bf16 *w, bf16 *y, i64 in, const int rows) {
    __m256 acc[ROWS];
    for (int j = 0; j < rows; j++) acc[j] = _mm256_setzero_ps();
    for (i64 k = 0; k < in; k += 8) {
        __m256 xv = widen(x + k, in - k);
        for (int j = 0; j < rows; j++) acc[j] = _mm256_fmadd_ps(xv, widen(w + j * in + k, in - k), acc[j]);
    }
    for (int j = 0; j < rows; j++) y[j] = to_bf16(sum8(acc[j]));
}

T256 void palm_bf16_avx2(const bf16 *x, const bf16 *w, bf16 *y, i64 m, i64 in, i64 out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 o = 0; o < out; o += ROWS)
        for (i64 r = 0; r < m; r++) {
            if (out - o < ROWS) bf16_tile_avx2(x + r * in, w + o * in, y + r * out + o, in, (int)(out - o));
            else bf16_tile_avx2(x + r * in, w + o * in, y + r * out + o, in, ROWS);
        }
}

// ---- int8 weights, one fp32 scale per output row: AVX512-VNNI ------------------------------------------
//
// The weights are stored offset by 128 (uint8, what vpdpbusd multiplies unsigned); the activations are
// quantized per call to int8 in blocks of 64, each with its own scale (llama.cpp's q8 scheme), so a product
// is 64 multiply-adds per instruction and the loop reads weights as fast as memory gives them. The offset's
// share, 128 * (sum of a block's int8 activations), is the same for every output row: it is taken off once.

#define TVNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

typedef struct {
    int8_t *q;      // [m, blocks * BLOCK], zero past `in`
    float *scale;   // [m, blocks]
    float *offset;  // [m]: sum over blocks of 128 * scale * (sum of the block's q)
} quantized;

// x (bf16 or fp32) -> int8 per block of 64, rounded to nearest even; per row, so rows stay batch-independent.
TVNNI static void quantize_rows(const void *x, int x_fp32, i64 m, i64 in, quantized *qx) {
    i64 blocks = (in + BLOCK - 1) / BLOCK;
    for (i64 r = 0; r < m; r++) {
        float offset = 0.0f;
        for (i64 b = 0; b < blocks; b++) {
            __m512 v[4];
            __m512 amax = _mm512_setzero_ps();
            for (int part = 0; part < 4; part++) {
                i64 k = b * BLOCK + part * 16, left = in - k;
                __mmask16 mask = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                if (x_fp32) v[part] = _mm512_maskz_loadu_ps(mask, (const float *)x + r * in + (left > 0 ? k : 0));
                else {
                    __m256i h = _mm256_maskz_loadu_epi16(mask, (const bf16 *)x + r * in + (left > 0 ? k : 0));
                    v[part] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                }
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[part]));
            }
            float top = _mm512_reduce_max_ps(amax), inv = top > 0.0f ? 127.0f / top : 0.0f;
            __m512i sum = _mm512_setzero_si512();
            int8_t *q = qx->q + (r * blocks + b) * BLOCK;
            for (int part = 0; part < 4; part++) {
                __m512i n = _mm512_cvtps_epi32(_mm512_mul_ps(v[part], _mm512_set1_ps(inv)));  // nearest even
                _mm_storeu_si128((__m128i *)(q + part * 16), _mm512_cvtepi32_epi8(n));
                sum = _mm512_add_epi32(sum, n);
            }
            float s = top / 127.0f;
            qx->scale[r * blocks + b] = s;
            offset += 128.0f * s * (float)_mm512_reduce_add_epi32(sum);
        }
        qx->offset[r] = offset;
    }
}

TVNNI TILE_INLINE void int8_tile(const quantized *qx, i64 r0, const uint8_t *w, const float *wscale, bf16 *y,
                                 i64 in, i64 out, const int rows, const int mt) {
    i64 blocks = (in + BLOCK - 1) / BLOCK;
    __m512 acc[2][ROWS];
    for (int r = 0; r < mt; r++)
        for (int j = 0; j < rows; j++) acc[r][j] = _mm512_setzero_ps();
    for (i64 b = 0; b < blocks; b++) {
        i64 k = b * BLOCK;
        __mmask64 mask = in - k >= BLOCK ? ~(__mmask64)0 : (((__mmask64)1 << (in - k)) - 1);
        __m512i xv[2];
        __m512 sv[2];
        for (int r = 0; r < mt; r++) {
            xv[r] = _mm512_loadu_si512(qx->q + ((r0 + r) * blocks + b) * BLOCK);
            sv[r] = _mm512_set1_ps(qx->scale[(r0 + r) * blocks + b]);
        }
        for (int j = 0; j < rows; j++) {
            _mm_prefetch((const char *)(w + (j + ROWS) * in + k), _MM_HINT_T2);
            __m512i wv = _mm512_maskz_loadu_epi8(mask, w + j * in + k);
            for (int r = 0; r < mt; r++) {
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[r]);
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[r], acc[r][j]);
            }
        }
    }
    for (int r = 0; r < mt; r++)
        for (int j = 0; j < rows; j++)
            y[r * out + j] = to_bf16((_mm512_reduce_add_ps(acc[r][j]) - qx->offset[r0 + r]) * wscale[j]);
}

// Returns 0, or -1 where the scratch for the quantized activations could not be allocated.
TVNNI int palm_int8_vnni(const void *x, int x_fp32, const uint8_t *w, const float *wscale, bf16 *y, i64 m, i64 in,
                         i64 out, int threads) {
    i64 blocks = (in + BLOCK - 1) / BLOCK;
    quantized qx = {malloc((size_t)(m * blocks * BLOCK)), malloc((size_t)(m * blocks) * 4), malloc((size_t)m * 4)};
    if (!qx.q || !qx.scale || !qx.offset) {
        free(qx.q), free(qx.scale), free(qx.offset);
        return -1;
    }
    quantize_rows(x, x_fp32, m, in, &qx);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 o = 0; o < out; o += ROWS) {
        const uint8_t *wo = w + o * in;
        if (out - o < ROWS) {
            for (i64 r = 0; r < m; r++) int8_tile(&qx, r, wo, wscale + o, y + r * out + o, in, out, (int)(out - o), 1);
            continue;
        }
        i64 r = 0;
        for (; r + 2 <= m; r += 2) int8_tile(&qx, r, wo, wscale + o, y + r * out + o, in, out, ROWS, 2);
        if (r < m) int8_tile(&qx, r, wo, wscale + o, y + r * out + o, in, out, ROWS, 1);
    }
    free(qx.q), free(qx.scale), free(qx.offset);
    return 0;
}
