/* Weight matrices of any storage times float32 activations (matrix.h): float16 rows go to f16_rows.c, float32 rows
 * and block codes are here. Block codes go 64 bytes a step (128 codes at 4 bits, 64 at 8), summed in int32 by
 * vpdpbusd from a seed that takes the zero point off (the activations' lane view), each step's sums scaled per
 * block in float32: one token (decode, memory bound) four rows a pass, several (prefill, compute bound) tiles of
 * two or four rows x four tokens; both prefetch the codes of the rows ahead, which are read cold either way.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "f16_rows.h"
#include "matrix.h"
#include "scratch.h"

#define BLOCKS __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

/* Rows of a prefill tile of four tokens: four from four tokens on, two for two or three. Four rows made a prefill
 * slower while the tiles kept their accumulators on the stack (q3-q8b8r: 108 -> 119 ms); with named variables they
 * pay from four tokens on (a 4-bit 1024 x 512 matrix times 8 tokens, rows read from memory: 38.9 -> 33.9 us, 8-bit
 * 56.4 -> 48.6; q3-q4b8r's 64-token prefill 1,943 -> 2,090 tok/s on one thread). */
#define MANY_TOKENS 4

/* The block kernels in use (edge_moe_blocks_use): 3 AVX-512 VNNI (here), 2 AVX-VNNI (blocks_vnni256.c), 1 AVX2. */
static int level;
#define use_512 (level == 3)

void edge_moe_blocks_use(int which) {
    __builtin_cpu_init();
    int best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                       __builtin_cpu_supports("avx512dq")
                   ? 3
               : __builtin_cpu_supports("avxvnni") ? 2
                                                   : 1;
    level = which > 0 && which < best ? which : best;
}

int edge_moe_blocks_supported(void) { return level; }

edge_moe_matrix edge_moe_sub_rows(const edge_moe_matrix *m, int first, int rows) {
    edge_moe_matrix s = *m;
    size_t row_bytes = m->bits >= 16 ? (size_t)m->k * (m->bits / 8)
                                     : (size_t)qx_blocks(m->k, m->block) * m->block * m->bits / 8;
    s.w = (const uint8_t *)m->w + (size_t)first * row_bytes;
    if (m->scales) s.scales = m->scales + (size_t)first * qx_blocks(m->k, m->block);
    s.rows = rows;
    return s;
}

/* 4 bits: each step of a row of `codes` (step_bytes: 128, then 64, then 32 codes) reordered to its even positions,
 * then its odd ones, which is how a nibble-packed row unpacks. */
static void nibble_order(int8_t *q, int codes) {
    int8_t natural[128];
    for (int at = 0; at < codes;) {
        int c = step_bytes(at / 2, codes / 2); /* the step's bytes: 2c codes */
        memcpy(natural, q + at, (size_t)2 * c);
        for (int i = 0; i < c; i++) q[at + i] = natural[2 * i], q[at + c + i] = natural[2 * i + 1];
        at += 2 * c;
    }
}

/* One token's activations into int8 codes: per block, max|x| over its values (zeros past K), codes of x * 127 /
 * max|x| rounded half to even (onnxruntime's MatMulNBits at accuracy_level 4 computes the inverse from max|x| in one
 * division and rounds so: the same codes bit for bit), its scale and scale * sum(codes); 4 bits in nibble_order. */
BLOCKS static void quantize_token(const float *x, const edge_moe_qx *qx, int8_t *q, float *scale, float *sum) {
    int B = qx->block, nb = qx->blocks, K = qx->k, codes = nb * B;
    for (int b = 0; b < nb; b++) {
        int first = b * B;
        __m512 big = _mm512_setzero_ps();
        for (int i = first; i < first + B && i < K; i += 16) {
            __mmask16 k = K - i >= 16 ? 0xFFFF : (__mmask16)((1u << (K - i)) - 1);
            big = _mm512_max_ps(big, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i)));
        }
        float amax = _mm512_reduce_max_ps(big), inverse = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m512 mul = _mm512_set1_ps(inverse);
        __m512i total = _mm512_setzero_si512();
        for (int i = first; i < first + B; i += 16) {
            __mmask16 k = K - i >= 16 ? 0xFFFF : K > i ? (__mmask16)((1u << (K - i)) - 1) : 0;
            __m512i v = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), mul),
                                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            total = _mm512_add_epi32(total, v);
            _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(v));
        }
        scale[b] = amax / 127.0f;
        sum[b] = scale[b] * (float)_mm512_reduce_add_epi32(total);
    }
    if (qx->bits == 4) nibble_order(q, codes);
}

