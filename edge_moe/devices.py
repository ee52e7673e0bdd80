"""Device names -> onnxruntime execution providers, in one table.

    --device cpu    everything on the CPU (the default)
    --device cuda   backbone and the accelerator expert tier on CUDA; fails if onnxruntime-gpu cannot load
    --device auto   the first accelerator whose provider really loads, else the CPU with a one-line notice

A new accelerator (DirectML, CoreML, OpenVINO) is one more `_DEVICES` entry: its provider name and the device
name OrtValue uses for memory on it. "Really loads" matters: onnxruntime lists CUDAExecutionProvider whenever
onnxruntime-gpu is installed, and a session asked for it quietly runs on the CPU if libcudart or libcudnn is
missing, so `auto` opens a one-node session and checks which provider it got.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

from .errors import EdgeMoeError
from .lazy_imports import ort
from .sessions import session_threading


@dataclass(frozen=True)
class Device:
    """Where sessions run.

    name: "cpu", "cuda", ... (or any label for a stand-in, e.g. tests' accelerator tier on the CPU provider).
    providers: the execution provider list sessions are opened with (CPU last as onnxruntime's fallback).
    ort_device: the device name OrtValue.ortvalue_from_numpy takes for memory on it ("cpu", "cuda", ...).
    device_id: which device of that kind.
    """

    name: str
    providers: tuple[str, ...]
    ort_device: str = "cpu"
    device_id: int = 0

    @property
    def accelerator(self) -> bool:
        """True when this is a device with its own expert tier (a CPU stand-in counts when named so)."""
        return self.name != "cpu"

    @property
    def compute_dtype(self) -> str | None:
        """float16 experts compute in float16 on a GPU (the tensor cores; half the bytes per call); on the CPU
        provider float16 MatMul is not fast (or not there), so a stand-in computes in float32 like the CPU path."""
        return None if self.ort_device == "cpu" else "float16"


CPU = Device("cpu", ("CPUExecutionProvider",))

# name -> (provider, OrtValue device name); order is the order `auto` tries them in
_DEVICES = {
    "cuda": ("CUDAExecutionProvider", "cuda"),
}

DEVICE_CHOICES = ("cpu", "auto", *_DEVICES)


def resolve_device(device, notice=None) -> Device:
    """Turns a device name (or a Device) into a Device.

    Args:
        device: "cpu", "auto", "cuda", or a Device (returned as is; tests pass a CPU stand-in accelerator).
        notice: callable taking one line, told when `auto` falls back to the CPU (default: print to stderr).
    Returns:
        The Device.
    Raises:
        EdgeMoeError: unknown name, or an accelerator asked for by name whose provider does not load.
    """
    if isinstance(device, Device):
        return device
    name = str(device or "cpu").lower()
    if name == "cpu":
        return CPU
    if name == "auto":
        for candidate in _DEVICES:
            if _loads(_DEVICES[candidate][0]) is None:
                return _device(candidate)
        line = "edge-moe: no accelerator found (" + "; ".join(
            f"{n}: {_loads(_DEVICES[n][0])}" for n in _DEVICES) + "); running on the CPU"
        (notice or (lambda text: print(text, file=sys.stderr)))(line)
        return CPU
    if name not in _DEVICES:
        raise EdgeMoeError(f"device {device!r} is unknown; choose one of {', '.join(DEVICE_CHOICES)}")
    why = _loads(_DEVICES[name][0])
    if why is not None:
        raise EdgeMoeError(f"device {name!r} is not usable: {why}; install the matching onnxruntime build "
                           f"(onnxruntime-gpu for cuda) or use --device cpu / auto")
    return _device(name)


def _device(name: str) -> Device:
    provider, ort_device = _DEVICES[name]
    return Device(name, (provider, "CPUExecutionProvider"), ort_device)


@lru_cache(maxsize=None)
def _loads(provider: str) -> str | None:
    """None if a session on `provider` really runs there; else why not (one phrase)."""
    if provider not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no {provider}"
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the fallback warning is what we report ourselves
    session_threading(options)  # onnxruntime refuses own pools once the shared one exists
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own types for a provider that fails to load
        return f"{provider} failed to load ({str(exc).splitlines()[0][:160]})"
    if session.get_providers()[0] != provider:
        return f"{provider} did not load (CUDA/cuDNN libraries missing?)"
    return None
