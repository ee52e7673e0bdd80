"""Qwen2-MoE: q/k/v biases, and a shared expert on every MoE layer gated by sigmoid(shared_expert_gate(x))."""

from .base import MoEFamily


class Family(MoEFamily):
    model_type = "qwen2_moe"
    qkv_bias = True

    def __init__(self, config: dict):
        self.qkv_bias = bool(config.get("qkv_bias", True))
        super().__init__(config)

    def sliding_windows(self, c, layers):
        if not c.get("use_sliding_window", False):
            return [None] * layers
        kinds = c.get("layer_types") or ["sliding_attention"] * layers
        return [c.get("sliding_window") if kind == "sliding_attention" else None for kind in kinds]

    def emit_shared_expert(self, g, layer, h, moe_input, w):
        gate_up = g.op("Concat", w("mlp.shared_expert.gate_proj.weight"), w("mlp.shared_expert.up_proj.weight"),
                       axis=0)
        shared = g.swiglu(moe_input, gate_up, w("mlp.shared_expert.down_proj.weight"))
        gate = g.op("Sigmoid", g.linear(moe_input, w("mlp.shared_expert_gate.weight")))  # [T, 1]
        return g.op("Add", h, g.op("Mul", gate, shared))