/* The same codes, scales and sums without AVX-512 (its products and roundings are the same float32 operations). */
static void quantize_token_portable(const float *x, const edge_moe_qx *qx, int8_t *q, float *scale, float *sum) {
    int B = qx->block, nb = qx->blocks, K = qx->k, codes = nb * B;
    for (int b = 0; b < nb; b++) {
        int first = b * B, total = 0;
        float amax = 0.0f;
        for (int i = first; i < first + B && i < K; i++) amax = fmaxf(amax, fabsf(x[i]));
        float inverse = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int i = first; i < first + B; i++) {
            int v = i < K ? (int)nearbyintf(x[i] * inverse) : 0;
            q[i] = (int8_t)v, total += v;
        }
        scale[b] = amax / 127.0f;
        sum[b] = scale[b] * (float)total;
    }
    if (qx->bits == 4) nibble_order(q, codes);
}

/* Per int32 lane of a 64-byte step: the scale of the block it sums (lane j holds bytes 4j .. 4j + 3), from the
 * step's `blocks` scales s[0 ..]. */
BLOCKS static inline __m512 lane_scales(const float *s, int blocks, int block_bytes) {
    if (blocks == 1) return _mm512_set1_ps(s[0]);
    __m512i lane = _mm512_srli_epi32(_mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60),
                                     __builtin_ctz(block_bytes));
    return _mm512_permutexvar_ps(lane, _mm512_castps128_ps512(_mm_maskz_loadu_ps((__mmask8)((1 << blocks) - 1), s)));
}

/* The four sums of a[0..4) in lanes 0..3. */
BLOCKS static inline __m128 reduce4(const __m512 *a) {
    __m256 h[4];
    for (int i = 0; i < 4; i++)
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                                              _mm512_castps_pd(a[i]), 1)));
    __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* The lane view of one quantized token (matrix.h): per step of a row's codes, the sums of the four activation codes
 * each int32 lane multiplies (twice four at 4 bits: the lane's low and high nibbles), by vpdpbusd with ones, times
 * -2^(bits - 1); and the lane's block scale. */
BLOCKS static void lane_view(const edge_moe_qx *qx, const int8_t *q, const float *scale, float *lane_scale,
                             int32_t *lane_zero) {
    int bb = qx->block * qx->bits / 8, row_bytes = qx->blocks * bb, four = qx->bits == 4, shift = __builtin_ctz(bb);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int at = 0; at < row_bytes;) {
        int c = step_bytes(at, row_bytes), b = at >> shift, blocks = c > bb ? c >> shift : 1;
        __mmask64 mask = c == 64 ? ~0ULL : (1ULL << c) - 1;
        __mmask16 lanes = (__mmask16)((1u << (c / 4)) - 1);
        const int8_t *a = q + (four ? 2 * at : at);
        __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_maskz_loadu_epi8(mask, a));
        if (four) sum = _mm512_dpbusd_epi32(sum, ones, _mm512_maskz_loadu_epi8(mask, a + c));
        _mm512_mask_storeu_epi32(lane_zero + at / 4, lanes,
                                 _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, qx->bits - 1)));
        _mm512_mask_storeu_ps(lane_scale + at / 4, lanes, lane_scales(scale + b, blocks, bb));
        at += c;
    }
}

void edge_moe_quantize(const float *x, const edge_moe_qx *qx, int t0, int t1) {
    int nb = qx->blocks, codes = nb * qx->block;
    for (int t = t0; t < t1; t++) {
        int8_t *q = qx->q + (size_t)t * codes;
        float *scale = qx->scale + (size_t)t * nb;
        (use_512 ? quantize_token : quantize_token_portable)(x + (size_t)t * qx->k, qx, q, scale,
                                                             qx->sum + (size_t)t * nb);
        if (qx->lane_scale)
            (use_512 ? lane_view : edge_moe_lane_view_portable)(qx, q, scale, qx->lane_scale + (size_t)t * qx->lanes,
                                                               qx->lane_zero + (size_t)t * qx->lanes);
    }
}

