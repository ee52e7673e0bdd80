/* Float16 rows times float32 activations (f16_rows.h). One token reads the float16 rows directly (decode is memory
 * bound: rows prefetched ahead); several tokens convert four rows once and reuse them from L1 (prefill is compute
 * bound: AVX-512 tiles of 4 rows x 4 tokens where the CPU has them).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "f16_rows.h"

#define PREFETCH_ROWS 8 /* a decoded token's rows are read once, cold: ask for the rows two groups ahead (+15-20 %) */

static int have_avx512; /* set by edge_moe_f16_supported, which the loader calls first */

int edge_moe_f16_supported(void) {
    __builtin_cpu_init();
    have_avx512 = __builtin_cpu_supports("avx512f");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* The last K % 8 terms of a dot product, one at a time. */
KERNEL static inline float tail_f16(const uint16_t *w, const float *x, int from, int K) {
    float s = 0.0f;
    for (int c = from; c < K; c++) s += _cvtsh_ss(w[c]) * x[c];
    return s;
}


/* Several tokens with AVX-512 (twice the lanes, 32 registers: tiles of 4 rows x 4 tokens): the groups of four
 * rows in [r0, r1) as rows_times does them; returns the first row not done. Prefill is compute bound: 64 tokens
 * of 12 layers (q3-f16e) took 150 ms in the AVX2 tiles on one thread. */
__attribute__((target("avx512f,f16c,fma"))) static int rows_times_512(const uint16_t *W, int K, int r0, int r1,
                                                                      const float *X, int n, float *out, int ldo,
                                                                      float *buf) {
    int r = r0, K16 = K & ~15;
    for (; r + 4 <= r1; r += 4) {
        const uint16_t *w0 = W + (size_t)r * K;
        if (r + 8 <= r1) /* the next four rows come into L2 while these four are multiplied */
            for (int c = 0; c < 4 * K; c += 32) _mm_prefetch((const char *)(w0 + 4 * (size_t)K + c), _MM_HINT_T1);
        for (int row = 0; row < 4; row++) {
            int c = 0;
            for (; c + 16 <= K; c += 16)
                _mm512_storeu_ps(buf + row * K + c,
                                 _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w0 + (size_t)row * K + c))));
            for (; c < K; c++) buf[row * K + c] = _cvtsh_ss(w0[(size_t)row * K + c]);
        }
        const float *b0 = buf, *b1 = buf + K, *b2 = buf + 2 * K, *b3 = buf + 3 * K;
        int t = 0;
        for (; t + 4 <= n; t += 4) {
            const float *x0 = X + (size_t)t * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            __m512 a[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();
            for (int c = 0; c < K16; c += 16) {
                __m512 v0 = _mm512_loadu_ps(x0 + c), v1 = _mm512_loadu_ps(x1 + c), v2 = _mm512_loadu_ps(x2 + c),
                       v3 = _mm512_loadu_ps(x3 + c);
                const float *rows[4] = {b0, b1, b2, b3};
                for (int i = 0; i < 4; i++) {
                    __m512 w = _mm512_loadu_ps(rows[i] + c);
                    a[i][0] = _mm512_fmadd_ps(w, v0, a[i][0]), a[i][1] = _mm512_fmadd_ps(w, v1, a[i][1]);
                    a[i][2] = _mm512_fmadd_ps(w, v2, a[i][2]), a[i][3] = _mm512_fmadd_ps(w, v3, a[i][3]);
                }
            }
            const float *xs[4] = {x0, x1, x2, x3}, *rows[4] = {b0, b1, b2, b3};
            for (int j = 0; j < 4; j++)
                for (int i = 0; i < 4; i++)
                    out[(size_t)(t + j) * ldo + r + i] = _mm512_reduce_add_ps(a[i][j]) + tail(rows[i], xs[j], K16, K);
        }
        for (; t < n; t++) /* the last tokens, fewer than a tile */
            four_rows_times(buf, K, X + (size_t)t * K, out + (size_t)t * ldo + r);
    }
    return r;
}

