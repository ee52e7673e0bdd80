"""One onnxruntime call per MoE layer: routing, every chosen expert and their weighted sum in onnxruntime's fused
`com.microsoft.MoE` kernel, over all the layer's experts stacked on the device.

The per-expert path (Forward.moe) makes k + 1 calls a layer and returns to Python between them: on the H200 that
is ~2 ms a layer of 6 for Qwen3-30B-A3B shapes (8 experts a token), per-call overhead rather than the GPU. When
every expert of a layer is resident on the accelerator there is nothing left to place or stream, so the layer's
experts can run as one kernel. It needs all of a layer's experts in one stacked tensor, so it is for an
all-resident accelerator (or forced, for tests and measurements), never for a budget that streams experts; the
per-expert path stays the reference (`fused_moe=False`) and the fallback for what the kernel cannot express.

Routing stays the family's own, in float32 (routing.Router on the host, or the layer graph's route outputs): the
graph turns the chosen experts and weights into the kernel's "router probabilities", log(w / max w) for the chosen
experts and -1e4 for the rest, so its softmax and top-k return exactly the chosen experts with weights w / sum(w),
and scales the output back by sum(w). Fed the raw logits instead, a float16 kernel rounds them before its softmax:
measured on the H200, near-ties then chose other experts and logits moved by 9e-3 of their largest magnitude (2.9e-4
per expert).

    # T = tokens, H = hidden, F = expert intermediate size, E = experts of the layer, k = experts per token
    x [T, H], indices and weights [T, k] -> chosen log-weights [T, E] -> (Cast to the compute dtype) -> MoE(k,
        softmax top-k, renormalize, SwiGLU with gate and up interleaved in fc1 [E, 2F, H], fc2 [E, H, F])
        -> (Cast to float32) -> * sum(w) -> [T, H]
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import EdgeMoeError
from .family_spec import ROUTE_OUTPUTS, router_spec
from .manifest import Manifest
from .sessions import OrtClock, TimedSession, open_session

X, FC1, FC2, Y = "moe_input", "fc1_experts_weights", "fc2_experts_weights", "moe_output"
RESIDUAL, HIDDEN = "residual", "hidden_states"
NOT_CHOSEN = -1e4  # a log-weight whose exp is 0 in float32, and finite in float16
ROUTE_INDICES, ROUTE_WEIGHTS = ROUTE_OUTPUTS


def unfusable_reason(manifest: Manifest) -> str | None:
    """Why the fused kernel cannot run this package's layers exactly as its experts define them, or None when it
    can: weights on the experts' outputs, SwiGLU experts stored as float32 or float16 (any router: it runs on the
    host)."""
    if router_spec(manifest.config).weight_on != "output":
        return "its router weights the experts' inputs (Llama 4)"
    kinds = {(r.kind, r.dtype) for r in manifest.experts.values()}
    if not kinds:
        return "it has no routed experts"
    if any(kind != "swiglu" or dtype not in ("float32", "float16") for kind, dtype in kinds):
        return f"its experts are {sorted(kinds)}; the fused kernel takes float32/float16 SwiGLU experts"
    layers = {}
    for r in manifest.experts.values():
        layers.setdefault(r.key[0], set()).add(r.key[1])
    experts = int(manifest.config["num_experts"])
    if any(len(found) != experts for found in layers.values()):
        return "some layer lacks experts"
    return None


def build_moe_graph(hidden: int, experts: int, intermediate: int, top_k: int, dtype: str, residual: bool = False):
    """A MoE layer's routed experts as a graph: x [T, H] and the router's choice (indices and weights [T, k]) -> the
    weighted sum of the chosen experts [T, H] (with `residual`: residual + that sum, the layer's output, as
    step_graph.py composes it after the layer graph). Weights are graph inputs FC1 / FC2 in `dtype`. The kernel gets
    log(w / max w) for the chosen experts and NOT_CHOSEN for the rest, so its softmax and top-k give back exactly the
    chosen experts with weights w / sum w; the output is scaled back by sum w."""
    from onnx import TensorProto

    from .onnx_build import GraphBuilder  # onnx only where a graph is built: 9 MB of the runtime's baseline

    g = GraphBuilder(f"{'routed_' if residual else 'fused_'}moe_{experts}x{hidden}x{intermediate}_top{top_k}_{dtype}")
    g.scope = "/moe"
    base = g.input(RESIDUAL, "float32", ["T", hidden]) if residual else None
    x = g.input(X, "float32", ["T", hidden])
    indices, weights = (g.input(ROUTE_INDICES, "int64", ["T", top_k]),
                        g.input(ROUTE_WEIGHTS, "float32", ["T", top_k]))
    fc1 = g.input(FC1, dtype, [experts, 2 * intermediate, hidden])
    fc2 = g.input(FC2, dtype, [experts, hidden, intermediate])
    total = g.op("ReduceSum", weights, g.const([-1], "int64"), keepdims=1)                    # [T, 1]
    largest = g.op("Max", g.op("ReduceMax", weights, axes=[-1], keepdims=1), g.const(np.finfo(np.float32).tiny))
    logs = g.op("Max", g.op("Log", g.op("Div", weights, largest)), g.const(NOT_CHOSEN))       # log(w / max w)
    shape = g.op("Concat", g.op("Shape", x, end=1), g.const([experts], "int64"), axis=0)     # [T, E]
    chosen = g.op("ScatterElements", g.op("Expand", g.const([[NOT_CHOSEN]]), shape), indices, logs, axis=1)
    if dtype == "float16":
        x, chosen = (g.op("Cast", v, to=TensorProto.FLOAT16) for v in (x, chosen))
    # activation_alpha 1 and beta 0 make the kernel's swiglu the plain silu(gate) * up (its defaults are GPT-OSS's)
    y = g.op("MoE", x, chosen, fc1, "", fc2, domain="com.microsoft", k=top_k, activation_type="swiglu",
             swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1)
    if dtype == "float16":
        y = g.op("Cast", y, to=TensorProto.FLOAT)
    y = g.op("Mul", y, total)
    if residual:
        g.output(g.op("Add", base, y), HIDDEN, "float32", ["T", hidden])
    else:
        g.output(y, Y, "float32", ["T", hidden])
    return g.model()


def stack_layer(weights: list[dict[str, np.ndarray]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's layout from the package's: fc1 [E, 2F, H] with gate and up rows interleaved (gate_up_proj is
    [H, 2F] with gate | up), fc2 [E, H, F] (down_proj is [F, H])."""
    first = weights[0]["gate_up_proj"]
    hidden, intermediate = first.shape[0], first.shape[1] // 2
    fc1 = np.empty((len(weights), 2 * intermediate, hidden), dtype)
    fc2 = np.empty((len(weights), hidden, intermediate), dtype)
    for e, w in enumerate(weights):
        gate_up = w["gate_up_proj"]
        fc1[e, 0::2] = gate_up[:, :intermediate].T
        fc1[e, 1::2] = gate_up[:, intermediate:].T
        fc2[e] = w["down_proj"].T
    return fc1, fc2


