"""onnxruntime sessions: each with a small intra-op pool whose threads sleep instead of spinning.

edge_moe keeps a dozen sessions live (one per layer graph plus one per expert shape) and runs them back to back.
Spinning pools make live sessions fight for the cores (DESIGN.md: 7.8 ms instead of 1.9 ms at M=64). A global
pool (onnxruntime.set_global_thread_pool_sizes) avoids that too, but it is process-wide and makes every other
session in the process fail unless it opts in, which an embeddable library must not do; so each session gets
its own pool with spinning off.
"""

from __future__ import annotations

import os
import threading
import time

import onnxruntime as ort
import psutil

from .errors import EdgeMoeError

_lock = threading.Lock()
_threads: int | None = None


def default_threads() -> int:
    """Physical cores: hyper-threads add little to memory-bound matrix-vector work."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def configure_threads(threads: int | None) -> int:
    """The intra-op thread count of sessions opened from now on (default: physical cores); returns it."""
    global _threads
    if threads is not None:
        cpus = os.cpu_count() or 1
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
            raise EdgeMoeError(f"--threads {threads!r}: this machine has {cpus} CPUs; choose 1..{cpus} "
                               "(more threads than CPUs only make them wait for each other)")
    with _lock:
        if threads is not None or _threads is None:
            _threads = int(threads or default_threads())
        return _threads


def open_session(model, *, providers=("CPUExecutionProvider",), threads: int | None = None,
                 initializers=None) -> ort.InferenceSession:
    """Opens a session. `model` is a path or serialized ModelProto bytes; `initializers` (name -> C-contiguous
    array) replace the model's initializers of those names without a copy (quantized experts, experts.py)."""
    options = ort.SessionOptions()
    if initializers:
        options.add_external_initializers(list(initializers), [ort.OrtValue.ortvalue_from_numpy(a)
                                                              for a in initializers.values()])
    options.intra_op_num_threads = threads or _threads or default_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=list(providers))


def fast_run(session: ort.InferenceSession):
    """session.run without the Python wrapper's per-call checks (input names and types, graph capture): ~5 us of
    the ~60 calls a token makes. The feeds are ours and checked once at load; onnxruntime still validates shapes."""
    inner = getattr(session, "_sess", None)
    if inner is None or not hasattr(inner, "run"):
        return session.run
    return lambda names, feeds: inner.run(names, feeds, None)


class TimedSession:
    """A session whose run() adds its wall time to a shared counter (the share of time spent inside onnxruntime)."""

    __slots__ = ("session", "clock", "output_names", "output_widths", "run_fast", "run_binding")

    def __init__(self, session: ort.InferenceSession, clock: "OrtClock"):
        self.session, self.clock = session, clock
        self.run_fast = fast_run(session)
        inner = getattr(session, "_sess", None)  # run_with_iobinding's wrapper adds nothing for our bindings
        self.run_binding = ((lambda io: inner.run_with_iobinding(io._iobinding, None))
                            if hasattr(inner, "run_with_iobinding") else session.run_with_iobinding)
        self.output_names = [o.name for o in session.get_outputs()]
        # the last dimension of each output where the graph fixes it (binding decode outputs to buffers)
        self.output_widths = [o.shape[-1] if o.shape and isinstance(o.shape[-1], int) else None
                              for o in session.get_outputs()]

    def run(self, feeds: dict) -> list:
        start = time.perf_counter()
        outputs = self.run_fast(self.output_names, feeds)
        self.clock.seconds += time.perf_counter() - start
        self.clock.calls += 1
        return outputs

    def io_binding(self):
        return self.session.io_binding()

    def run_bound(self, io, count: int) -> list:
        """Runs with inputs and outputs bound in `io`; returns the first `count` outputs as arrays (the rest are
        buffers bound in place, such as the KV cache, which need no copy out)."""
        start = time.perf_counter()
        self.run_binding(io)
        # get_outputs() wraps every bound output (~5 us): only when some are read out
        outputs = [value.numpy() for value in io.get_outputs()[:count]] if count else []
        self.clock.seconds += time.perf_counter() - start
        self.clock.calls += 1
        return outputs


class OrtClock:
    """Seconds and calls spent inside onnxruntime, for telemetry."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