/* One row's step with one token: acc += (codes . activations per int32 lane, seeded with the lane's zero point
 * term) * scale_w * scale_x, lane by lane. */
#define BLOCK_STEP(acc, row, sw_row)                                                                                   \
    do {                                                                                                               \
        const uint8_t *wi = (row) + at;                                                                                \
        if (ahead) _mm_prefetch((const char *)(wi + PREFETCH_BLOCK_ROWS * (size_t)row_bytes), _MM_HINT_T0);           \
        __m512i raw = _mm512_maskz_loadu_epi8(mask, wi), s;                                                            \
        if (four)                                                                                                      \
            s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, _mm512_and_si512(raw, nibble), a_lo),                  \
                                    _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble), a_hi);                        \
        else                                                                                                           \
            s = _mm512_dpbusd_epi32(zero, raw, a_lo);                                                                  \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(lane_scales((sw_row) + b, blocks, bb), sa), acc);  \
    } while (0)

/* One token (decode): four rows a pass, sharing each step's activation codes and lane view; a last pass of fewer
 * rows repeats its first row in the missing places (their sums are not stored). Rows r0 .. r1. */
BLOCKS static void block_rows_one(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, float *out) {
    int nb = qx->blocks, bb = qx->block * m->bits / 8, row_bytes = nb * bb, four = m->bits == 4;
    int shift = __builtin_ctz(bb); /* blocks are a power of two bytes: no division in the loop */
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int r = r0; r < r1; r += 4) {
        int rows = r1 - r < 4 ? r1 - r : 4;
        const uint8_t *w0 = (const uint8_t *)m->w + (size_t)r * row_bytes;
        const uint8_t *w1 = rows > 1 ? w0 + row_bytes : w0, *w2 = rows > 2 ? w0 + 2 * (size_t)row_bytes : w0;
        const uint8_t *w3 = rows > 3 ? w0 + 3 * (size_t)row_bytes : w0;
        const float *s0 = m->scales + (size_t)r * nb, *s1 = rows > 1 ? s0 + nb : s0, *s2 = rows > 2 ? s0 + 2 * nb : s0;
        const float *s3 = rows > 3 ? s0 + 3 * nb : s0;
        int ahead = r + PREFETCH_BLOCK_ROWS + 4 <= r1; /* within this call's rows: the next are another's */
        if (ahead)
            for (int i = 0; i < 4 * nb; i += 16) _mm_prefetch((const char *)(s0 + PREFETCH_BLOCK_ROWS * nb + i), _MM_HINT_T0);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int at = 0; at < row_bytes;) {
            int c = step_bytes(at, row_bytes), b = at >> shift, blocks = c > bb ? c >> shift : 1;
            __mmask64 mask = c == 64 ? ~0ULL : (1ULL << c) - 1;
            __mmask16 lanes = (__mmask16)((1u << (c / 4)) - 1);
            const int8_t *a = qx->q + (four ? 2 * at : at);
            __m512i a_lo = _mm512_maskz_loadu_epi8(mask, a), a_hi = four ? _mm512_maskz_loadu_epi8(mask, a + c) : a_lo;
            __m512i zero = _mm512_maskz_loadu_epi32(lanes, qx->lane_zero + at / 4);
            __m512 sa = _mm512_maskz_loadu_ps(lanes, qx->lane_scale + at / 4);
            BLOCK_STEP(acc[0], w0, s0);
            BLOCK_STEP(acc[1], w1, s1);
            BLOCK_STEP(acc[2], w2, s2);
            BLOCK_STEP(acc[3], w3, s3);
            at += c;
        }
        __m128 sums = reduce4(acc);
        if (rows == 4)
            _mm_storeu_ps(out + r, sums);
        else
            _mm_mask_storeu_ps(out + r, (__mmask8)((1 << rows) - 1), sums);
    }
}