/* out[t * ldo + r] = W[r] . X[t] for rows r0 <= r < r1 of W [rows, K] (float16) and tokens t < n of X [n, K]
 * (float32). One token reads the float16 rows directly, four at a time (memory bound); more
 * tokens convert four rows into `buf` [4 K] once and reuse them from L1 for three tokens at a time. */
KERNEL void edge_moe_rows_times(const uint16_t *W, int K, int r0, int r1, const float *X, int n,
                                float *out, int ldo, float *buf) {
    int r = r0, K8 = K & ~7;
    if (n > 1 && have_avx512) r = rows_times_512(W, K, r0, r1, X, n, out, ldo, buf);
    for (; r + 4 <= r1; r += 4) {
        const uint16_t *w0 = W + (size_t)r * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        if (n == 1) {
            int ahead = r + PREFETCH_ROWS + 4 <= r1; /* within this call's rows: the next are another's */
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int c = 0; c < K8; c += 8) {
                if (ahead && (c & 31) == 0) { /* 32 float16 weights: a cache line */
                    _mm_prefetch((const char *)(w0 + c + PREFETCH_ROWS * (size_t)K), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w1 + c + PREFETCH_ROWS * (size_t)K), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w2 + c + PREFETCH_ROWS * (size_t)K), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w3 + c + PREFETCH_ROWS * (size_t)K), _MM_HINT_T0);
                }
                __m256 xv = _mm256_loadu_ps(X + c);
                a0 = _mm256_fmadd_ps(load_f16(w0 + c), xv, a0);
                a1 = _mm256_fmadd_ps(load_f16(w1 + c), xv, a1);
                a2 = _mm256_fmadd_ps(load_f16(w2 + c), xv, a2);
                a3 = _mm256_fmadd_ps(load_f16(w3 + c), xv, a3);
            }
            out[r] = hsum(a0) + tail_f16(w0, X, K8, K), out[r + 1] = hsum(a1) + tail_f16(w1, X, K8, K);
            out[r + 2] = hsum(a2) + tail_f16(w2, X, K8, K), out[r + 3] = hsum(a3) + tail_f16(w3, X, K8, K);
            continue;
        }
        for (int c = 0; c < K8; c += 8) {
            _mm256_storeu_ps(buf + c, load_f16(w0 + c));
            _mm256_storeu_ps(buf + K + c, load_f16(w1 + c));
            _mm256_storeu_ps(buf + 2 * K + c, load_f16(w2 + c));
            _mm256_storeu_ps(buf + 3 * K + c, load_f16(w3 + c));
        }
        for (int c = K8; c < K; c++)
            buf[c] = _cvtsh_ss(w0[c]), buf[K + c] = _cvtsh_ss(w1[c]), buf[2 * K + c] = _cvtsh_ss(w2[c]),
            buf[3 * K + c] = _cvtsh_ss(w3[c]);
        const float *b0 = buf, *b1 = buf + K, *b2 = buf + 2 * K, *b3 = buf + 3 * K;
        int t = 0;
        for (; t + 3 <= n; t += 3) {
            const float *x0 = X + (size_t)t * K, *x1 = x0 + K, *x2 = x1 + K;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
            __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
            for (int c = 0; c < K8; c += 8) {
                __m256 v0 = _mm256_loadu_ps(x0 + c), v1 = _mm256_loadu_ps(x1 + c), v2 = _mm256_loadu_ps(x2 + c);
                __m256 w = _mm256_loadu_ps(b0 + c);
                a00 = _mm256_fmadd_ps(w, v0, a00), a01 = _mm256_fmadd_ps(w, v1, a01), a02 = _mm256_fmadd_ps(w, v2, a02);
                w = _mm256_loadu_ps(b1 + c);
                a10 = _mm256_fmadd_ps(w, v0, a10), a11 = _mm256_fmadd_ps(w, v1, a11), a12 = _mm256_fmadd_ps(w, v2, a12);
                w = _mm256_loadu_ps(b2 + c);
                a20 = _mm256_fmadd_ps(w, v0, a20), a21 = _mm256_fmadd_ps(w, v1, a21), a22 = _mm256_fmadd_ps(w, v2, a22);
                w = _mm256_loadu_ps(b3 + c);
                a30 = _mm256_fmadd_ps(w, v0, a30), a31 = _mm256_fmadd_ps(w, v1, a31), a32 = _mm256_fmadd_ps(w, v2, a32);
            }
            float *o0 = out + (size_t)t * ldo + r, *o1 = o0 + ldo, *o2 = o1 + ldo;
            o0[0] = hsum(a00) + tail(b0, x0, K8, K), o0[1] = hsum(a10) + tail(b1, x0, K8, K);
            o0[2] = hsum(a20) + tail(b2, x0, K8, K), o0[3] = hsum(a30) + tail(b3, x0, K8, K);
            o1[0] = hsum(a01) + tail(b0, x1, K8, K), o1[1] = hsum(a11) + tail(b1, x1, K8, K);
            o1[2] = hsum(a21) + tail(b2, x1, K8, K), o1[3] = hsum(a31) + tail(b3, x1, K8, K);
            o2[0] = hsum(a02) + tail(b0, x2, K8, K), o2[1] = hsum(a12) + tail(b1, x2, K8, K);
            o2[2] = hsum(a22) + tail(b2, x2, K8, K), o2[3] = hsum(a32) + tail(b3, x2, K8, K);
        }
        for (; t < n; t++) /* the last tokens, fewer than three */
            four_rows_times(buf, K, X + (size_t)t * K, out + (size_t)t * ldo + r);
    }
    for (; r < r1; r++) { /* rows past the last group of four */
        const uint16_t *w0 = W + (size_t)r * K;
        for (int t = 0; t < n; t++) {
            const float *x0 = X + (size_t)t * K;
            __m256 a = _mm256_setzero_ps();
            for (int c = 0; c < K8; c += 8)
                a = _mm256_fmadd_ps(load_f16(w0 + c), _mm256_loadu_ps(x0 + c), a);
            out[(size_t)t * ldo + r] = hsum(a) + tail_f16(w0, x0, K8, K);
        }
    }
}


