"""The graph of one routed expert: `expert_output = swiglu(hidden_states)`, [T, H] -> [T, H] in float32.

Expert kinds: "swiglu" (down(silu(gate x) * up x)); "swiglu_oss" (GPT-OSS: biased projections, gate and up
interleaved in gate_up_proj's columns, gate clamped above and up on both sides at `limit`,
down((up + 1) * gate * sigmoid(alpha * gate)) + bias; alpha and limit are stored as scalar tensors in the expert
itself, so the graph needs nothing from the config).

The exporter writes it once per expert with the weights as external data in the layer's blob (a standalone model
that plain onnxruntime and Netron open). The runtime builds the same graph once per expert shape with the weights
as graph inputs and feeds each resident expert's arrays to that one session: no session per expert, no copy of
C-contiguous float32 weights per call (measured in DESIGN.md), and the bytes the cache holds are the bytes it
accounts for.

Quantized experts (dtype "q2"/"q4"/"q8", edge_moe.quant_graph) are the exception: MatMulNBits runs 15-20x slower with its
weights as graph inputs, so each resident quantized expert gets its own session with the weights as initializers.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # onnx costs ~12 MB of RSS: imported only where a graph is built
    import onnx

INPUT, OUTPUT = "hidden_states", "expert_output"
KINDS = ("swiglu", "swiglu_oss")


@dataclass(frozen=True)
class ExpertShape:
    """What makes two experts share a runtime kernel."""

    kind: str  # one of KINDS
    hidden_size: int
    intermediate_size: int
    dtype: str  # dtype of the stored weights: float32, float16, or q2/q4/q8 (MatMulNBits, see quant_graph)
    block_size: int = 0  # quantized only: weights per scale
    zero_points: bool = False  # quantized only: asymmetric blocks with a stored zero point

    @property
    def bits(self) -> int:
        return {"float32": 32, "float16": 16, "bfloat16": 16, "q8": 8, "q4": 4, "q2": 2}[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.dtype in ("q2", "q4", "q8")

    def tensor_shapes(self) -> dict[str, list[int]]:
        if self.quantized:
            from .quant_graph import quantized_tensor_shapes

            return {name: shape for name, (_, shape) in quantized_tensor_shapes(self).items()}
        # [in, out]: onnxruntime's MatMul streams unpacked weights at M=1 about 40% faster than Gemm(transB)
        # (13.8 vs 9.9 GB/s measured on 2 cores), and the kernel takes weights as inputs, so nothing is prepacked.
        h, f = self.hidden_size, self.intermediate_size
        if self.kind == "swiglu_oss":
            return {"gate_up_proj": [h, 2 * f], "gate_up_bias": [2 * f], "down_proj": [f, h], "down_bias": [h],
                    "alpha": [], "limit": []}
        return {"gate_up_proj": [h, 2 * f], "down_proj": [f, h]}


    def stored_tensors(self) -> dict[str, tuple[str, list[int]]]:
        """name -> (dtype, dims) of an unquantized expert's tensors; scalars (swiglu_oss's alpha, limit) stay
        float32 whatever the weights' dtype."""
        return {name: (self.dtype if dims else "float32", dims) for name, dims in self.tensor_shapes().items()}


def build_expert_graph(shape: ExpertShape, external: dict[str, tuple[str, int, int]] | None = None) -> "onnx.ModelProto":
    """Builds the expert graph.

    Args:
        shape: kind, sizes and weight dtype.
        external: tensor name -> (blob path relative to the graph, offset, length) for a standalone graph;
            None makes the weights graph inputs (the runtime's shared kernel).
    Returns:
        The ModelProto.
    """
    if shape.kind not in KINDS:
        raise ValueError(f"expert kind {shape.kind!r} is not supported; supported: {', '.join(KINDS)}")
    if shape.quantized:
        from .quant_graph import build_quant_expert_graph

        return build_quant_expert_graph(shape, external)
    from .onnx_build import GraphBuilder

    g = GraphBuilder(f"expert_{shape.kind}_{shape.hidden_size}x{shape.intermediate_size}_{shape.dtype}")
    g.scope = "/expert"
    x = g.input(INPUT, "float32", ["T", shape.hidden_size])
    weights = {}
    for name, (dtype, dims) in shape.stored_tensors().items():
        if external is None:
            weights[name] = g.input(name, dtype, dims)
        else:
            location, offset, length = external[name]
            weights[name] = g.external(name, dtype, dims, location, offset, length)
        weights[name] = g.as_float32(weights[name], dtype)
    if shape.kind == "swiglu_oss":
        y = g.swiglu_oss(x, weights)
    else:
        y = g.swiglu(x, weights["gate_up_proj"], weights["down_proj"], in_out_layout=True)
    g.output(y, OUTPUT, "float32", ["T", shape.hidden_size])
    return g.model()
