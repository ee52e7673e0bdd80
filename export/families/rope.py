"""Rotary position embedding frequencies from a config.json, as transformers computes them (modeling_rope_utils):
plain RoPE and YaRN (DeepSeek-V2/V3, GPT-OSS). Other scalings are refused with the list of supported ones."""

from __future__ import annotations

import math

import numpy as np

from edge_moe.errors import EdgeMoeError

SUPPORTED = ("default", "yarn")


def rope_parameters(config: dict, supported: tuple[str, ...] = SUPPORTED) -> dict:
    """config.json's rope settings in one dict (transformers 5 `rope_parameters`, or older `rope_scaling` plus
    top-level rope_theta); `supported` are the rope types the family computes."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in supported:
        raise EdgeMoeError(f"config.json: rope_type {kind!r} is not supported yet; supported: {', '.join(supported)}")
    rope["rope_type"] = kind
    return rope


def inverse_frequencies(config: dict, dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [dim/2] float32, attention_factor: multiplies cos and sin) for rotary dimension `dim`."""
    rope = rope_parameters(config)
    base = float(rope["rope_theta"])
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    if rope["rope_type"] == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    original = rope.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    factor = rope.get("factor") or config["max_position_embeddings"] / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (np.float32(factor) * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
