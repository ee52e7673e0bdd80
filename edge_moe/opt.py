"""Trace simulation of residency policies, and Belady's OPT as the bound they are measured against.

A trace is a list of steps; a step is one (token, layer) visit: the keys of the layer's top-k experts,
all of which must be resident at once while the layer runs. So no key of the current step may be evicted
to make room for another key of the same step. A miss loads the key, which then occupies sizes[key] bytes.

Belady's OPT evicts, when room is needed, the resident key whose next use is furthest in the future.
Eviction is lazy (only when room is needed), so a key loaded at one step is a normal candidate from the
next step on: if it is the furthest used, it is the one dropped. With equal sizes this is optimal (tests
check it against an exhaustive search); with mixed sizes it is the usual furthest-first heuristic.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Mapping

from edge_moe.errors import EdgeMoeError
from edge_moe.policies import BasePolicy, make_policy
from edge_moe.residency import ResidencySet

Key = Hashable
Observer = Callable[[int, Mapping[Key, int]], None]  # (step index, resident key -> bytes) after each step
_NEVER = float("inf")


@dataclass(frozen=True)
class SimResult:
    """Outcome of a simulated trace.

    Attributes:
        hits, misses: accesses that found the key resident / had to load it (keys deduplicated per step).
        bytes_loaded: sum of sizes of the missed keys (what the flash had to deliver).
        hit_rate: hits / (hits + misses), 0.0 for an empty trace.
        hit_flags: per access, in trace order, whether it hit.
    """

    hits: int
    misses: int
    bytes_loaded: int
    hit_rate: float
    hit_flags: tuple[bool, ...] = field(default=(), repr=False)


def _prepare(trace: Iterable[Iterable[Key]], sizes: Mapping[Key, int], capacity: int) -> list[list[Key]]:
    """Deduplicate each step (keeping order) and check that every step fits the capacity on its own."""
    steps = []
    for i, step in enumerate(trace):
        keys = list(dict.fromkeys(step))
        need = 0
        for k in keys:
            if k not in sizes:
                raise EdgeMoeError(f"step {i}: key {k!r} has no entry in sizes; give every expert in the trace a size")
            need += sizes[k]
        if need > capacity:
            raise EdgeMoeError(f"step {i} needs {need} bytes resident at once ({len(keys)} experts) but the capacity "
                               f"is {capacity}; raise capacity_bytes to at least {need}")
        steps.append(keys)
    return steps


def _result(flags: list[bool], bytes_loaded: int) -> SimResult:
    hits = sum(flags)
    n = len(flags)
    return SimResult(hits, n - hits, bytes_loaded, hits / n if n else 0.0, tuple(flags))


def simulate(policy_or_name, trace, sizes: Mapping[Key, int], capacity_bytes: int, *,
             observe: Observer | None = None) -> SimResult:
    """Run a residency policy over a trace.

    Args:
        policy_or_name: a policy instance (its state is used and updated) or a name for make_policy.
        trace: list of steps, each a list of keys needed together.
        sizes: key -> bytes.
        capacity_bytes: the residency budget.
        observe: optional callback(step_index, resident) after each step (tests check the budget with it).

    Returns:
        SimResult.

    Raises:
        EdgeMoeError: a key without a size, a step larger than the capacity, an unknown policy name, or a
            policy that names a victim outside the candidates.
    """
    policy: BasePolicy = make_policy(policy_or_name) if isinstance(policy_or_name, str) else policy_or_name
    steps = _prepare(trace, sizes, capacity_bytes)
    room = ResidencySet(capacity_bytes, policy)
    loaded = now = 0
    flags: list[bool] = []
    for si, step in enumerate(steps):
        # in ExpertCache's order: the layer is announced, room is made for all of its misses, then its experts are
        # used; so the policy weighs the same candidates with the same knowledge as the runtime
        if step:
            policy.on_layer(_layer_of(step[0]), now)
        needed = set(step)
        hits = [key in room for key in step]
        for key, hit in zip(step, hits):
            if not hit:  # _prepare checked that the step fits: make_room always finds enough to evict
                size = sizes[key]
                room.make_room(size, keep=needed)
                room.admit(key, size, now)
                loaded += size
        flags += hits
        for key in step:
            room.access(key, now)
            now += 1
        if observe is not None:
            observe(si, room.resident)
    return _result(flags, loaded)


def _layer_of(key: Key):
    """The layer of a (layer, index) key; a key of another shape (the tests' plain names) is its own layer."""
    return key[0] if isinstance(key, tuple) and key else key


class KnownFrequencyLFU(BasePolicy):
    """LFU that knows, before the trace starts, how often every key occurs in the whole trace: evicts the candidate
    used least overall. Not implementable online (the counts include the future); a reference for how far an online
    frequency estimate (lfu, adaptive) falls short of perfect knowledge of popularity, as OPT is for everything."""

    name = "lfu-known-frequencies"

    def __init__(self, trace: Iterable[Iterable[Key]]):
        self.count: dict[Key, int] = {}
        for step in trace:
            for key in set(step):
                self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates):
        self._check(candidates)
        return min(candidates, key=lambda k: self.count.get(k, 0))  # the first of equal counts