/* A tile's row i (< tile_rows) at this step: its codes unpacked (4 bits: low and high nibbles) and its lane scales. */
#define TILE_ROW(i)                                                                                                    \
    __m512i lo##i = _mm512_setzero_si512(), hi##i = lo##i;                                                             \
    __m512 ws##i = _mm512_setzero_ps();                                                                                \
    if (i < tile_rows) {                                                                                               \
        __m512i raw = _mm512_maskz_loadu_epi8(mask, w##i + at);                                                        \
        if (ahead) _mm_prefetch((const char *)(w##i + at + PREFETCH_BLOCK_ROWS * (size_t)row_bytes), _MM_HINT_T0);    \
        lo##i = four ? _mm512_and_si512(raw, nibble) : raw;                                                            \
        hi##i = four ? _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble) : raw;                                      \
        ws##i = lane_scales(sw##i + b, blocks, bb);                                                                    \
    }

/* Row i times token j at this step, into acc_i_j. */
#define TILE_PAIR(i, j)                                                                                                \
    do {                                                                                                               \
        __m512i s = _mm512_dpbusd_epi32(zero, lo##i, x_lo);                                                            \
        if (four) s = _mm512_dpbusd_epi32(s, hi##i, x_hi);                                                             \
        acc##i##j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(ws##i, xs), acc##i##j);                       \
    } while (0)

/* Token j's activations and lane view at this step, times each row of the tile. */
#define TILE_TOKEN(j)                                                                                                  \
    do {                                                                                                               \
        __m512i x_lo = _mm512_maskz_loadu_epi8(mask, a##j + a_at), x_hi = x_lo;                                        \
        if (four) x_hi = _mm512_maskz_loadu_epi8(mask, a##j + a_at + c);                                               \
        __m512i zero = _mm512_maskz_loadu_epi32(lanes, za##j + at / 4);                                                \
        __m512 xs = _mm512_maskz_loadu_ps(lanes, sa##j + at / 4);                                                      \
        TILE_PAIR(0, j);                                                                                               \
        TILE_PAIR(1, j);                                                                                               \
        if (tile_rows > 2) {                                                                                           \
            TILE_PAIR(2, j);                                                                                           \
            TILE_PAIR(3, j);                                                                                           \
        }                                                                                                              \
    } while (0)

/* Row i's sums with the tile's tokens, stored where the row and the tokens are real. */
#define TILE_STORE(i)                                                                                                  \
    do {                                                                                                               \
        if (i < tile_rows && i < rows) {                                                                               \
            __m512 sums4[4] = {acc##i##0, acc##i##1, acc##i##2, acc##i##3};                                            \
            _mm_storeu_ps(sums, reduce4(sums4));                                                                       \
            for (int j = 0; j < n; j++) out[(size_t)(t0 + j) * ldo + r + i] = sums[j];                                 \
        }                                                                                                              \
    } while (0)

/* Several tokens (prefill): a tile of `tile_rows` rows (2 or 4: a constant where it is inlined) x four tokens, each
 * step's codes unpacked once for the four tokens and each token's activations loaded once for all the rows (the
 * float scaling of every step's sums, not the int8 products, is what prefill spends its time on). A tile of fewer
 * rows or tokens repeats its first in the missing places (their sums are not stored). Rows r .. (< r1), tokens
 * t0 .. t0 + n (n <= 4). The tile is named variables, not arrays: GCC kept arrays of accumulators on the stack,
 * storing every step's sums there. */
BLOCKS static inline __attribute__((always_inline)) void block_tile(const edge_moe_matrix *m, int r, int r1,
                                                                     const edge_moe_qx *qx, int t0, int n, float *out,
                                                                     int ldo, const int tile_rows) {
    int nb = qx->blocks, codes = nb * qx->block, bb = qx->block * m->bits / 8, row_bytes = nb * bb;
    int four = m->bits == 4, shift = __builtin_ctz(bb), rows = r1 - r < tile_rows ? r1 - r : tile_rows;
    const uint8_t *w0 = (const uint8_t *)m->w + (size_t)r * row_bytes;
    const uint8_t *w1 = rows > 1 ? w0 + row_bytes : w0, *w2 = rows > 2 ? w0 + 2 * (size_t)row_bytes : w0;
    const uint8_t *w3 = rows > 3 ? w0 + 3 * (size_t)row_bytes : w0;
    const float *sw0 = m->scales + (size_t)r * nb, *sw1 = rows > 1 ? sw0 + nb : sw0;
    const float *sw2 = rows > 2 ? sw0 + 2 * nb : sw0, *sw3 = rows > 3 ? sw0 + 3 * nb : sw0;
    /* the codes of the rows PREFETCH_BLOCK_ROWS on, step by step, and their scales, on the first tokens' pass over
     * these rows (rows of this call only: the next are another thread's) */
    int ahead = t0 == 0 && r + PREFETCH_BLOCK_ROWS + tile_rows <= r1;
    if (ahead)
        for (int i = 0; i < tile_rows * nb; i += 16)
            _mm_prefetch((const char *)(sw0 + PREFETCH_BLOCK_ROWS * nb + i), _MM_HINT_T0);
    /* token j's codes, lane scales and lane zeros; a missing token repeats t0 */
#define TILE_TOKEN_AT(j)                                                                                               \
    int token##j = t0 + (j < n ? j : 0);                                                                               \
    const int8_t *a##j = qx->q + (size_t)token##j * codes;                                                             \
    const float *sa##j = qx->lane_scale + (size_t)token##j * qx->lanes;                                                \
    const int32_t *za##j = qx->lane_zero + (size_t)token##j * qx->lanes;
    TILE_TOKEN_AT(0) TILE_TOKEN_AT(1) TILE_TOKEN_AT(2) TILE_TOKEN_AT(3)
#undef TILE_TOKEN_AT
    __m512 acc00 = _mm512_setzero_ps(), acc01 = acc00, acc02 = acc00, acc03 = acc00, acc10 = acc00, acc11 = acc00;
    __m512 acc12 = acc00, acc13 = acc00, acc20 = acc00, acc21 = acc00, acc22 = acc00, acc23 = acc00, acc30 = acc00;
    __m512 acc31 = acc00, acc32 = acc00, acc33 = acc00;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int at = 0; at < row_bytes;) {
        int c = step_bytes(at, row_bytes), b = at >> shift, blocks = c > bb ? c >> shift : 1, a_at = four ? 2 * at : at;
        __mmask64 mask = c == 64 ? ~0ULL : (1ULL << c) - 1;
        __mmask16 lanes = (__mmask16)((1u << (c / 4)) - 1);
        TILE_ROW(0)
        TILE_ROW(1)
        TILE_ROW(2)
        TILE_ROW(3)
        TILE_TOKEN(0);
        TILE_TOKEN(1);
        TILE_TOKEN(2);
        TILE_TOKEN(3);
        at += c;
    }
    float sums[4];
    TILE_STORE(0);
    TILE_STORE(1);
    TILE_STORE(2);
    TILE_STORE(3);
}

BLOCKS static void block_rows_tiles2(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, int n,
                                     float *out, int ldo) {
    for (int r = r0; r < r1; r += 2)
        for (int t = 0; t < n; t += 4) block_tile(m, r, r1, qx, t, n - t < 4 ? n - t : 4, out, ldo, 2);
}

BLOCKS static void block_rows_tiles4(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, int n,
                                     float *out, int ldo) {
    for (int r = r0; r < r1; r += 4)
        for (int t = 0; t < n; t += 4) block_tile(m, r, r1, qx, t, n - t < 4 ? n - t : 4, out, ldo, 4);
}

/* AVX2 (no VNNI): a row times one token at a time, 32 bytes of codes a pass. 4 bits: vpmaddubsw of the codes
 * (0..15) with the activations, pairs to int32 by vpmaddwd (at most 2 x 15 x 127: no saturation), the zero point
 * taken off as on the AVX-512 path. 8 bits: codes - 128 as signed bytes, whose sign moves onto the activations
 * (|w| x sign(a, w): at most 2 x 128 x 127 < 32768), so the zero point is already off. */
KERNEL static void block_rows_avx2(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, int n, float *out,
                                   int ldo) {
    int nb = qx->blocks, codes = nb * qx->block, bb = qx->block * m->bits / 8, row_bytes = nb * bb;
    int four = m->bits == 4, shift = __builtin_ctz(bb);
    const __m256i nibble = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    const __m256i lane = _mm256_srli_epi32(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), shift);
    for (int r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)m->w + (size_t)r * row_bytes;
        const float *sw = m->scales + (size_t)r * nb;
        if (n == 1 && r + 8 < r1) _mm_prefetch((const char *)(w + 8 * (size_t)row_bytes), _MM_HINT_T0);
        for (int t = 0; t < n; t++) {
            const int8_t *a = qx->q + (size_t)t * codes;
            const float *sa = qx->scale + (size_t)t * nb;
            __m256 acc = _mm256_setzero_ps();
            for (int at = 0; at < row_bytes;) {
                int c = step_bytes(at, row_bytes);
                for (int h = 0; h < c; h += 32) { /* a 64-byte step in two halves; a 16-byte one zero-extended */
                    int bytes = c - h < 32 ? c - h : 32, b = (at + h) >> shift;
                    __m256i raw = bytes == 32 ? _mm256_loadu_si256((const __m256i *)(w + at + h))
                                              : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(w + at + h)));
                    __m256i s;
                    if (four) {
                        const int8_t *x = a + 2 * at + h; /* the step's even positions, then (c on) its odd ones */
                        __m256i x_lo = bytes == 32 ? _mm256_loadu_si256((const __m256i *)x)
                                                   : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)x));
                        __m256i x_hi = bytes == 32 ? _mm256_loadu_si256((const __m256i *)(x + c))
                                                   : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(x + c)));
                        __m256i lo = _mm256_and_si256(raw, nibble);
                        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
                        s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, x_lo), ones),
                                             _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x_hi), ones));
                    } else {
                        __m256i x = _mm256_loadu_si256((const __m256i *)(a + at + h)); /* 8 bits: halves of 32 */
                        __m256i wv = _mm256_xor_si256(raw, flip);
                        s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(x, wv)), ones);
                    }
                    /* lane j sums bytes 4j .. 4j + 3 of these 32: block b + (4j >> shift) (one or two blocks) */
                    __m256 scales = bb >= 32 ? _mm256_set1_ps(sw[b] * sa[b])
                                             : _mm256_permutevar8x32_ps(_mm256_setr_ps(
                                                   sw[b] * sa[b], bytes == 32 ? sw[b + 1] * sa[b + 1] : 0.0f, 0, 0,
                                                   0, 0, 0, 0), lane);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scales, acc);
                }
                at += c;
            }
            float total = hsum(acc);
            if (four)
                for (int b = 0; b < nb; b++) total -= 8.0f * sw[b] * qx->sum[(size_t)t * nb + b];
            out[(size_t)t * ldo + r] = total;
        }
    }
}

