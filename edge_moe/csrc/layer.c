/* A decoder layer's attention block and router on the CPU, over its weights as the package holds them (matrix.h:
 * float16 or float32 rows, 8- / 4-bit blocks), for T tokens after `past` cached:
 *
 *   x [T, H] -> RMSNorm -> q, k, v (projections) -> head norms -> RoPE -> k, v into the cache at past..
 *     -> causal attention over the cache -> o projection -> residual = x + o -> RMSNorm -> moe_input
 *     -> router logits [T, E] -> softmax top-k (renormalized, scaled) -> indices, weights [T, k]
 *
 * What the exported layer graph of a "gqa" family computes (export/families/base.py: emit_layer with
 * GroupQueryAttention), with the same KV cache buffers ([kvH, M, D] float32, or float16 where the graphs attend in
 * it: kv_cache.GqaKVCache) and RoPE tables ([M, D/2], of the cache's type), so either may run any step. Why it
 * exists: onnxruntime (1.32) reads float16 weights as float32 copies (a float16 package's backbone is 55 MB a token
 * instead of 27), and its matrix-vector products and attention for one token barely gain from a second thread; this
 * reads the package's bytes once, on every thread. Block-code projections take int8 activations, as MatMulNBits.
 *
 * Every output element is one thread's sum in a fixed order: the results do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "f16_rows.h"
#include "matrix.h"
#include "scratch.h"

/* One layer's parameters (native_layer.py fills it with ctypes; keep the two in step). */
typedef struct {
    int hidden, heads, kv_heads, head_dim, experts, top_k;
    int head_norm;   /* 0: none; 1: RMSNorm over each head's D (Qwen3); 2: over all heads' width at once (OLMoE) */
    int normalize;   /* renormalize the chosen experts' weights to sum to 1 */
    float eps, scale, routing_scale; /* RMSNorm epsilon, q.k scale, factor on the routing weights */
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* float32 */
    edge_moe_matrix wq, wk, wv, wo, router;                /* [out, in] */
    const float *bq, *bk, *bv, *bo;                        /* biases (Qwen2-MoE: q, k, v) or NULL */
    int shared_ffn; /* a shared expert's intermediate size (Qwen2-MoE: gated by sigmoid(gate . x)), 0 for none */
    edge_moe_matrix shared_gate, shared_up, shared_down, shared_expert_gate; /* [Fs, H], [Fs, H], [H, Fs], [1, H] */
} layer_params;

