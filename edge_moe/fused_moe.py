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

Float16 experts on the CPU run in edge_moe's own kernel (native.py) over float16 stacks in the same layout, where it
was built: onnxruntime has no x86 kernel that reads float16 weights, and its float32 stacks read twice the bytes.
It runs outside onnxruntime, so such layers run one call each (no step graph): 1.8x faster a layer at one token.

Quantized experts (q4 / q8, symmetric, on the CPU) run in `com.microsoft.QMoE` over the same packed blocks their
MatMulNBits graphs hold, with the same int8 activations (accuracy_level 4): 2.7e-7 of the per-expert path's output
at one token, 5e-5 at 64 (float32 sums in another order). Its weights must be initializers (as graph inputs it
runs 20x slower: no prepacking), so each layer's stacks are given to the session that runs them and onnxruntime
keeps its own packed copy (about 1.7x the stacks: 0.7 MB an expert of 512x512 at 4 bits, where a MatMulNBits
session per expert holds 1.5 MB). Measured on this VM (synthetic Qwen3-MoE, 4-bit block 128, one layer, 1 thread):
86 us a decode call against 162 us for its 4 experts one session each, and 3.8 ms against 11.4 ms for 64 tokens.
The kernel is given the chosen experts directly (router_probs 1 for the chosen, 0 elsewhere; router_weights w).

    x [T, H], indices and weights [T, k] -> ones and w scattered to [T, E] -> QMoE(k, SwiGLU, fc1 [E, 2F, H*bits/8]
        + scales [E, 2F, H/B], fc2 [E, H, F*bits/8] + scales [E, H, F/B]) -> [T, H]
"""

from __future__ import annotations

import numpy as np

from . import native, quant
from .errors import EdgeMoeError
from .experts import expert_shape
from .family_spec import ROUTE_OUTPUTS, router_spec
from .lazy_imports import ort
from .manifest import Manifest
from .quant_graph import ACCURACY_LEVEL
from .sessions import OrtClock, TimedSession, open_session

X, FC1, FC2, Y = "moe_input", "fc1_experts_weights", "fc2_experts_weights", "moe_output"
FC1_SCALES, FC2_SCALES = "fc1_scales", "fc2_scales"  # quantized experts
QUANT_BITS = {"q4": 4, "q8": 8}  # what QMoE takes of the package's expert dtypes
RESIDUAL, HIDDEN = "residual", "hidden_states"
NOT_CHOSEN = -1e4  # a log-weight whose exp is 0 in float32, and finite in float16
ROUTE_INDICES, ROUTE_WEIGHTS = ROUTE_OUTPUTS


def runs_quantized(shape) -> bool:
    """Whether experts of this ExpertShape run in QMoE over their quantized blocks; small quantized experts run as
    float32, as the per-expert path computes them (quant.uses_session), and QMoE's int8 activations would not."""
    return shape.quantized and quant.uses_session(shape)


def experts_run_quantized(manifest: Manifest) -> bool:
    """runs_quantized for the package's experts (its first one: a model whose experts differ is not fused)."""
    record = next(iter(manifest.experts.values()), None)
    return record is not None and runs_quantized(expert_shape(record))


def experts_run_native(manifest: Manifest) -> bool:
    """Whether edge_moe's own kernel (native.py) runs the package's experts here: float16 ones, and quantized ones
    that would run in QMoE (symmetric q4 / q8 blocks, read in place) where the CPU has AVX-512 VNNI
    (native.blocks_fused_reason); on the CPU they
    fuse in it then."""
    record = next(iter(manifest.experts.values()), None)
    if record is None or native.unavailable_reason() is not None:
        return False
    if record.dtype == "float16":
        return True
    return experts_run_quantized(manifest) and quant.kernel_reads(expert_shape(record)) and \
        native.blocks_fused_reason() is None and \
        record.hidden_size % record.block_size == 0 and record.intermediate_size % record.block_size == 0