class FusedMoeLayers:
    """Every MoE layer's experts stacked on `device`, and the one call that runs a layer's routed experts.

    Args:
        manifest: the package (unfusable_reason must be None).
        expert_weights: (layer, expert) -> that expert's weight arrays (name -> array), e.g. from the RAM tier.
        device: the Device whose providers run the kernel; its memory holds the stacks.
        clock: OrtClock.
    """

    def __init__(self, manifest: Manifest, expert_weights, device, clock: OrtClock):
        reason = unfusable_reason(manifest)
        if reason is not None:
            raise EdgeMoeError(f"{manifest.root}: the fused MoE kernel cannot run this model: {reason}; load it "
                               "with fused_moe=False (--no-fused-moe)")
        c = manifest.config
        # float16 stays float16 where the device computes in it; the CPU kernel takes float32 only
        dtype = "float16" if device.compute_dtype == "float16" else "float32"
        record = next(iter(manifest.experts.values()))
        self.device, self.num_experts, self.top_k = device, int(c["num_experts"]), router_spec(c).top_k
        self.dtype = dtype
        model = build_moe_graph(record.hidden_size, self.num_experts, record.intermediate_size, self.top_k,
                                dtype).SerializeToString()
        self.session = TimedSession(open_session(model, providers=device.providers), clock)
        self.stacks: dict[int, tuple[ort.OrtValue, ort.OrtValue]] = {}
        self.nbytes = 0
        for layer in sorted({r.key[0] for r in manifest.experts.values()}):
            fc1, fc2 = stack_layer([expert_weights(layer, e) for e in range(self.num_experts)], np.dtype(dtype))
            self.stacks[layer] = tuple(ort.OrtValue.ortvalue_from_numpy(a, device.ort_device, device.device_id)
                                       for a in (fc1, fc2))
            self.nbytes += fc1.nbytes + fc2.nbytes
        self._bindings: dict[int, object] = {}

    def run(self, layer: int, x: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """x [T, H] and the router's choice (indices, weights [T, k], float32, host) -> the layer's routed-experts
        output [T, H] (host)."""
        io = self._bindings.get(layer)
        if io is None:  # the stacks stay bound between calls; only x and the routing change
            io = self._bindings[layer] = self.session.io_binding()
            fc1, fc2 = self.stacks[layer]
            io.bind_ortvalue_input(FC1, fc1)
            io.bind_ortvalue_input(FC2, fc2)
        io.bind_cpu_input(X, np.ascontiguousarray(x, np.float32))
        io.bind_cpu_input(ROUTE_INDICES, np.ascontiguousarray(indices, np.int64))
        io.bind_cpu_input(ROUTE_WEIGHTS, np.ascontiguousarray(weights, np.float32))
        io.bind_output(Y, "cpu")
        return self.session.run_bound(io, 1)[0]