BLOCKS static void block_rows(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, int n, float *out,
                              int ldo) {
    if (n == 1)
        block_rows_one(m, r0, r1, qx, out);
    else if (n >= MANY_TOKENS)
        block_rows_tiles4(m, r0, r1, qx, n, out, ldo);
    else
        block_rows_tiles2(m, r0, r1, qx, n, out, ldo);
}

/* Float32 rows: four rows a pass over each token (the router of a float32 package, its head). */
KERNEL static void f32_rows(const float *W, int K, int r0, int r1, const float *X, int n, float *out, int ldo) {
    int K8 = K & ~7, r = r0;
    for (; r + 4 <= r1; r += 4)
        for (int t = 0; t < n; t++) four_rows_times(W + (size_t)r * K, K, X + (size_t)t * K, out + (size_t)t * ldo + r);
    for (; r < r1; r++)
        for (int t = 0; t < n; t++) {
            const float *w = W + (size_t)r * K, *x = X + (size_t)t * K;
            __m256 a = _mm256_setzero_ps();
            for (int c = 0; c < K8; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a);
            float s = hsum(a);
            for (int c = K8; c < K; c++) s += w[c] * x[c];
            out[(size_t)t * ldo + r] = s;
        }
}

void edge_moe_matrix_times(const edge_moe_matrix *m, int r0, int r1, const float *x, const edge_moe_qx *qx, int n,
                           float *out, int ldo, float *buf) {
    if (m->bits == 16)
        edge_moe_rows_times((const uint16_t *)m->w, m->k, r0, r1, x, n, out, ldo, buf);
    else if (m->bits == 32)
        f32_rows((const float *)m->w, m->k, r0, r1, x, n, out, ldo);
    else if (use_512)
        block_rows(m, r0, r1, qx, n, out, ldo);
    else if (level == 2)
        edge_moe_blocks_vnni256(m, r0, r1, qx, n, out, ldo);
    else
        block_rows_avx2(m, r0, r1, qx, n, out, ldo);
}

