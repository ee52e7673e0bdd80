"""Expert kernels on an accelerator: weights uploaded once as OrtValues on the device, runs through IOBinding.

One session per ExpertShape (as edge_moe.experts.ExpertKernels on the CPU), opened with the device's providers.
float16 experts compute in float16 on a GPU: x is cast down inside the graph and the output cast back up, so a
call moves T*H*4 bytes each way and reads the weights once at half the bytes of float32 (DESIGN.md's H200 table
was measured this way). Elsewhere (the CPU stand-in of the tests) the graph is the CPU path's own, so results
match it exactly.

    # T = tokens, H = hidden, F = expert intermediate size
    x [T, H] f32 -> Cast f16 -> MatMul gate_up [H, 2F] -> Split -> silu(gate) * up -> MatMul down [F, H] -> Cast f32
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .expert_graph import INPUT, OUTPUT, ExpertShape, build_expert_graph
from .lazy_imports import ort
from .manifest import ExpertRecord
from .sessions import OrtClock, TimedSession, open_session


@dataclass
class DeviceExpert:
    """An expert whose weights live on the device (OrtValues); `nbytes` counts against the GPU budget."""

    record: ExpertRecord
    weights: dict[str, ort.OrtValue]
    nbytes: int
    shape: ExpertShape


def device_expert_graph(shape: ExpertShape, compute_dtype: str | None):
    """The expert graph with weights as inputs, computing in `compute_dtype` (None: the CPU path's graph)."""
    if compute_dtype is None or compute_dtype != shape.dtype or shape.kind != "swiglu":
        return build_expert_graph(shape)  # the CPU graph (float32 compute) is the right one
    from onnx import TensorProto

    from .onnx_build import GraphBuilder

    g = GraphBuilder(f"expert_{shape.kind}_{shape.hidden_size}x{shape.intermediate_size}_{shape.dtype}_device")
    g.scope = "/expert"
    x = g.op("Cast", g.input(INPUT, "float32", ["T", shape.hidden_size]), to=TensorProto.FLOAT16)
    w = {name: g.input(name, shape.dtype, dims) for name, dims in shape.tensor_shapes().items()}
    y = g.op("Cast", g.swiglu(x, w["gate_up_proj"], w["down_proj"], in_out_layout=True), to=TensorProto.FLOAT)
    g.output(y, OUTPUT, "float32", ["T", shape.hidden_size])
    return g.model()


class DeviceKernels:
    """Uploads experts to `device` and runs them there with IOBinding."""

    def __init__(self, device, clock: OrtClock):
        self.device, self.clock = device, clock
        self._sessions: dict[ExpertShape, TimedSession] = {}

    def session(self, shape: ExpertShape) -> TimedSession:
        session = self._sessions.get(shape)
        if session is None:
            model = device_expert_graph(shape, self.device.compute_dtype).SerializeToString()
            session = self._sessions[shape] = TimedSession(
                open_session(model, providers=self.device.providers), self.clock)
        return session

    def upload(self, expert) -> DeviceExpert:
        """Copies a ResidentExpert's weights to the device. On the CPU the arrays are copied too: the RAM tier
        recycles an evicted expert's buffer, and an OrtValue on the CPU would otherwise alias it."""
        d = self.device
        weights = {}
        for name, array in expert.weights.items():
            if d.ort_device == "cpu":
                array = np.array(array, copy=True)
            weights[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), d.ort_device,
                                                             d.device_id)
        return DeviceExpert(expert.record, weights, sum(int(a.nbytes) for a in expert.weights.values()),
                            expert.shape)

    def run(self, expert: DeviceExpert, x: np.ndarray) -> np.ndarray:
        """x [T, H] float32 (host) -> [T, H] float32 (host)."""
        timed = self.session(expert.shape)
        binding = timed.session.io_binding()
        binding.bind_cpu_input(INPUT, np.ascontiguousarray(x, dtype=np.float32))
        for name, value in expert.weights.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(OUTPUT, "cpu")
        start = time.perf_counter()
        timed.session.run_with_iobinding(binding)
        y = binding.copy_outputs_to_cpu()[0]
        self.clock.seconds += time.perf_counter() - start
        self.clock.calls += 1
        return y
