"""The budgeted expert cache: the generation loop's one way to obtain experts when they do not all fit.

    fetch(layer, experts): hits are returned at once; misses are read by the I/O pool, all of a layer's misses in
        parallel, and handed out in order as they land, so expert j computes while expert j+1 is still read.
    prefetch(layer, experts): speculative reads for a later layer, only into room that evicting nothing the
        current layer needs can make.
    Every byte of a resident expert or an in-flight read counts against the budget (page-rounded buffers plus
    alignment slack); large buffers are mmap-backed (see _return_freed_memory), so evicting really gives memory
    back instead of leaving it in glibc's heap.
"""

from __future__ import annotations

import ctypes
import threading
import time
from concurrent.futures import Future

from .budget import expert_footprint
from .errors import EdgeMoeError
from .experts import ExpertSource, ResidentExpert
from .manifest import Manifest
from .store import ExpertLocation, ExpertStore


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 256 KiB: expert buffers then come from mmap and go back to the OS on free.
    (By default the threshold grows after each large free, and freed experts would stay in the heap.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def store_for(manifest: Manifest, io_threads: int = 2, direct: bool = True, throttle=None) -> ExpertStore:
    locations = [ExpertLocation(r.key, str(r.blob), r.offset, r.length, r.checksum)
                 for r in manifest.experts.values()]
    return ExpertStore(locations, io_threads=io_threads, direct=direct, throttle=throttle)


class CacheStats:
    def __init__(self):
        self.hits = self.misses = self.evictions = 0
        self.prefetch_issued = self.prefetch_dropped = 0
        self.stall_seconds = 0.0
        self.peak_resident_bytes = 0


class ExpertCache(ExpertSource):
    """Experts resident under `budget` bytes, chosen by `policy`, read through `store`."""

    def __init__(self, manifest: Manifest, store: ExpertStore, policy, budget: int, trace: list | None = None):
        super().__init__(trace)
        _return_freed_memory()
        self.manifest, self.store, self.policy, self.budget = manifest, store, policy, int(budget)
        self.resident: dict[tuple, ResidentExpert] = {}
        self.inflight: dict[tuple, Future] = {}
        self.pinned: set[tuple] = set()
        self.used = 0  # bytes of resident experts and in-flight reads
        self.now = 0
        self.stats = CacheStats()
        self._protected: set[tuple] = set()
        self._lock = threading.RLock()

    def size(self, key) -> int:
        return expert_footprint(self.manifest.experts[key].length)

    # The generation loop's side -------------------------------------------------------------------------

    def fetch(self, layer: int, experts: list[int]):
        """Returns a generator of ResidentExpert in the order of `experts`; all misses are submitted now."""
        keys = [(layer, int(e)) for e in experts]
        with self._lock:
            self._protected = set(keys)
            hits = []
            room = True
            for key in keys:
                hit = key in self.resident or (key in self.inflight and self.inflight[key].done())
                hits.append(hit)
                if room and key not in self.resident and key not in self.inflight:
                    # A prefill layer may route to more experts than the budget holds at once: read what fits
                    # now, the rest in turn as earlier ones are computed and can make room (_hand_out).
                    room = self._make_room(self.size(key), self._protected, wait=False)
                    if room:
                        self._start_read(key)
            self.stats.hits += sum(hits)
            self.stats.misses += len(hits) - sum(hits)
            self.record(layer, experts, hits)
        return self._hand_out(keys)

    def _hand_out(self, keys):
        for j, key in enumerate(keys):
            with self._lock:
                self._protected = set(keys[j:])  # experts already computed may now be evicted
                self.now += 1
                expert = self.resident.get(key)
                if expert is None and key not in self.inflight:
                    self._reserve(self.size(key))
                    self._start_read(key)
                future = None if expert is not None else self.inflight[key]
            if future is not None:
                start = time.perf_counter()
                try:
                    buffer = future.result()
                finally:
                    self.stats.stall_seconds += time.perf_counter() - start
                with self._lock:
                    expert = self._admit(key)
            with self._lock:
                self.policy.on_access(key, self.now)
            yield expert

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Starts reads of predicted experts of a later layer, best first, while room can be made."""
        with self._lock:
            predicted = [(layer, int(e)) for e in experts]
            self.policy.on_predict(predicted, self.now)
            keep = self._protected | set(predicted)
            for key in predicted:
                if key in self.resident or key in self.inflight:
                    continue
                if not self._make_room(self.size(key), keep, wait=False):
                    break
                self._start_read(key)
                self.stats.prefetch_issued += 1

    def on_route(self, layer: int, scores, now=None) -> None:
        with self._lock:
            self.policy.on_route(layer, scores, self.now)

    # Pinning --------------------------------------------------------------------------------------------

    def pin(self, keys) -> None:
        """Loads the experts now and never evicts them.

        Raises:
            EdgeMoeError: the pinned set would not leave room for a layer's top-k experts.
        """
        with self._lock:
            for key in map(tuple, keys):
                if key not in self.manifest.experts:
                    raise EdgeMoeError(f"cannot pin expert {key}: no such (layer, index) in the model")
                self.pinned.add(key)
                if key not in self.resident:
                    if key not in self.inflight:
                        self._reserve(self.size(key))
                        self._start_read(key)
                    self.inflight[key].result()
                    self._admit(key)

    def unpin(self, keys) -> None:
        with self._lock:
            self.pinned.difference_update(map(tuple, keys))

    # Live controls and state (the demo app, the planner) ----------------------------------------------------

    def set_budget(self, nbytes: int) -> None:
        """Changes the budget now; shrinking evicts (policy order) down to it. Parse with budget.parse_budget."""
        with self._lock:
            self.budget = int(nbytes)
            self._make_room(0, self._protected, wait=True)

    def set_policy(self, policy) -> None:
        """Swaps the residency policy; the new one learns from the accesses that follow."""
        with self._lock:
            self.policy = policy
            for key in self.resident:
                policy.on_admit(key, self.size(key), self.now)

    def snapshot(self) -> dict[tuple, str]:
        """State of every expert that is not only on flash: 'resident', 'pinned' or 'reading'."""
        with self._lock:
            state = {key: "reading" for key in self.inflight}
            state.update({key: "pinned" if key in self.pinned else "resident" for key in self.resident})
            return state

    # Budget ---------------------------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        return self.used

    def _reserve(self, nbytes: int) -> None:
        self._make_room(nbytes, self._protected, wait=True)

    def _start_read(self, key) -> None:
        """Submits the read of a key whose room is made; its bytes count from now on."""
        self.used += self.size(key)
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.used)
        self.inflight[key] = self.store.submit(key)

    def _make_room(self, nbytes: int, keep: set, wait: bool) -> bool:
        """Evicts until nbytes fit. Never evicts `keep` or pinned experts. False if impossible (prefetch only)."""
        while self.used + nbytes > self.budget:
            self._reap()
            candidates = [k for k in self.resident if k not in keep and k not in self.pinned]
            if candidates:
                self._evict(self.policy.victim(candidates))
                continue
            # Only in-flight prefetches remain evictable: wait for one and drop it.
            droppable = [k for k in self.inflight if k not in keep and k not in self.pinned]
            if not droppable or not wait:
                if wait:
                    raise EdgeMoeError(f"budget of {self.budget:,} bytes cannot hold the experts one layer needs "
                                       f"plus the pinned ones; raise the budget or unpin experts")
                return False
            key = droppable[0]
            self.inflight.pop(key).cancel() or None
            self.used -= self.size(key)
            self.stats.prefetch_dropped += 1
        return True

    def _reap(self) -> None:
        """Admits prefetches that have landed, so the policy can weigh them."""
        for key in [k for k, f in self.inflight.items() if f.done()]:
            try:
                self._admit(key)
            except EdgeMoeError:
                pass  # a failed prefetch is forgotten here; a real use of that expert reads it again and reports

    def _admit(self, key) -> ResidentExpert:
        if key in self.resident:
            return self.resident[key]
        future = self.inflight.pop(key)
        try:
            buffer = future.result()
        except BaseException:
            self.used -= self.size(key)  # the reservation goes with the failed read: the cache stays consistent
            raise
        expert = self.resident[key] = ResidentExpert.from_bytes(self.manifest.experts[key], buffer)
        self.policy.on_admit(key, self.size(key), self.now)
        return expert

    def _evict(self, key) -> None:
        del self.resident[key]
        self.used -= self.size(key)
        self.policy.on_evict(key)
        self.stats.evictions += 1