int edge_moe_qx_alloc(edge_moe_qx *qx, const edge_moe_matrix *m, int n) {
    if (!m->w || m->bits >= 16 || qx->q) return 0; /* float rows read x itself; an input's first consumer sized it */
    qx->k = m->k, qx->bits = m->bits, qx->block = m->block, qx->blocks = qx_blocks(m->k, m->block);
    qx->q = edge_moe_scratch((size_t)n * qx->blocks * qx->block + 64);
    qx->scale = edge_moe_scratch(sizeof(float) * ((size_t)n * qx->blocks + 16));
    qx->sum = edge_moe_scratch(sizeof(float) * ((size_t)n * qx->blocks + 16));
    qx->lanes = qx->blocks * qx->block * qx->bits / 32;
    if (level >= 2) {
        qx->lane_scale = edge_moe_scratch(sizeof(float) * ((size_t)n * qx->lanes + 16));
        qx->lane_zero = edge_moe_scratch(sizeof(int32_t) * ((size_t)n * qx->lanes + 16));
        if (!qx->lane_scale || !qx->lane_zero) return -1;
    }
    return qx->q && qx->scale && qx->sum ? 0 : -1;
}

void edge_moe_qx_free(edge_moe_qx *qx) {
    edge_moe_scratch_free(qx->q), edge_moe_scratch_free(qx->scale), edge_moe_scratch_free(qx->sum);
    edge_moe_scratch_free(qx->lane_scale), edge_moe_scratch_free(qx->lane_zero);
    qx->q = NULL, qx->scale = qx->sum = qx->lane_scale = NULL, qx->lane_zero = NULL;
}

