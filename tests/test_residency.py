"""The residency core's invariants, tested once for every tier through the core: random operation sequences
(hypothesis) drive the core alone, the RAM tier (ExpertCache), the accelerator tier and the trace simulator, each
with a ResidencySet that checks itself after every call:
    resident + reserved (in-flight reads) + spare bytes never exceed the capacity (only a capacity just lowered may
    be over, until the tier makes room), pinned and kept keys are never victims, and the tier's payloads match the
    core's keys.
Then the simulator against a brute-force LRU, and the RAM tier against the simulator: the same hits and misses (lru,
lfu, adaptive) for the same trace, policy and capacity, so what the planner replays is what the runtime does."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_moe import opt
from edge_moe.accelerator import AcceleratorTier
from edge_moe.budget import minimum_budget
from edge_moe.cache import ExpertCache, store_for
from edge_moe.devices import Device
from edge_moe.errors import EdgeMoeError
from edge_moe.manifest import Manifest
from edge_moe.policies import LFUPolicy, make_policy
from edge_moe.residency import ResidencySet
from edge_moe_export.exporter import export_checkpoint

from conftest import build_checkpoint, tiny_config

LAYERS, EXPERTS = 3, 16
POLICIES = ["lru", "lfu", "adaptive"]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("residency")
    build_checkpoint(root / "hf", tiny_config("qwen3_moe", layers=LAYERS, experts=EXPERTS, top_k=2, hidden=64, ffn=96))
    return export_checkpoint(root / "hf", root / "pkg", progress=False)


class CheckedResidencySet(ResidencySet):
    """A ResidencySet that asserts its invariants after every call that changes it."""

    _lowered = False  # set_capacity left it over the capacity: the tier has not made room yet

    def _check(self) -> None:
        assert sum(self.resident.values()) + sum(self.reserved.values()) + self.spare_bytes == self.used_bytes()
        assert not set(self.resident) & set(self.reserved)
        if self.used_bytes() <= self.capacity:
            self._lowered = False
        assert self._lowered or self.used_bytes() <= self.capacity, (self.used_bytes(), self.capacity)

    def make_room(self, nbytes, keep=frozenset(), incoming=None):
        victims = super().make_room(nbytes, keep, incoming)
        for key in victims or ():
            assert key not in keep and key not in self.pinned, key
        self._check()
        return victims

    def evict(self, key):
        assert key not in self.pinned, f"pinned {key} evicted"
        return super().evict(key)

    def set_capacity(self, nbytes):
        super().set_capacity(nbytes)
        self._lowered = self.used_bytes() > self.capacity


def _checked_after(name):
    def method(self, *args, **kwargs):
        result = getattr(ResidencySet, name)(self, *args, **kwargs)
        self._check()
        return result
    return method


for _name in ("reserve", "release", "admit", "keep_spare", "drop_spare", "pin", "unpin", "set_policy"):
    setattr(CheckedResidencySet, _name, _checked_after(_name))


def checked(tier):
    """Swaps the tier's core for the checking one, state and all."""
    tier.residency.__class__ = CheckedResidencySet
    return tier


# Random operation sequences: (op, layer, experts, fraction) ---------------------------------------------------

experts_st = st.lists(st.integers(0, EXPERTS - 1), min_size=1, max_size=3, unique=True)
op_st = st.tuples(st.sampled_from(["use", "use", "use", "prefetch", "pin", "unpin", "capacity"]),
                  st.integers(0, LAYERS - 1), experts_st, st.floats(0.0, 1.0))
ops_st = st.lists(op_st, min_size=1, max_size=30)


