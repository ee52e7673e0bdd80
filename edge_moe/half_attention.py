"""GroupQueryAttention in float16 on an accelerator, rewritten from the package's float32 layer graph at load.

onnxruntime's CUDA GroupQueryAttention has float16 (and bfloat16) kernels only: given the package's float32 "gqa"
layer graph it falls back to the CPU for that node, copying the whole cache each call, so GPU packages were exported
with plain-ONNX attention (~70 nodes a layer, a KV cache copied to the device and back every call; measured on the
H200 at 0.75 ms a layer call, over half of a fused decode step). Rewritten here, only the attention itself changes
precision: q, k, v are cast to float16 in front of the node, the KV cache and the RoPE tables are float16 inputs
(kv_cache.GqaKVCache allocates them so, on the device, updated in place), and the attention output is cast back to
float32 for o_proj. Projections, norms and the router stay as exported.

    q, k, v [1, T, *] f32 -> Cast f16 -> GQA(past f16 [1, kvH, M, D], cos/sin f16) -> out f16 -> Cast f32
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

HALF_INPUTS = ("past_key", "past_value", "cos_cache", "sin_cache")
HALF_OUTPUTS = ("key", "value")


def half_attention_graph(path: str | Path) -> bytes:
    """The layer graph at `path` (a package's "gqa" graph) with its attention in float16, weights inline."""
    model = onnx.load(str(path), load_external_data=True)  # one session's weights; the layer's own, not the model's
    graph = model.graph
    at = next(i for i, n in enumerate(graph.node) if n.op_type == "GroupQueryAttention")
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
    return model.SerializeToString()
