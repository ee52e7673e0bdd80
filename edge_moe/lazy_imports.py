"""onnxruntime imported when first used, with Ctrl-C held back while a native library initializes.

A package whose layers and experts all run in edge_moe's own kernels (native_layer.py, fused_moe.py) opens no
onnxruntime session, yet importing onnxruntime took 20 MiB of resident memory on the 2-core VM (its library's
pages and what it allocates at import): a fifth of the float16 Qwen3-MoE's baseline, and room for 13 more experts
that budget auto gives under a 166 MiB memory limit. Modules take `ort` from here and use it as the module.
"""

from __future__ import annotations

import contextlib
import importlib
import threading


@contextlib.contextmanager
def sigint_deferred():
    """Holds Ctrl-C back while native libraries initialize (interrupted there, they fail with a traceback or an
    ImportError); a Ctrl-C that came meanwhile arrives as KeyboardInterrupt when the block ends. Only the main
    thread takes Python's signals, so elsewhere this does nothing."""
    import signal

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        # A Ctrl-C held back meanwhile is taken here and raised now: left pending, it would be delivered at
        # unblocking and become a KeyboardInterrupt only at Python's next signal check, somewhere later.
        interrupted = signal.SIGINT in signal.sigpending()
        if interrupted:
            signal.sigwait({signal.SIGINT})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if interrupted:
        raise KeyboardInterrupt


class LazyModule:
    """Stands for a module and imports it at the first attribute asked for; each attribute is then kept on this
    object, so a later lookup costs what a module's does."""

    def __init__(self, name: str):
        self._module_name = name

    def __getattr__(self, attribute: str):
        with sigint_deferred():
            module = importlib.import_module(self._module_name)
        value = getattr(module, attribute)
        setattr(self, attribute, value)
        return value


ort = LazyModule("onnxruntime")
