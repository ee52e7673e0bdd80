"""onnxruntime sessions and their threads: a pool per session whose threads sleep, or one shared pool.

edge_moe keeps a dozen sessions live (one per layer graph, one per expert shape or quantized expert) and runs them
back to back. Spinning per-session pools make live sessions fight for the cores (DESIGN.md: 7.8 ms instead of
1.9 ms at M=64; 384 spinning expert pools decoded 1.1 tok/s), so per-session pools do not spin; but then a pool
thread sleeps between calls and waking it costs more than it gives on decode's small products.

The shared pool (onnxruntime.set_global_thread_pool_sizes) is one spinning pool for every session: measured on the
2-core VM at 2 threads, decode 136-141 tok/s (4-bit experts) and 144 (8-bit) against 113 / 100 with per-session
pools, prefill 640-722 against 480. It is process-wide, and once it exists onnxruntime refuses every session that
does not opt in, including sessions the embedding program opens itself; so the library keeps per-session pools
unless asked (load(thread_pool="shared") or EDGE_MOE_THREAD_POOL=shared), and the command line, which owns its
process, uses the shared pool.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil

from .errors import EdgeMoeError
from .lazy_imports import ort

_lock = threading.Lock()
_threads: int | None = None
_shared_threads: int | None = None  # the shared pool's size once asked for; then every session must use it
_shared_created = False  # whether onnxruntime has made it (at the first session: session_threading)
_spinning = False  # per-session pools spin while a run lasts (and stop when it returns)
# per-session: each session its own pool, sleeping between calls; shared: one process-wide pool that spins;
# per-session-spinning: each session's pool spins during its run and stops when the run returns, so that work
# between runs (edge_moe's own kernel, native.py, on its threads) has the cores
POOLS = ("per-session", "shared", "per-session-spinning")


def default_threads() -> int:
    """Physical cores: hyper-threads add little to memory-bound matrix-vector work."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def configure_threads(threads: int | None, pool: str = "per-session") -> int:
    """The intra-op thread count of sessions opened from now on (default: physical cores); returns it. pool
    'shared' fixes the process's shared pool at that many threads (once: a later size is refused); onnxruntime
    creates it when the first session opens (open_session), so a process that opens none never imports onnxruntime
    for it (lazy_imports.py: the command line asks for the shared pool, and a package whose layers and experts all
    run in edge_moe's kernels opens no session)."""
    global _threads, _shared_threads, _spinning
    if threads is not None:
        cpus = os.cpu_count() or 1
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
            raise EdgeMoeError(f"--threads {threads!r}: this machine has {cpus} CPUs; choose 1..{cpus} "
                               "(more threads than CPUs only make them wait for each other)")
    if pool not in POOLS:
        raise EdgeMoeError(f"thread pool {pool!r} is unknown; choose one of {', '.join(POOLS)}")
    with _lock:
        if _shared_threads is not None:  # every session uses it from now on, whatever this load asks
            if threads is not None and threads != _shared_threads:
                raise EdgeMoeError(f"--threads {threads}: this process already runs onnxruntime on a shared pool "
                                   f"of {_shared_threads} threads; use {_shared_threads} or start a new process")
            _threads = _shared_threads
            return _threads
        if threads is not None or _threads is None:
            _threads = int(threads or default_threads())
        if pool == "shared":
            _shared_threads = _threads
        _spinning = pool == "per-session-spinning"
        return _threads


def shared_pool() -> bool:
    """Whether this process runs every session on the shared pool."""
    return _shared_threads is not None


def session_threading(options) -> None:
    """Opts `options` (onnxruntime SessionOptions) into the shared pool where this process runs on it, creating the
    pool first if no session has yet; else leaves them on a pool of their own.

    Raises:
        EdgeMoeError: onnxruntime refuses the shared pool (sessions were opened before, elsewhere in the process).
    """
    global _shared_created
    if _shared_threads is None:
        return
    with _lock:
        if not _shared_created:
            try:
                ort.set_global_thread_pool_sizes(_shared_threads, 1)
            except Exception as exc:  # onnxruntime's own error: pools made elsewhere in this process
                raise EdgeMoeError(f"thread pool shared: onnxruntime refuses it in this process "
                                   f"({str(exc).splitlines()[0][:120]}); use thread_pool='per-session'") from None
            _shared_created = True
    options.use_per_session_threads = False  # the shared pool's size holds, whatever a session asks


def open_session(model, *, providers=("CPUExecutionProvider",), threads: int | None = None,
                 initializers=None, weights_folder=None) -> ort.InferenceSession:
    """Opens a session. `model` is a path or serialized ModelProto bytes; `initializers` (name -> C-contiguous
    array) replace the model's initializers of those names without a copy (quantized experts, experts.py);
    `weights_folder`: where the external weights of a model given as bytes lie (a rewritten graph, layer_graphs.py)."""
    options = ort.SessionOptions()
    if weights_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_folder))
    if initializers:
        options.add_external_initializers(list(initializers), [ort.OrtValue.ortvalue_from_numpy(a)
                                                              for a in initializers.values()])
    if shared_pool():
        session_threading(options)  # `threads` is moot
    else:
        options.intra_op_num_threads = threads or _threads or default_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if _spinning else "0")
        if _spinning:
            options.add_session_config_entry("session.force_spinning_stop", "1")
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

    __slots__ = ("session", "clock", "output_names", "output_widths", "output_dtypes", "run_fast", "run_binding")

    def __init__(self, session: ort.InferenceSession, clock: "OrtClock"):
        self.session, self.clock = session, clock
        self.run_fast = fast_run(session)
        inner = getattr(session, "_sess", None)  # run_with_iobinding's wrapper adds nothing for our bindings
        self.run_binding = ((lambda io, options=None: inner.run_with_iobinding(io._iobinding, options))
                            if hasattr(inner, "run_with_iobinding") else session.run_with_iobinding)
        self.output_names = [o.name for o in session.get_outputs()]
        # the last dimension of each output where the graph fixes it (binding decode outputs to buffers)
        self.output_widths = [o.shape[-1] if o.shape and isinstance(o.shape[-1], int) else None
                              for o in session.get_outputs()]
        self.output_dtypes = [_NUMPY_TYPES.get(o.type, np.float32) for o in session.get_outputs()]

    def run(self, feeds: dict) -> list:
        start = time.perf_counter()
        outputs = self.run_fast(self.output_names, feeds)
        self.clock.seconds += time.perf_counter() - start
        self.clock.calls += 1
        return outputs

    def io_binding(self):
        return self.session.io_binding()

    def run_bound(self, io, count: int, options: ort.RunOptions | None = None) -> list:
        """Runs with inputs and outputs bound in `io` (and these run options); returns the first `count` outputs as
        arrays (the rest are buffers bound in place, such as the KV cache, which need no copy out)."""
        start = time.perf_counter()
        self.run_binding(io, options)
        # get_outputs() wraps every bound output (~5 us): only when some are read out
        outputs = [value.numpy() for value in io.get_outputs()[:count]] if count else []
        self.clock.seconds += time.perf_counter() - start
        self.clock.calls += 1
        return outputs


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32}


class OrtClock:
    """Seconds and calls spent inside kernels, for telemetry: onnxruntime's sessions and edge_moe's own (native.py;
    `native_calls` of the calls are those)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self.native_calls = 0

    def time_native(self, kernel, *args):
        """kernel(*args), its wall time and call counted."""
        start = time.perf_counter()
        result = kernel(*args)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.native_calls += 1
        return result
