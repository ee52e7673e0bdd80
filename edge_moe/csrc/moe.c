/* A MoE layer's routed SwiGLU experts on an x86 CPU, over the weights as the package holds them (matrix.h: float16
 * rows, or 8- / 4-bit blocks in MatMulNBits' layout read in place): float32 activations and sums.
 *
 * Why it exists: onnxruntime (1.32) has no x86 CPU kernel that reads float16 weights, so float16 experts ran as
 * float32 stacks, twice the bytes a decoded token reads; its QMoE over quantized experts keeps a packed copy of its
 * own (1.7x the stacks) and is one onnxruntime call a layer. This reads the package's bytes once, in place.
 *
 * T = tokens, H = hidden, F = expert intermediate size, E = experts, k = experts per token
 *   fc1 [E * 2F, H] gate and up rows interleaved (row 2j gate j, row 2j + 1 up j: fused_moe.stack_layer and
 *   fused_moe.quantized_stacks), fc2 [E * H, F]
 *   x [T, H], indices [T, k] int64, weights [T, k] float32  ->  y [T, H] = sum_k w * down(silu(gate x) * up x)
 *
 * Each expert runs once on the tokens routed to it: h = silu(x fc1_gate^T) * (x fc1_up^T) [n, F], out = h fc2^T
 * [n, H]; a token's outputs are summed in its routing order. With threads > 1 the rows of every expert's matrices
 * are split between threads (the same sums whatever the split: every output element is one thread's dot product).
 * Block codes take int8 activations quantized per block (matrix.h), as onnxruntime's MatMulNBits and QMoE do.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "f16_rows.h"
#include "matrix.h"
#include "scratch.h"

/* h[r / 2] = silu(g[r]) * g[r + 1] for the interleaved gate/up rows r0 <= r < r1 (r0 even): eight rows' exponentials
 * at a time (exp8; the up rows' are computed and not used), which took prefill's scalar expf off the profile. */
KERNEL static void swiglu_rows(const float *g, int r0, int r1, float *h) {
    int r = r0;
    float silu[8];
    for (; r + 8 <= r1; r += 8) {
        _mm256_storeu_ps(silu, silu8(_mm256_loadu_ps(g + r)));
        for (int j = 0; j < 8; j += 2) h[(r + j) / 2] = silu[j] * g[r + j + 1];
    }
    for (; r < r1; r += 2) h[r / 2] = g[r] / (1.0f + expf(-g[r])) * g[r + 1];
}

