"""Mixtral: experts under block_sparse_moe with w1 (gate), w3 (up), w2 (down); top-k weights always renormalized."""

from .base import MoEFamily


class Family(MoEFamily):
    model_type = "mixtral"
    expert_prefix = "block_sparse_moe"
    expert_projections = ("w1", "w3", "w2")

    def make_arch(self, c):
        arch = super().make_arch(c)
        arch.moe_intermediate_size = int(c["intermediate_size"])
        arch.norm_topk_prob = True  # softmax over the top-k logits == normalized top-k of the full softmax
        arch.moe_layers = list(range(arch.num_layers))
        return arch