edge_moe_qx edge_moe_qx_from(const edge_moe_qx *qx, int first) {
    edge_moe_qx view = *qx;
    if (qx->q) {
        view.q += (size_t)first * qx->blocks * qx->block;
        view.scale += (size_t)first * qx->blocks, view.sum += (size_t)first * qx->blocks;
    }
    if (qx->lane_scale) view.lane_scale += (size_t)first * qx->lanes, view.lane_zero += (size_t)first * qx->lanes;
    return view;
}

void edge_moe_run_products(const edge_moe_product *ps, int count, int n, float *buf) {
    int first[8], block[8], total = 0, threads = 1;
#ifdef _OPENMP
    threads = omp_get_num_threads();
#endif
    for (int i = 0; i < count; i++)
        block[i] = row_block(ps[i].m->rows, threads), first[i] = total,
        total += (ps[i].m->rows + block[i] - 1) / block[i];
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < total; item++) {
        int i = count - 1;
        while (first[i] > item) i--;
        const edge_moe_product *p = ps + i;
        int rows = p->m->rows, r0 = (item - first[i]) * block[i], r1 = r0 + block[i] < rows ? r0 + block[i] : rows;
        edge_moe_matrix_times(p->m, r0, r1, p->x, p->qx, n, p->out, p->ldo, buf);
    }
}

void edge_moe_quantize_team(const edge_moe_qx *qx, const float *x, int n) {
    if (!qx->q) return;
#pragma omp for schedule(static)
    for (int t = 0; t < n; t++) edge_moe_quantize(x, qx, t, t + 1);
}

int edge_moe_matmul(const edge_moe_matrix *m, const float *x, int n, float *out, int threads) {
    if (threads < 1) threads = 1;
    edge_moe_qx qx = {0};
    size_t buf_floats = 4 * (size_t)m->k + 8;
    float *bufs = edge_moe_scratch(sizeof(float) * buf_floats * threads);
    int ok = edge_moe_qx_alloc(&qx, m, n) == 0 && bufs;
    if (ok) {
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            edge_moe_product product = {m, x, &qx, out, m->rows};
            edge_moe_quantize_team(&qx, x, n);
            edge_moe_run_products(&product, 1, n, bufs + buf_floats * team_thread());
        }
    }
    edge_moe_qx_free(&qx);
    edge_moe_scratch_free(bufs);
    return ok ? 0 : -1;
}