@SETTINGS
@given(ops=ops_st, policy=st.sampled_from(POLICIES), slots=st.integers(3, 12), sizes=st.sampled_from([(1,), (1, 2, 5)]))
def test_core_alone_keeps_its_invariants(ops, policy, slots, sizes):
    """The core driven the way a tier drives it: room, then admission or a reservation that lands later."""
    size = {(layer, e): sizes[(layer * 7 + e) % len(sizes)] for layer in range(LAYERS) for e in range(EXPERTS)}
    room = CheckedResidencySet(slots * max(sizes), make_policy(policy))
    now = 0
    for op, layer, experts, fraction in ops:
        keys = [(layer, e) for e in experts]
        if op == "use":
            for key in keys:
                if key in room.reserved:
                    room.admit(key, now=now)  # the read landed
                elif key not in room:
                    room.make_room(size[key], keep=set(keys))
                    if room.fits(size[key]):
                        room.admit(key, size[key], now)
                if key in room:
                    room.access(key, now)
                now += 1
        elif op == "prefetch":
            room.policy.on_predict(keys, now)  # as ExpertCache.prefetch does before it weighs a victim
            for key in keys:
                if key not in room and key not in room.reserved:
                    if room.make_room(size[key], incoming=key) is not None and room.fits(size[key]):
                        room.reserve(key, size[key])
        elif op == "pin":
            room.pin(k for k in keys if k in room)
        elif op == "unpin":
            room.unpin(keys)
        else:
            room.set_capacity(int(fraction * slots * max(sizes)))
            room.make_room(0)
        with pytest.raises(EdgeMoeError, match="make room first"):
            room.reserve(("nowhere", 0), room.capacity - room.used_bytes() + 1)


@SETTINGS
@given(ops=ops_st, policy=st.sampled_from(POLICIES), slots=st.integers(4, 16))
# found by CI: two pins leave room for the model's top-k (2), and a fetch of three beside them is refused
@example(ops=[("use", 0, [0], 0.0), ("pin", 1, [0, 1], 0.0), ("use", 0, [0, 1, 2], 0.0), ("use", 0, [0, 1, 2], 0.0)],
         policy="lru", slots=4)
# found by a test run: a pin of a layer the adaptive policy had not seen grew its tables under memoized scores of
# the old shape, and the next victim looked the pinned key up outside them
@example(ops=[("use", 0, [0], 0.0), ("use", 0, [0, 1, 2], 0.0), ("pin", 2, [0], 0.0), ("unpin", 2, [0], 0.0),
              ("capacity", 0, [0], 0.0)], policy="adaptive", slots=4)
