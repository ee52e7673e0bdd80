/* Block codes times quantized activations with AVX-VNNI (256-bit vpdpbusd, no AVX-512): Intel's laptop and desktop
 * CPUs since Alder Lake (2021), which have no AVX-512 (AMD's since Zen 4 have AVX-512 VNNI: matrix.c). The
 * arithmetic is matrix.c's AVX-512 one, lane for lane: each int32 lane sums the products of 4 bytes of codes, seeded
 * with the activations' lane view (the zero point, exactly), then is scaled by its block's weight scale times its
 * activation scale. A 64-byte step of the activations' layout goes as two halves of 32 bytes (at 4 bits the low
 * nibbles of half h multiply the step's even codes from h on, the high nibbles its odd ones from c + h on); a 16-byte
 * step as one zero-extended half. One token: four rows a pass, their codes prefetched ahead. Several: tiles of two
 * rows x four tokens.
 */
#include <immintrin.h>
#include <stdint.h>

#include "f16_rows.h"
#include "matrix.h"

#define VNNI256 __attribute__((target("avxvnni,avx2,fma,f16c")))

/* `bytes` (32 or 16: zero-extended) from p. */
VNNI256 static inline __m256i load_half(const void *p, int bytes) {
    return bytes == 32 ? _mm256_loadu_si256((const __m256i *)p)
                       : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

/* The weight scales of the 8 lanes of a half from byte `at` of a row: lane j holds bytes at + 4j .. of block
 * (at + 4j) >> shift, one or two blocks in 32 bytes (blocks of 16 bytes or more). */
VNNI256 static inline __m256 half_scales(const float *s, int at, int bytes, int shift, __m256i lane) {
    int b = at >> shift;
    if ((1 << shift) >= 32 || bytes <= (1 << shift)) return _mm256_set1_ps(s[b]);
    /* blocks b and b + 1, one load */
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)(s + b)))),
                                    lane);
}

/* A half's activations: codes (4 bits: low and high nibbles' partners), lane zeros and lane scales. */
typedef struct {
    __m256i lo, hi, zero;
    __m256 scale;
} half_x;

/* Token t's activations: where its codes, lane zeros and lane scales begin (computed once a tile, not a step). */
typedef struct {
    const int8_t *q;
    const int32_t *zero;
    const float *scale;
} token_x;

static inline token_x token_at(const edge_moe_qx *qx, int t) {
    token_x x = {qx->q + (size_t)t * qx->blocks * qx->block, qx->lane_zero + (size_t)t * qx->lanes,
                 qx->lane_scale + (size_t)t * qx->lanes};
    return x;
}

VNNI256 static inline half_x load_x(token_x t, int at, int c, int h, int bytes, int four) {
    half_x x;
    x.lo = load_half(t.q + (four ? 2 * at : at) + h, bytes);
    x.hi = four ? load_half(t.q + 2 * at + c + h, bytes) : x.lo;
    x.zero = load_half(t.zero + (at + h) / 4, bytes); /* a lane per 4 bytes of codes: 8 or 4 */
    x.scale = _mm256_castsi256_ps(load_half(t.scale + (at + h) / 4, bytes));
    return x;
}

/* A row's half of codes as vpdpbusd takes them: 4 bits as low and high nibbles, 8 bits as they are. */
typedef struct {
    __m256i lo, hi;
} half_w;

VNNI256 static inline half_w unpack(__m256i raw, int four) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    half_w w = {raw, raw};
    if (four) w.lo = _mm256_and_si256(raw, nibble), w.hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
    return w;
}

/* Codes times activations for one row's half: the lane sums, seeded with the lane zeros. */
VNNI256 static inline __m256i half_sums(half_w w, const half_x *x, int four) {
    __m256i s = _mm256_dpbusd_avx_epi32(x->zero, w.lo, x->lo);
    return four ? _mm256_dpbusd_avx_epi32(s, w.hi, x->hi) : s;
}

/* One token: rows r0 .. r1, four a pass (a last pass of fewer repeats its first row; those sums are not stored). */
VNNI256 static void rows_one(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, float *out) {
    int nb = qx->blocks, bb = qx->block * m->bits / 8, row_bytes = nb * bb, four = m->bits == 4;
    int shift = __builtin_ctz(bb);
    size_t ahead_bytes = PREFETCH_BLOCK_ROWS * (size_t)row_bytes;
    const __m256i lane = _mm256_srli_epi32(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), shift);
    for (int r = r0; r < r1; r += 4) {
        int rows = r1 - r < 4 ? r1 - r : 4, ahead = r + PREFETCH_BLOCK_ROWS + 4 <= r1;
        const uint8_t *w[4];
        const float *sw[4];
        token_x token = token_at(qx, 0);
        for (int i = 0; i < 4; i++) {
            int row = r + (i < rows ? i : 0);
            w[i] = (const uint8_t *)m->w + (size_t)row * row_bytes, sw[i] = m->scales + (size_t)row * nb;
        }
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (int at = 0; at < row_bytes;) {
            int c = step_bytes(at, row_bytes);
            for (int h = 0; h < c; h += 32) {
                int bytes = c - h < 32 ? c - h : 32;
                half_x x = load_x(token, at, c, h, bytes, four);
#define ONE_ROW(i)                                                                                                     \
    do {                                                                                                               \
        if (ahead) _mm_prefetch((const char *)(w[i] + at + h + ahead_bytes), _MM_HINT_T0);                             \
        __m256i s = half_sums(unpack(load_half(w[i] + at + h, bytes), four), &x, four);                                \
        acc##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s),                                                                \
                                 _mm256_mul_ps(half_scales(sw[i], at + h, bytes, shift, lane), x.scale), acc##i);     \
    } while (0)
                ONE_ROW(0);
                ONE_ROW(1);
                ONE_ROW(2);
                ONE_ROW(3);
#undef ONE_ROW
            }
            at += c;
        }
        float sums[4] = {hsum(acc0), hsum(acc1), hsum(acc2), hsum(acc3)};
        for (int i = 0; i < rows; i++) out[r + i] = sums[i];
    }
}

