"""GPT-OSS: biased router, "swiglu_oss" experts (biased, clamped, gate/up interleaved; stored fused per layer), q/k/v/o
biases, a learned attention sink per head, sliding-window layers alternating with full ones, YaRN.

Experts: mlp.experts.gate_up_proj [E, H, 2F] and down_proj [E, F, H] are already [in, out] (the graph's layout),
with gate_up_proj_bias [E, 2F] and down_proj_bias [E, H]; swiglu_alpha and swiglu_limit go into each expert as
scalar tensors. The router (mlp.router, weight and bias) takes the top-k logits and softmaxes them, which is the
renormalized top-k of the full softmax. A sink s_h joins each head's softmax denominator as exp(s_h) and takes no
value: p = exp(score) / (sum exp(scores) + exp(s_h)).
"""

import numpy as np

from edge_moe.family_spec import RouterSpec

from ..encodings import mxfp4_to_matmulnbits
from .base import MoEFamily


class Family(MoEFamily):
    model_type = "gpt_oss"
    expert_kind = "swiglu_oss"
    fused_attention = False  # sinks: its own softmax

    def __init__(self, config: dict):
        self.qkv_bias = self.o_bias = bool(config.get("attention_bias", True))
        super().__init__(config)

    def make_arch(self, c):
        arch = super().make_arch(c)
        arch.moe_intermediate_size = int(c["intermediate_size"])
        arch.moe_layers = list(range(arch.num_layers))
        return arch

    def make_router(self, c, arch):
        return RouterSpec(num_experts=arch.num_experts, top_k=arch.top_k, normalize=True)

    def sliding_windows(self, c, layers):
        kinds = c.get("layer_types") or ["full_attention"] * layers
        return [c.get("sliding_window") if kind == "sliding_attention" else None for kind in kinds]

    def expert_keys(self, layer, expert):
        base = self.layer_key(layer, "mlp.experts")
        return (f"{base}.gate_up_proj", f"{base}.gate_up_proj_bias", f"{base}.down_proj", f"{base}.down_proj_bias")

    def read_expert(self, checkpoint, layer, expert, codes_bits=None):
        """The expert's tensors; with codes_bits (8 or 4), weights the checkpoint stores in MXFP4 come as
        MatMulNBits codes mapped from the MXFP4 codes (export/encodings.py), the rest as float32 [in, out]."""
        def read(key):
            if codes_bits and getattr(checkpoint, "is_mxfp4", lambda _: False)(key):
                return mxfp4_to_matmulnbits(*checkpoint.read_mxfp4(key, expert), codes_bits)[0]
            return checkpoint.read(key, expert)

        gate_up, gate_up_bias, down, down_bias = (read(key) for key in self.expert_keys(layer, expert))
        scalar = lambda name, default: np.array(self.config.get(name, default), np.float32)  # noqa: E731
        return {"gate_up_proj": gate_up, "gate_up_bias": gate_up_bias, "down_proj": down, "down_bias": down_bias,
                "alpha": scalar("swiglu_alpha", 1.702), "limit": scalar("swiglu_limit", 7.0)}

    def router_key(self, layer):
        return self.layer_key(layer, "mlp.router.weight")

    def router_bias_key(self, layer):
        return self.layer_key(layer, "mlp.router.bias")

    def emit_attention_softmax(self, g, layer, scores, w):
        a = self.arch
        kv, groups = a.num_key_value_heads, a.num_attention_heads // a.num_key_value_heads
        sink = g.op("Reshape", w("self_attn.sinks"), g.const([kv, groups, 1, 1], "int64"))  # [kvH, G, 1, 1]
        top = g.op("Max", g.op("ReduceMax", scores, axes=[-1], keepdims=1), sink)           # [kvH, G, T, 1]
        exp = g.op("Exp", g.op("Sub", scores, top))
        total = g.op("Add", g.op("ReduceSum", exp, g.const([-1], "int64"), keepdims=1),
                     g.op("Exp", g.op("Sub", sink, top)))
        return g.op("Div", exp, total)