def test_ram_tier_keeps_the_core_invariants(package, ops, policy, slots):
    manifest = Manifest.load(package)
    footprint = max(minimum_budget(manifest) // 2, 1)
    cache = checked(ExpertCache(manifest, store_for(manifest), make_policy(policy), slots * footprint))
    top_k = manifest.config["top_k"]
    for op, layer, experts, fraction in ops:
        keys = [(layer, e) for e in experts]
        if op == "use":
            try:
                assert [x.record.key for x in cache.fetch(layer, experts)] == keys
            except EdgeMoeError as exc:  # pins leave room for a layer's top-k, not for more: refused, state intact
                assert len(experts) > top_k and cache.pinned and "plus the pinned ones" in str(exc)
        elif op == "prefetch":
            cache.prefetch(layer, experts)
        elif op == "pin":
            try:
                cache.pin(keys)
            except EdgeMoeError as exc:
                assert "pin fewer or raise the budget" in str(exc)
        elif op == "unpin":
            cache.unpin(keys)
        else:  # never below what the pins and one fetch (3 experts) need
            floor = sum(cache.size(k) for k in cache.pinned) + 3 * footprint
            cache.set_budget(max(floor, int(fraction * slots * footprint)))
        core = cache.residency
        with cache._lock:
            assert set(cache.resident) == set(core.resident) and set(cache.inflight) == set(core.reserved)
            assert core.spare_bytes == sum(size * len(b) for size, b in cache._spare.items())
            assert all(k in cache.resident for k in core.pinned)  # pinned experts are loaded and stay
            held = sum(cache.size(k) for k in list(cache.resident) + list(cache.inflight)) + core.spare_bytes
            assert held == cache.used <= cache.budget
    cache.store.close()


@SETTINGS
@given(ops=ops_st, policy=st.sampled_from(POLICIES), slots=st.integers(0, 10))
def test_accelerator_tier_keeps_the_core_invariants(package, ops, policy, slots):
    """Promotions through the tier's own room test and admission (run() calls these), with fake device handles."""
    manifest = Manifest.load(package)
    length = next(iter(manifest.experts.values())).length
    tier = checked(AcceleratorTier(manifest, SimpleNamespace(trace=None), Device("standin", ("CPUExecutionProvider",)),
                                   slots * length, None, None, make_policy(policy), clock=None))
    for op, layer, experts, fraction in ops:
        keys = [(layer, e) for e in experts]
        if op in ("use", "prefetch"):
            tier._protected = {k for k in keys if k in tier.resident}  # as fetch() does: the layer's GPU experts
            for key in keys:
                tier.now += 1
                tier.residency.access(key, tier.now)  # as run() does, before it decides where the expert runs
                if key not in tier.resident and (fraction > 0.3 or tier._room_for(key, length)):
                    tier._admit(key, SimpleNamespace(nbytes=length))  # the cost model's upload, or a promotion
        elif op == "pin":  # the tier has no pinning of its own, but its core's pins hold
            tier.residency.pin(k for k in keys if k in tier.resident)
        elif op == "unpin":
            tier.residency.unpin(keys)
        assert set(tier.resident) == set(tier.residency.resident)
        assert tier.used == len(tier.resident) * length <= tier.budget


@SETTINGS
@given(steps=st.lists(st.tuples(st.integers(0, LAYERS - 1), experts_st), min_size=1, max_size=60),
       policy=st.sampled_from(POLICIES + ["opt"]), extra=st.integers(0, 12), mixed=st.booleans())
def test_simulator_keeps_the_core_invariants(steps, policy, extra, mixed):
    trace = [[(layer, e) for e in experts] for layer, experts in steps]
    sizes = {(layer, e): (1 + (layer + e) % 3 if mixed else 1) for layer in range(LAYERS) for e in range(EXPERTS)}
    capacity = max(sum(sizes[k] for k in step) for step in trace) + extra
    with mock.patch.object(opt, "ResidencySet", CheckedResidencySet):
        result = opt.belady(trace, sizes, capacity) if policy == "opt" else \
            opt.simulate(policy, trace, sizes, capacity)
    assert result.hits + result.misses == sum(len(step) for step in trace)


# The simulator against a brute-force LRU, and the RAM tier against the simulator ------------------------------

def brute_force_lru(trace, sizes, capacity) -> list[bool]:
    """Resident keys in recency order; a miss evicts the least recent keys the step does not need until it fits."""
    order: list = []
    flags = []
    for step in trace:
        for key in step:
            flags.append(key in order)
            if key in order:
                order.remove(key)
            else:
                while sum(sizes[k] for k in order) + sizes[key] > capacity:
                    order.remove(next(k for k in order if k not in step))
            order.append(key)
    return flags


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, LAYERS - 1), experts_st), min_size=1, max_size=80),
       extra=st.integers(0, 10), mixed=st.booleans())
def test_simulated_lru_equals_a_brute_force_lru(steps, extra, mixed):
    trace = [[(layer, e) for e in experts] for layer, experts in steps]
    sizes = {(layer, e): (1 + (layer * 5 + e) % 4 if mixed else 1) for layer in range(LAYERS) for e in range(EXPERTS)}
    capacity = max(sum(sizes[k] for k in step) for step in trace) + extra
    assert list(opt.simulate("lru", trace, sizes, capacity).hit_flags) == brute_force_lru(trace, sizes, capacity)


# adaptive too: its scores depend on the layer running now, which both learn from Policy.on_layer before they make
# room for the layer's misses (when the simulator learnt it at the layer's first access and the RAM tier at its first
# hand-out, after all of the room was made, the two differed hit by hit on 130 of 150 random traces).
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, LAYERS - 1), experts_st), min_size=1, max_size=60),
       policy=st.sampled_from(["lru", "lfu", "lfu-history", "adaptive", "adaptive"]), slots=st.integers(3, 14))
def test_ram_tier_hits_what_the_simulator_replays(package, steps, policy, slots):
    manifest = Manifest.load(package)
    make = (lambda: LFUPolicy(keep_history=True)) if policy == "lfu-history" else (lambda: make_policy(policy))
    footprint = max(minimum_budget(manifest) // 2, 1)
    trace: list = []
    cache = ExpertCache(manifest, store_for(manifest), make(), slots * footprint, trace=trace)
    for layer, experts in steps:
        list(cache.fetch(layer, experts))
    runtime = [hit for entry in trace for hit in entry["hit"]]
    keys = [[(layer, e) for e in experts] for layer, experts in steps]
    replay = opt.simulate(make(), keys, {k: cache.size(k) for k in manifest.experts}, cache.budget).hit_flags
    cache.store.close()
    assert runtime == list(replay)
