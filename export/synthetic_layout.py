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
    fan_in_axis: int = -1  # the input axis of a linear weight: -1 for [out, in], -2 for GPT-OSS's [E, in, out]


# ---------------------------------------------------------------- families: tensor names and config.json

# family -> (architecture, MoE module, expert projection names gate/up/down, q/k norm, qkv bias, shared expert)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "head", False, False),
    "olmoe": ("OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "full", False, False),
    "mixtral": ("MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), None, False, False),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None, True, True),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None, False, False),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None, False, False),
    "granitemoe": ("GraniteMoeForCausalLM", "block_sparse_moe", None, None, False, False),
    "phimoe": ("PhimoeForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), None, False, False),
    "gpt_oss": ("GptOssForCausalLM", "mlp", None, None, False, False),
}
# What the newer families add to that common layout: biases on all four attention projections, LayerNorm biases
# (Phi), an lm_head bias, a learned attention sink per head, the router's module and bias, and experts stored
# fused per layer (`experts`: Granite's input_linear [E, 2F, H] / output_linear [E, H, F]; GPT-OSS's
# gate_up_proj [E, H, 2F] / down_proj [E, F, H] in [in, out] with biases) instead of one tensor per expert.
EXTRAS = {
    "granitemoe": dict(router="router.layer", experts="granite"),
    "phimoe": dict(attention_bias=True, norm_bias=True, lm_head_bias=True),
    "gpt_oss": dict(attention_bias=True, sinks=True, router="router", router_bias=True, experts="gpt_oss"),
}
# config.json fields of the DeepSeek families that the preset's `family_config` may set (defaults: DeepSeek-V2-Lite)
MLA_DEFAULTS = dict(kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_shared_experts=2, first_k_dense_replace=1, intermediate_size=10944, n_group=1, topk_group=1,
                    routed_scaling_factor=1.0)
# Granite's multipliers (defaults: Granite-3.1-3B-A800M's)
GRANITE_DEFAULTS = dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                        logits_scaling=6.0)
# family -> the config.json fields a preset's `family_config` may set, with their defaults
FAMILY_DEFAULTS = {"deepseek_v2": MLA_DEFAULTS, "deepseek_v3": MLA_DEFAULTS, "granitemoe": GRANITE_DEFAULTS}


def checkpoint_tensors(a) -> list[_Tensor]:
    """Every tensor of the checkpoint, in write order. Names and shapes are transformers 5.24's."""
    if a.family.startswith("deepseek"):
        return _mla_tensors(a)
    _, moe, projections, qk_norm, qkv_bias, shared = FAMILIES[a.family]
    extra = EXTRAS.get(a.family, {})
    H, F, D = a.hidden_size, a.moe_intermediate_size, a.head_dim
    q_out, kv_out = a.num_attention_heads * D, a.num_key_value_heads * D

    def norm(name: str) -> list[_Tensor]:
        bias = [_Tensor(name + ".bias", (H,), "bias")] if extra.get("norm_bias") else []
        return [_Tensor(name + ".weight", (H,), "norm")] + bias

    out = [_Tensor("model.embed_tokens.weight", (a.vocab_size, H), "embed")]
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        t = norm(p + "input_layernorm")
        for proj, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            t.append(_Tensor(f"{p}self_attn.{proj}.weight", (rows, H), "linear"))
            if qkv_bias or extra.get("attention_bias"):
                t.append(_Tensor(f"{p}self_attn.{proj}.bias", (rows,), "bias"))
        if qk_norm == "head":            # Qwen3: one RMSNorm over each head's D channels
            t += [_Tensor(p + "self_attn.q_norm.weight", (D,), "norm"),
                  _Tensor(p + "self_attn.k_norm.weight", (D,), "norm")]
        elif qk_norm == "full":          # OLMoE: RMSNorm over all heads together
            t += [_Tensor(p + "self_attn.q_norm.weight", (q_out,), "norm"),
                  _Tensor(p + "self_attn.k_norm.weight", (kv_out,), "norm")]
        t.append(_Tensor(p + "self_attn.o_proj.weight", (H, q_out), "residual"))
        if extra.get("attention_bias"):
            t.append(_Tensor(p + "self_attn.o_proj.bias", (H,), "bias"))
        if extra.get("sinks"):
            t.append(_Tensor(p + "self_attn.sinks", (a.num_attention_heads,), "bias"))
        t += norm(p + "post_attention_layernorm")
        router = f"{p}{moe}.{extra.get('router', 'gate')}"
        t.append(_Tensor(router + ".weight", (a.num_experts, H), "router", i))
        if extra.get("router_bias"):
            t.append(_Tensor(router + ".bias", (a.num_experts,), "bias"))
        t += _experts(f"{p}{moe}.", extra.get("experts"), projections, a.num_experts, H, F)
        if shared:
            S = a.shared_expert_intermediate_size
            x = f"{p}{moe}.shared_expert."
            t += [_Tensor(x + "gate_proj.weight", (S, H), "linear"), _Tensor(x + "up_proj.weight", (S, H), "linear"),
                  _Tensor(x + "down_proj.weight", (H, S), "residual"),
                  _Tensor(f"{p}{moe}.shared_expert_gate.weight", (1, H), "linear")]
        out += t
    out += norm("model.norm") + [_Tensor("lm_head.weight", (a.vocab_size, H), "linear")]
    if extra.get("lm_head_bias"):
        out.append(_Tensor("lm_head.bias", (a.vocab_size,), "bias"))
    return out


def _experts(prefix: str, fused: str | None, projections, experts: int, H: int, F: int) -> list[_Tensor]:
    """The routed experts of one layer: one tensor per expert and projection, or fused per layer."""
    E = experts
    if fused == "granite":
        return [_Tensor(prefix + "input_linear.weight", (E, 2 * F, H), "linear"),
                _Tensor(prefix + "output_linear.weight", (E, H, F), "residual")]
    if fused == "gpt_oss":
        x = prefix + "experts."
        return [_Tensor(x + "gate_up_proj", (E, H, 2 * F), "linear", fan_in_axis=-2),
                _Tensor(x + "gate_up_proj_bias", (E, 2 * F), "bias"),
                _Tensor(x + "down_proj", (E, F, H), "residual", fan_in_axis=-2),
                _Tensor(x + "down_proj_bias", (E, H), "bias")]
    gate, up, down = projections
    out = []
    for e in range(E):
        x = f"{prefix}experts.{e}."
        out += [_Tensor(x + gate + ".weight", (F, H), "linear"), _Tensor(x + up + ".weight", (F, H), "linear"),
                _Tensor(x + down + ".weight", (H, F), "residual")]
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
    elif a.family in ("granitemoe", "phimoe", "gpt_oss"):  # experts sized by intermediate_size
        c.update(num_local_experts=a.num_experts, intermediate_size=a.moe_intermediate_size,
                 attention_bias=a.family != "granitemoe")
        c.update(_new_family_config(a))
        if a.family != "gpt_oss":        # their head size is hidden_size / num_attention_heads, not a field
            del c["head_dim"]
    return c


def _new_family_config(a) -> dict:
    if a.family == "granitemoe":
        return {**GRANITE_DEFAULTS, **(a.family_config or {}), "max_position_embeddings": 4096,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    if a.family == "phimoe":
        # Phi-3.5-MoE: longrope over 4096 original positions. The published factors are 64 measured values; these
        # stand-ins have the same length and range (short ~1, long up to ~60).
        half = a.head_dim // 2
        return {"lm_head_bias": True, "input_jitter_noise": 0.01, "router_jitter_noise": 0.01,
                "rms_norm_eps": 1e-05, "sliding_window": 131072, "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096, "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 4096,
                                    "short_factor": [round(1.0 + 0.3 * i / (half - 1), 4) for i in range(half)],
                                    "long_factor": [round(1.0 + 59.0 * i / (half - 1), 4) for i in range(half)],
                                    "short_mscale": 1.243, "long_mscale": 1.243}}
    # GPT-OSS-20B: sliding window 128 on every other layer (the first one sliding), YaRN over 4096 positions
    return {"layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(a.num_layers)],
            "sliding_window": 128, "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rms_norm_eps": 1e-05,
            "max_position_embeddings": 131072,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}}
