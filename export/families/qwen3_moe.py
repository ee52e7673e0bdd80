"""Qwen3-MoE: per-head RMSNorm on q and k before RoPE; otherwise the common layout."""

from .base import MoEFamily


class Family(MoEFamily):
    model_type = "qwen3_moe"
    qkv_bias = False

    def __init__(self, config: dict):
        # attention_bias puts a bias on o_proj too (transformers' Qwen3MoeAttention): it was dropped before
        self.qkv_bias = self.o_bias = bool(config.get("attention_bias", False))
        super().__init__(config)

    def emit_head_norms(self, g, layer, q, k, w):
        eps = self.arch.rms_norm_eps
        return g.rms_norm(q, w("self_attn.q_norm.weight"), eps), g.rms_norm(k, w("self_attn.k_norm.weight"), eps)
