"""Phi-3.5-MoE: the Mixtral layout (block_sparse_moe, w1/w3/w2) with LayerNorm (weight and bias) instead of RMSNorm,
biases on q/k/v/o and optionally the LM head, and the sparsemixer router (at inference: two argmax rounds, each
weight a softmax over the logits within router_jitter_noise of that round's best)."""

from edge_moe.family_spec import RouterSpec

from .base import MoEFamily


class Family(MoEFamily):
    model_type = "phimoe"
    expert_prefix = "block_sparse_moe"
    expert_projections = ("w1", "w3", "w2")

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
