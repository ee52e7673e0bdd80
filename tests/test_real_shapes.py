"""Each new family at its public model's real dimensions (hidden size, heads, MLA ranks, expert size, top-k, rope,
multipliers) with fewer layers, fewer experts and a small vocabulary to keep CI short: exported from a random bf16
checkpoint, logits within 1e-4 of transformers and greedy tokens identical."""

import numpy as np
import pytest

import edge_moe
from edge_moe_export.exporter import export_checkpoint

from conftest import build_checkpoint, reference_greedy, reference_logits, transformers

VOCAB = 512
_MLA_2048 = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                 kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 moe_intermediate_size=1408, n_shared_experts=2, num_experts_per_tok=6, n_routed_experts=8)
_GRANITE_3B = dict(hidden_size=1536, num_attention_heads=24, num_key_value_heads=8, intermediate_size=512,
                   num_local_experts=10, num_experts_per_tok=8, embedding_multiplier=12.0,
                   attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=6.0,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

CASES = {
    # DeepSeek-V2-Lite: YaRN (factor 40, mscale 0.707), greedy top-6 of 64 (8 here), 2 shared experts, layer 0 dense
    "deepseek-v2-lite": ("deepseek_v2", dict(
        _MLA_2048, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=10944, topk_method="greedy",
        routed_scaling_factor=1.0, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                         "beta_slow": 1.0})),
    # Moonlight-16B-A3B (model_type deepseek_v3): sigmoid + bias, top-6, scaling 2.446, rope theta 50000
    "moonlight-16b-a3b": ("deepseek_v3", dict(
        _MLA_2048, num_hidden_layers=1, first_k_dense_replace=0, intermediate_size=11264, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.446, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    # GPT-OSS-20B: hidden 2880, 64 heads of 64, 8 KV heads, experts of 2880, top-4 of 32 (4 here), sinks, YaRN
    # (factor 32, truncate false), sliding window 128 on even layers (a 12-token prompt stays inside it)
    "gpt-oss-20b": ("gpt_oss", dict(
        hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880,
        num_local_experts=4, num_experts_per_tok=4, num_hidden_layers=1, sliding_window=128,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096})),
    # Phi-3.5-MoE: hidden 4096, 32 heads of 128, 8 KV heads, experts of 6400, sparsemixer top-2 of 16 (2 here),
    # longrope over 4096 original positions (stand-in factors: the published ones are 64 measured values)
    "phi-3.5-moe": ("phimoe", dict(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=6400,
        num_local_experts=2, num_experts_per_tok=2, num_hidden_layers=1, max_position_embeddings=131072,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                         "short_factor": np.linspace(1.0, 1.3, 64).tolist(),
                         "long_factor": np.linspace(1.0, 60.0, 64).tolist(), "short_mscale": 1.243,
                         "long_mscale": 1.243})),
    # Granite-3.1-3B-A800M: 40 experts (10 here) top-8 of 512, multipliers as published
    "granite-3.1-3b-a800m": ("granitemoe", dict(_GRANITE_3B, num_hidden_layers=2)),
    "granite-3.1-3b-dims-shared": ("granitemoeshared", dict(_GRANITE_3B, num_hidden_layers=1,
                                                            shared_intermediate_size=1024)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_shape_matches_transformers(case, tmp_path):
    import torch

    family, dims = CASES[case]
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                                               pad_token_id=None, **dims)
    reference = build_checkpoint(tmp_path / "hf", config, dtype=torch.bfloat16, seed=7)
    package = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False)
    model = edge_moe.load(package)
    ids = np.random.default_rng(2).integers(2, VOCAB, 12).tolist()
    np.testing.assert_allclose(model.logits(ids), reference_logits(reference, ids), atol=1e-4, rtol=0)
    result = model.generate(ids, max_new_tokens=8)
    assert result.token_ids == reference_greedy(reference, ids, 8)[:len(result.token_ids)]
    if family.startswith("deepseek"):  # MLA caches the latent and the shared roped key, not per-head K/V
        cache = model.forward.new_cache()
        assert cache.keys[0].shape[1:] == (1, 512) and cache.values[0].shape[1:] == (1, 64)
