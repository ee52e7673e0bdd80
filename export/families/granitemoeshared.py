"""Granite MoE with a shared expert: granitemoe plus shared_mlp (input_linear [2S, H] gate then up, output_linear
[H, S]) on every layer, ungated, added to the routed experts before the residual multiplier."""

from . import granitemoe


class Family(granitemoe.Family):
    model_type = "granitemoeshared"

    def emit_shared_expert(self, g, layer, h, moe_input, w):
        if not self.config.get("shared_intermediate_size"):
            return h
        shared = g.swiglu(moe_input, w("shared_mlp.input_linear.weight"), w("shared_mlp.output_linear.weight"))
        return g.op("Add", h, self.scale_residual(g, shared))
