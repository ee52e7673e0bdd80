"""The accelerator tier: experts resident on the GPU under their own budget, in front of the RAM tier.

    flash --(store)--> RAM tier (ExpertCache / all-resident, --budget) --(upload)--> accelerator (--gpu-budget)

`fetch(layer, experts)` hands out the GPU-resident experts as DeviceExperts and asks the RAM tier only for the
rest. `kernels.run(expert, x)` (what Forward calls) runs a DeviceExpert on the accelerator; for a RAM expert the
cost model (edge_moe.placement) picks the CPU or an upload for the T tokens routed to it. Hot experts are
promoted: when an expert's decayed routing share (its expected uses over the next ~half-life of calls) times the
per-call saving of a resident decode call exceeds one upload, it is uploaded and kept, whatever the cost model
says for this one call; an uploaded expert stays if there is room or its share beats the GPU policy's victim's by
PROMOTE_MARGIN.

Resident weights are OrtValues on the device, bound with IOBinding: the weights never cross the bus per call,
only x [T, H] goes over and y [T, H] comes back.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from .device_kernels import DeviceExpert, DeviceKernels
from .budget import Budget, share_total
from .errors import EdgeMoeError
from .experts import ExpertSource, ResidentExpert
from .residency import ResidencySet, ResidencyView

PROMOTE_MARGIN = 1.5  # the incoming expert's routing share over the victim's: hysteresis against churn


@dataclass
class TierStats:
    """Counters per tier; seconds are wall time of the calls on the generation thread."""

    gpu_hits: int = 0  # runs of an expert resident on the accelerator
    gpu_seconds: float = 0.0
    cpu_runs: int = 0
    cpu_seconds: float = 0.0
    uploads: int = 0  # weight copies to the accelerator (promotions + one-call uploads)
    upload_bytes: int = 0
    upload_seconds: float = 0.0
    upload_runs: int = 0  # runs right after an upload (the cost model's "upload", or a promotion)
    upload_run_seconds: float = 0.0
    promotions: int = 0
    evictions: int = 0
    peak_resident_bytes: int = 0


class AcceleratorTier(ResidencyView, ExpertSource):
    """Experts resident on `device` under `budget` bytes, in front of the RAM source `ram`.

    Args:
        manifest: the package.  ram: the RAM tier (any ExpertSource with fetch).
        device: a Device with an accelerator (or a stand-in on the CPU provider, for tests).
        budget: bytes of expert weights the accelerator may hold.
        cost_model: placement.CostModel.  cpu_kernels: ExpertKernels for the CPU path.
        policy: the tier's own residency policy (policies.make_policy), which names eviction victims.
        clock: OrtClock.  trace: list to append {step, layer, experts, hit, where} to, or None.
        half_life: routing-share memory in routed-expert calls (default: 32 decode steps' worth).
    """

    def __init__(self, manifest, ram, device, budget: int, cost_model, cpu_kernels, policy, clock,
                 trace: list | None = None, half_life: float | None = None):
        super().__init__(trace)
        if int(budget) < 0:
            raise EdgeMoeError(f"gpu budget {budget} is negative; give bytes, '1GiB' or a share like '25%'")
        self.manifest, self.ram, self.device = manifest, ram, device
        self.cost, self.cpu_kernels = cost_model, cpu_kernels
        self.residency = ResidencySet(budget, policy)  # what is resident, its bytes and the eviction order
        self.device_kernels = DeviceKernels(device, clock)
        self.kernels = _PlacedKernels(self)
        self.resident: dict[tuple, DeviceExpert] = {}  # the payloads of self.residency's keys
        self.stats = TierStats()
        c = manifest.config
        self.half_life = float(half_life or 32 * len(c["moe_layers"]) * int(c["top_k"]))
        self._share: dict[tuple, tuple[float, int]] = {}  # key -> (decayed routing share, at access number)
        self.now = 0
        self._protected: set = set()
        self._slots: dict[tuple, int] = {}  # key -> its index in the current trace entry
        self._entry: dict | None = None
        self._ram_trace = ram.trace = []  # the RAM tier records its hits here; we read and clear them

    # The generation loop's side ---------------------------------------------------------------------------

    def begin_step(self) -> None:
        super().begin_step()
        self.ram.begin_step()

    def on_route(self, layer: int, scores) -> None:
        self.ram.on_route(layer, scores)
        self.policy.on_route(layer, scores, self.now)

    def observe_routes(self, layer: int, indices: np.ndarray) -> None:
        """Forward's route observer: each expert's share of this call's tokens feeds the promotion gate."""
        counts = np.bincount(indices.ravel(), minlength=int(self.manifest.config["num_experts"]))
        share = counts / max(indices.shape[0], 1)
        for e in np.flatnonzero(counts):
            self._bump((layer, int(e)), float(share[e]))

    def prefetch(self, layer: int, experts: list[int]) -> None:
        self.ram.prefetch(layer, [e for e in experts if (layer, int(e)) not in self.resident])

    def fetch(self, layer: int, experts: list[int]):
        """A generator of DeviceExpert (resident here) or ResidentExpert (from RAM), in the order of `experts`."""
        self.policy.on_layer(layer, self.now)  # before any promotion makes room, as the RAM tier does
        keys = [(layer, int(e)) for e in experts]
        on_gpu = [k in self.resident for k in keys]
        self._protected = {k for k, g in zip(keys, on_gpu) if g}
        rest = [k[1] for k, g in zip(keys, on_gpu) if not g]
        del self._ram_trace[:]
        ram_experts = self.ram.fetch(layer, rest) if rest else iter(())
        ram_hits = iter(self._ram_trace[-1]["hit"] if self._ram_trace else [])
        hits = [True if g else next(ram_hits, False) for g in on_gpu]
        self.record(layer, experts, hits)
        self._slots = {k: j for j, k in enumerate(keys)}
        self._entry = self.trace[-1] if self.trace is not None else None
        if self._entry is not None:
            self._entry["where"] = [None] * len(keys)
        return (self.resident[k] if g else next(ram_experts) for k, g in zip(keys, on_gpu))

    def run(self, expert, x: np.ndarray) -> np.ndarray:
        """Computes one expert on x [T, H] where it is cheapest; returns [T, H] float32."""
        key = expert.record.key
        self.now += 1
        self.residency.access(key, self.now)
        start = time.perf_counter()
        s = self.stats
        if isinstance(expert, DeviceExpert):
            y = self.device_kernels.run(expert, x)
            where = "gpu"
            s.gpu_hits += 1
            s.gpu_seconds += time.perf_counter() - start
        else:
            promote = False
            if _quantized(expert.record):  # MatMulNBits experts (edge_moe.quant) have no device kernel here yet
                where = "cpu"
            elif (where := self.cost.choose(expert, x.shape[0])) == "cpu":
                # cheaper now; but a hot expert pays its upload back over the next steps
                promote = self._worth_promoting(key, expert)
                where = "upload" if promote else "cpu"
            else:  # the upload is paid anyway: keep the copy if there is room or it beats the victim
                promote = self._room_for(key, expert.record.length)
            if where == "cpu":
                y = self.cpu_kernels.run(expert, x)
                s.cpu_runs += 1
                s.cpu_seconds += time.perf_counter() - start
            else:
                handle = self._upload(expert)
                if promote:
                    self._admit(key, handle)
                run_start = time.perf_counter()
                y = self.device_kernels.run(handle, x)
                s.upload_runs += 1
                s.upload_run_seconds += time.perf_counter() - run_start
        if self._entry is not None and key in self._slots:
            self._entry["where"][self._slots[key]] = where
        return y

    # Residency ------------------------------------------------------------------------------------------------

    def warm(self, keys=None) -> int:
        """Uploads experts (default: all, layer by layer) while they fit; returns how many are resident. For an
        all-resident accelerator, so the first tokens do not pay the uploads."""
        keys = sorted(self.manifest.experts) if keys is None else [tuple(k) for k in keys]
        keys = [k for k in keys if not _quantized(self.manifest.experts[k])]
        by_layer: dict[int, list[int]] = {}
        for layer, e in keys:
            by_layer.setdefault(layer, []).append(e)
        for layer, experts in by_layer.items():
            todo = [e for e in experts if (layer, e) not in self.resident]
            for expert in self.ram.fetch(layer, todo):
                if not self.residency.fits(expert.record.length):
                    break
                self._admit(expert.record.key, self._upload(expert))
        return len(self.resident)

    def resident_bytes(self) -> int:
        return self.used

    def snapshot(self) -> dict[tuple, str]:
        """Every expert that is not only on flash: 'gpu' here, else the RAM tier's state."""
        state = dict(self.ram.snapshot()) if hasattr(self.ram, "snapshot") else {}
        state.update({k: "gpu" for k in self.resident})
        return state

    def stats_dict(self) -> dict:
        """Per-tier counters for Model.expert_stats."""
        s = self.stats
        return {"device": self.device.name, "gpu_budget_bytes": self.budget, "gpu_resident_bytes": self.used,
                "gpu_resident_experts": len(self.resident), **vars(s)}

    def _bump(self, key, amount: float) -> None:
        value, at = self._share.get(key, (0.0, self.now))
        self._share[key] = (value * 0.5 ** ((self.now - at) / self.half_life) + amount, self.now)

    def _share_now(self, key) -> float:
        value, at = self._share.get(key, (0.0, self.now))
        return value * 0.5 ** ((self.now - at) / self.half_life)

    def _worth_promoting(self, key, expert) -> bool:
        """Promote an expert the CPU would run now while the tier has free room (the copy costs one upload and saves
        every later CPU run and every read of it from flash: uniform routing gives no expert the share that pays an
        upload back in compute alone, and on the H200 a 25 % GPU budget held the 26 experts a prefill had uploaded,
        whatever the budget); into a full tier when its expected uses (its decayed routing share over about a
        half-life of calls) times what a resident decode call saves exceed one upload and _room_for says so."""
        if not self.residency.fits(expert.record.length):
            p = self.cost.predict(expert, 1)
            saving, upload = p["cpu"] - p["gpu"], p["upload"] - p["gpu"]
            if saving <= 0 or self._share_now(key) * saving < upload:
                return False
        return self._room_for(key, expert.record.length)

    def _room_for(self, key, nbytes: int) -> bool:
        """Free room: yes. Full: if the incoming expert's routing share beats the policy's victim's."""
        if nbytes > self.budget:
            return False
        if self.residency.fits(nbytes):
            return True
        victim = self.residency.victim(keep=self._protected)
        if victim is None:
            return False
        return self._share_now(key) > PROMOTE_MARGIN * self._share_now(victim)

    def _admit(self, key, handle: DeviceExpert) -> None:
        if key in self.resident:
            return  # promoted already by an earlier run of this call (a key routed twice): one copy is enough
        for victim in self.residency.make_room(handle.nbytes, keep=self._protected):
            del self.resident[victim]
            self.stats.evictions += 1
        if not self.residency.fits(handle.nbytes):
            return  # stays a one-call upload; nothing evictable (the running layer's experts are kept)
        self.residency.admit(key, handle.nbytes, self.now)
        self.resident[key] = handle
        self.stats.promotions += 1
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.used)

    def _upload(self, expert: ResidentExpert) -> DeviceExpert:
        start = time.perf_counter()
        handle = self.device_kernels.upload(expert)
        self.stats.uploads += 1
        self.stats.upload_bytes += expert.nbytes
        self.stats.upload_seconds += time.perf_counter() - start
        return handle


