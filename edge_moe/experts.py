"""Routed experts as the generation loop sees them: `fetch` of an expert source is the single place where
the loop obtains experts (`fetch(layer, experts)`), and `ExpertKernels.run` computes them.

A resident expert is its weight arrays (views into one buffer holding the expert's blob bytes); the kernel for
its shape is one shared onnxruntime session that takes the weights as inputs. A quantized (q4/q8) expert is the
exception: it gets its own MatMulNBits session at admission (edge_moe.quant_graph), or, when it is so small that a
session costs more than its float32 copy, is dequantized for the shared float32 kernel (edge_moe.quant). A float16
SwiGLU expert runs in edge_moe's own kernel where it is built (native.expert_f16, on the same views: onnxruntime's
graph cast the float16 weights to float32 every call), and so does a quantized one that its block kernel reads
(native.expert_blocks on the views, no session: quant.kernel_reads). The all-resident source reads every expert at
load; the budgeted cache (edge_moe.cache) implements the same `get`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from . import native, quant
from .expert_graph import INPUT, OUTPUT, ExpertShape, build_expert_graph
from .manifest import ExpertRecord, Manifest
from .sessions import OrtClock, TimedSession, fast_run, open_session


@dataclass
class ResidentExpert:
    """An expert's weights in memory, ready to feed its kernel."""

    record: ExpertRecord
    weights: dict[str, np.ndarray]
    nbytes: int
    shape: "ExpertShape"
    session: object = None  # its own onnxruntime session (quantized experts), else None: the shared kernel
    run_fast: object = None  # session's run without the wrapper's checks (sessions.fast_run)
    native: bool = False  # its weights are what edge_moe's float16 expert kernel reads (set once, not per call)
    blocks: tuple | None = None  # (gate_up, down) native.Matrix: quantized blocks edge_moe's block kernel reads

    def __post_init__(self):
        if self.session is not None:
            self.run_fast = fast_run(self.session)
        self.native = _native_layout(self)

    @classmethod
    def from_bytes(cls, record: ExpertRecord, buffer: np.ndarray, kernel: bool = True) -> "ResidentExpert":
        """Views the tensors inside `buffer` (uint8, the expert's `length` bytes) without copying. A quantized
        expert that edge_moe's block kernel reads (quant.kernel_reads, where `kernel`: native_kernel not False) is
        those views too; another's session is created here (it prepacks its own copy and no longer reads
        `buffer`)."""
        weights = stored_tensors(record, buffer)
        shape = expert_shape(record)
        if not shape.quantized:
            return cls(record, weights, int(buffer.nbytes), shape)
        if kernel and quant.kernel_reads(shape):
            return cls(record, weights, int(buffer.nbytes), shape, blocks=_blocks(shape, weights))
        extra = quant.resident_extra_bytes(shape, kernel=False)
        if quant.uses_session(shape):
            return cls(record, {}, int(buffer.nbytes) + extra, shape, _quant_session(record, shape, weights))
        return cls(record, quant.dequantized_weights(shape, weights), int(buffer.nbytes) + extra,
                   ExpertShape(shape.kind, shape.hidden_size, shape.intermediate_size, "float32"))


def stored_tensors(record: ExpertRecord, buffer: np.ndarray) -> dict[str, np.ndarray]:
    """The expert's tensors as the package stores them: views into `buffer` (its `length` bytes), no copy."""
    return {t.name: buffer[t.offset:t.offset + t.nbytes].view(t.dtype).reshape(t.shape) for t in record.tensors}


def expert_shape(record: ExpertRecord) -> ExpertShape:
    return ExpertShape(record.kind, record.hidden_size, record.intermediate_size, record.dtype, record.block_size,
                       record.zero_points)


_graphs: dict[ExpertShape, bytes] = {}
_OUTPUTS = [OUTPUT]


# intra-op threads of expert sessions; 1 while Forward runs experts side by side on its own threads
# (ExpertKernels(parallel=True)): small matrix-vector products gain little from a pool that sleeps between calls
_session_threads: int | None = None


def _quant_session(record: ExpertRecord, shape: ExpertShape, weights: dict[str, np.ndarray]):
    """The expert's own MatMulNBits session, its initializers taken from `weights` (views into the read buffer).
    One serialized graph per shape: the initializers' external locations are never read (all are overridden)."""
    model = _graphs.get(shape)
    if model is None:
        external = {t.name: ("unused.bin", 0, t.nbytes) for t in record.tensors}
        model = _graphs[shape] = build_expert_graph(shape, external).SerializeToString()
    return open_session(model, initializers=weights, threads=_session_threads)