KERNEL static float dot(const float *a, const float *b, int n) {
    __m256 s = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    float r = hsum(s);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* y = x / sqrt(mean(x^2) + eps) * w over n values (y may be x). */
KERNEL static void rms_norm(const float *x, const float *w, int n, float eps, float *y) {
    float inv = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

/* Hugging Face's non-interleaved RoPE on one head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); the tables' row
 * is float32, or float16 where the cache is (`f16`). */
KERNEL static void rope(float *v, const void *cos, const void *sin, int half, int f16) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        float c = f16 ? _cvtsh_ss(((const uint16_t *)cos)[i]) : ((const float *)cos)[i];
        float s = f16 ? _cvtsh_ss(((const uint16_t *)sin)[i]) : ((const float *)sin)[i];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

/* Eight values of a KV cache from element i: float32, or float16 (`f16`, a constant where attend is inlined). */
KERNEL static inline __attribute__((always_inline)) __m256 load_kv(const void *cache, size_t i, int f16) {
    return f16 ? load_f16((const uint16_t *)cache + i) : _mm256_loadu_ps((const float *)cache + i);
}

/* The eight sums of a[0..8) in one vector: (sum a[0], ..., sum a[7]). */
KERNEL static inline __m256 hsum8(const __m256 *a) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* out [G, D] = softmax(q . K[0..n) * scale) V[0..n) for the G query heads q [G, D] that share one KV head, K and V
 * [n, D] its rows (float32, or float16: `f16`); s: scratch of G rows of `ls` >= n + 8 floats. Eight keys' dot
 * products at a time (one reduction for eight), for every head of the group while those keys are in L1 (the cache is
 * read once a group, not once a head: at 2,048 tokens it was half of a decoded token's bytes); four value rows a pass
 * over `out`. */
KERNEL static inline __attribute__((always_inline)) void attend(const float *q, int G, const void *K, const void *V,
                                                                int n, int D, float scale, float *s, int ls,
                                                                float *out, int f16) {
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int h = 0; h < G; h++) {
            const float *qh = q + (size_t)h * D;
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) { /* D is a multiple of 8 (the caller checks) */
                __m256 qd = _mm256_loadu_ps(qh + d);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qd, load_kv(K, (size_t)(j + i) * D + d, f16), a[i]);
            }
            _mm256_storeu_ps(s + (size_t)h * ls + j, _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale)));
        }
    for (; j < n; j++)
        for (int h = 0; h < G; h++) {
            __m256 a = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)h * D + d), load_kv(K, (size_t)j * D + d, f16), a);
            s[(size_t)h * ls + j] = hsum(a) * scale;
        }
    for (int h = 0; h < G; h++) { /* each head's softmax, in place */
        float *sh = s + (size_t)h * ls, best = -INFINITY;
        for (j = 0; j < n; j++) best = sh[j] > best ? sh[j] : best;
        __m256 total = _mm256_setzero_ps(), shift = _mm256_set1_ps(best);
        for (j = 0; j + 8 <= n; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), shift));
            _mm256_storeu_ps(sh + j, e);
            total = _mm256_add_ps(total, e);
        }
        float sum = hsum(total);
        for (; j < n; j++) sh[j] = expf(sh[j] - best), sum += sh[j];
        float inv = 1.0f / sum;
        for (j = 0; j < n; j++) sh[j] *= inv;
    }
    memset(out, 0, sizeof(float) * (size_t)G * D);
    for (j = 0; j + 4 <= n; j += 4) {
        size_t v0 = (size_t)j * D, v1 = v0 + D, v2 = v1 + D, v3 = v2 + D;
        for (int h = 0; h < G; h++) {
            const float *sh = s + (size_t)h * ls + j;
            float *oh = out + (size_t)h * D;
            __m256 p0 = _mm256_set1_ps(sh[0]), p1 = _mm256_set1_ps(sh[1]), p2 = _mm256_set1_ps(sh[2]),
                   p3 = _mm256_set1_ps(sh[3]);
            for (int d = 0; d < D; d += 8) {
                __m256 o = _mm256_fmadd_ps(p0, load_kv(V, v0 + d, f16), _mm256_loadu_ps(oh + d));
                o = _mm256_fmadd_ps(p1, load_kv(V, v1 + d, f16), o);
                o = _mm256_fmadd_ps(p2, load_kv(V, v2 + d, f16), o);
                _mm256_storeu_ps(oh + d, _mm256_fmadd_ps(p3, load_kv(V, v3 + d, f16), o));
            }
        }
    }
    for (; j < n; j++)
        for (int h = 0; h < G; h++) {
            __m256 p = _mm256_set1_ps(s[(size_t)h * ls + j]);
            float *oh = out + (size_t)h * D;
            for (int d = 0; d < D; d += 8)
                _mm256_storeu_ps(oh + d, _mm256_fmadd_ps(p, load_kv(V, (size_t)j * D + d, f16), _mm256_loadu_ps(oh + d)));
        }
}

/* attend over a float32 or a float16 cache: each its own inlined copy, with no test in the loops */
KERNEL static void attend_f32(const float *q, int G, const void *K, const void *V, int n, int D, float scale, float *s,
                              int ls, float *out) {
    attend(q, G, K, V, n, D, scale, s, ls, out, 0);
}

