/* Float16 weight rows times float32 activations on an x86 CPU (AVX2/FMA/F16C, AVX-512 where the CPU has it): what
 * edge_moe's own kernels share (moe.c: a MoE layer's routed experts; layer.c: a decoder layer's attention
 * block and router). Weights are [rows, K] float16, Hugging Face's [out, in] layout; activations [n, K] float32.
 */
#ifndef EDGE_MOE_F16_ROWS_H
#define EDGE_MOE_F16_ROWS_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define KERNEL __attribute__((target("avx2,fma,f16c")))
#define ROW_BLOCK 16 /* the rows of a work item are a multiple of this: 4 groups of 4 */

/* Rows of one work item of a product on `threads`: a contiguous share, two a thread (one on one thread), so that
 * each thread streams its rows in order and prefetches within them, for one token and for several. With blocks of
 * 16 handed out in turn two threads decoded slower than one (q3-q4b8r 549 -> 483-510 tok/s: a block's rows
 * prefetched ahead were the next block's, which the other thread read), and a prefill's blocks each began cold
 * (4-bit 1024 x 512 times 8 tokens, rows read from memory: 72 us in blocks of 16, 43 in one share). */
static inline int row_block(int rows, int threads) {
    int shares = threads > 1 ? 2 * threads : 1, share = (rows + shares - 1) / shares;
    return share < ROW_BLOCK ? ROW_BLOCK : (share + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK;
}

/* This thread's number in the OpenMP team running it (0 without OpenMP): which scratch slice is its own. */
static inline int team_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Whether this CPU has AVX2, FMA and F16C (and notes AVX-512 for the tiles); call once before the rest. */
int edge_moe_f16_supported(void);

/* out[t * ldo + r] = W[r] . X[t] for rows r0 <= r < r1 of W [rows, K] and tokens t < n of X [n, K]; buf: scratch of
 * 4 K + 8 floats (the caller's thread's own). */
void edge_moe_rows_times(const uint16_t *W, int K, int r0, int r1, const float *X, int n, float *out,
                         int ldo, float *buf);

/* out[t * ldo + c] = X[t] . W[:, c] for columns c0 <= c < c1 of W [K, N] (float16 [in, out], the package's expert
 * layout) and tokens t < n of X [n, K]. */
void edge_moe_xw(const uint16_t *W, int K, int N, int c0, int c1, const float *X, int n, float *out, int ldo);

KERNEL static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

KERNEL static inline __m256 load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline float tail(const float *w, const float *x, int from, int K) {
    float s = 0.0f;
    for (int c = from; c < K; c++) s += w[c] * x[c];
    return s;
}

/* o[i] = b[i K ..] . x for four float32 rows b [4, K] (float16 ones converted, or a float32 matrix's) and one token x [K]. */
KERNEL static inline void four_rows_times(const float *b, int K, const float *x, float *o) {
    const float *b0 = b, *b1 = b + K, *b2 = b + 2 * K, *b3 = b + 3 * K;
    int K8 = K & ~7;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < K8; c += 8) {
        __m256 v = _mm256_loadu_ps(x + c);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(b0 + c), v, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(b1 + c), v, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(b2 + c), v, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(b3 + c), v, a3);
    }
    o[0] = hsum(a0) + tail(b0, x, K8, K), o[1] = hsum(a1) + tail(b1, x, K8, K);
    o[2] = hsum(a2) + tail(b2, x, K8, K), o[3] = hsum(a3) + tail(b3, x, K8, K);
}

/* e^x for eight floats: x = n ln2 + r, 2^n from the exponent bits, e^r by Cephes' expf polynomial (relative error
 * near 1e-7); x is clamped to [-87, 88] (e^-87 ~ 1.6e-38: nothing a softmax or SiLU sees). */
KERNEL static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts: r stays exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* silu(v) = v / (1 + e^-v) for eight floats. */
KERNEL static inline __m256 silu8(__m256 v) {
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

/* h[j] = silu(gate[j]) * up[j] for j < F: a SwiGLU whose gate and up values lie in two runs (an expert's gate | up
 * columns, a shared expert's gate and up rows). */
KERNEL static inline void swiglu(const float *gate, const float *up, int F, float *h) {
    int j = 0;
    for (; j + 8 <= F; j += 8)
        _mm256_storeu_ps(h + j, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + j)), _mm256_loadu_ps(up + j)));
    for (; j < F; j++) h[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

#endif
