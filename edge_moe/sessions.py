"""onnxruntime sessions: one process-wide thread pool, shared by every session.

A spinning intra-op pool per session makes live sessions fight for the cores (DESIGN.md: 7.8 ms instead of 1.9 ms
at M=64), and edge_moe keeps a dozen sessions live (one per layer graph plus one per expert shape). So the pool is
global, sized once, and every session uses it.
"""

from __future__ import annotations

import os
import threading
import time

import onnxruntime as ort
import psutil

_pool_lock = threading.Lock()
_pool_threads: int | None = None


def default_threads() -> int:
    """Physical cores: hyper-threads add little to memory-bound matrix-vector work."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def configure_threads(threads: int | None) -> int:
    """Sizes the global pool on first use; later calls get the pool that exists (onnxruntime allows one)."""
    global _pool_threads
    with _pool_lock:
        if _pool_threads is None:
            _pool_threads = int(threads or default_threads())
            ort.set_global_thread_pool_sizes(_pool_threads, 1)
        return _pool_threads


def open_session(model, *, providers=("CPUExecutionProvider",)) -> ort.InferenceSession:
    """Opens a session on the global pool. `model` is a path or serialized ModelProto bytes."""
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=list(providers))


class TimedSession:
    """A session whose run() adds its wall time to a shared counter (the share of time spent inside onnxruntime)."""

    __slots__ = ("session", "clock", "output_names")

    def __init__(self, session: ort.InferenceSession, clock: "OrtClock"):
        self.session, self.clock = session, clock
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict) -> list:
        start = time.perf_counter()
        outputs = self.session.run(self.output_names, feeds)
        self.clock.seconds += time.perf_counter() - start
        self.clock.calls += 1
        return outputs


class OrtClock:
    """Seconds and calls spent inside onnxruntime, for telemetry."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
