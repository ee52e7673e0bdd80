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
on accelerators: it costs 9 MB of the CPU runtime's baseline otherwise.
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
    own layer kernel (native_layer.py) reads instead of opening the graph.

    Read from the protobuf wire format directly (ModelProto.graph -> GraphProto.initializer -> TensorProto's dims,
    data_type, name, external_data, data_location): importing `onnx` for it cost 8.8 MiB of a float16 package's
    baseline (101.4 MiB, against the 100 MB goal)."""
    data = Path(path).read_bytes()
    size = blob.stat().st_size
    found = {}
    try:
        graph = b""
        for field, value in _fields(data):  # every field: a torn file fails here, not silently after the graph
            graph = value if field == 7 else graph
        for field, tensor in _fields(graph):
            if field != 5:
                continue
            name, dims, dtype, external, location = "", [], 0, {}, 0
            for number, value in _fields(tensor):
                if number == 1:
                    dims.extend(_varints(value) if isinstance(value, bytes) else [value])
                elif number == 2:
                    dtype = value
                elif number == 8:
                    name = value.decode()
                elif number == 13:
                    entry = dict(_fields(value))
                    external[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
                elif number == 14:
                    location = value
            if location != 1 or Path(external.get("location", "")).name != blob.name:  # 1: EXTERNAL
                continue
            offset, length = int(external.get("offset", 0)), int(external.get("length", -1))
            if offset < 0 or length < 0 or offset + length > size:
                raise EdgeMoeError(f"{path}: initializer {name!r} lies at bytes {offset}..{offset + length} of "
                                   f"{blob.name}, which has {size}; re-export the model")
            found[name] = (offset, length, dtype, tuple(dims))
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise EdgeMoeError(f"{path}: not a readable ONNX graph ({exc}); re-export the model") from None
    return found


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("a varint runs past the end")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _varints(data: bytes) -> list[int]:
    values, at = [], 0
    while at < len(data):
        value, at = _varint(data, at)
        values.append(value)
    return values


def _fields(data: bytes):
    """(field number, value) of a protobuf message: varints as int, length-delimited fields as bytes."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        wire = key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise ValueError("a field runs past the end")
            value, at = data[at:at + length], at + length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
            continue
        else:
            raise ValueError(f"wire type {wire}")
        yield key >> 3, value