/* Token j of a tile times both rows at this half step, into a0j and a1j. */
#define TILE_TOKEN(j)                                                                                                  \
    do {                                                                                                               \
        half_x x = load_x(x##j, at, c, h, bytes, four);                                                                \
        a0##j = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_sums(raw0, &x, four)), _mm256_mul_ps(ws0, x.scale), a0##j);    \
        a1##j = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_sums(raw1, &x, four)), _mm256_mul_ps(ws1, x.scale), a1##j);    \
    } while (0)

/* Stores row i's sums with the tile's real tokens. */
#define TILE_STORE(i)                                                                                                  \
    do {                                                                                                               \
        float sums[4] = {hsum(a##i##0), hsum(a##i##1), hsum(a##i##2), hsum(a##i##3)};                              \
        for (int j = 0; j < tokens; j++) out[(size_t)(t + j) * ldo + r + i] = sums[j];                                 \
    } while (0)

/* Several tokens: tiles of two rows x four tokens, named variables (an array of accumulators GCC keeps on the
 * stack); a missing row or token repeats the first (its sums are not stored). Eight accumulators, two rows' codes
 * and scales and a token's activations are 18 vectors for AVX2's 16 registers: the compiler keeps a few in L1. */
VNNI256 static void rows_tiles(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, int n, float *out,
                               int ldo) {
    int nb = qx->blocks, bb = qx->block * m->bits / 8, row_bytes = nb * bb, four = m->bits == 4;
    int shift = __builtin_ctz(bb);
    size_t ahead_bytes = PREFETCH_BLOCK_ROWS * (size_t)row_bytes;
    const __m256i lane = _mm256_srli_epi32(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), shift);
    for (int r = r0; r < r1; r += 2) {
        int rows = r1 - r < 2 ? r1 - r : 2;
        const uint8_t *w0 = (const uint8_t *)m->w + (size_t)r * row_bytes, *w1 = rows > 1 ? w0 + row_bytes : w0;
        const float *s0 = m->scales + (size_t)r * nb, *s1 = rows > 1 ? s0 + nb : s0;
        for (int t = 0; t < n; t += 4) {
            int tokens = n - t < 4 ? n - t : 4, ahead = t == 0 && r + PREFETCH_BLOCK_ROWS + 2 <= r1;
            token_x x0 = token_at(qx, t), x1 = token_at(qx, tokens > 1 ? t + 1 : t);
            token_x x2 = token_at(qx, tokens > 2 ? t + 2 : t), x3 = token_at(qx, tokens > 3 ? t + 3 : t);
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
            __m256 a13 = a00;
            for (int at = 0; at < row_bytes;) {
                int c = step_bytes(at, row_bytes);
                for (int h = 0; h < c; h += 32) {
                    int bytes = c - h < 32 ? c - h : 32;
                    if (ahead) {
                        _mm_prefetch((const char *)(w0 + at + h + ahead_bytes), _MM_HINT_T0);
                        _mm_prefetch((const char *)(w1 + at + h + ahead_bytes), _MM_HINT_T0);
                    }
                    half_w raw0 = unpack(load_half(w0 + at + h, bytes), four);
                    half_w raw1 = unpack(load_half(w1 + at + h, bytes), four);
                    __m256 ws0 = half_scales(s0, at + h, bytes, shift, lane);
                    __m256 ws1 = half_scales(s1, at + h, bytes, shift, lane);
                    TILE_TOKEN(0);
                    TILE_TOKEN(1);
                    TILE_TOKEN(2);
                    TILE_TOKEN(3);
                }
                at += c;
            }
            TILE_STORE(0);
            if (rows > 1) TILE_STORE(1);
        }
    }
}

void edge_moe_blocks_vnni256(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, int n, float *out,
                             int ldo) {
    if (n == 1)
        rows_one(m, r0, r1, qx, out);
    else
        rows_tiles(m, r0, r1, qx, n, out, ldo);
}

/* The lane view (matrix.h) without AVX-512: per 4 bytes of a row's codes, -2^(bits - 1) x the sum of the activation
 * codes they multiply, and their block's activation scale. */
void edge_moe_lane_view_portable(const edge_moe_qx *qx, const int8_t *q, const float *scale, float *lane_scale,
                                 int32_t *lane_zero) {
    int bb = qx->block * qx->bits / 8, row_bytes = qx->blocks * bb, four = qx->bits == 4;
    for (int at = 0; at < row_bytes;) {
        int c = step_bytes(at, row_bytes);
        for (int byte = at; byte < at + c; byte += 4) {
            const int8_t *a = q + (four ? 2 * at : at) + (byte - at);
            int sum = a[0] + a[1] + a[2] + a[3];
            if (four) sum += a[c] + a[c + 1] + a[c + 2] + a[c + 3];
            lane_zero[byte / 4] = -sum * (1 << (qx->bits - 1));
            lane_scale[byte / 4] = scale[byte / bb];
        }
        at += c;
    }
}
