"""Where a routed expert computes: the cost model of the accelerator tier.

Per routed expert per step, with T = tokens routed to it:
    resident on the accelerator           -> "gpu"
    else  cpu(T)  <=  upload(bytes) + gpu(T)  -> "cpu"      (run from RAM: decode, usually)
          otherwise                          -> "upload"   (copy the weights over and run there: long prefill)
DESIGN.md's H200 table is the reason there is a choice at all: a Qwen3-30B-A3B expert costs 0.22 ms on 16 CPU
cores at T=1 but 0.8 ms to copy, while at T=512 the CPU needs 5 ms and the copy wins.

cpu(T) and gpu(T) are measured at a few token counts per expert shape and interpolated linearly in T (matrix work
is affine in T once past the weight-streaming floor); upload is measured per shape. The measurement takes a
fraction of a second per shape and is cached per machine (hostname, onnxruntime version, device, threads) in
`<cache root>/placement.json` (EDGE_MOE_CACHE, else $XDG_CACHE_HOME/edge_moe, else ~/.cache/edge_moe).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from .errors import EdgeMoeError
from .files import write_text_atomic
from .lazy_imports import ort

TOKENS = (1, 8, 64, 512)  # token counts measured: decode, short and long prefill chunks


def shape_key(shape) -> str:
    """The cost table's key for an ExpertShape: experts of one shape cost the same."""
    return f"{shape.kind}_{shape.hidden_size}x{shape.intermediate_size}_{shape.dtype}"


@dataclass
class ShapeCosts:
    """Seconds per call of one expert shape: cpu_s[i] and gpu_s[i] at tokens[i]; upload_s per expert."""

    tokens: list[int]
    cpu_s: list[float]
    gpu_s: list[float]
    upload_s: float
    nbytes: int

    def at(self, costs: list[float], tokens: int) -> float:
        """Piecewise-linear in T, extrapolated along the last segment beyond the largest T measured."""
        t = self.tokens
        if tokens >= t[-1] and len(t) > 1:
            slope = (costs[-1] - costs[-2]) / (t[-1] - t[-2])
            return costs[-1] + max(slope, 0.0) * (tokens - t[-1])
        return float(np.interp(tokens, t, costs))