/* Several tokens with AVX-512: tiles of 4 tokens x 64 columns of W [K, N] over the strips of 64 in [c0, c1), as
 * edge_moe_xw's AVX2 tiles do them (the same sums in the same order); returns the first column not done. */
__attribute__((target("avx512f,f16c,fma"))) static int xw_tiles_512(const uint16_t *W, int K, int N, int c0, int c1,
                                                                    const float *X, int n, float *out, int ldo) {
    int c = c0;
    for (; c + 64 <= c1; c += 64)
        for (int t = 0; t < n; t += 4) {
            int m = n - t < 4 ? n - t : 4;
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
            for (int k = 0; k < K; k++) {
                const uint16_t *w = W + (size_t)k * N + c;
                __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w)),
                       w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 16))),
                       w2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 32))),
                       w3 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 48)));
                for (int i = 0; i < m; i++) {
                    __m512 xb = _mm512_set1_ps(X[(size_t)(t + i) * K + k]);
                    acc[i][0] = _mm512_fmadd_ps(w0, xb, acc[i][0]), acc[i][1] = _mm512_fmadd_ps(w1, xb, acc[i][1]);
                    acc[i][2] = _mm512_fmadd_ps(w2, xb, acc[i][2]), acc[i][3] = _mm512_fmadd_ps(w3, xb, acc[i][3]);
                }
            }
            for (int i = 0; i < m; i++)
                for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + (size_t)(t + i) * ldo + c + 16 * j, acc[i][j]);
        }
    return c;
}

/* out[t * ldo + c] = X[t] . W[:, c] for columns c0 <= c < c1 of W [K, N] (float16, the package's [in, out] expert
 * layout) and tokens t < n of X [n, K]. One token streams W's rows in order (memory bound: each row's columns
 * c0..c1 are read once, contiguously, into sums kept in `out`); more tokens take tiles of 4 tokens x 64 columns
 * (AVX-512) or 32 (AVX2) whose sums stay in registers while the strip of W is reused from cache for every tile. */