KERNEL static void attend_f16(const float *q, int G, const void *K, const void *V, int n, int D, float scale, float *s,
                              int ls, float *out) {
    attend(q, G, K, V, n, D, scale, s, ls, out, 1);
}

/* Softmax over E logits, the top k (ties to the lower index), renormalized where asked, times `factor`. */
static void route(const float *logits, int E, int k, int normalize, float factor, float *probs, int64_t *indices,
                  float *weights) {
    float best = -INFINITY, sum = 0.0f, chosen = 0.0f;
    for (int e = 0; e < E; e++) best = logits[e] > best ? logits[e] : best;
    for (int e = 0; e < E; e++) probs[e] = expf(logits[e] - best), sum += probs[e];
    for (int e = 0; e < E; e++) probs[e] /= sum;
    for (int s = 0; s < k; s++) {
        int top = -1;
        for (int e = 0; e < E; e++)
            if (probs[e] >= 0.0f && (top < 0 || probs[e] > probs[top])) top = e;
        indices[s] = top, weights[s] = probs[top], chosen += probs[top];
        probs[top] = -1.0f; /* taken */
    }
    for (int s = 0; s < k; s++) weights[s] = (normalize ? weights[s] / chosen : weights[s]) * factor;
}

/* Quantized-activation buffers for the inputs of a layer's block-code products, one an input (its first consumer's
 * bits and block: native_layer.load_native_layers refuses a layer whose block matrices do not all share them). */
typedef struct {
    edge_moe_qx xn, attn, moe_input, shared_h;
} layer_qx;

/* Returns 0; -1 when scratch memory could not be had; -2 when past + T exceeds the cache's capacity, -3 for a head
 * size not a multiple of 8 or heads that do not group (nothing written then). kc, vc: this layer's cache
 * [kvH, capacity, D]; cos, sin: [capacity, D/2]; all float32, or float16 where `f16` is set. */
