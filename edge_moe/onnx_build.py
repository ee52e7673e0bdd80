"""A small ONNX graph builder shared by the exporter (backbone, experts) and the runtime (expert kernels).

Node names follow one scheme, `{scope}/{op_type}_{n}` (for example `/model/layers.3/attn/q_proj/Gemm_0`), so a graph
reads well in Netron and profiles. Weights are either external data (a file offset, never loaded here) or graph
inputs, which is how the runtime feeds resident expert weights to one shared session per expert shape.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "uint8": TensorProto.UINT8,
}


class GraphBuilder:
    """Accumulates nodes, inputs, outputs and initializers; `model()` returns the ModelProto."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self.scope = ""
        # weight name -> MatMulNBits attributes, for weights the exporter stored block-quantized (backbone bits):
        # `linear` on such a name emits MatMulNBits over its `.qweight` / `.scales` initializers
        self.quantized: dict[str, dict] = {}

    def input(self, name: str, dtype: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], shape))
        return name

    def output(self, value: str, name: str, dtype: str, shape: list) -> str:
        """Exposes `value` as graph output `name` (through an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"{self.scope}/{name}/Identity"))
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], shape))
        return name

    def const(self, value, dtype: str = "float32") -> str:
        """An inline constant (small tensors: shapes, scalars, RoPE frequencies)."""
        array = np.asarray(value, dtype=dtype)
        name = self._fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def external(self, name: str, dtype: str, shape: list, location: str, offset: int, length: int) -> str:
        """An initializer whose bytes lie in `location` (relative to the .onnx file) at `offset`."""
        tensor = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        """Adds one node; returns its output name, or a list of names when `outputs` > 1."""
        node_name = self._fresh(op_type)
        names = [f"{node_name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, domain=domain or None,
                                           **attrs))
        return names[0] if outputs == 1 else names

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        domains = sorted({n.domain for n in self.nodes if n.domain})  # contrib ops (com.microsoft) need version 1
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)] +
                                  [helper.make_opsetid(d, 1) for d in domains], producer_name="edge_moe")
        model.ir_version = 8  # readable by onnxruntime >= 1.14
        return model

    def _fresh(self, kind: str) -> str:
        self._count += 1
        return f"{self.scope}/{kind}_{self._count}"

    # Building blocks shared by every family -------------------------------------------------------------

    def linear(self, x: str, weight: str, bias: str | None = None) -> str:
        """x [T, in] @ weight[out, in]^T (+ bias): Hugging Face layout, no transpose at export; a block-quantized
        weight (see `quantized`) runs as com.microsoft.MatMulNBits with int8 activations (accuracy_level 4)."""
        attrs = self.quantized.get(weight)
        if attrs is None:
            return self.op("Gemm", x, weight, *([bias] if bias else []), transB=1)
        y = self.op("MatMulNBits", x, f"{weight}.qweight", f"{weight}.scales", domain="com.microsoft",
                    accuracy_level=4, **attrs)
        return self.op("Add", y, bias) if bias else y

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32 as transformers does.

        One SimplifiedLayerNormalization (onnxruntime's, registered in the ONNX domain, with CPU and CUDA kernels)
        where plain ONNX needs six ops, each a kernel call: a decode step runs four norms a layer."""
        return self.op("SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=eps)

    def swiglu(self, x: str, gate_up: str, down: str, in_out_layout: bool = False) -> str:
        """down(silu(gate(x)) * up(x)) with gate and up fused in one matrix: [2F, H] in Hugging Face's
        [out, in] layout, or [H, 2F] with `in_out_layout` (then down is [F, H]) for a plain MatMul."""
        project = (lambda a, w: self.op("MatMul", a, w)) if in_out_layout else self.linear
        gate, up = self.op("Split", project(x, gate_up), axis=-1, outputs=2)
        activated = self.op("Mul", self.op("Mul", gate, self.op("Sigmoid", gate)), up)
        return project(activated, down)

    def swiglu_oss(self, x: str, w: dict[str, str], project=None) -> str:
        """GPT-OSS's expert: gate_up = x @ gate_up_proj + bias with gate in the even columns and up in the odd ones;
        gate <= limit, -limit <= up <= limit; ((up + 1) * gate * sigmoid(alpha * gate)) @ down_proj + down_bias.
        `project(a, name)` computes a @ weight `name` (default: MatMul on [in, out] weights w[name]; the quantized
        expert passes MatMulNBits)."""
        project = project or (lambda a, name: self.op("MatMul", a, w[name]))
        gate_up = self.op("Add", project(x, "gate_up_proj"), w["gate_up_bias"])                     # [T, 2F]
        pairs = self.op("Reshape", gate_up, self.const([0, -1, 2], "int64"))                       # [T, F, 2]
        gate, up = (self.op("Squeeze", half, self.const([2], "int64"))
                    for half in self.op("Split", pairs, axis=2, outputs=2))
        gate = self.op("Min", gate, w["limit"])
        up = self.op("Max", self.op("Min", up, w["limit"]), self.op("Neg", w["limit"]))
        glu = self.op("Mul", gate, self.op("Sigmoid", self.op("Mul", gate, w["alpha"])))
        gated = self.op("Mul", self.op("Add", up, self.const(1.0)), glu)
        return self.op("Add", project(gated, "down_proj"), w["down_bias"])

    def as_float32(self, x: str, dtype: str) -> str:
        """Casts a float16/bfloat16 weight to float32 (all activations are float32)."""
        return x if dtype == "float32" else self.op("Cast", x, to=TensorProto.FLOAT)

    def route_top_k(self, logits: str, top_k: int, normalize: bool, scaling_factor: float = 1.0) -> tuple[str, str]:
        """Each token's experts and weights from router logits [T, E], as routing.route computes them for a softmax
        top-k router: Softmax -> TopK (largest, sorted; ties to the lower index) -> (/ sum) -> (* scaling).
        Returns (indices [T, k] int64, weights [T, k] float32)."""
        weights, indices = self.op("TopK", self.op("Softmax", logits, axis=-1), self.const([top_k], "int64"),
                                   outputs=2, axis=-1, largest=1, sorted=1)
        if normalize:
            weights = self.op("Div", weights, self.op("ReduceSum", weights, self.const([-1], "int64"), keepdims=1))
        if scaling_factor != 1.0:
            weights = self.op("Mul", weights, self.const(scaling_factor))
        return indices, weights