def belady(trace, sizes: Mapping[Key, int], capacity_bytes: int, *, observe: Observer | None = None) -> SimResult:
    """Belady's OPT (furthest next use first) under the step constraint.

    Args:
        trace, sizes, capacity_bytes, observe: as for `simulate`.

    Returns:
        SimResult: an upper bound on any policy's hits when all sizes are equal.

    Raises:
        EdgeMoeError: a key without a size, or a step larger than the capacity.
    """
    steps = _prepare(trace, sizes, capacity_bytes)
    # next_use[s][j]: index of the next step after s that needs steps[s][j]
    next_use: list[list[float]] = [[] for _ in steps]
    seen: dict[Key, int] = {}
    for s in range(len(steps) - 1, -1, -1):
        next_use[s] = [seen.get(k, _NEVER) for k in steps[s]]
        for k in steps[s]:
            seen[k] = s
    furthest = FurthestNextUse()
    room = ResidencySet(capacity_bytes, furthest)
    loaded = 0
    flags: list[bool] = []
    for s, step in enumerate(steps):
        misses = []
        for k, n in zip(step, next_use[s]):
            flags.append(k in room)
            if k in room:
                furthest.set_next_use(k, n)
            else:
                misses.append((k, n))
        needed = set(step)
        for k, n in misses:  # the step's hits carry their new next use before any victim is chosen
            size = sizes[k]
            room.make_room(size, keep=needed)
            room.admit(k, size)
            loaded += size
            furthest.set_next_use(k, n)  # only now: before admission the entry would look stale and be dropped
        if observe is not None:
            observe(s, room.resident)
        furthest.compact(room.resident)
    return _result(flags, loaded)


class FurthestNextUse(BasePolicy):
    """Belady's victim: the candidate whose next use is furthest away, from a lazy max-heap of next uses that the
    driver (belady) keeps current with set_next_use. A policy like any other, so OPT runs on the same residency
    core as the online policies; but it only knows the future the driver tells it."""

    name = "opt"

    def __init__(self):
        self._next: dict[Key, float] = {}  # resident key -> its current next use
        self._heap: list[tuple[float, int, Key]] = []  # (-next use, tiebreak, key); stale entries skipped lazily
        self._tick = 0

    def set_next_use(self, key: Key, step: float) -> None:
        self._next[key] = step
        heapq.heappush(self._heap, (-step, self._tick, key))
        self._tick += 1

    def on_evict(self, key: Key) -> None:
        del self._next[key]

    def victim(self, candidates):
        self._check(candidates)
        allowed = set(candidates)
        held = []  # valid entries of keys that may not be evicted now: put back after
        try:
            while True:
                neg, tick, key = heapq.heappop(self._heap)
                if self._next.get(key) != -neg:
                    continue  # stale
                if key not in allowed:
                    held.append((neg, tick, key))
                    continue
                return key
        finally:
            for entry in held:
                heapq.heappush(self._heap, entry)

    def compact(self, resident) -> None:
        """Keeps the lazy heap from growing with the trace."""
        if len(self._heap) > 4 * len(resident) + 1024:
            self._heap = [(-self._next[k], i, k) for i, k in enumerate(resident)]
            heapq.heapify(self._heap)
            self._tick = len(self._heap)
