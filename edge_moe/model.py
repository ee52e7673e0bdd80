"""The backbone and the forward pass: embed -> (layer graph, routed experts) x L -> head.

    # T = tokens in this call, H = hidden, E = experts, k = experts per token
    h = embed(ids)                                         # [T, H]
    for each layer: residual, x, logits, key, value = layer(h, past)
                    h = residual + sum_k w[t,k] * expert_k(x[t])   (each expert once on all its tokens)
    logits = head(h)                                       # [T, V]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import EdgeMoeError
from .experts import AllResidentExperts, ExpertKernels, ExpertSource
from .family_spec import ROUTE_OUTPUTS
from .files import drop_page_cache
from .fused_moe import experts_run_quantized
from .kv_cache import KVCache, new_kv_cache
from .layer_graphs import half_attention_graph
from .manifest import Manifest
from .native import release_scratch
from .native_layer import load_native_embed, load_native_head, load_native_layers
from .routing import Router, group_by_expert
from .sessions import OrtClock, TimedSession, open_session


class Backbone:
    """The resident graphs, one session each."""

    def __init__(self, manifest: Manifest, clock: OrtClock, providers=("CPUExecutionProvider",), ort_device="cpu",
                 threads: int | None = None, half_attention: bool | None = None, native_kernel: bool | None = None,
                 native_threads: int = 1):
        """threads: intra-op threads of the graphs (None: the process's --threads). half_attention: "gqa" layer
        graphs attend in float16 (layer_graphs.py; None: on an accelerator, whose kernel has no float32, and where
        the experts run quantized: see below). native_kernel: False keeps the layer graphs where edge_moe's layer
        kernel could run the layers (native_layer.py; None: it does where it can), on `native_threads` threads."""
        self.ort_device = ort_device  # where the graphs run: the KV cache lives there
        self.threads = threads
        gqa = manifest.config.get("attention_kernel", "generic") == "gqa"
        if half_attention is None:
            # Quantized experts already quantize their activations to int8 (a relative error near 1e-2); a float16
            # KV cache (as llama.cpp keeps by default) adds little to that and reads half the bytes: at 2,048
            # tokens of context on the 2-core VM, 4-bit decode 70-79 -> 75-89 tok/s; no change at short context.
            half_attention = ort_device != "cpu" or experts_run_quantized(manifest)
        self.half_attention = gqa and half_attention
        self.kv_dtype = np.float16 if self.half_attention else np.float32

        moe = set(manifest.config["moe_layers"])

        def session(path, layer=None):
            try:
                graph = half_attention_graph(path) if layer is not None and self.half_attention else None
                if graph is None:
                    return TimedSession(open_session(path, providers=providers, threads=threads), clock)
                return TimedSession(open_session(graph, providers=providers, threads=threads,
                                                 weights_folder=path.parent), clock)
            except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
                raise EdgeMoeError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]}); "
                                   "re-export the model") from None

        # A float16 or block-quantized backbone's layers in edge_moe's own kernel where it expresses them (it reads
        # the package's bytes; the graphs' sessions would each hold a float32 copy); else one graph session a layer
        self.native_layers, self.native_reason = None, "native_kernel=False"
        if native_kernel is not False:
            self.native_reason = "the layer graphs run on an accelerator" if ort_device != "cpu" else None
            if self.native_reason is None:
                self.native_layers, self.native_reason = load_native_layers(manifest, clock, native_threads)
        self.embed = (self.native_layers and load_native_embed(manifest, clock)) or session(manifest.embed)
        self.layers = self.native_layers or [session(p, layer) for layer, p in enumerate(manifest.layers)]
        self._open_layer = lambda layer: session(manifest.layers[layer], layer)
        self.head = (self.native_layers and load_native_head(manifest, clock, native_threads)) or session(manifest.head)
        # MoE layers whose graph routes (family_spec.ROUTE_OUTPUTS, exported for softmax top-k routers): numpy
        # routing cost 60 us a layer inside decode (16 alone), 0.76 ms of a 9.8 ms token on this VM
        self.routed = {layer for layer in moe if layer < len(self.layers)
                       and self.layers[layer].output_names[3:5] == list(ROUTE_OUTPUTS)}
        inputs = LAYER_INPUTS[manifest.config.get("attention_kernel", "generic")]
        _check_signature(manifest.embed, self.embed, ["input_ids"], 1)
        for layer, (path, s) in enumerate(zip(manifest.layers, self.layers)):
            _check_signature(path, s, inputs, (7 if layer in self.routed else 5) if layer in moe else 3)
        _check_signature(manifest.head, self.head, ["hidden_states"], 1)
        # onnxruntime (or the layer kernel) holds its own copy of every weight now: the file pages read to build it
        # are cache a memory cgroup charges to this process (budget auto would count them as used) and nothing reads
        # them again
        drop_page_cache([manifest.embed, *manifest.layers, manifest.head, manifest.backbone_blob])

    def open_layers_on_use(self) -> None:
        """Closes the per-layer sessions and opens each again when first used: where one graph runs every token
        (step_graph.py) only batching and measurements use them, and each holds a copy of its layer's weights. The
        layer kernel's weights go too (a quantized package asked for float32 attention has both)."""
        self.layers = LazySessions(self._open_layer, len(self.layers))
        if self.native_layers:
            self.native_layers, self.native_reason = None, "one graph runs every step (step_graph)"


class LazySessions(Sequence):
    """A list of sessions, each opened on first access."""

    def __init__(self, open_one, count: int):
        self._open, self._sessions = open_one, [None] * count

    def __len__(self) -> int:
        return len(self._sessions)

    def __getitem__(self, index: int):
        session = self._sessions[index]
        if session is None:
            session = self._sessions[index] = self._open(index)
        return session


# a layer graph's inputs per config.attention_kernel (kv_cache.py feeds them)
LAYER_INPUTS = {"generic": ["hidden_states", "past_key", "past_value"],
                "gqa": ["hidden_states", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
                        "sin_cache"]}


def _check_signature(path, session: TimedSession, inputs: list[str], outputs: int) -> None:
    """Once at load: a graph of the wrong kind (a head where a layer belongs, a layer without its router) would
    otherwise fail at the first generate with onnxruntime's own error. What edge_moe's layer kernel runs instead of
    a graph (native_layer.py) was checked weight by weight as it was read."""
    if not isinstance(session, TimedSession):
        return
    names = [i.name for i in session.session.get_inputs()]
    if names != inputs or len(session.output_names) != outputs:
        raise EdgeMoeError(f"{path}: takes {names[:6]} and gives {len(session.output_names)} outputs where the "
                           f"model needs {inputs} and {outputs} outputs; re-export the model")


DECODE_SIDE_BY_SIDE_BYTES = 1 << 20  # experts at least this large run side by side in decode too (Forward)


class Forward:
    """Runs tokens through the model, getting every routed expert from `experts.fetch` (all-resident or the
    budgeted cache), with speculative prefetch of the next layers' experts when a predictor is given."""

    def __init__(self, manifest: Manifest, backbone: Backbone, experts, kernels: ExpertKernels, predictor=None,
                 workers: int = 0, fused=None, step=None):
        """workers: threads that compute a layer's experts beside the calling thread (all-resident experts on the
        CPU, --threads above 1): one expert each at a time, so a token's top-k experts run side by side.
        fused: a fused_moe.FusedMoeLayers that runs each MoE layer's routing and experts in one call, or None.
        step: a step_graph.StepGraph that runs embed and every layer (fused MoE included) in one call, or None."""
        c = manifest.config
        self.config = c
        self.backbone, self.experts, self.kernels, self.predictor = backbone, experts, kernels, predictor
        self.workers, self.fused, self.step = workers, fused, step
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edge-moe-expert") if workers else None
        # In decode a handoff to a worker (~40 us here) costs more than it saves on small experts: measured at
        # 2 threads, 4-bit experts (0.5 MB) decoded 95 tok/s side by side and 103-107 one after another, 8-bit
        # (0.9 MB) the same either way, float16 (1.5 MB) 42-44 against 35 at one thread. Prefill gains with all.
        self._decode_side_by_side = bool(workers) and bool(manifest.experts) and \
            float(np.median([e.length for e in manifest.experts.values()])) >= DECODE_SIDE_BY_SIDE_BYTES
        self.moe_layers = set(c["moe_layers"])
        self.router = Router(manifest)  # the family's router, as the manifest declares it
        self._weight_on_input = self.router.spec.weight_on == "input"
        self.num_experts = int(c["num_experts"])
        self.route_observers: list = []  # callables (layer, indices [T, k]) for routing statistics
        # the routing scores go to sources whose policy learns from them (not the all-resident one: ~5 us a layer)
        self._wants_scores = type(experts).on_route is not ExpertSource.on_route
        # One forward step at a time per model: the cache protects the running layer's experts, and two threads
        # generating at once interleave token by token instead of evicting each other's experts mid-layer.
        self._step_lock = threading.Lock()

    def new_cache(self) -> KVCache:
        return new_kv_cache(self.config, self.backbone.ort_device, self.backbone.kv_dtype)

    def hidden(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """ids [T] int64 after the cached tokens -> final hidden states [T, H]; extends the cache."""
        with self._step_lock:
            h = self._hidden(ids, cache)
            if ids.shape[0] > 1 and not isinstance(self.experts, AllResidentExperts):
                # under a budget no prompt-sized kernel scratch stays past its prompt: the budget holds that memory
                release_scratch()
            return h

    def _hidden(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        self.experts.begin_step()
        if self.step is not None:
            h, routes = self.step.run(ids, cache, routes=bool(self.route_observers) or self.experts.trace is not None)
            for layer, indices in routes:
                self._note_fused_routes(layer, indices)
            cache.advance(ids.shape[0])
            return h
        h = self.backbone.embed.run({"input_ids": ids})[0]
        for layer, session in enumerate(self.backbone.layers):
            outputs = cache.run(layer, session, h)
            if layer in self.moe_layers:
                residual, moe_input, logits = outputs[:3]
                h = residual + self.moe(layer, moe_input, logits, residual, outputs[3:5] or None)
            else:
                h = outputs[0]
        cache.advance(ids.shape[0])
        return h

    def moe(self, layer: int, x: np.ndarray, logits: np.ndarray, residual: np.ndarray, routed=None) -> np.ndarray:
        """The routed experts' weighted sum [T, H] for x [T, H] and router logits [T, E] of MoE layer `layer`;
        routed: (indices, weights) [T, k] where the layer graph routed already (family_spec.ROUTE_OUTPUTS), or
        None."""
        indices, weights = routed if routed is not None else self.router(layer, logits)  # [T, k]
        if self.fused is not None:
            return self._fused_moe(layer, x, indices, weights)
        return self._per_expert_moe(layer, x, indices, weights, residual)

    def _per_expert_moe(self, layer: int, x: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                        residual: np.ndarray) -> np.ndarray:
        for observe in self.route_observers:
            observe(layer, indices)
        if self._wants_scores:
            scores = np.zeros(self.num_experts, np.float32)  # [E]: each expert's highest weight over the tokens
            if x.shape[0] == 1:
                scores[indices[0]] = weights[0]
            else:
                np.maximum.at(scores, indices.ravel(), weights.ravel())
            self.experts.on_route(layer, scores)
        decode = x.shape[0] == 1
        if decode:  # the token's experts, best first
            groups, chosen = None, indices[0].tolist()
        else:  # prefill: each expert once, on all the tokens routed to it
            groups = list(group_by_expert(indices))
            chosen = [g[0] for g in groups]
        # misses start reading now; a cache hands out the experts that are ready first
        ready_first = getattr(self.experts, "fetch_ready_first", None)
        experts = ready_first(layer, chosen) if ready_first else enumerate(self.experts.fetch(layer, chosen))
        if self.predictor is not None:
            self.predictor.observe(layer, chosen)
            for target, predicted in self.predictor.predict(layer, residual).items():
                self.experts.prefetch(target, predicted)  # queued behind this layer's own misses
        # results are summed in routing order whatever order the experts came in: the same floating-point sum
        # (and so the same tokens) as with every expert resident
        parts = [None] * len(chosen)
        if decode and not self._decode_side_by_side:  # one after another on this thread (~60 us a token less)
            token_weights = weights[0]
            for i, expert in experts:
                parts[i] = self._weighted(expert, x, token_weights[i])
        elif decode:
            job = lambda i, expert, timed: self._weighted(expert, x, weights[0, i], timed)  # noqa: E731
            self._run_all(experts, job, parts)
        else:
            job = lambda i, expert, timed: self._weighted(  # noqa: E731
                expert, x[groups[i][1]], weights[groups[i][1], groups[i][2]][:, None], timed)
            self._run_all(experts, job, parts)
        if decode:
            out = parts[0]
            for y in parts[1:]:
                out = out + y
            return out
        out = np.zeros_like(x)
        for (_, rows, _), y in zip(groups, parts):
            out[rows] += y  # a token meets an expert at most once, so rows are unique and += is exact
        return out

    def _fused_moe(self, layer: int, x: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The layer's routed experts in one call (fused_moe.py), routed as on the per-expert path; the trace sees
        every chosen expert as a hit."""
        self._note_fused_routes(layer, indices)
        return self.fused.run(layer, x, indices, weights)

    def _note_fused_routes(self, layer: int, indices: np.ndarray) -> None:
        """Routing observers and the trace see a fused layer's choice [T, k] (every chosen expert a hit)."""
        for observe in self.route_observers:
            observe(layer, indices)
        if self.experts.trace is not None:
            chosen = sorted({int(e) for e in indices.ravel()})
            self.experts.record(layer, chosen, [True] * len(chosen))

    def _run_all(self, experts, job, parts: list) -> None:
        """parts[i] = job(i, expert, timed) for every (i, expert). With workers, the workers take experts in turn
        with this thread (each a whole expert: the same arithmetic as alone, so the same tokens); their onnxruntime
        time is this thread's wait for them, so the clock stays a share of wall time."""
        if self._pool is None:
            for i, expert in experts:
                parts[i] = job(i, expert, True)
            return
        futures, turn = [], self.workers + 1
        for n, (i, expert) in enumerate(experts):
            if n % turn < self.workers:  # a worker first: it starts while this thread takes the next one
                futures.append((i, self._pool.submit(job, i, expert, False)))
            else:
                parts[i] = job(i, expert, True)
        if futures:
            clock, start = self.kernels.clock, time.perf_counter()
            for i, future in futures:
                parts[i] = future.result()
            clock.seconds += time.perf_counter() - start
            clock.calls += len(futures)

    def _weighted(self, expert, x: np.ndarray, weight, timed: bool = True) -> np.ndarray:
        """w * expert(x), or expert(w * x) where the family weights an expert's input (Llama 4)."""
        untimed = {} if timed else {"timed": False}  # only workers pass it: kernels of a tier take (expert, x)
        if self._weight_on_input:
            return self.kernels.run(expert, x * weight, **untimed)
        return self.kernels.run(expert, x, **untimed) * weight

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def logits(self, h: np.ndarray) -> np.ndarray:
        return self.backbone.head.run({"hidden_states": h})[0]