/* Returns 0, or -1 when memory for the scratch buffers could not be had (y untouched then). */
KERNEL int edge_moe_moe(const edge_moe_matrix *fc1, const edge_moe_matrix *fc2, int E, const float *x, int T,
                        const int64_t *indices, const float *weights, int k, float *y, int threads) {
    int pairs = T * k, H = fc1->k, F = fc2->k;
    /* group the (token, slot) pairs by expert: rows start[e] .. start[e + 1] of the scratch are expert e's */
    int *count = calloc((size_t)E + 1, sizeof(int)), *start = calloc((size_t)E + 1, sizeof(int));
    int *slot_row = edge_moe_scratch(sizeof(int) * (size_t)(pairs ? pairs : 1));
    float *xs = edge_moe_scratch(sizeof(float) * (size_t)pairs * H + 32);
    float *gu = edge_moe_scratch(sizeof(float) * (size_t)pairs * 2 * F + 32);
    float *h = edge_moe_scratch(sizeof(float) * (size_t)pairs * F + 32);
    float *outs = edge_moe_scratch(sizeof(float) * (size_t)pairs * H + 32);
    int *active = edge_moe_scratch(sizeof(int) * (size_t)(E ? E : 1));
    if (threads < 1) threads = 1;
    size_t buf_floats = 4 * (size_t)(H > F ? H : F) + 8; /* four rows converted, per thread */
    float *bufs = edge_moe_scratch(sizeof(float) * buf_floats * (size_t)threads);
    edge_moe_qx qx1 = {0}, qx2 = {0};
    int ok = count && start && slot_row && xs && gu && h && outs && active && bufs;
    ok = (edge_moe_qx_alloc(&qx1, fc1, pairs) == 0) & (edge_moe_qx_alloc(&qx2, fc2, pairs) == 0) && ok;
    if (ok) {
        for (int p = 0; p < pairs; p++) {
            int64_t e = indices[p];
            count[(e >= 0 && e < E) ? e : E]++; /* an index out of range selects nothing (the caller checks) */
        }
        for (int e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
        memset(count, 0, sizeof(int) * (size_t)E);
        for (int p = 0; p < pairs; p++) {
            int64_t e = indices[p];
            if (e < 0 || e >= E) continue;
            int row = start[e] + count[e]++;
            slot_row[p] = row;    /* where (token, slot) p's output lands */
            memcpy(xs + (size_t)row * H, x + (size_t)(p / k) * H, sizeof(float) * H);
        }
        int n_active = 0;
        for (int e = 0; e < E; e++)
            if (start[e + 1] > start[e]) active[n_active++] = e;
        /* each active expert's rows in shares (row_block) */
        int b1 = row_block(2 * F, threads), b2 = row_block(H, threads);
        int blocks1 = (2 * F + b1 - 1) / b1, blocks2 = (H + b2 - 1) / b2;
        int items1 = n_active * blocks1, items2 = n_active * blocks2, rows = start[E];
        /* work items take as long as their expert has tokens: handed out in turn, not split in advance */
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            int thread = team_thread();
            float *buf = bufs + (size_t)thread * buf_floats;
            edge_moe_quantize_team(&qx1, xs, rows);
            /* gate and up rows of every active expert, for its tokens */
#pragma omp for schedule(dynamic, 2)
            for (int item = 0; item < items1; item++) {
                int e = active[item / blocks1], r0 = (item % blocks1) * b1;
                int r1 = r0 + b1 < 2 * F ? r0 + b1 : 2 * F, n = start[e + 1] - start[e];
                edge_moe_matrix w = edge_moe_sub_rows(fc1, e * 2 * F, 2 * F);
                edge_moe_qx q = edge_moe_qx_from(&qx1, start[e]);
                edge_moe_matrix_times(&w, r0, r1, xs + (size_t)start[e] * H, &q, n, gu + (size_t)start[e] * 2 * F,
                                      2 * F, buf);
                for (int t = 0; t < n; t++) /* silu(gate) * up for the rows done here (r0 is even) */
                    swiglu_rows(gu + (size_t)(start[e] + t) * 2 * F, r0, r1, h + (size_t)(start[e] + t) * F);
            }
            edge_moe_quantize_team(&qx2, h, rows);
#pragma omp for schedule(dynamic, 2)
            for (int item = 0; item < items2; item++) {
                int e = active[item / blocks2], r0 = (item % blocks2) * b2;
                int r1 = r0 + b2 < H ? r0 + b2 : H, n = start[e + 1] - start[e];
                edge_moe_matrix w = edge_moe_sub_rows(fc2, e * H, H);
                edge_moe_qx q = edge_moe_qx_from(&qx2, start[e]);
                edge_moe_matrix_times(&w, r0, r1, h + (size_t)start[e] * F, &q, n, outs + (size_t)start[e] * H, H,
                                      buf);
            }
            /* each token's outputs weighted and summed in its routing order */
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) {
                float *yt = y + (size_t)t * H;
                memset(yt, 0, sizeof(float) * H);
                for (int s = 0; s < k; s++) {
                    int p = t * k + s;
                    if (indices[p] < 0 || indices[p] >= E) continue;
                    const float *o = outs + (size_t)slot_row[p] * H;
                    float w = weights[p];
                    for (int c = 0; c < H; c++) yt[c] += w * o[c];
                }
            }
        }
    }
    edge_moe_qx_free(&qx1), edge_moe_qx_free(&qx2);
    free(count), free(start);
    edge_moe_scratch_free(slot_row), edge_moe_scratch_free(xs), edge_moe_scratch_free(gu), edge_moe_scratch_free(h);
    edge_moe_scratch_free(outs), edge_moe_scratch_free(active), edge_moe_scratch_free(bufs);
    return ok ? 0 : -1;
}

