"""Load-time readings of the package's layer graphs: float16 GroupQueryAttention on an accelerator, and the weights
edge_moe's own layer kernel reads.

Float16 GroupQueryAttention on an accelerator: a load-time rewrite of the package's float32 "gqa" layer graphs.

onnxruntime's CUDA GroupQueryAttention has float16 (and bfloat16) kernels only: given the package's float32 layer
graph it falls back to the CPU for that node, so GPU packages were exported with plain-ONNX attention (~70 nodes a
layer, the KV cache copied to the device and back every call: 0.75 ms a layer call on the H200). Rewritten, only
the attention changes precision: q, k, v are cast to float16 in front of the node, the KV cache and RoPE tables are
float16 inputs (kv_cache.GqaKVCache allocates them so, updated in place), and the output is cast back to float32 for
o_proj. Projections, norms and the router stay as exported.

    q, k, v [1, T, *] f32 -> Cast f16 -> GQA(past f16 [1, kvH, M, D], cos/sin f16) -> out f16 -> Cast f32

The graph is read without its weights (a few KB) and handed to onnxruntime as bytes with its folder for the
external weights (open_session's `weights_folder`): no weight is copied or re-read. `onnx` is imported only here,
on accelerators and where edge_moe's layer kernel runs (which saves onnxruntime's float32 copies of the weights):
it costs 9 MB of the CPU runtime's baseline otherwise.
"""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeMoeError

HALF_INPUTS = ("past_key", "past_value", "cos_cache", "sin_cache")
HALF_OUTPUTS = ("key", "value")


def half_attention_graph(path: str | Path) -> bytes | None:
    """The layer graph at `path` with its attention in float16, weights external in the graph's folder; None when
    it has no GroupQueryAttention node (a graph of another kind, which the caller's signature check names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return model.SerializeToString() if half_attention_model(model) else None


def half_attention_model(model) -> bool:
    """Rewrites a layer graph's ModelProto (read without its weights) in place to attend in float16; False when it
    has no GroupQueryAttention node (left as it is)."""
    from onnx import TensorProto, helper

    graph = model.graph
    at = next((i for i, n in enumerate(graph.node) if n.op_type == "GroupQueryAttention"), None)
    if at is None:
        return False
    attention = graph.node[at]
    casts = []
    for slot in range(3):  # query, key, value
        half = f"{attention.name}/half_input_{slot}"
        casts.append(helper.make_node("Cast", [attention.input[slot]], [half], name=f"{half}/Cast",
                                      to=TensorProto.FLOAT16))
        attention.input[slot] = half
    output = attention.output[0]
    attention.output[0] = f"{output}/half"
    back = helper.make_node("Cast", [attention.output[0]], [output], name=f"{attention.name}/float_output/Cast",
                            to=TensorProto.FLOAT)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:at] + casts + [nodes[at], back] + nodes[at + 1:])
    for value in list(graph.input) + list(graph.output):
        if value.name in HALF_INPUTS + HALF_OUTPUTS:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return True


def external_weights(path: str | Path, blob: Path) -> dict[str, tuple[int, int, int, tuple[int, ...]]]:
    """The initializers of the graph at `path` whose bytes lie in the backbone blob `blob`: name -> (offset, length,
    onnx data type, shape), each range checked to lie inside the blob (a package is untrusted input). What edge_moe's
    own layer kernel (native_layer.py) reads instead of opening the graph."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's own decode errors
        raise EdgeMoeError(f"{path}: not a readable ONNX graph ({str(exc)[:120]}); re-export the model") from None
    size = blob.stat().st_size
    found = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        if Path(entry.get("location", "")).name != blob.name:
            continue
        offset, length = int(entry.get("offset", 0)), int(entry.get("length", -1))
        if offset < 0 or length < 0 or offset + length > size:
            raise EdgeMoeError(f"{path}: initializer {tensor.name!r} lies at bytes {offset}..{offset + length} of "
                               f"{blob.name}, which has {size}; re-export the model")
        found[tensor.name] = (offset, length, tensor.data_type, tuple(int(d) for d in tensor.dims))
    return found
