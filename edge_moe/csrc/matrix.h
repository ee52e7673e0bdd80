/* A weight matrix as edge_moe's kernels read it, whatever its storage: float32 or float16 rows, or symmetric
 * blocks of 8- or 4-bit codes in onnxruntime's MatMulNBits layout (edge_moe/quant.py), which is what a package's
 * quantized experts and backbone hold, read in place:
 *
 *   # N = rows (output features), K = input features, B = block, nb = ceil(K / B)
 *   codes [N, nb, B * bits / 8] uint8 (4 bits: two a byte, the lower index in the lower nibble), scales [N, nb]
 *   w[n, k] = (code[n, k] - 2^(bits - 1)) * scale[n, k / B]
 *
 * Block codes are multiplied with int8 activations quantized per block as onnxruntime's MatMulNBits does at
 * accuracy_level 4 (scale = max|x| / 127, codes = round-half-even(x * 127 / max|x|)), so that both compute the same
 * products to float32 rounding; the integer sums take AVX-512 VNNI (vpdpbusd: unsigned codes times signed
 * activations), the zero point comes off afterwards as 2^(bits - 1) * scale * the activations' block sums; without
 * VNNI, AVX2's vpmaddubsw (at 8 bits over codes - 128, whose sign moves onto the activations).
 */
#ifndef EDGE_MOE_MATRIX_H
#define EDGE_MOE_MATRIX_H
#include <stdint.h>

typedef struct {
    const void *w;        /* float32 / float16 [rows, k], or block codes [rows, blocks, block * bits / 8] */
    const float *scales;  /* block codes: [rows, blocks]; else NULL */
    int rows, k, bits, block; /* bits: 32, 16, 8 or 4; block: a multiple of 32 (block codes only) */
} edge_moe_matrix;

/* Activations quantized for block matrices of one (bits, block): per token `blocks * block` int8 codes (zeros past
 * k), laid out as the kernel reads them (4 bits: each chunk of 128, 64 or 32 codes as its even then its odd
 * positions, which is how a nibble-packed row unpacks), a scale and scale * sum(codes) a block. For the AVX-512
 * kernels also a lane view (NULL otherwise): for each 4 bytes of a row's codes, which vpdpbusd sums into one int32
 * lane, the scale of their block (lane_scale) and -2^(bits - 1) x the sum of the activation codes they multiply
 * (lane_zero): it seeds the lane's integer sum, so the zero point comes off exactly in int32 and every step's scales
 * are one load; `lanes` a token (a row's code bytes / 4). */
typedef struct {
    int8_t *q;
    float *scale, *sum, *lane_scale;
    int32_t *lane_zero;
    int k, bits, block, blocks, lanes;
} edge_moe_qx;

/* Chooses the block-code kernels: the CPU's best (0: call once before the rest), or at most `which` (tests): 3
 * AVX-512 F/BW/VL/DQ with VNNI, 2 AVX-VNNI (256-bit vpdpbusd), 1 AVX2 (FMA and F16C too, which the float16 kernels
 * already need). */
void edge_moe_blocks_use(int which);

/* Which block-code kernels run (3, 2 or 1 as above). */
int edge_moe_blocks_supported(void);

/* Rows ahead the block kernels prefetch: each row is read once, cold, so they ask for the codes and scales of the
 * rows two decode passes on (as f16_rows.c does; without it a 4-bit matrix read at 5 GB/s where float16 rows stream
 * at 30), and a prefill tile for the rows two tiles on. */
#define PREFETCH_BLOCK_ROWS 8

/* The bytes of a row's next step from byte `at` of `row_bytes`: 64, then 32, then 16 for the rest (a row is whole
 * blocks of a multiple of 32 codes: at 4 bits a multiple of 16 bytes). The activations' layout follows the same
 * steps. */
static inline int step_bytes(int at, int row_bytes) {
    int left = row_bytes - at;
    return left >= 64 ? 64 : left >= 32 ? 32 : 16;
}

/* Blocks of a row of k values: ceil(k / block). */
static inline int qx_blocks(int k, int block) { return (k + block - 1) / block; }

/* Quantizes tokens t0 <= t < t1 of x [n, k] (row stride k) into qx (whose k, bits, block, blocks are set). */
void edge_moe_quantize(const float *x, const edge_moe_qx *qx, int t0, int t1);

/* out[t * ldo + r] = W[r] . x[t] for rows r0 <= r < r1 and tokens t < n: x [n, k] float32 for float rows, qx for
 * block codes (quantized from the same x). buf: 4 k + 8 floats of the calling thread's scratch. */
void edge_moe_matrix_times(const edge_moe_matrix *m, int r0, int r1, const float *x, const edge_moe_qx *qx, int n,
                           float *out, int ldo, float *buf);

/* Buffers for n tokens' activations quantized for m, where m is block codes and qx has none yet (the first of an
 * input's consumers sizes them; nothing for float rows): 0, or -1 without memory (free them all the same). */
int edge_moe_qx_alloc(edge_moe_qx *qx, const edge_moe_matrix *m, int n);
void edge_moe_qx_free(edge_moe_qx *qx);

/* The AVX-VNNI block kernels (blocks_vnni256.c), as edge_moe_matrix_times calls them for block codes. */
void edge_moe_blocks_vnni256(const edge_moe_matrix *m, int r0, int r1, const edge_moe_qx *qx, int n, float *out,
                             int ldo);

/* One token's lane view (above) from its codes q and block scales, without AVX-512. */
void edge_moe_lane_view_portable(const edge_moe_qx *qx, const int8_t *q, const float *scale, float *lane_scale,
                                 int32_t *lane_zero);

/* Tokens `first` .. of qx as activations of their own (an expert's tokens among a layer's). */
edge_moe_qx edge_moe_qx_from(const edge_moe_qx *qx, int first);

/* A product of a matrix with n tokens x (quantized into qx where the matrix is block codes): out[t * ldo + r]. */
typedef struct {
    const edge_moe_matrix *m;
    const float *x;
    const edge_moe_qx *qx;
    float *out;
    int ldo;
} edge_moe_product;

/* Called by every thread of a parallel region: the rows of `count` (<= 8) products in shares (row_block) handed out
 * in turn; buf is the calling thread's scratch (4 k + 8 floats for the widest k). */
void edge_moe_run_products(const edge_moe_product *ps, int count, int n, float *buf);

/* Called by every thread of a parallel region: x [n, k] quantized into qx where it has buffers (block codes). */
void edge_moe_quantize_team(const edge_moe_qx *qx, const float *x, int n);

/* out [n, rows] = x [n, k] W^T on `threads` threads; 0, or -1 without memory. */
int edge_moe_matmul(const edge_moe_matrix *m, const float *x, int n, float *out, int threads);

/* Rows `first` .. first + rows of m as a matrix of their own (an expert's rows of a stacked tensor). */
edge_moe_matrix edge_moe_sub_rows(const edge_moe_matrix *m, int first, int rows);

#endif
