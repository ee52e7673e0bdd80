"""A Hugging Face MoE checkpoint written as llama.cpp's convert_hf_to_gguf.py writes it, with the gguf package's
GGUFWriter and its own HF -> GGUF tensor name map: the fixture of tests/test_gguf.py, and the file behind the GGUF
import timing (no llama.cpp build needed):

    python tests/gguf_writer.py HF_DIR OUT.gguf [--experts Q4_0] [--weights F16]
"""

import argparse
import json
from pathlib import Path

import gguf
import numpy as np

from edge_moe_export.checkpoint import Checkpoint

ARCH = {"qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE, "olmoe": gguf.MODEL_ARCH.OLMOE,
        "mixtral": gguf.MODEL_ARCH.LLAMA}
EXPERT_PROJECTIONS = {"mixtral": ("block_sparse_moe", ("w1", "w2", "w3")),
                      "qwen3_moe": ("mlp", ("gate_proj", "down_proj", "up_proj")),
                      "qwen2_moe": ("mlp", ("gate_proj", "down_proj", "up_proj")),
                      "olmoe": ("mlp", ("gate_proj", "down_proj", "up_proj"))}
Q = gguf.GGMLQuantizationType


def permute(w, heads):
    """convert_hf_to_gguf's LlamaModel.permute: Hugging Face rotate-half rows -> ggml's interleaved RoPE rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, path, *, expert_type=Q.F32, weight_type=Q.F32, tokenizer=None, stacked=True, split_tensors=0):
    """Writes hf_dir's checkpoint as convert_hf_to_gguf.py would: metadata keys, stacked experts, permuted llama q/k,
    norms and the router in float32, other matrices in weight_type, experts in expert_type. stacked=False writes
    one tensor per expert, blk.N.ffn_gate.E.weight, as llama.cpp's converters did for Mixtral until early 2024.
    split_tensors > 0 splits the file every that many tensors (NAME-00001-of-0000N.gguf; returns the first)."""
    config = json.loads((hf_dir / "config.json").read_text())
    family = config["model_type"]
    state = Checkpoint(hf_dir)
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCH[family]], use_temp_file=not split_tensors,
                             split_max_tensors=split_tensors)
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
    if "shared_expert_intermediate_size" in config:
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if tokenizer is not None:
        tokenizer(writer)
    names = gguf.get_tensor_name_map(ARCH[family], layers)

    def add(hf_name, array, qtype, expert=None):
        if array.ndim == 1 or hf_name.endswith("gate.weight"):
            qtype = Q.F32  # llama.cpp keeps norms and the router in float32
        data = gguf.quants.quantize(array.astype(np.float32), qtype)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(name if expert is None else name.replace("_exps.", f".{expert}."), data, raw_dtype=qtype)

    prefix, projections = EXPERT_PROJECTIONS[family]
    for name in state.names():
        if ".experts." in name:
            continue
        array = state.read(name)
        if family == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            array = permute(array, heads if "q_proj" in name else config["num_key_value_heads"])
        add(name, array, weight_type)
    for layer in range(layers):
        for projection in projections:
            weights = [state.read(f"model.layers.{layer}.{prefix}.experts.{e}.{projection}.weight")
                       for e in range(experts)]
            merged = f"model.layers.{layer}.{prefix}.experts.{projection}.weight"
            if stacked:
                add(merged, np.stack(weights), expert_type)
            else:
                for e, w in enumerate(weights):
                    add(merged, w, expert_type, expert=e)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))
    return shards[0] if split_tensors and shards else path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--experts", default="F16", help="GGUF type of the expert tensors (F32, F16, Q8_0, Q4_0)")
    parser.add_argument("--weights", default="F16", help="GGUF type of the other matrices")
    args = parser.parse_args()
    write_gguf(args.hf_dir, args.out, expert_type=Q[args.experts], weight_type=Q[args.weights])


if __name__ == "__main__":
    main()
