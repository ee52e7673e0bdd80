"""OLMoE: RMSNorm over the whole q and k projections (not per head), then optional clipping of q, k, v."""

from .base import MoEFamily


class Family(MoEFamily):
    model_type = "olmoe"

    def sliding_windows(self, c, layers):
        return [None] * layers  # OLMoE attends to the full context

    def emit_qkv_post(self, g, layer, q, k, v, w):
        eps = self.arch.rms_norm_eps
        q = g.rms_norm(q, w("self_attn.q_norm.weight"), eps)
        k = g.rms_norm(k, w("self_attn.k_norm.weight"), eps)
        clip = self.config.get("clip_qkv")
        if clip is not None:
            low, high = g.const(-float(clip)), g.const(float(clip))
            q, k, v = (g.op("Clip", t, low, high) for t in (q, k, v))
        return q, k, v