KERNEL int edge_moe_layer(const layer_params *L, const float *x, int T, void *kc, void *vc, int capacity, int past,
                          const void *cos, const void *sin, int f16, float *residual, float *moe_input, float *logits,
                          int64_t *indices, float *weights, int threads) {
    if (past + T > capacity) return -2;
    if (L->head_dim % 8 || L->kv_heads < 1 || L->heads % L->kv_heads) return -3; /* native_layer.py refuses these */
    int H = L->hidden, nH = L->heads, kvH = L->kv_heads, D = L->head_dim, E = L->experts, half = D / 2;
    int qw = nH * D, kw = kvH * D, width = qw + 2 * kw, group = nH / kvH, n = past + T, Fs = L->shared_ffn;
    size_t cell = f16 ? sizeof(uint16_t) : sizeof(float); /* bytes of a cache or table element */
    if (threads < 1) threads = 1;
    size_t widest = (size_t)(H > qw ? H : qw), score_floats = (size_t)group * (n + 8) + E;
    widest = widest > (size_t)Fs ? widest : (size_t)Fs;
    size_t buf_floats = 4 * widest + 8, shared_floats = Fs ? (size_t)T * (3 * (size_t)Fs + 1 + H) : 0;
    float *xn = edge_moe_scratch(sizeof(float) * (size_t)T * H + 32);
    float *qkv = edge_moe_scratch(sizeof(float) * (size_t)T * width + 32);
    float *attn = edge_moe_scratch(sizeof(float) * (size_t)T * qw + 32);
    float *bufs = edge_moe_scratch(sizeof(float) * buf_floats * threads);
    float *scores = edge_moe_scratch(sizeof(float) * score_floats * threads);
    float *shared = edge_moe_scratch(sizeof(float) * shared_floats + 32);
    layer_qx qx;
    memset(&qx, 0, sizeof qx);
    int ok = xn && qkv && attn && bufs && scores && shared;
    const edge_moe_matrix *consumers[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->router, &L->shared_gate, &L->shared_up,
                                          &L->shared_expert_gate, &L->shared_down};
    edge_moe_qx *inputs[] = {&qx.xn, &qx.xn, &qx.xn, &qx.attn, &qx.moe_input, &qx.moe_input, &qx.moe_input,
                             &qx.moe_input, &qx.shared_h};
    for (int i = 0; i < 9; i++) ok = edge_moe_qx_alloc(inputs[i], consumers[i], T) == 0 && ok;
    if (ok) {
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            int thread = team_thread();
            float *buf = bufs + buf_floats * thread, *s = scores + score_floats * thread;
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) rms_norm(x + (size_t)t * H, L->input_norm, H, L->eps, xn + (size_t)t * H);
            edge_moe_quantize_team(&qx.xn, xn, T);
            edge_moe_product qkv_products[3] = {{&L->wq, xn, &qx.xn, qkv, width},
                                       {&L->wk, xn, &qx.xn, qkv + qw, width},
                                       {&L->wv, xn, &qx.xn, qkv + qw + kw, width}};
            edge_moe_run_products(qkv_products, 3, T, buf);
            /* head norms and RoPE, then this token's key and value into the cache */
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) {
                float *q = qkv + (size_t)t * width, *k = q + qw, *v = k + kw;
                if (L->bq)
                    for (int i = 0; i < qw; i++) q[i] += L->bq[i];
                if (L->bk)
                    for (int i = 0; i < kw; i++) k[i] += L->bk[i], v[i] += L->bv[i];
                if (L->head_norm == 2) rms_norm(q, L->q_norm, qw, L->eps, q), rms_norm(k, L->k_norm, kw, L->eps, k);
                const char *c = (const char *)cos + (size_t)(past + t) * half * cell;
                const char *sn = (const char *)sin + (size_t)(past + t) * half * cell;
                for (int h = 0; h < nH + kvH; h++) {
                    float *head = q + (size_t)h * D; /* the q heads, then the k heads (k follows q in the row) */
                    if (L->head_norm == 1) rms_norm(head, h < nH ? L->q_norm : L->k_norm, D, L->eps, head);
                    rope(head, c, sn, half, f16);
                }
                for (int g = 0; g < kvH; g++) {
                    size_t row = ((size_t)g * capacity + past + t) * D;
                    if (!f16) {
                        memcpy((float *)kc + row, k + (size_t)g * D, sizeof(float) * D);
                        memcpy((float *)vc + row, v + (size_t)g * D, sizeof(float) * D);
                        continue;
                    }
                    for (int d = 0; d < D; d += 8) { /* rounded to nearest, as onnxruntime's Cast */
                        _mm_storeu_si128((__m128i *)((uint16_t *)kc + row + d),
                                         _mm256_cvtps_ph(_mm256_loadu_ps(k + (size_t)g * D + d), _MM_FROUND_TO_NEAREST_INT));
                        _mm_storeu_si128((__m128i *)((uint16_t *)vc + row + d),
                                         _mm256_cvtps_ph(_mm256_loadu_ps(v + (size_t)g * D + d), _MM_FROUND_TO_NEAREST_INT));
                    }
                }
            }
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < T * kvH; item++) { /* KV-head-major: a KV head stays in L2 across tokens */
                int g = item / T, t = item % T, h = g * group; /* the group's query heads h .. h + group - 1 */
                const char *K = (const char *)kc + (size_t)g * capacity * D * cell;
                const char *V = (const char *)vc + (size_t)g * capacity * D * cell;
                (f16 ? attend_f16 : attend_f32)(qkv + (size_t)t * width + (size_t)h * D, group, K, V, past + t + 1, D,
                                                 L->scale, s, n + 8, attn + (size_t)t * qw + (size_t)h * D);
            }
            edge_moe_quantize_team(&qx.attn, attn, T);
            edge_moe_product o_product = {&L->wo, attn, &qx.attn, residual, H};
            edge_moe_run_products(&o_product, 1, T, buf);
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) {
                float *r = residual + (size_t)t * H;
                for (int i = 0; i < H; i++) r[i] += x[(size_t)t * H + i] + (L->bo ? L->bo[i] : 0.0f);
                rms_norm(r, L->post_norm, H, L->eps, moe_input + (size_t)t * H);
            }
            edge_moe_quantize_team(&qx.moe_input, moe_input, T);
            if (Fs) { /* the shared expert joins the residual: + sigmoid(gate . x) down(silu(gate x) * up x) */
                float *in = shared, *h = in + (size_t)T * (2 * Fs + 1), *out = h + (size_t)T * Fs;
                int ld = 2 * Fs + 1;
                edge_moe_product shared_in[3] = {{&L->shared_gate, moe_input, &qx.moe_input, in, ld},
                                        {&L->shared_up, moe_input, &qx.moe_input, in + Fs, ld},
                                        {&L->shared_expert_gate, moe_input, &qx.moe_input, in + 2 * Fs, ld}};
                edge_moe_run_products(shared_in, 3, T, buf);
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++)
                    swiglu(in + (size_t)t * ld, in + (size_t)t * ld + Fs, Fs, h + (size_t)t * Fs);
                edge_moe_quantize_team(&qx.shared_h, h, T);
                edge_moe_product shared_out = {&L->shared_down, h, &qx.shared_h, out, H};
                edge_moe_run_products(&shared_out, 1, T, buf);
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++) {
                    float gate = 1.0f / (1.0f + expf(-in[(size_t)t * ld + 2 * Fs]));
                    for (int i = 0; i < H; i++) residual[(size_t)t * H + i] += gate * out[(size_t)t * H + i];
                }
            }
            edge_moe_product router_product = {&L->router, moe_input, &qx.moe_input, logits, E};
            edge_moe_run_products(&router_product, 1, T, buf);
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++)
                route(logits + (size_t)t * E, E, L->top_k, L->normalize, L->routing_scale, s + (size_t)group * (n + 8),
                      indices + (size_t)t * L->top_k, weights + (size_t)t * L->top_k);
        }
    }
    edge_moe_qx_free(&qx.xn), edge_moe_qx_free(&qx.attn), edge_moe_qx_free(&qx.moe_input);
    edge_moe_qx_free(&qx.shared_h);
    edge_moe_scratch_free(xn), edge_moe_scratch_free(qkv), edge_moe_scratch_free(attn), edge_moe_scratch_free(bufs);
    edge_moe_scratch_free(scores), edge_moe_scratch_free(shared);
    return ok ? 0 : -1;
}