KERNEL void edge_moe_xw(const uint16_t *W, int K, int N, int c0, int c1, const float *X, int n, float *out, int ldo) {
    if (n == 1) {
        int c8 = c0 + ((c1 - c0) & ~7), k = 0;
        memset(out + c0, 0, sizeof(float) * (size_t)(c1 - c0));
        for (; k + 4 <= K; k += 4) { /* four rows a pass: the sums are loaded and stored once for four products */
            const uint16_t *w0 = W + (size_t)k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
            if (k + 8 + 4 <= K) /* rows two passes ahead, as the row kernel does */
                for (int r = 8; r < 12; r++)
                    for (int c = c0; c < c1; c += 32) _mm_prefetch((const char *)(w0 + (size_t)r * N + c), _MM_HINT_T0);
            __m256 x0 = _mm256_set1_ps(X[k]), x1 = _mm256_set1_ps(X[k + 1]), x2 = _mm256_set1_ps(X[k + 2]),
                   x3 = _mm256_set1_ps(X[k + 3]);
            for (int c = c0; c < c8; c += 8) {
                __m256 a = _mm256_fmadd_ps(load_f16(w0 + c), x0, _mm256_loadu_ps(out + c));
                a = _mm256_fmadd_ps(load_f16(w1 + c), x1, a);
                a = _mm256_fmadd_ps(load_f16(w2 + c), x2, a);
                _mm256_storeu_ps(out + c, _mm256_fmadd_ps(load_f16(w3 + c), x3, a));
            }
            for (int c = c8; c < c1; c++)
                out[c] += _cvtsh_ss(w0[c]) * X[k] + _cvtsh_ss(w1[c]) * X[k + 1] + _cvtsh_ss(w2[c]) * X[k + 2] +
                          _cvtsh_ss(w3[c]) * X[k + 3];
        }
        for (; k < K; k++) {
            const uint16_t *w = W + (size_t)k * N;
            __m256 xk = _mm256_set1_ps(X[k]);
            for (int c = c0; c < c8; c += 8)
                _mm256_storeu_ps(out + c, _mm256_fmadd_ps(load_f16(w + c), xk, _mm256_loadu_ps(out + c)));
            for (int c = c8; c < c1; c++) out[c] += _cvtsh_ss(w[c]) * X[k];
        }
        return;
    }
    int c = have_avx512 ? xw_tiles_512(W, K, N, c0, c1, X, n, out, ldo) : c0;
    for (; c + 32 <= c1; c += 32)
        for (int t = 0; t < n; t += 4) {
            int m = n - t < 4 ? n - t : 4;
            __m256 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();
            for (int k = 0; k < K; k++) {
                const uint16_t *w = W + (size_t)k * N + c;
                __m256 w0 = load_f16(w), w1 = load_f16(w + 8), w2 = load_f16(w + 16), w3 = load_f16(w + 24);
                for (int i = 0; i < m; i++) {
                    __m256 xb = _mm256_set1_ps(X[(size_t)(t + i) * K + k]);
                    acc[i][0] = _mm256_fmadd_ps(w0, xb, acc[i][0]), acc[i][1] = _mm256_fmadd_ps(w1, xb, acc[i][1]);
                    acc[i][2] = _mm256_fmadd_ps(w2, xb, acc[i][2]), acc[i][3] = _mm256_fmadd_ps(w3, xb, acc[i][3]);
                }
            }
            for (int i = 0; i < m; i++)
                for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + (size_t)(t + i) * ldo + c + 8 * j, acc[i][j]);
        }
    for (; c < c1; c++) /* columns past the last strip of 32 */
        for (int t = 0; t < n; t++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += X[(size_t)t * K + k] * _cvtsh_ss(W[(size_t)k * N + c]);
            out[(size_t)t * ldo + c] = s;
        }
}