def _quantized(record) -> bool:
    return str(record.dtype) in ("q2", "q4", "q8")


class _PlacedKernels:
    """What Forward calls as `kernels.run(expert, x)`: the tier decides where."""

    def __init__(self, tier: AcceleratorTier):
        self.tier = tier

    def run(self, expert, x: np.ndarray) -> np.ndarray:
        return self.tier.run(expert, x)


def parse_gpu_budget(value, manifest, kernel: bool = True) -> int:
    """Bytes of expert weights on the accelerator from a `budget.Budget` or what it parses: an int, '4GiB', '512MB'
    or '25%' (of `budget.share_total`: the same bytes as a RAM budget of 25%); None means all of them (100%). Unlike
    the RAM budget there is no minimum: experts the accelerator cannot hold run on the CPU. kernel: as the RAM
    budget's (the model may run edge_moe's kernels), so that both shares are of one total.

    Raises:
        EdgeMoeError: malformed or negative.
    """
    budget = Budget.parse(value, "gpu budget", allow_auto=False)
    total = share_total(manifest, kernel)
    return total if budget.unlimited else budget.resolve(total)


def build_tier(model, gpu_budget=None, gpu_policy: str = "lfu", cost_model=None, recalibrate: bool = False,
               progress: bool = False) -> AcceleratorTier:
    """The accelerator tier of a Model being loaded (runtime.Model calls this when its device is an accelerator).

    Args:
        model: the Model (manifest, experts = RAM tier, kernels = CPU kernels, store, clock, threads, device).
        gpu_budget: see parse_gpu_budget.  gpu_policy: residency policy name for the accelerator's set.
        cost_model: a placement.CostModel (tests: a stub table), a path to its JSON, or None: this machine's cached
            calibration, measured now for shapes it lacks.
        recalibrate: measure again even if cached.  progress: print a line per calibrated shape.
    """
    from pathlib import Path

    from .experts import expert_shape
    from .placement import CostModel, load_or_calibrate, shape_key
    from .policies import make_policy

    m = model.manifest
    tier = AcceleratorTier(m, model.experts, model.device, parse_gpu_budget(gpu_budget, m, model.kernel), None,
                           model.kernels, make_policy(gpu_policy), model.clock, trace=model.trace)
    if isinstance(cost_model, (str, Path)):
        cost_model = CostModel.from_json(json.loads(Path(cost_model).read_text()))
    if cost_model is None:
        samples = {}
        for record in m.experts.values():
            if _quantized(record):
                continue  # runs on the CPU (see AcceleratorTier.run): nothing to calibrate
            samples.setdefault(shape_key(expert_shape(record)),
                               lambda r=record: ResidentExpert.from_bytes(r, model.store.read(r.key)))
        dk = tier.device_kernels
        cost_model = load_or_calibrate(model.device, model.threads, samples, model.kernels.run, dk.upload, dk.run,
                                       recalibrate=recalibrate,
                                       progress=(lambda line: print(f"edge-moe: {line}", file=sys.stderr))
                                       if progress else None)
    tier.cost = cost_model
    if tier.budget >= m.expert_bytes:
        tier.warm()  # everything fits: upload at load, not during the first tokens
    return tier