/* One routed SwiGLU expert in the package's MatMulNBits layout (rows: gate_up [2F, H] with gate rows then up rows,
 * down [H, F], block codes): y [n, H] = (silu(x gate^T) * (x up^T)) down^T. Returns 0, or -1 without memory. */
KERNEL int edge_moe_expert_blocks(const edge_moe_matrix *gate_up, const edge_moe_matrix *down, const float *x, int n,
                                  float *y, int threads) {
    int H = gate_up->k, F = down->k;
    if (threads < 1) threads = 1;
    float *gu = edge_moe_scratch(sizeof(float) * (size_t)n * 2 * F + 32);
    float *h = edge_moe_scratch(sizeof(float) * (size_t)n * F + 32);
    size_t buf_floats = 4 * (size_t)(H > F ? H : F) + 8;
    float *bufs = edge_moe_scratch(sizeof(float) * buf_floats * (size_t)threads);
    edge_moe_qx qx1 = {0}, qx2 = {0};
    int ok = (edge_moe_qx_alloc(&qx1, gate_up, n) == 0) & (edge_moe_qx_alloc(&qx2, down, n) == 0) && gu && h && bufs;
    if (ok) {
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            float *buf = bufs + (size_t)team_thread() * buf_floats;
            edge_moe_product up = {gate_up, x, &qx1, gu, 2 * F}, out = {down, h, &qx2, y, H};
            edge_moe_quantize_team(&qx1, x, n);
            edge_moe_run_products(&up, 1, n, buf);
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) {
                swiglu(gu + (size_t)t * 2 * F, gu + (size_t)t * 2 * F + F, F, h + (size_t)t * F);
                edge_moe_quantize(h, &qx2, t, t + 1);
            }
            edge_moe_run_products(&out, 1, n, buf);
        }
    }
    edge_moe_qx_free(&qx1), edge_moe_qx_free(&qx2);
    edge_moe_scratch_free(gu), edge_moe_scratch_free(h), edge_moe_scratch_free(bufs);
    return ok ? 0 : -1;
}

/* Column ranges of an [in, out] product for `threads`: one contiguous share each for a single token (each thread
 * streams its part of every row), strips of 64 (a tile's width) handed out in turn for several (compute bound). */
static int xw_chunk(int N, int n, int threads) {
    if (n > 1) return 64;
    int share = (N + threads - 1) / threads;
    return (share + 7) & ~7;
}

/* One routed SwiGLU expert in the package's own layout (what an expert cache holds: experts.stored_tensors):
 * y [n, H] = (silu(x GU[:, :F]) * (x GU[:, F:])) D for gate_up GU [H, 2F] and down D [F, H], float16.
 * Returns 0, or -1 without memory for the scratch. */
KERNEL int edge_moe_expert_f16(const uint16_t *gate_up, const uint16_t *down, int H, int F, const float *x, int n,
                               float *y, int threads) {
    if (threads < 1) threads = 1;
    float *gu = edge_moe_scratch(sizeof(float) * (size_t)n * 2 * F + 32);
    float *h = edge_moe_scratch(sizeof(float) * (size_t)n * F + 32);
    int ok = gu && h;
    if (ok) {
        int chunk1 = xw_chunk(2 * F, n, threads), chunk2 = xw_chunk(H, n, threads);
        int items1 = (2 * F + chunk1 - 1) / chunk1, items2 = (H + chunk2 - 1) / chunk2;
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < items1; item++) {
                int c0 = item * chunk1, c1 = c0 + chunk1 < 2 * F ? c0 + chunk1 : 2 * F;
                edge_moe_xw(gate_up, H, 2 * F, c0, c1, x, n, gu, 2 * F);
            }
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++)
                swiglu(gu + (size_t)t * 2 * F, gu + (size_t)t * 2 * F + F, F, h + (size_t)t * F);
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < items2; item++) {
                int c0 = item * chunk2, c1 = c0 + chunk2 < H ? c0 + chunk2 : H;
                edge_moe_xw(down, F, H, c0, c1, h, n, y, H);
            }
        }
    }
    edge_moe_scratch_free(gu), edge_moe_scratch_free(h);
    return ok ? 0 : -1;
}