class CostModel:
    """Predicted seconds per expert call on the CPU, on the accelerator, and per upload; `choose` decides.

    Build one with `calibrate`, `load_or_calibrate`, or directly from a table (tests use a stub table).
    """

    def __init__(self, shapes: dict[str, ShapeCosts], machine: str = ""):
        self.shapes, self.machine = dict(shapes), machine

    def costs(self, shape) -> ShapeCosts:
        key = shape_key(shape)
        costs = self.shapes.get(key)
        if costs is None:
            raise EdgeMoeError(f"the cost model has no entry for expert shape {key}; known: "
                               f"{', '.join(sorted(self.shapes)) or 'none'}; calibrate it (load_or_calibrate)")
        return costs

    def predict(self, expert, tokens: int) -> dict[str, float]:
        """Seconds for each choice of a non-resident expert: {"cpu": ..., "upload": ..., "gpu": ...} ("gpu" is
        the run alone, as if resident)."""
        c = self.costs(expert.shape)
        gpu = c.at(c.gpu_s, tokens)
        upload = c.upload_s * expert.nbytes / max(c.nbytes, 1)
        return {"cpu": c.at(c.cpu_s, tokens), "upload": upload + gpu, "gpu": gpu}

    def choose(self, expert, tokens: int, resident: bool = False) -> str:
        """"gpu" when resident on the accelerator; else "cpu" or "upload", whichever is predicted faster.

        Args:
            expert: anything with `.shape` (ExpertShape) and `.nbytes`.
            tokens: tokens routed to it in this call.
            resident: it is already on the accelerator.
        """
        if resident:
            return "gpu"
        p = self.predict(expert, tokens)
        return "upload" if p["upload"] < p["cpu"] else "cpu"

    def crossover(self, expert) -> int | None:
        """The smallest token count (<= 65536) at which uploading wins, or None (for reports)."""
        lo, hi = 1, 65536
        if self.choose(expert, hi) == "cpu":
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.choose(expert, mid) == "cpu" else (lo, mid)
        return lo

    def to_json(self) -> dict:
        return {"machine": self.machine, "shapes": {k: asdict(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "CostModel":
        return cls({k: ShapeCosts(**v) for k, v in data["shapes"].items()}, data.get("machine", ""))


def machine_key(device, threads: int) -> str:
    """What the measurements depend on: this host, onnxruntime's build, the device and the CPU threads."""
    return f"{platform.node()}|ort-{ort.__version__}|{device.name}:{device.device_id}|threads-{threads}"


def measure_shape(sample, cpu_run, upload, device_run, tokens=TOKENS, seconds: float = 0.15) -> ShapeCosts:
    """Times one expert of a shape.

    Args:
        sample: a ResidentExpert of the shape (in RAM).
        cpu_run: (expert, x) -> y on the CPU.  upload: expert -> device handle.  device_run: (handle, x) -> y.
        tokens: token counts to time.  seconds: rough time spent per (path, token count).
    Returns:
        ShapeCosts (medians of repeated calls, after one warm-up call each).
    """
    rng = np.random.default_rng(0)
    handle = upload(sample)  # also the warm-up of the copy path (allocator, first-touch)
    xs = [rng.standard_normal((t, sample.shape.hidden_size), dtype=np.float32) for t in tokens]
    # Two passes, the lower median of each point kept: a burst of other work during one point (seen on the H200
    # machine: T=8 measured at twice its real cost) would otherwise skew every choice near it until recalibration.
    passes = [([_median_time(lambda: cpu_run(sample, x), seconds / 2) for x in xs],
               [_median_time(lambda: device_run(handle, x), seconds / 2) for x in xs],
               _median_time(lambda: upload(sample), seconds / 2, at_most=5)) for _ in range(2)]
    cpu_s, gpu_s = (list(np.min([p[i] for p in passes], axis=0)) for i in (0, 1))
    upload_s = min(p[2] for p in passes)
    return ShapeCosts(list(tokens), [float(c) for c in cpu_s], [float(g) for g in gpu_s], float(upload_s),
                      int(sample.nbytes))


def _median_time(call, seconds: float, at_most: int = 50) -> float:
    call()  # warm-up: kernels chosen, buffers allocated
    times = []
    budget_end = time.perf_counter() + seconds
    while len(times) < 3 or (len(times) < at_most and time.perf_counter() < budget_end):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cache_path():
    from .default_model import cache_root

    return cache_root() / "placement.json"


def load_or_calibrate(device, threads: int, samples: dict, cpu_run, upload, device_run, path=None,
                      recalibrate: bool = False, progress=None) -> CostModel:
    """The cached cost model of this machine, measuring (and caching) the expert shapes it lacks.

    Args:
        device: the Device the tier runs on.  threads: CPU intra-op threads (costs depend on them).
        samples: shape_key -> a function returning a ResidentExpert of that shape (read only if measured).
        cpu_run, upload, device_run: as in measure_shape.
        path: the cache file (default: cache_path()).  recalibrate: measure even what is cached.
        progress: callable taking one line per measured shape (None: quiet).
    Returns:
        A CostModel covering every shape in `samples`.
    """
    path = path or cache_path()
    machine = machine_key(device, threads)
    try:
        cached = json.loads(path.read_text()).get(machine, {}) if path.exists() else {}
    except (OSError, ValueError):
        cached = {}  # an unreadable cache is measured again and rewritten
    shapes = {} if recalibrate else {k: ShapeCosts(**v) for k, v in cached.get("shapes", {}).items()
                                     if k in samples}
    missing = [k for k in samples if k not in shapes]
    for key in missing:
        shapes[key] = measure_shape(samples[key](), cpu_run, upload, device_run)
        if progress is not None:
            progress(f"calibrated {key}: " + _describe(shapes[key]))
    model = CostModel(shapes, machine)
    if missing:
        _write_cache(path, machine, model)
    return model


def _describe(c: ShapeCosts) -> str:
    return (f"upload {c.upload_s * 1e3:.2f} ms, " + ", ".join(
        f"T={t}: cpu {a * 1e3:.2f} / gpu {b * 1e3:.2f} ms" for t, a, b in zip(c.tokens, c.cpu_s, c.gpu_s)))


def _write_cache(path, machine: str, model: CostModel) -> None:
    """Merges this machine's entry into the cache file; a cache that cannot be written is skipped (the
    measurement is then redone on the next load, which costs time, not correctness)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        entry = data.setdefault(machine, {"shapes": {}})
        entry["shapes"].update(model.to_json()["shapes"])
        write_text_atomic(path, json.dumps(data, indent=1))
    except (OSError, ValueError):
        pass
