"""Phi-3.5-MoE: the Mixtral layout (block_sparse_moe, w1/w3/w2) with LayerNorm (weight and bias) instead of RMSNorm,
biases on q/k/v/o and optionally the LM head, and the sparsemixer router (at inference: two argmax rounds, each
weight a softmax over the logits within router_jitter_noise of that round's best).

RoPE "longrope" as transformers' Phimoe computes it: the short factors' frequencies at every length, cos and sin
times short_mscale, or long_mscale once the sequence (cached + new tokens) passes original_max_position_embeddings.
"""

import numpy as np

from edge_moe.family_spec import RouterSpec

from .base import MoEFamily
from .rope import rope_parameters


class Family(MoEFamily):
    model_type = "phimoe"
    expert_prefix = "block_sparse_moe"
    expert_projections = ("w1", "w3", "w2")
    rope_types = ("default", "longrope")

    def __init__(self, config: dict):
        self.qkv_bias = self.o_bias = bool(config.get("attention_bias", False))
        self.lm_head_bias = bool(config.get("lm_head_bias", False))
        super().__init__(config)

    def make_arch(self, c):
        arch = super().make_arch(c)
        arch.moe_intermediate_size = int(c["intermediate_size"])
        arch.moe_layers = list(range(arch.num_layers))
        arch.rms_norm_eps = float(c.get("rms_norm_eps", 1e-5))  # LayerNorm's eps, under this name in config.json
        return arch

    def make_router(self, c, arch):
        return RouterSpec(num_experts=arch.num_experts, top_k=arch.top_k, scoring="sparsemixer",
                          jitter_eps=float(c.get("router_jitter_noise", 0.01)))

    def emit_norm(self, g, x, name, weight):
        return g.op("LayerNormalization", x, weight(f"{name}.weight"), weight(f"{name}.bias"), axis=-1,
                    epsilon=self.arch.rms_norm_eps)

    def emit_rope_tables(self, g, positions):
        rope = rope_parameters(self.config, self.rope_types)
        if rope["rope_type"] == "default":
            return super().emit_rope_tables(g, positions)
        d = self.arch.head_dim
        exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
        inv_freq = (1.0 / (np.asarray(rope["short_factor"], np.float32)
                           * np.float32(rope["rope_theta"]) ** exponents)).astype(np.float32)
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=1), g.const([1], "int64")),
                     g.const(inv_freq[None, :]))                                           # [T, D/2]
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1], "int64"))  # [T, 1, D]
        length = g.op("Add", g.op("ReduceMax", positions, keepdims=0), g.const(1, "int64"))
        long = g.op("Greater", length, g.const(int(rope["original_max_position_embeddings"]), "int64"))
        mscale = g.op("Where", long, g.const(float(rope["long_mscale"])), g.const(float(rope["short_mscale"])))
        return g.op("Mul", g.op("Cos", angles), mscale), g.op("Mul", g.op("Sin", angles), mscale)
