"""The graph of one quantized routed expert: SwiGLU with both projections as `com.microsoft.MatMulNBits`.

    # T = tokens, H = hidden, F = expert intermediate size, nb(K) = ceil(K / block_size)
    hidden_states [T, H] -> MatMulNBits(gate_up_proj: N=2F, K=H) -> split -> silu(gate) * up   [T, F]
                         -> MatMulNBits(down_proj: N=H, K=F) -> expert_output                    [T, H]

"swiglu" stacks gate rows over up rows; "swiglu_oss" (GPT-OSS) keeps its checkpoint's interleaved rows (gate 2i,
up 2i+1, which is also how its MXFP4 blocks come) and adds float32 biases after each projection, and the scalar
alpha and limit, around the same activation as the float graph (GraphBuilder.swiglu_oss).

Weights are initializers, never graph inputs (as inputs MatMulNBits runs 15-20x slower and ignores accuracy_level;
DESIGN.md). The exporter points them at the layer's blob (a standalone model); the runtime opens the same graph with
`SessionOptions.add_external_initializers` fed from views into the expert's read buffer, so nothing is read twice.
onnxruntime prepacks them into its own copy at session creation and then no longer reads the buffer.

`accuracy_level=4` lets onnxruntime quantize the activations to int8 per block and use integer dot products: about
4x faster than float accumulation at one token, at a relative error near 1e-2 of the output's scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # onnx is imported only where a graph is built (RSS)
    import onnx

ACCURACY_LEVEL = 4
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits takes
MS_DOMAIN = "com.microsoft"


def _projections(shape) -> dict[str, tuple[int, int]]:
    """name -> (N, K): Hugging Face [out, in], quantized along `in`."""
    h, f = shape.hidden_size, shape.intermediate_size
    return {"gate_up_proj": (2 * f, h), "down_proj": (h, f)}


# swiglu_oss: the bias added to each projection's output
OSS_BIASES = {"gate_up_proj": "gate_up_bias", "down_proj": "down_bias"}


def quantized_tensor_shapes(shape) -> dict[str, tuple[str, list[int]]]:
    """Stored tensors of a quantized expert: name -> (dtype, shape), in blob order."""
    bits, block = shape.bits, shape.block_size
    out = {}
    for name, (n, k) in _projections(shape).items():
        nb = -(-k // block)
        out[f"{name}.qweight"] = ("uint8", [n, nb, block * bits // 8])
        out[f"{name}.scales"] = ("float32", [n, nb])
        if shape.zero_points:
            out[f"{name}.zero_points"] = ("uint8", [n, -(-nb * bits // 8)])
        if shape.kind == "swiglu_oss":
            out[OSS_BIASES[name]] = ("float32", [n])
    if shape.kind == "swiglu_oss":
        out["alpha"] = out["limit"] = ("float32", [])
    return out


def build_quant_expert_graph(shape, external: dict[str, tuple[str, int, int]]) -> "onnx.ModelProto":
    """Builds the MatMulNBits expert graph.

    Args:
        shape: an ExpertShape with dtype q4 or q8, its block_size and zero_points.
        external: tensor name -> (blob path relative to the graph, offset, length). The runtime passes the same and
            overrides every initializer with add_external_initializers.
    Returns:
        The ModelProto (opset 17 plus com.microsoft 1).
    Raises:
        ValueError: external is None (MatMulNBits weights cannot be graph inputs at a usable speed).
    """
    from .expert_graph import INPUT, OUTPUT
    from .onnx_build import GraphBuilder

    if external is None:
        raise ValueError(f"{shape.dtype} experts need their weights as initializers; pass `external`")
    g = GraphBuilder(f"expert_{shape.kind}_{shape.hidden_size}x{shape.intermediate_size}_{shape.dtype}"
                     f"_b{shape.block_size}")
    g.scope = "/expert"
    x = g.input(INPUT, "float32", ["T", shape.hidden_size])
    tensors = {}
    for name, (dtype, dims) in quantized_tensor_shapes(shape).items():
        location, offset, length = external[name]
        tensors[name] = g.external(name, dtype, dims, location, offset, length)

    def project(a: str, name: str) -> str:
        n, k = _projections(shape)[name]
        inputs = [a, f"{name}.qweight", f"{name}.scales"] + ([f"{name}.zero_points"] if shape.zero_points else [])
        return g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=k, N=n, bits=shape.bits,
                    block_size=shape.block_size, accuracy_level=ACCURACY_LEVEL)

    if shape.kind == "swiglu_oss":
        g.output(g.swiglu_oss(x, tensors, project), OUTPUT, "float32", ["T", shape.hidden_size])
        return g.model()
    gate, up = g.op("Split", project(x, "gate_up_proj"), axis=-1, outputs=2)
    activated = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    g.output(project(activated, "down_proj"), OUTPUT, "float32", ["T", shape.hidden_size])
    return g.model()
