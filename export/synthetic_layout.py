"""Synthetic checkpoints' layout per family: tensor names and shapes, and config.json, as transformers 5.24's
`from_config(cfg).save_pretrained(dir)` writes them (the values are drawn in synthetic.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: `init` names how its values are drawn (see _generate)."""
    name: str
    shape: tuple[int, ...]
    init: str        # "embed" | "linear" | "residual" | "norm" | "bias" | "router"
    layer: int = -1


# ---------------------------------------------------------------- families: tensor names and config.json

# family -> (architecture, MoE module, expert projection names gate/up/down, q/k norm, qkv bias, shared expert)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "head", False, False),
    "olmoe": ("OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "full", False, False),
    "mixtral": ("MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), None, False, False),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None, True, True),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None, False, False),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None, False, False),
}
# config.json fields of the DeepSeek families that the preset's `family_config` may set (defaults: DeepSeek-V2-Lite)
MLA_DEFAULTS = dict(kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_shared_experts=2, first_k_dense_replace=1, intermediate_size=10944, n_group=1, topk_group=1,
                    routed_scaling_factor=1.0)


def checkpoint_tensors(a) -> list[_Tensor]:
    """Every tensor of the checkpoint, in write order. Names and shapes are transformers 5.24's."""
    if a.family.startswith("deepseek"):
        return _mla_tensors(a)
    _, moe, (gate, up, down), qk_norm, qkv_bias, shared = FAMILIES[a.family]
    H, F, D = a.hidden_size, a.moe_intermediate_size, a.head_dim
    q_out, kv_out = a.num_attention_heads * D, a.num_key_value_heads * D
    out = [_Tensor("model.embed_tokens.weight", (a.vocab_size, H), "embed")]
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        t = [_Tensor(p + "input_layernorm.weight", (H,), "norm")]
        for proj, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            t.append(_Tensor(f"{p}self_attn.{proj}.weight", (rows, H), "linear"))
            if qkv_bias:
                t.append(_Tensor(f"{p}self_attn.{proj}.bias", (rows,), "bias"))
        if qk_norm == "head":            # Qwen3: one RMSNorm over each head's D channels
            t += [_Tensor(p + "self_attn.q_norm.weight", (D,), "norm"),
                  _Tensor(p + "self_attn.k_norm.weight", (D,), "norm")]
        elif qk_norm == "full":          # OLMoE: RMSNorm over all heads together
            t += [_Tensor(p + "self_attn.q_norm.weight", (q_out,), "norm"),
                  _Tensor(p + "self_attn.k_norm.weight", (kv_out,), "norm")]
        t.append(_Tensor(p + "self_attn.o_proj.weight", (H, q_out), "residual"))
        t.append(_Tensor(p + "post_attention_layernorm.weight", (H,), "norm"))
        t.append(_Tensor(f"{p}{moe}.gate.weight", (a.num_experts, H), "router", i))
        for e in range(a.num_experts):
            x = f"{p}{moe}.experts.{e}."
            t += [_Tensor(x + gate + ".weight", (F, H), "linear"), _Tensor(x + up + ".weight", (F, H), "linear"),
                  _Tensor(x + down + ".weight", (H, F), "residual")]
        if shared:
            S = a.shared_expert_intermediate_size
            x = f"{p}{moe}.shared_expert."
            t += [_Tensor(x + "gate_proj.weight", (S, H), "linear"), _Tensor(x + "up_proj.weight", (S, H), "linear"),
                  _Tensor(x + "down_proj.weight", (H, S), "residual"),
                  _Tensor(f"{p}{moe}.shared_expert_gate.weight", (1, H), "linear")]
        out += t
    out += [_Tensor("model.norm.weight", (H,), "norm"), _Tensor("lm_head.weight", (a.vocab_size, H), "linear")]
    return out


def _mla_tensors(a) -> list[_Tensor]:
    """DeepSeek-V2/V3: MLA attention, dense first layers, routed and shared experts."""
    m = {**MLA_DEFAULTS, **(a.family_config or {})}
    H, F, heads = a.hidden_size, a.moe_intermediate_size, a.num_attention_heads
    r, dr, dn, dv = m["kv_lora_rank"], m["qk_rope_head_dim"], m["qk_nope_head_dim"], m["v_head_dim"]
    out = [_Tensor("model.embed_tokens.weight", (a.vocab_size, H), "embed")]
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        t = [_Tensor(p + "input_layernorm.weight", (H,), "norm")]
        if m["q_lora_rank"]:
            t += [_Tensor(p + "self_attn.q_a_proj.weight", (m["q_lora_rank"], H), "linear"),
                  _Tensor(p + "self_attn.q_a_layernorm.weight", (m["q_lora_rank"],), "norm"),
                  _Tensor(p + "self_attn.q_b_proj.weight", (heads * (dn + dr), m["q_lora_rank"]), "linear")]
        else:
            t.append(_Tensor(p + "self_attn.q_proj.weight", (heads * (dn + dr), H), "linear"))
        t += [_Tensor(p + "self_attn.kv_a_proj_with_mqa.weight", (r + dr, H), "linear"),
              _Tensor(p + "self_attn.kv_a_layernorm.weight", (r,), "norm"),
              _Tensor(p + "self_attn.kv_b_proj.weight", (heads * (dn + dv), r), "linear"),
              _Tensor(p + "self_attn.o_proj.weight", (H, heads * dv), "residual"),
              _Tensor(p + "post_attention_layernorm.weight", (H,), "norm")]
        if i < m["first_k_dense_replace"]:
            t += _swiglu(p + "mlp.", H, m["intermediate_size"])
        else:
            t.append(_Tensor(p + "mlp.gate.weight", (a.num_experts, H), "router", i))
            if a.family == "deepseek_v3":
                t.append(_Tensor(p + "mlp.gate.e_score_correction_bias", (a.num_experts,), "bias"))
            for e in range(a.num_experts):
                t += _swiglu(f"{p}mlp.experts.{e}.", H, F)
            if m["n_shared_experts"]:
                t += _swiglu(p + "mlp.shared_experts.", H, F * m["n_shared_experts"])
        out += t
    return out + [_Tensor("model.norm.weight", (H,), "norm"), _Tensor("lm_head.weight", (a.vocab_size, H), "linear")]


def _swiglu(prefix: str, hidden: int, ffn: int) -> list[_Tensor]:
    return [_Tensor(prefix + "gate_proj.weight", (ffn, hidden), "linear"),
            _Tensor(prefix + "up_proj.weight", (ffn, hidden), "linear"),
            _Tensor(prefix + "down_proj.weight", (hidden, ffn), "residual")]


def checkpoint_config(a, dtype: str) -> dict:
    """config.json exactly as transformers 5.24 saves it for the family (without transformers_version)."""
    c = {
        "architectures": [FAMILIES[a.family][0]], "model_type": a.family, "dtype": dtype,
        "hidden_size": a.hidden_size, "num_hidden_layers": a.num_layers, "vocab_size": a.vocab_size,
        "num_attention_heads": a.num_attention_heads, "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim, "num_experts_per_tok": a.top_k, "hidden_act": "silu",
        "attention_dropout": 0.0, "initializer_range": 0.02, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "rms_norm_eps": 1e-06,
    }
    if a.family in ("qwen3_moe", "qwen2_moe"):
        c.update(decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=a.moe_intermediate_size,
                 use_sliding_window=False, max_position_embeddings=32768)
    if a.family == "qwen3_moe":
        # Dense layers (none here) would use intermediate_size; Qwen3-30B-A3B has top_k * moe_intermediate_size.
        c.update(attention_bias=False, sliding_window=None, num_local_experts=a.num_experts, norm_topk_prob=True,
                 intermediate_size=a.top_k * a.moe_intermediate_size)
    elif a.family == "qwen2_moe":
        c.update(num_experts=a.num_experts, norm_topk_prob=False, qkv_bias=True, sliding_window=0,
                 max_window_layers=28, layer_types=["full_attention"] * a.num_layers,
                 shared_expert_intermediate_size=a.shared_expert_intermediate_size,
                 intermediate_size=a.shared_expert_intermediate_size)
    elif a.family == "olmoe":            # OLMoE's experts use intermediate_size; it has no moe_intermediate_size
        c.update(num_experts=a.num_experts, norm_topk_prob=False, attention_bias=False, clip_qkv=None,
                 intermediate_size=a.moe_intermediate_size, rms_norm_eps=1e-05, router_aux_loss_coef=0.01,
                 max_position_embeddings=4096, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    elif a.family == "mixtral":          # Mixtral's experts use intermediate_size too
        c.update(num_local_experts=a.num_experts, intermediate_size=a.moe_intermediate_size, rms_norm_eps=1e-05,
                 router_jitter_noise=0.0, sliding_window=None, max_position_embeddings=32768)
    elif a.family.startswith("deepseek"):
        m = {**MLA_DEFAULTS, **(a.family_config or {})}
        c.update(m, n_routed_experts=a.num_experts, moe_intermediate_size=a.moe_intermediate_size,
                 head_dim=m["qk_rope_head_dim"], qk_head_dim=m["qk_nope_head_dim"] + m["qk_rope_head_dim"],
                 max_position_embeddings=163840, attention_bias=False, mlp_bias=False, pretraining_tp=1,
                 topk_method="group_limited_greedy" if m["n_group"] > 1 else "greedy",
                 norm_topk_prob=a.family == "deepseek_v3", rope_interleave=True,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                                  "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32.0, "beta_slow": 1.0})
        if a.family == "deepseek_v3":
            c["num_nextn_predict_layers"] = 1  # the multi-token-prediction head transformers does not build
    return c