def unfusable_reason(manifest: Manifest, device=None) -> str | None:
    """Why the fused kernel cannot run this package's layers exactly as its experts define them, or None when it
    can: weights on the experts' outputs, SwiGLU experts of one dtype, float or small quantized ones on any device,
    large quantized ones (runs_quantized) as symmetric q4 / q8 blocks that rows fill whole, on the CPU (`device`
    None or one whose onnxruntime device is the CPU). Any router: it runs on the host or in the layer graph."""
    if router_spec(manifest.config).weight_on != "output":
        return "its router weights the experts' inputs (Llama 4)"
    records = list(manifest.experts.values())
    if not records:
        return "it has no routed experts"
    kinds = {(r.kind, r.dtype) for r in records}
    if len(kinds) > 1 or any(kind != "swiglu" for kind, _ in kinds):
        return f"its experts are {sorted(kinds)}; the fused kernel takes one kind of SwiGLU expert a model"
    dtype = records[0].dtype
    if experts_run_quantized(manifest):
        if dtype not in QUANT_BITS:
            return f"its experts are {dtype}; the quantized fused kernel takes q4 and q8"
        if device is not None and device.ort_device != "cpu":
            return f"its experts are {dtype}; the quantized fused kernel runs on the CPU"
        if any(r.zero_points for r in records):
            return "its quantized experts have zero points; the quantized fused kernel takes symmetric blocks"
        if any(r.hidden_size % r.block_size or r.intermediate_size % r.block_size for r in records):
            return "its quantized experts' rows do not fill whole blocks"
    layers = {}
    for r in records:
        layers.setdefault(r.key[0], set()).add(r.key[1])
    experts = int(manifest.config["num_experts"])
    if any(len(found) != experts for found in layers.values()):
        return "some layer lacks experts"
    return None


def build_moe_graph(hidden: int, experts: int, intermediate: int, top_k: int, dtype: str, residual: bool = False,
                    block_size: int = 0):
    """A MoE layer's routed experts as a graph: x [T, H] and the router's choice (indices and weights [T, k]) -> the
    weighted sum of the chosen experts [T, H] (with `residual`: residual + that sum, the layer's output, as
    step_graph.py composes it after the layer graph).

    Float experts (`dtype` float32 / float16): weights are graph inputs FC1 / FC2 in `dtype`. The kernel gets
    log(w / max w) for the chosen experts and NOT_CHOSEN for the rest, so its softmax and top-k give back exactly the
    chosen experts with weights w / sum w; the output is scaled back by sum w.
    Quantized experts (`dtype` q4 / q8, `block_size`): FC1, FC1_SCALES, FC2, FC2_SCALES are initializers whose bytes
    the session is given at load (sessions.open_session's `initializers`; see quantized_stacks), with
    int8 activations as the experts' MatMulNBits sessions (onnxruntime's QMoE does so at any accuracy_level)."""
    from onnx import TensorProto

    from .onnx_build import GraphBuilder  # onnx only where a graph is built: 9 MB of the runtime's baseline

    g = GraphBuilder(f"{'routed_' if residual else 'fused_'}moe_{experts}x{hidden}x{intermediate}_top{top_k}_{dtype}")
    g.scope = "/moe"
    base = g.input(RESIDUAL, "float32", ["T", hidden]) if residual else None
    x = g.input(X, "float32", ["T", hidden])
    indices, weights = (g.input(ROUTE_INDICES, "int64", ["T", top_k]),
                        g.input(ROUTE_WEIGHTS, "float32", ["T", top_k]))
    shape = g.op("Concat", g.op("Shape", x, end=1), g.const([experts], "int64"), axis=0)     # [T, E]
    if dtype in QUANT_BITS:
        bits = QUANT_BITS[dtype]
        stacks = quantized_stack_shapes(hidden, experts, intermediate, bits, block_size)
        for name, (array_dtype, dims) in stacks.items():
            g.external(name, array_dtype, dims, "unused.bin", 0, array_bytes(array_dtype, dims))
        zeros = g.op("Expand", g.const([[0.0]]), shape)
        picked = g.op("ScatterElements", zeros, indices, g.op("Expand", g.const([[1.0]]), g.op("Shape", weights)),
                      axis=1)
        chosen = g.op("ScatterElements", zeros, indices, weights, axis=1)
        y = g.op("QMoE", x, picked, FC1, FC1_SCALES, "", FC2, FC2_SCALES, "", "", "", "", "", "", "", chosen,
                 domain="com.microsoft", k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                 activation_beta=0.0, expert_weight_bits=bits, block_size=block_size, accuracy_level=ACCURACY_LEVEL,
                 normalize_routing_weights=0, quant_type="int")
    else:
        fc1 = g.input(FC1, dtype, [experts, 2 * intermediate, hidden])
        fc2 = g.input(FC2, dtype, [experts, hidden, intermediate])
        total = g.op("ReduceSum", weights, g.const([-1], "int64"), keepdims=1)                    # [T, 1]
        largest = g.op("Max", g.op("ReduceMax", weights, axes=[-1], keepdims=1), g.const(np.finfo(np.float32).tiny))
        logs = g.op("Max", g.op("Log", g.op("Div", weights, largest)), g.const(NOT_CHOSEN))       # log(w / max w)
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


