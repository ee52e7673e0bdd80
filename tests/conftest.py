"""The shared runner: tiny random-weight models built locally with transformers' `from_config` (no download),
saved as Hugging Face checkpoints, exported, and compared against transformers' own PyTorch forward pass."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# family -> the config keys that name its expert count
EXPERT_KEY = {"mixtral": "num_local_experts", "olmoe": "num_experts", "qwen2_moe": "num_experts",
              "qwen3_moe": "num_experts", "granitemoe": "num_local_experts", "granitemoeshared": "num_local_experts",
              "phimoe": "num_local_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts",
              "gpt_oss": "num_local_experts"}


def tiny_config(family: str, *, hidden=48, layers=2, heads=4, kv_heads=2, experts=6, top_k=2, ffn=40, vocab=128,
                **extra):
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, num_experts_per_tok=top_k,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    kwargs[EXPERT_KEY[family]] = experts
    if family in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        kwargs["moe_intermediate_size"] = ffn
        kwargs["intermediate_size"] = ffn + 8
    else:
        kwargs["intermediate_size"] = ffn
    if family == "qwen2_moe":
        kwargs["shared_expert_intermediate_size"] = ffn + 16
    kwargs.update(extra)
    return transformers.AutoConfig.for_model(family, **kwargs)


def build_checkpoint(directory, config, *, seed=0, dtype=None, max_shard_size=None):
    """Saves a random-weight model; returns the transformers model (float32, eval mode)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # default init leaves routers near zero: spread them so routing is decisive
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.15 if ("gate.weight" in name or "router.weight" in name) else 0.05)
            elif "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():  # DeepSeek-V3's selection-only router bias
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    save = model.to(dtype) if dtype is not None else model
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    save.save_pretrained(directory, **kwargs)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def reference_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def reference_greedy(model, ids, steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def export_float16(root, config):
    """(transformers model, package) of `config`, the checkpoint saved in float16 so that transformers (reading it
    back in float32) runs the very weights the float16 package holds."""
    from edge_moe_export.exporter import export_checkpoint

    hf = build_checkpoint(root / "hf", config, dtype=torch.float16)
    return hf, export_checkpoint(root / "hf", root / "pkg", dtype="float16", progress=False)


def assert_agrees(model, other, hf, ids, new_tokens: int = 12) -> None:
    """`model` computes what `other` does (the same weights on another path: logits within 1e-5 of their largest) and
    what transformers' `hf` does (within 1e-4), with the same greedy tokens as both."""
    a, b = model.logits(ids), other.logits(ids)
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale
    assert np.abs(a - reference_logits(hf, ids)).max() <= 1e-4 * scale
    tokens = model.generate(ids, new_tokens).token_ids
    assert tokens == other.generate(ids, new_tokens).token_ids
    reference = reference_greedy(hf, ids, new_tokens)  # goes on past the end-of-sequence token, where generate stops
    assert tokens == reference[:len(tokens)] and (len(tokens) == new_tokens or tokens[-1] == hf.config.eos_token_id)


def fake_expert_record(layer: int, length: int):
    """What budget arithmetic reads of a float32 expert record, for tests that need no package."""
    from types import SimpleNamespace

    return SimpleNamespace(layer=layer, length=length, kind="swiglu", hidden_size=512, intermediate_size=512,
                           dtype="float32", block_size=None, zero_points=False)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """A small exported qwen3_moe package shared by the CLI and bad-input tests: (package dir, hf dir)."""
    from edge_moe_export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    build_checkpoint(root / "hf", tiny_config("qwen3_moe"))
    return export_checkpoint(root / "hf", root / "pkg", progress=False), root / "hf"


@pytest.fixture(scope="session")
def shipped_package(tmp_path_factory):
    """The default model exported once for the session into a private cache (it has a real tokenizer)."""
    import os

    from edge_moe import default_model

    os.environ.setdefault("EDGE_MOE_CACHE", str(tmp_path_factory.mktemp("default-cache")))
    return default_model.default_model_path(progress=False)


def mxfp4_gpt_oss_checkpoint(hf_dir, out_dir):
    """GPT-OSS as it ships: the experts of the checkpoint in hf_dir re-encoded as MXFP4 (gate_up_proj_blocks
    [E, 2F, G, 16] over the input, and scales) in out_dir; everything else as it was."""
    import shutil
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    from edge_moe_export.encodings import quantize_mxfp4

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        codes = [quantize_mxfp4(np.ascontiguousarray(w.astype(np.float32).T)) for w in tensors.pop(name)]  # [out, in]
        tensors[f"{name}_blocks"] = np.stack([b for b, _ in codes])
        tensors[f"{name}_scales"] = np.stack([s for _, s in codes])
    out_dir.mkdir()
    save_file(tensors, out_dir / "model.safetensors")
    shutil.copyfile(hf_dir / "config.json", out_dir / "config.json")
    return out_dir


@pytest.fixture(params=["avx512-vnni", "avx-vnni", "avx2"])
def instructions(request):
    """Each block kernel (edge_moe.native) the CPU runs: AVX-512 VNNI and AVX-VNNI where it has them, and the AVX2
    one (forced there too, as on a CPU without VNNI)."""
    from edge_moe import native

    if native.unavailable_reason() is not None:
        pytest.skip(native.unavailable_reason())
    native.use_block_instructions(request.param)
    try:
        if native.blocks_instructions() != request.param:
            pytest.skip(f"this CPU lacks {request.param}")
        yield request.param
    finally:
        native.use_block_instructions(None)
