"""Load-time rewrites of a package's layer graphs: float16 attention on accelerators, and routing inside the graph.

Both read the graph without its weights (a few KB), add a handful of nodes, and give onnxruntime the bytes with the
graph's folder for its external weights (open_session's `weights_folder`), so no weight is copied or re-read.

Float16 attention. onnxruntime's CUDA GroupQueryAttention has float16 (and bfloat16) kernels only: given the
package's float32 "gqa" layer graph it falls back to the CPU for that node, so GPU packages were exported with
plain-ONNX attention (~70 nodes a layer, the KV cache copied to the device and back every call: 0.75 ms a layer call
on the H200). Rewritten, only the attention changes precision: q, k, v are cast to float16 in front of the node, the
KV cache and RoPE tables are float16 inputs (kv_cache.GqaKVCache allocates them so, updated in place), and the
output is cast back to float32 for o_proj. Projections, norms and the router stay as exported.

    q, k, v [1, T, *] f32 -> Cast f16 -> GQA(past f16 [1, kvH, M, D], cos/sin f16) -> out f16 -> Cast f32

Routing in the graph. Routing in numpy costs ~16 us a layer in isolation and 60 us inside decode (the experts'
weights stream through the caches in between, and the interpreter's working set with them): 0.76 ms of a 9.8 ms
token on this VM. For a softmax top-k router (renormalized or not, scaled or not) the graph now also returns each
token's experts and weights, two outputs in front of the KV outputs:

    router_logits [T, E] -> Softmax -> TopK(k, largest, sorted: ties to the lower index, as routing.py)
        -> (/ sum: normalize) -> (* scaling_factor) -> route_indices [T, k] int64, route_weights [T, k] float32
Routers with a selection bias, groups, sigmoid scores or sparsemixer keep routing.Router on the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .family_spec import RouterSpec

HALF_INPUTS = ("past_key", "past_value", "cos_cache", "sin_cache")
HALF_OUTPUTS = ("key", "value")
LOGITS, ROUTE_OUTPUTS = "router_logits", ("route_indices", "route_weights")


def routes_in_graph(spec: RouterSpec) -> bool:
    """Whether the graph can route exactly as routing.route does for this router."""
    return (spec.scoring == "softmax" and not spec.selection_bias and spec.n_group == 1
            and spec.weight_on == "output")


def rewrite_layer(path: str | Path, *, half_attention: bool = False, routing: RouterSpec | None = None) -> bytes | None:
    """The layer graph at `path` with float16 attention and/or routing outputs (see the module docstring), its
    weights external in the graph's folder; None when the graph has nothing to rewrite (no GroupQueryAttention
    node, no router logits: a graph of another kind, which the caller's signature check then names)."""
    model = onnx.load(str(path), load_external_data=False)
    graph, changed = model.graph, False
    if half_attention and any(n.op_type == "GroupQueryAttention" for n in graph.node):
        _half_attention(graph)
        changed = True
    if routing is not None and any(o.name == LOGITS for o in graph.output):
        _route(graph, routing)
        changed = True
    return model.SerializeToString() if changed else None


def _half_attention(graph: onnx.GraphProto) -> None:
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


def _route(graph: onnx.GraphProto, spec: RouterSpec) -> None:
    def const(name, value, dtype):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op, inputs, output, **attrs):
        graph.node.append(helper.make_node(op, inputs, [output], name=f"/route/{output}/{op}", **attrs))
        return output

    probs = node("Softmax", [LOGITS], "/route/probs", axis=-1)
    graph.node.append(helper.make_node("TopK", [probs, const("/route/k", [spec.top_k], "int64")],
                                       ["/route/top", ROUTE_OUTPUTS[0]], name="/route/TopK", axis=-1, largest=1,
                                       sorted=1))
    weights = "/route/top"
    if spec.normalize:
        total = node("ReduceSum", [weights, const("/route/axes", [-1], "int64")], "/route/total", keepdims=1)
        weights = node("Div", [weights, total], "/route/normalized")
    if spec.scaling_factor != 1.0:
        weights = node("Mul", [weights, const("/route/scale", spec.scaling_factor, "float32")], "/route/scaled")
    node("Identity", [weights], ROUTE_OUTPUTS[1])
    outputs = list(graph.output)
    kv = [o for o in outputs if o.name in HALF_OUTPUTS]
    del graph.output[:]
    graph.output.extend([o for o in outputs if o.name not in HALF_OUTPUTS] + [
        helper.make_tensor_value_info(ROUTE_OUTPUTS[0], TensorProto.INT64, ["T", spec.top_k]),
        helper.make_tensor_value_info(ROUTE_OUTPUTS[1], TensorProto.FLOAT, ["T", spec.top_k])] + kv)
