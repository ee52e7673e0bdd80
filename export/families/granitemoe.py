"""Granite 3.x MoE: the Mixtral layout with four multipliers and experts stored fused per layer.

embedding_multiplier scales the embeddings, attention_multiplier replaces 1/sqrt(D), residual_multiplier scales
each block's output before it joins the residual stream (for the routed experts: the router's scaling factor),
and the logits are divided by logits_scaling. Experts: block_sparse_moe.input_linear [E, 2F, H] (gate rows, then
up) and output_linear [E, H, F]; the router is block_sparse_moe.router.layer, softmax over the top-k logits.
"""

from edge_moe.family_spec import RouterSpec

from .base import MoEFamily


class Family(MoEFamily):
    model_type = "granitemoe"
    expert_prefix = "block_sparse_moe"

    def __init__(self, config: dict):
        self.qkv_bias = self.o_bias = bool(config.get("attention_bias", False))
        super().__init__(config)

    def make_arch(self, c):
        arch = super().make_arch(c)
        arch.moe_layers = list(range(arch.num_layers))
        arch.norm_topk_prob = True  # softmax over the top-k logits == normalized top-k of the full softmax
        arch.sliding_windows = [None] * arch.num_layers
        return arch

    def make_router(self, c, arch):
        return RouterSpec(num_experts=arch.num_experts, top_k=arch.top_k, normalize=True,
                          scaling_factor=self._multiplier("residual_multiplier"))

    def _multiplier(self, name: str) -> float:
        return float(self.config.get(name, 1.0))

    def expert_keys(self, layer, expert):
        base = self.layer_key(layer, self.expert_prefix)
        return (f"{base}.input_linear.weight", f"{base}.output_linear.weight")

    def read_expert(self, checkpoint, layer, expert):
        fused, down = (checkpoint.read(key, expert) for key in self.expert_keys(layer, expert))
        gate, up = fused[:fused.shape[0] // 2], fused[fused.shape[0] // 2:]
        return gate, up, down

    def router_key(self, layer):
        return self.layer_key(layer, f"{self.expert_prefix}.router.layer.weight")

    def attention_scale(self):
        return self._multiplier("attention_multiplier")

    def scale_residual(self, g, update):
        return g.op("Mul", update, g.const(self._multiplier("residual_multiplier")))

    def embedding_scale(self):
        return self._multiplier("embedding_multiplier")

    def logit_scale(self):
        return 1.0 / self._multiplier("logits_scaling")
