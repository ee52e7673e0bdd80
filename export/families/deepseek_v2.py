"""DeepSeek-V2: multi-head latent attention (MLA), shared experts, dense first layers, group-limited greedy routing.

MLA caches per token only the normalized latent c [r] (as `key`, one head) and the shared roped key k_pe [dr] (as
`value`), not K and V per head. Attention uses kv_b_proj absorbed into the query and the output
(H = heads, dn/dr/dv = nope/rope/value head dims, r = kv_lora_rank, S = cached + new tokens):

    q [T,H,dn+dr] = q_b(norm(q_a(x))) (or q_proj(x));  [c | k_pe] = kv_a_proj_with_mqa(x);  c = norm(c)
    kv_b [H*(dn+dv), r] -> W_uk [H,dn,r], W_uv [H,dv,r]
    scores [H,T,S] = (q_nope W_uk) c_all^T + rope(q_pe) rope(k_pe)_all^T        (never forms K [S,H,dn])
    out [T,H*dv]   = (softmax(scale * scores) c_all) W_uv^T  -> o_proj
"""

from edge_moe.family_spec import AttentionSpec, RouterSpec

from .base import MoEFamily
from .rope import rope_parameters, yarn_mscale

_LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use RMSNorm's default, not config.rms_norm_eps


class Family(MoEFamily):
    model_type = "deepseek_v2"
    fused_attention = False  # MLA: its own attention graph

    def make_arch(self, c):
        c = {**c, "num_experts": c.get("n_routed_experts")}
        arch = super().make_arch(c)
        arch.head_dim = int(c.get("qk_rope_head_dim", 64))  # the rotary dimension (transformers' head_dim)
        arch.num_key_value_heads = arch.num_attention_heads
        arch.sliding_windows = [None] * arch.num_layers
        first_dense = int(c.get("first_k_dense_replace") or 0)
        arch.moe_layers = list(range(first_dense, arch.num_layers))
        return arch

    def make_router(self, c, arch):
        grouped = c.get("topk_method") == "group_limited_greedy"
        return RouterSpec(num_experts=arch.num_experts, top_k=arch.top_k, scoring="softmax",
                          n_group=int(c.get("n_group") or 1) if grouped else 1,
                          topk_group=int(c.get("topk_group") or 1) if grouped else 1, group_score="max",
                          scaling_factor=float(c.get("routed_scaling_factor") or 1.0))

    def make_attention(self, c, arch):
        return AttentionSpec("mla", 1, int(c["kv_lora_rank"]), 1, arch.head_dim)

    def attention_scale(self):
        c, rope = self.config, rope_parameters(self.config)
        scale = (int(c["qk_nope_head_dim"]) + self.arch.head_dim) ** -0.5
        if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
            scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
        return scale

    def apply_rope(self, g, x, cos, sin):
        """DeepSeek rotates interleaved pairs (x0, x1), (x2, x3)...: rotate evens and odds, written de-interleaved
        (q and k alike, so their dot products are those of the interleaved layout)."""
        if not self.config.get("rope_interleave", True):
            return super().apply_rope(g, x, cos, sin)
        d = self.arch.head_dim
        cos, sin = (g.op("Split", t, axis=-1, outputs=2)[0] for t in (cos, sin))    # [T, 1, D/2]
        even = g.op("Gather", x, g.const(list(range(0, d, 2)), "int64"), axis=-1)
        odd = g.op("Gather", x, g.const(list(range(1, d, 2)), "int64"), axis=-1)
        return g.op("Concat", g.op("Sub", g.op("Mul", even, cos), g.op("Mul", odd, sin)),
                    g.op("Add", g.op("Mul", odd, cos), g.op("Mul", even, sin)), axis=-1)

    def emit_attention(self, g, layer, x, past_k, past_v, w):
        c = self.config
        heads, dr = self.arch.num_attention_heads, self.arch.head_dim
        dn, dv, r = int(c["qk_nope_head_dim"]), int(c["v_head_dim"]), int(c["kv_lora_rank"])
        bias = (lambda p: w(f"self_attn.{p}.bias")) if c.get("attention_bias") else (lambda p: None)
        if c.get("q_lora_rank"):
            q = g.linear(x, w("self_attn.q_a_proj.weight"), bias("q_a_proj"))
            q = g.linear(g.rms_norm(q, w("self_attn.q_a_layernorm.weight"), _LATENT_NORM_EPS),
                         w("self_attn.q_b_proj.weight"))
        else:
            q = g.linear(x, w("self_attn.q_proj.weight"))
        q = g.op("Reshape", q, g.const([0, heads, dn + dr], "int64"))
        q_nope, q_pe = g.op("Split", q, g.const([dn, dr], "int64"), axis=-1, outputs=2)
        compressed = g.linear(x, w("self_attn.kv_a_proj_with_mqa.weight"), bias("kv_a_proj_with_mqa"))
        latent, k_pe = g.op("Split", compressed, g.const([r, dr], "int64"), axis=-1, outputs=2)
        latent = g.rms_norm(latent, w("self_attn.kv_a_layernorm.weight"), _LATENT_NORM_EPS)      # [T, r]
        q_pos, k_pos = self.emit_positions(g, past_k, x)
        cos, sin = self.emit_rope_tables(g, q_pos)
        q_pe = self.apply_rope(g, q_pe, cos, sin)                                                 # [T, H, dr]
        new_k = g.op("Unsqueeze", latent, g.const([1], "int64"))                                  # [T, 1, r]
        new_v = self.apply_rope(g, g.op("Unsqueeze", k_pe, g.const([1], "int64")), cos, sin)       # [T, 1, dr]
        latents = g.op("Reshape", g.op("Concat", past_k, new_k, axis=0), g.const([-1, r], "int64"))  # [S, r]
        rope_keys = g.op("Reshape", g.op("Concat", past_v, new_v, axis=0), g.const([-1, dr], "int64"))
        kv_b = g.op("Reshape", w("self_attn.kv_b_proj.weight"), g.const([heads, dn + dv, r], "int64"))
        w_uk, w_uv = g.op("Split", kv_b, g.const([dn, dv], "int64"), axis=1, outputs=2)      # [H,dn,r] [H,dv,r]
        q_latent = g.op("MatMul", g.op("Transpose", q_nope, perm=[1, 0, 2]), w_uk)             # [H, T, r]
        scores = g.op("Add", g.op("MatMul", q_latent, g.op("Transpose", latents)),
                      g.op("MatMul", g.op("Transpose", q_pe, perm=[1, 0, 2]), g.op("Transpose", rope_keys)))
        scores = g.op("Mul", scores, g.const(self.attention_scale()))                         # [H, T, S]
        scores = g.op("Where", self.emit_mask(g, layer, q_pos, k_pos), scores, g.const(-float("inf")))
        context = g.op("MatMul", g.op("Softmax", scores, axis=-1), latents)                   # [H, T, r]
        out = g.op("MatMul", context, g.op("Transpose", w_uv, perm=[0, 2, 1]))                # [H, T, dv]
        out = g.op("Reshape", g.op("Transpose", out, perm=[1, 0, 2]), g.const([-1, heads * dv], "int64"))
        return g.linear(out, w("self_attn.o_proj.weight"), bias("o_proj")), new_k, new_v

    def emit_shared_expert(self, g, layer, h, moe_input, w):
        if not self.config.get("n_shared_experts"):
            return h
        gate_up = g.op("Concat", w("mlp.shared_experts.gate_proj.weight"), w("mlp.shared_experts.up_proj.weight"),
                       axis=0)
        return g.op("Add", h, g.swiglu(moe_input, gate_up, w("mlp.shared_experts.down_proj.weight")))
