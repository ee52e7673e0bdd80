"""One onnxruntime call a token: the embedding, every layer graph and its fused MoE composed into one graph at load.

With fused MoE layers (fused_moe.py) a decoded token still made 2 + 2L calls with Python and host copies between
them: on the H200 (6 layers) 5.6 ms a token, 1.8 ms of it outside onnxruntime. When every MoE layer routes inside
its graph (family_spec.ROUTE_OUTPUTS) and attends with GroupQueryAttention over a KV cache updated in place, nothing
between the layers needs Python, so the package's graphs are composed into one at load: each graph's names get its
layer's prefix, a layer's outputs feed the MoE graph (fused_moe.build_moe_graph with the residual: the same graph
FusedMoeLayers runs per layer) and the next layer. A token is one call and the head's.

    input_ids -> embed -> [layer i: attention, router, top-k -> MoE(stacks i) -> + residual] x L -> hidden_states
    past/present KV of layer i: past_key.i / key.i (one buffer, bound in place); stacks: fc1.i / fc2.i (bound once;
    quantized experts' stacks and scales are the session's initializers, given at load)
    route_indices.i [T, k] of every MoE layer: outputs, copied out only when someone observes the routing

The graphs are read without their weights and the composed graph is opened as bytes with the backbone's folder for
them (as layer_graphs.py does). The per-layer sessions, which hold the same weights, are closed once this session
is open and reopened when batching first runs one call a layer (Backbone.open_layers_on_use). The per-layer path
stays the reference (`step_graph=False`).
"""

from __future__ import annotations

import weakref

import numpy as np

from .errors import EdgeMoeError
from .fused_moe import (FC1, FC1_SCALES, FC2, FC2_SCALES, HIDDEN, RESIDUAL, ROUTE_INDICES, ROUTE_WEIGHTS, X,
                        FusedMoeLayers, build_moe_graph)
from .layer_graphs import half_attention_model
from .lazy_imports import ort
from .manifest import Manifest
from .model import LAYER_INPUTS
from .sessions import OrtClock, TimedSession, open_session

IDS = "input_ids"
GRAPH_ID = "gpu_graph_id"  # onnxruntime's run option naming the CUDA graph a run captures or replays (-1: none)
MAX_REPLAYS = 8
SHARED_INPUTS = tuple(LAYER_INPUTS["gqa"][3:])  # sequence lengths and RoPE tables: one for every layer
PER_LAYER = ("past_key", "past_value", "key", "value")


def per_layer(name: str, layer: int) -> str:
    return f"{name}.{layer}"


def unsupported_reason(manifest: Manifest, routed: set[int]) -> str | None:
    """Why this package's layers cannot run as one graph (None when they can): `routed` are the MoE layers whose
    graph routes (Backbone.routed)."""
    if manifest.config.get("attention_kernel", "generic") != "gqa":
        return "its layer graphs attend with plain ONNX ops and a KV cache copied in numpy (export --attention auto)"
    if not set(manifest.config["moe_layers"]) <= routed:
        return "its layer graphs do not route (re-export it: exports route in their layer graphs since revision 3)"
    return None


