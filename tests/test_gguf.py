"""GGUF in: tiny Hugging Face models written as llama.cpp's converter writes them (gguf's GGUFWriter, its tensor name
map, stacked experts, llama's q/k row permutation), imported with `edge-moe export model.gguf`, and compared with
transformers and with the export of the same checkpoint from safetensors."""

import json

import numpy as np
import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe_export.exporter import export_checkpoint

from conftest import build_checkpoint, reference_logits, tiny_config

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

ARCH = {"qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "olmoe": gguf.MODEL_ARCH.OLMOE, "mixtral": gguf.MODEL_ARCH.LLAMA}
EXPERT_PROJECTIONS = {"mixtral": ("block_sparse_moe", ("w1", "w2", "w3")),
                      "qwen3_moe": ("mlp", ("gate_proj", "down_proj", "up_proj")),
                      "olmoe": ("mlp", ("gate_proj", "down_proj", "up_proj"))}
Q = gguf.GGMLQuantizationType


def permute(w, heads):
    """convert_hf_to_gguf's LlamaModel.permute: Hugging Face rotate-half rows -> ggml's interleaved RoPE rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, path, *, expert_type=Q.F32, weight_type=Q.F32, tokenizer=None):
    """Writes hf_dir's checkpoint as convert_hf_to_gguf.py would: metadata keys, stacked experts, permuted llama q/k,
    norms and the router in float32, other matrices in weight_type, experts in expert_type."""
    config = json.loads((hf_dir / "config.json").read_text())
    family = config["model_type"]
    state = safetensors_numpy.load_file(hf_dir / "model.safetensors")
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCH[family]])
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    experts = config.get("num_experts") or config["num_local_experts"]
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if "moe_intermediate_size" in config:
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if tokenizer is not None:
        tokenizer(writer)
    names = gguf.get_tensor_name_map(ARCH[family], layers)

    def add(hf_name, array, qtype):
        if array.ndim == 1 or hf_name.endswith("gate.weight"):
            qtype = Q.F32  # llama.cpp keeps norms and the router in float32
        data = gguf.quants.quantize(array.astype(np.float32), qtype)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data, raw_dtype=qtype)

    prefix, projections = EXPERT_PROJECTIONS[family]
    for name, array in state.items():
        if ".experts." in name:
            continue
        if family == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            array = permute(array, heads if "q_proj" in name else config["num_key_value_heads"])
        add(name, array, weight_type)
    for layer in range(layers):
        for projection in projections:
            stacked = np.stack([state[f"model.layers.{layer}.{prefix}.experts.{e}.{projection}.weight"]
                                for e in range(experts)])
            add(f"model.layers.{layer}.{prefix}.experts.{projection}.weight", stacked, expert_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def kl_divergence(reference_logits_, logits):
    """Mean over positions of KL(softmax(reference) || softmax(ours)), in nats."""
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p_log, q_log = log_softmax(reference_logits_.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return float((np.exp(p_log) * (p_log - q_log)).sum(axis=-1).mean())


IDS = list(range(2, 34))
SHAPES = {  # K a multiple of 32 so that Q8_0 / Q4_0 blocks fit
    "qwen3_moe": dict(hidden=64, ffn=64, heads=4, kv_heads=2, experts=6, top_k=2, norm_topk_prob=True),
    "mixtral": dict(hidden=64, ffn=64, heads=4, kv_heads=2, experts=4, top_k=2),
    "olmoe": dict(hidden=64, ffn=64, heads=4, kv_heads=4, experts=6, top_k=3),
}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_float32_gguf_exports_to_transformers_logits(family, tmp_path):
    reference = build_checkpoint(tmp_path / "hf", tiny_config(family, **SHAPES[family]), seed=11)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf")
    package = export_checkpoint(path, tmp_path / "pkg", progress=False)
    ours = edge_moe.load(package).logits(IDS)
    np.testing.assert_allclose(ours, reference_logits(reference, IDS), atol=1e-4, rtol=0)
    from_safetensors = edge_moe.load(export_checkpoint(tmp_path / "hf", tmp_path / "pkg_hf", progress=False))
    np.testing.assert_allclose(ours, from_safetensors.logits(IDS), atol=1e-5, rtol=0)


def test_float16_gguf_equals_the_float16_export(tmp_path):
    build_checkpoint(tmp_path / "hf", tiny_config("mixtral", **SHAPES["mixtral"]), seed=12)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=Q.F16, weight_type=Q.F16)
    package = export_checkpoint(path, tmp_path / "pkg", dtype="float16", progress=False)
    manifest = json.loads((package / "manifest.json").read_text())
    assert {e["dtype"] for e in manifest["experts"]} == {"float16"}
    expected = export_checkpoint(tmp_path / "hf", tmp_path / "pkg_hf", dtype="float16", progress=False)
    np.testing.assert_allclose(edge_moe.load(package).logits(IDS), edge_moe.load(expected).logits(IDS), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("family,qtype,bits,bound", [("qwen3_moe", Q.Q8_0, 8, 1e-4), ("qwen3_moe", Q.Q4_0, 4, 2e-2),
                                                     ("mixtral", Q.Q4_0, 4, 2e-2)])
def test_quantized_gguf_experts_become_our_quantized_experts(family, qtype, bits, bound, tmp_path):
    """Q8_0 / Q4_0 experts are dequantized and requantized at the same bits; the KL against transformers on the
    float weights is measured and printed next to that of our own quantizer on the same checkpoint."""
    reference = build_checkpoint(tmp_path / "hf", tiny_config(family, **SHAPES[family]), seed=13)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=qtype)
    package = export_checkpoint(path, tmp_path / "pkg", progress=False)
    manifest = json.loads((package / "manifest.json").read_text())
    assert {e["bits"] for e in manifest["experts"]} == {bits}
    exact = reference_logits(reference, IDS)
    kl = kl_divergence(exact, edge_moe.load(package).logits(IDS))
    ours = export_checkpoint(tmp_path / "hf", tmp_path / "pkg_hf", bits=bits, progress=False)
    kl_ours = kl_divergence(exact, edge_moe.load(ours).logits(IDS))
    print(f"{family} {qtype.name} experts -> {bits}-bit: KL {kl:.2e} nats (our {bits}-bit from float: {kl_ours:.2e})")
    assert 0 < kl < bound


def test_not_a_gguf_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(EdgeMoeError, match="not a readable GGUF file"):
        export_checkpoint(bad, tmp_path / "pkg", progress=False)
    with pytest.raises(EdgeMoeError, match="no such file"):
        export_checkpoint(tmp_path / "missing.gguf", tmp_path / "pkg", progress=False)


def test_dense_architecture_is_refused_with_the_supported_list(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "dense.gguf", "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EdgeMoeError, match="'qwen2' without experts is not supported; supported: qwen3moe"):
        export_checkpoint(tmp_path / "dense.gguf", tmp_path / "pkg", progress=False)
