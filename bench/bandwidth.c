// The machine's read bandwidth, for bench/decode.py's "bandwidth used": the fastest of a few ways to stream a
// buffer far larger than the caches, on `threads` threads, each summing its share (AVX2 loads, and AVX-512
// loads where the CPU has them).
// A decode kernel that reads weights faster than torch's sum() (llama.cpp's, palm's own) showed more than 100%
// of a bandwidth measured with the sum; this measures what the memory gives to a loop built to read.

#include <immintrin.h>
#include <stdint.h>

// One front-to-back stream per thread, four accumulators.
__attribute__((target("avx2"))) double palm_read_stream(const uint8_t *p, int64_t n, int threads) {
    double total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int64_t chunk = 0; chunk < n; chunk += 1 << 20) {
        __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
        int64_t end = chunk + (1 << 20) < n ? chunk + (1 << 20) : n;
        for (int64_t i = chunk; i + 128 <= end; i += 128) {
            a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(p + i)));
            b = _mm256_add_epi64(b, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
            c = _mm256_add_epi64(c, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
            d = _mm256_add_epi64(d, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
        }
        int64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
        total += (double)(lanes[0] + lanes[1] + lanes[2] + lanes[3]);
    }
    return total;
}

// Eight streams 4 KB apart in flight at once, as a matrix-vector product reads eight weight rows.
__attribute__((target("avx2"))) double palm_read_rows(const uint8_t *p, int64_t n, int threads) {
    double total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int64_t tile = 0; tile < n / 32768; tile++) {
        const uint8_t *t = p + tile * 32768;
        __m256i acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_si256();
        for (int64_t i = 0; i < 4096; i += 32)
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_add_epi64(acc[j], _mm256_loadu_si256((const __m256i *)(t + j * 4096 + i)));
        int64_t lanes[4];
        for (int j = 1; j < 8; j++) acc[0] = _mm256_add_epi64(acc[0], acc[j]);
        _mm256_storeu_si256((__m256i *)lanes, acc[0]);
        total += (double)(lanes[0] + lanes[1] + lanes[2] + lanes[3]);
    }
    return total;
}

// The same eight streams with 64-byte loads (AVX-512 CPUs only: the caller checks).
__attribute__((target("avx512f"))) double palm_read_rows512(const uint8_t *p, int64_t n, int threads) {
    double total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int64_t tile = 0; tile < n / 32768; tile++) {
        const uint8_t *t = p + tile * 32768;
        __m512i acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_si512();
        for (int64_t i = 0; i < 4096; i += 64)
            for (int j = 0; j < 8; j++)
                acc[j] = _mm512_add_epi64(acc[j], _mm512_loadu_si512((const void *)(t + j * 4096 + i)));
        for (int j = 1; j < 8; j++) acc[0] = _mm512_add_epi64(acc[0], acc[j]);
        total += (double)_mm512_reduce_add_epi64(acc[0]);
    }
    return total;
}