def build_step_model(manifest: Manifest, half_attention: bool, moe_dtype: str, top_k: int, block_size: int = 0):
    """The composed ModelProto (weights external, in the backbone's folder; quantized experts' stacks, named
    per_layer(FC1, layer) and so on, given to the session at load)."""
    import onnx
    from onnx import helper

    graph = onnx.GraphProto(name="edge_moe_step")
    declared: set[str] = set()
    opsets: dict[str, int] = {}

    def declare(values, target, rename) -> None:
        for value in values:
            name = rename(value.name)
            if name not in declared:
                declared.add(name)
                copy = target.add()
                copy.CopyFrom(value)
                copy.name = name

    def append(model, rename) -> None:
        for domain, version in ((o.domain or "", o.version) for o in model.opset_import):
            if opsets.setdefault(domain, version) != version:
                raise EdgeMoeError(f"{manifest.root}: its graphs use {domain or 'ai.onnx'} opsets {version} and "
                                   f"{opsets[domain]}; run it with step_graph=False or re-export it")
        for tensor in model.graph.initializer:
            copy = graph.initializer.add()
            copy.CopyFrom(tensor)
            copy.name = rename(tensor.name)
        for node in model.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise EdgeMoeError(f"{manifest.root}: a graph holds control flow ({node.op_type}); run it with "
                                   "step_graph=False")
            copy = graph.node.add()
            copy.CopyFrom(node)
            copy.name = rename(node.name)
            del copy.input[:], copy.output[:]
            copy.input.extend(rename(n) if n else n for n in node.input)  # "" is an omitted optional input
            copy.output.extend(rename(n) if n else n for n in node.output)

    def renamer(prefix: str, fixed: dict[str, str]):
        return lambda name: fixed.get(name, f"{prefix}{name}")

    embed = onnx.load(str(manifest.embed), load_external_data=False)
    append(embed, renamer("embed/", {IDS: IDS}))
    declare(embed.graph.input, graph.input, renamer("embed/", {IDS: IDS}))
    hidden = f"embed/{embed.graph.output[0].name}"
    moe_layers = set(manifest.config["moe_layers"])
    moe_model = None
    for layer, path in enumerate(manifest.layers):
        model = onnx.load(str(path), load_external_data=False)
        if half_attention:
            half_attention_model(model)
        names = [o.name for o in model.graph.output]
        fixed = {"hidden_states": hidden, **{n: n for n in SHARED_INPUTS},
                 **{n: per_layer(n, layer) for n in PER_LAYER}}
        if layer in moe_layers:
            fixed[names[3]] = per_layer(ROUTE_INDICES, layer)
        rename = renamer(f"layer{layer}/", fixed)
        append(model, rename)
        declare([v for v in model.graph.input if v.name != "hidden_states"], graph.input, rename)
        declare([v for v in model.graph.output if v.name in ("key", "value")
                 or (layer in moe_layers and v.name == names[3])], graph.output, rename)
        if layer not in moe_layers:
            hidden = rename(names[0])
            continue
        if moe_model is None:
            record = next(r for r in manifest.experts.values() if r.key[0] == layer)
            moe_model = build_moe_graph(record.hidden_size, int(manifest.config["num_experts"]),
                                        record.intermediate_size, top_k, moe_dtype, residual=True,
                                        block_size=block_size)
        moe_rename = renamer(f"layer{layer}", {
            RESIDUAL: rename(names[0]), X: rename(names[1]), ROUTE_INDICES: rename(names[3]),
            ROUTE_WEIGHTS: rename(names[4]), HIDDEN: f"layer{layer}/moe/{HIDDEN}",
            **{n: per_layer(n, layer) for n in (FC1, FC2, FC1_SCALES, FC2_SCALES)}})
        append(moe_model, moe_rename)
        declare([v for v in moe_model.graph.input if v.name in (FC1, FC2)], graph.input, moe_rename)
        hidden = moe_rename(HIDDEN)
    graph.node.append(helper.make_node("Identity", [hidden], [HIDDEN], name="/step/hidden_states/Identity"))
    width = int(manifest.config["hidden_size"])
    graph.output.insert(0, helper.make_tensor_value_info(HIDDEN, onnx.TensorProto.FLOAT, ["T", width]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="edge_moe")
    model.ir_version = max(embed.ir_version, moe_model.ir_version if moe_model else 0)
    return model


class StepGraph:
    """The composed graph's session and the binding that runs a token through it.

    Args:
        manifest: the package (unsupported_reason must be None).
        half_attention: the layer graphs attend in float16 (Backbone.half_attention).
        fused: the FusedMoeLayers whose stacks the graph's MoE nodes take.
        threads: intra-op threads (None: the process's).
        clock: OrtClock.
    """

    def __init__(self, manifest: Manifest, half_attention: bool, fused: FusedMoeLayers, clock: OrtClock,
                 threads: int | None = None, cuda_graphs: bool | None = None):
        self.fused, self.device = fused, fused.device
        self.hidden_size = int(manifest.config["hidden_size"])
        # decode steps replay captured CUDA graphs (Replay): auto on CUDA; True on the CPU provider binds the same
        # fixed buffers without capturing (tests)
        self.replay_decode = self.device.ort_device == "cuda" if cuda_graphs is None else cuda_graphs
        providers = list(self.device.providers)
        self._eager = None  # run options of the calls not captured
        if self.replay_decode and self.device.ort_device == "cuda":
            providers = [(p, {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider" else p for p in providers]
            self._eager = ort.RunOptions()
            self._eager.add_run_config_entry(GRAPH_ID, "-1")
        self.layers = len(manifest.layers)
        self.moe_layers = sorted(set(manifest.config["moe_layers"]))
        model = build_step_model(manifest, half_attention, fused.dtype, fused.top_k, fused.block_size)
        stacks = {per_layer(name, layer): array for layer in self.moe_layers if fused.quantized
                  for name, array in fused.layer_stacks(layer).items()}
        try:
            session = open_session(model.SerializeToString(), providers=providers, threads=threads,
                                   weights_folder=manifest.embed.parent, initializers=stacks)
        except Exception as exc:  # onnxruntime's own exception types
            raise EdgeMoeError(f"{manifest.root}: onnxruntime cannot run its layers as one graph "
                               f"({str(exc).splitlines()[0][:200]}); load it with step_graph=False") from None
        self.session = TimedSession(session, clock)
        self._io = None
        self._bound = (lambda: None, 0)  # (the cache, its capacity) the binding holds buffers of
        self._rows = 0  # tokens of the last call: the shape of the route outputs bound
        self._replays: dict[tuple, Replay] = {}  # by the addresses of the cache buffers they were captured over

    def run(self, ids: np.ndarray, cache, routes: bool = False):
        """ids [T] int64 after the cached tokens -> (final hidden states [T, H] float32 on the host, and when
        `routes` the chosen experts [(layer, indices [T, k])] of every MoE layer). The caller advances the cache."""
        cache.prepare(ids.shape[0])
        if self.replay_decode and ids.shape[0] == 1 and not routes:
            replay = self._replay(cache)
            if replay is not None:
                return replay.run(int(ids[0]), cache.offset), []
        io = self._io
        if self._bound[0]() is not cache or self._bound[1] != cache.capacity:
            io = self._io = self.session.io_binding()
            io.bind_output(HIDDEN, "cpu")  # first: run_bound reads outputs in binding order
            self._bind_routes(io)
            for layer in self.moe_layers:
                self.fused.bind_stacks(io, layer, lambda name, layer=layer: per_layer(name, layer))
            cache.bind(io, range(self.layers), per_layer)
            self._bound = (weakref.ref(cache), cache.capacity)
        else:
            if ids.shape[0] != self._rows:  # outputs onnxruntime allocated keep their shape once bound
                self._bind_routes(io)
            if self.device.ort_device != "cpu":
                # a CUDA binding copies host inputs when they are bound: the new sequence lengths need binding again
                cache.bind(io, ())
        io.bind_cpu_input(IDS, np.ascontiguousarray(ids, np.int64))
        io.bind_output(HIDDEN, "cpu")
        self._rows = ids.shape[0]
        outputs = self.session.run_bound(io, 1 + (len(self.moe_layers) if routes else 0), self._eager)
        return outputs[0], list(zip(self.moe_layers, outputs[1:]))

    def _replay(self, cache) -> "Replay | None":
        """The replay over this cache's buffers: one exists for every buffer set seen, up to MAX_REPLAYS (a CUDA
        graph cannot be released from its session); beyond, None and the step runs uncaptured."""
        key = cache.buffer_addresses()
        replay = self._replays.get(key)
        if replay is None and len(self._replays) < MAX_REPLAYS:
            replay = self._replays[key] = Replay(self, cache, len(self._replays) + 1)
        return replay

    def _bind_routes(self, io) -> None:
        for layer in self.moe_layers:
            io.bind_output(per_layer(ROUTE_INDICES, layer), self.device.ort_device, self.device.device_id)


class Replay:
    """A decoded token over fixed buffers: the token and its position are written into buffers bound once, the
    hidden state and the routes come out in others, and total_sequence_length is held at the cache's capacity
    (GroupQueryAttention takes it on the host, where a captured graph would keep the value it saw at capture;
    seqlens_k, on the device, carries the length). On CUDA the session captures the step as a CUDA graph on its
    first runs under this replay's graph id and replays it after (stop 16, H200, 6 layers of Qwen3-30B-A3B shapes:
    1.03 ms a step against 1.76). A graph keeps the addresses it was captured with, so the cache's buffers must be
    the same ones each time: on a device they come from a pool (kv_cache._DevicePool)."""

    def __init__(self, step: StepGraph, cache, graph_id: int):
        device = step.device
        where = (device.ort_device, device.device_id)
        self.session = step.session
        self.ids, self.position = np.zeros(1, np.int64), np.zeros(1, np.int32)
        self._ids, self._position = (ort.OrtValue.ortvalue_from_numpy(a, *where) for a in (self.ids, self.position))
        self._hidden = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, step.hidden_size), np.float32), *where)
        io = self.io = step.session.io_binding()
        io.bind_ortvalue_output(HIDDEN, self._hidden)
        for layer in step.moe_layers:  # the routes, which nobody reads here, into buffers of their own
            io.bind_ortvalue_output(per_layer(ROUTE_INDICES, layer), ort.OrtValue.ortvalue_from_numpy(
                np.zeros((1, step.fused.top_k), np.int64), *where))
            step.fused.bind_stacks(io, layer, lambda name, layer=layer: per_layer(name, layer))
        cache.bind(io, range(step.layers), per_layer)
        io.bind_ortvalue_input(IDS, self._ids)
        io.bind_ortvalue_input("seqlens_k", self._position)
        io.bind_ortvalue_input("total_sequence_length",
                               ort.OrtValue.ortvalue_from_numpy(np.array(cache.capacity, np.int32)))
        self.options = ort.RunOptions()
        if device.ort_device == "cuda":
            self.options.add_run_config_entry(GRAPH_ID, str(graph_id))

    def run(self, token: int, position: int) -> np.ndarray:
        """The final hidden state [1, H] (host) of `token` at `position` (the cached tokens before it)."""
        self.ids[0], self.position[0] = token, position
        self._ids.update_inplace(self.ids)
        self._position.update_inplace(self.position)
        self.session.run_bound(self.io, 0, self.options)
        return self._hidden.numpy()