class ExpertKernels:
    """One session per expert shape, built from the same graph the exporter writes, with weights as inputs."""

    def __init__(self, clock: OrtClock, providers=("CPUExecutionProvider",), parallel: bool = False,
                 native_threads: int | None = None):
        """parallel: Forward will call run() from several threads at once, one expert each; expert sessions then
        get one intra-op thread (set before any expert loads: quantized experts open their sessions at load).
        native_threads: float16 SwiGLU experts run in edge_moe's own kernel (native.expert_f16) on that many threads,
        reading the float16 bytes where onnxruntime's graph casts them to float32 every call; None: onnxruntime."""
        global _session_threads
        self.clock, self.providers, self.parallel = clock, providers, parallel
        self.native_threads = native_threads
        self._sessions: dict[ExpertShape, TimedSession] = {}
        self._lock = threading.Lock()
        _session_threads = 1 if parallel else None

    def run(self, expert: ResidentExpert, x: np.ndarray, timed: bool = True) -> np.ndarray:
        """x [T, H] float32 -> [T, H] float32. timed=False leaves the clock alone (a worker thread's call: the
        caller times its wait instead, so the clock stays a share of wall time)."""
        start = time.perf_counter()
        if expert.blocks is not None or (self.native_threads and expert.native):
            y = native.expert_blocks(*expert.blocks, x, self.native_threads or 1) if expert.blocks is not None else \
                native.expert_f16(expert.weights["gate_up_proj"], expert.weights["down_proj"], x, self.native_threads)
            if timed:
                self.clock.native_calls += 1
        elif expert.session is not None:
            y = expert.run_fast(_OUTPUTS, {INPUT: x})[0]
        else:
            y = self._shared_session(expert.shape).run_fast(_OUTPUTS, {INPUT: x, **expert.weights})[0]
        if timed:
            self.clock.seconds += time.perf_counter() - start
            self.clock.calls += 1
        return y

    def _shared_session(self, shape: ExpertShape) -> TimedSession:
        session = self._sessions.get(shape)
        if session is None:
            with self._lock:
                session = self._sessions.get(shape)
                if session is None:
                    model = build_expert_graph(shape).SerializeToString()
                    session = self._sessions[shape] = TimedSession(open_session(
                        model, providers=self.providers, threads=1 if self.parallel else None), self.clock)
        return session


def _blocks(shape: ExpertShape, weights: dict[str, np.ndarray]) -> tuple:
    """(gate_up [2F, H], down [H, F]) blocks of a quantized SwiGLU expert, views of its read buffer."""
    matrices = []
    for name, k in (("gate_up_proj", shape.hidden_size), ("down_proj", shape.intermediate_size)):
        codes = weights[f"{name}.qweight"]
        matrices.append(native.Matrix.of_blocks(codes.reshape(codes.shape[0], -1), weights[f"{name}.scales"],
                                                shape.bits, shape.block_size, k))
    return tuple(matrices)


def _native_layout(expert: ResidentExpert) -> bool:
    """A float16 SwiGLU expert whose stored tensors are the kernel's gate_up [H, 2F] and down [F, H]."""
    shape = expert.shape
    if shape.dtype != "float16" or shape.kind != "swiglu" or expert.session is not None:
        return False
    hidden, intermediate = shape.hidden_size, shape.intermediate_size
    gate_up, down = expert.weights.get("gate_up_proj"), expert.weights.get("down_proj")
    return (gate_up is not None and down is not None and gate_up.shape == (hidden, 2 * intermediate)
            and down.shape == (intermediate, hidden) and gate_up.flags.c_contiguous and down.flags.c_contiguous)


class ExpertSource:
    """What every expert source shares: the step counter and the (step, layer, experts, hit) trace."""

    def __init__(self, trace: list | None = None):
        self.trace, self.step = trace, 0
        self.lookups = self.lookup_hits = 0

    def begin_step(self) -> None:
        self.step += 1

    def record(self, layer: int, experts, hits) -> None:
        self.lookups += len(hits)
        self.lookup_hits += sum(map(bool, hits))
        if self.trace is not None:
            self.trace.append({"step": self.step, "layer": layer, "experts": [int(e) for e in experts],
                               "hit": [bool(h) for h in hits]})

    def prefetch(self, layer: int, experts: list[int]) -> None:
        pass

    def on_route(self, layer: int, scores) -> None:
        pass


class AllResidentExperts(ExpertSource):
    """Every expert read once at load (checksum verified) and kept: the reference the budgeted cache must match."""

    def __init__(self, manifest: Manifest, store, progress=None, trace: list | None = None, load: bool = True,
                 kernel: bool = True):
        """load=False keeps none here: fused MoE layers (fused_moe.py) hold every expert, stacked, instead.
        kernel: quantized experts as edge_moe's block kernel reads them (ResidentExpert.from_bytes)."""
        super().__init__(trace)
        self.experts: dict[tuple[int, int], ResidentExpert] = {}
        for record in manifest.experts.values() if load else ():
            self.experts[record.key] = ResidentExpert.from_bytes(record, store.read(record.key), kernel)
            if progress is not None:
                progress.update()

    def fetch(self, layer: int, experts: list[int]):
        self.record(layer, experts, [True] * len(experts))
        return (self.experts[(layer, int(e))] for e in experts)

    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())