def quantized_stack_shapes(hidden: int, experts: int, intermediate: int, bits: int, block_size: int) -> dict:
    """QMoE's weights: name -> (dtype, shape)."""
    return {FC1: ("uint8", [experts, 2 * intermediate, hidden * bits // 8]),
            FC1_SCALES: ("float32", [experts, 2 * intermediate, hidden // block_size]),
            FC2: ("uint8", [experts, hidden, intermediate * bits // 8]),
            FC2_SCALES: ("float32", [experts, hidden, intermediate // block_size])}


def array_bytes(dtype: str, dims: list[int]) -> int:
    return int(np.prod(dims)) * np.dtype(dtype).itemsize


def quantized_stacks(tensors: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A layer's quantized experts (each the package's MatMulNBits tensors: gate_up_proj rows gate | up) -> QMoE's
    stacked weights, gate and up rows interleaved in fc1 (the blocks themselves are the same bytes)."""
    first = tensors[0]["gate_up_proj.qweight"]
    intermediate = first.shape[0] // 2
    order = np.empty(2 * intermediate, np.int64)
    order[0::2], order[1::2] = np.arange(intermediate), intermediate + np.arange(intermediate)
    stacks = {FC1: [], FC1_SCALES: [], FC2: [], FC2_SCALES: []}
    for t in tensors:
        stacks[FC1].append(t["gate_up_proj.qweight"].reshape(2 * intermediate, -1)[order])
        stacks[FC1_SCALES].append(t["gate_up_proj.scales"][order])
        down = t["down_proj.qweight"]
        stacks[FC2].append(down.reshape(down.shape[0], -1))
        stacks[FC2_SCALES].append(t["down_proj.scales"])
    return {name: np.stack(parts) for name, parts in stacks.items()}


def _rows(stack: np.ndarray) -> np.ndarray:
    """[E, rows, ...] -> [E * rows, ...]: a stack as the rows of one matrix."""
    return stack.reshape(-1, stack.shape[-1])


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
    """Every MoE layer's experts stacked for the kernel, and the one call that runs a layer's routed experts.

    Float experts are stacked once on `device` and bound as inputs of one shared session. Quantized experts become
    initializers of the session that runs them (QMoE prepacks them only so): one session a layer, opened when the
    layer first runs here (open_all opens them all), and the step graph's own (layer_stacks); nothing stays stacked.

    Args:
        manifest: the package (unfusable_reason(manifest, device) must be None).
        expert_tensors: (layer, expert) -> that expert's stored tensors (name -> array, experts.stored_tensors).
        device: the Device whose providers run the kernel; its memory holds the float stacks.
        clock: OrtClock.
        progress: a tqdm bar advanced by one for each expert stacked, or None.
        native_kernel: float16 experts on the CPU in edge_moe's own kernel (native.py). None: where it was built and
            this CPU runs it; False: onnxruntime's MoE over float32 stacks; True insists.
        threads: the native kernel's threads.
    """

    def __init__(self, manifest: Manifest, expert_tensors, device, clock: OrtClock, progress=None,
                 native_kernel: bool | None = None, threads: int = 1):
        reason = unfusable_reason(manifest, device)
        if reason is not None:
            raise EdgeMoeError(f"{manifest.root}: the fused MoE kernel cannot run this model: {reason}; load it "
                               "with fused_moe=False (--no-fused-moe)")
        c = manifest.config
        record = next(iter(manifest.experts.values()))
        self.device, self.num_experts, self.top_k = device, int(c["num_experts"]), router_spec(c).top_k
        self.clock, self._expert_tensors, self._progress = clock, expert_tensors, progress
        self.layers = sorted({r.key[0] for r in manifest.experts.values()})
        shape = expert_shape(record)
        self.quantized = runs_quantized(shape)
        if shape.quantized and not self.quantized:  # small ones: float32, as the per-expert path computes them
            def expert_tensors(layer: int, e: int, stored=expert_tensors) -> dict[str, np.ndarray]:
                return quant.dequantized_weights(shape, stored(layer, e))
        self.native = device.ort_device == "cpu" and native_kernel is not False and experts_run_native(manifest)
        if native_kernel and not self.native:
            why = native.unavailable_reason() or native.blocks_fused_reason() or \
                "they are not float16 or symmetric q4 / q8 blocks on the CPU"
            raise EdgeMoeError(f"{manifest.root}: edge_moe's kernel cannot run these experts: {why}")
        # float16 stays float16 where the device computes in it (or edge_moe's CPU kernel reads it); onnxruntime's CPU
        # kernel takes float32 only
        self.dtype = record.dtype if self.quantized else \
            "float16" if device.compute_dtype == "float16" or self.native else "float32"
        self.block_size, self.threads = record.block_size, max(1, int(threads))
        self.model = None if self.native else build_moe_graph(
            record.hidden_size, self.num_experts, record.intermediate_size, self.top_k, self.dtype,
            block_size=self.block_size).SerializeToString()
        # float experts: layer -> (fc1, fc2), OrtValues on the device (host arrays for the native kernel)
        self.stacks: dict[int, tuple] = {}
        self._sessions: dict[int, TimedSession] = {}  # quantized experts: layer -> its session
        self._bindings: dict[int, object] = {}
        if self.quantized and self.native:  # the package's blocks, stacked once and read in place by the kernel
            self.session, self.nbytes = None, 0
            bits = QUANT_BITS[self.dtype]
            for layer in self.layers:
                stacks = self.layer_stacks(layer)
                self.stacks[layer] = tuple(native.Matrix.of_blocks(
                    _rows(stacks[codes]), _rows(stacks[scales]), bits, self.block_size, k)
                    for codes, scales, k in ((FC1, FC1_SCALES, record.hidden_size),
                                             (FC2, FC2_SCALES, record.intermediate_size)))
                self.nbytes += sum(a.nbytes for a in stacks.values())
            return
        if self.quantized:
            shapes = quantized_stack_shapes(record.hidden_size, self.num_experts, record.intermediate_size,
                                            QUANT_BITS[self.dtype], self.block_size)
            self.nbytes = len(self.layers) * sum(array_bytes(dt, dims) for dt, dims in shapes.values())
            self.session = None
            return
        self.session = None if self.native else \
            TimedSession(open_session(self.model, providers=device.providers), clock)
        self.nbytes = 0
        for layer in self.layers:
            weights = []
            for e in range(self.num_experts):
                weights.append(expert_tensors(layer, e))
                self._advance(1)
            fc1, fc2 = stack_layer(weights, np.dtype(self.dtype))
            self.stacks[layer] = native.stacked(fc1, fc2) if self.native else tuple(
                ort.OrtValue.ortvalue_from_numpy(a, device.ort_device, device.device_id) for a in (fc1, fc2))
            self.nbytes += fc1.nbytes + fc2.nbytes

    def layer_stacks(self, layer: int) -> dict[str, np.ndarray]:
        """A quantized layer's stacked weights, read from the package now (checksums verified by the read)."""
        stacks = quantized_stacks([self._expert_tensors(layer, e) for e in range(self.num_experts)])
        self._advance(self.num_experts)
        return stacks

    def bind_stacks(self, io, layer: int, named=lambda name: name) -> None:
        """Binds the layer's float stacks as the inputs `named(FC1)` / `named(FC2)` of a binding; quantized stacks
        are their sessions' initializers, so nothing to bind."""
        if not self.quantized:
            fc1, fc2 = self.stacks[layer]
            io.bind_ortvalue_input(named(FC1), fc1)
            io.bind_ortvalue_input(named(FC2), fc2)

    def open_all(self) -> None:
        """Opens every quantized layer's session now, so that no token waits for one (none in edge_moe's kernel)."""
        for layer in self.layers if not self.native else ():
            self._layer_session(layer)

    def _advance(self, experts: int) -> None:
        if self._progress is not None:
            self._progress.update(experts)

    def _layer_session(self, layer: int) -> TimedSession:
        session = self._sessions.get(layer)
        if session is None:  # onnxruntime copies and packs the stacks: they go when this returns
            session = self._sessions[layer] = TimedSession(
                open_session(self.model, providers=self.device.providers, initializers=self.layer_stacks(layer)),
                self.clock)
        return session

    def run(self, layer: int, x: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """x [T, H] and the router's choice (indices, weights [T, k], float32, host) -> the layer's routed-experts
        output [T, H] (host)."""
        if self.native:
            return self.clock.time_native(native.moe, *self.stacks[layer], x, indices, weights, self.threads)
        session = self._layer_session(layer) if self.quantized else self.session
        io = self._bindings.get(layer)
        if io is None:  # the float stacks stay bound between calls; only x and the routing change
            io = self._bindings[layer] = session.io_binding()
            self.bind_stacks(io, layer)
        io.bind_cpu_input(X, np.ascontiguousarray(x, np.float32))
        io.bind_cpu_input(ROUTE_INDICES, np.ascontiguousarray(indices, np.int64))
        io.bind_cpu_input(ROUTE_WEIGHTS, np.ascontiguousarray(weights, np.float32))
        io.bind_output(Y, "cpu")
        return session.run_bound(io, 1)[0]
