"""DeepSeek-V3 (and derivatives such as Kimi-K2 and GLM-class configs of this model_type): DeepSeek-V2's MLA and
shared experts, with sigmoid router scores, a selection-only bias (e_score_correction_bias) and groups ranked by
the sum of their two best biased scores; chosen weights renormalized (norm_topk_prob) and scaled."""

from edge_moe.family_spec import RouterSpec

from . import deepseek_v2


class Family(deepseek_v2.Family):
    model_type = "deepseek_v3"

    def make_router(self, c, arch):
        return RouterSpec(num_experts=arch.num_experts, top_k=arch.top_k, scoring="sigmoid", selection_bias=True,
                          n_group=int(c.get("n_group") or 1), topk_group=int(c.get("topk_group") or 1),
                          group_score="top2_sum", normalize=bool(c.get("norm_topk_prob", True)),
                          scaling_factor=float(c.get("routed_scaling_factor") or 1.0))

    def selection_bias_key(self, layer):
        return self.layer_key(layer, "mlp.gate.e_score_correction_bias")