/* The head: logits [T, V] = RMSNorm(x [T, H]) W^T for the lm_head W [V, H] (any matrix). Returns 0, or -1 without
 * memory. */
KERNEL int edge_moe_head(const float *norm, float eps, const edge_moe_matrix *W, const float *x, int T, float *logits,
                         int threads) {
    if (threads < 1) threads = 1;
    int H = W->k;
    size_t buf_floats = 4 * (size_t)H + 8;
    float *xn = edge_moe_scratch(sizeof(float) * (size_t)T * H + 32);
    float *bufs = edge_moe_scratch(sizeof(float) * buf_floats * threads);
    edge_moe_qx qx = {0};
    int ok = xn && bufs && edge_moe_qx_alloc(&qx, W, T) == 0;
    if (ok) {
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            int thread = team_thread();
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) rms_norm(x + (size_t)t * H, norm, H, eps, xn + (size_t)t * H);
            edge_moe_quantize_team(&qx, xn, T);
            edge_moe_product head = {W, xn, &qx, logits, W->rows};
            edge_moe_run_products(&head, 1, T, bufs + buf_floats * thread);
        }
    }
    edge_moe_qx_free(&qx);
    edge_moe_scratch_free(xn), edge_moe_scratch_free(bufs);
    return ok ? 0 : -1;
}
