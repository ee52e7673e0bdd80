"""The budgeted expert cache: the generation loop's one way to obtain experts when they do not all fit.

    fetch(layer, experts): hits are returned at once; misses are read by the I/O pool, all of a layer's misses in
        parallel, and handed out in order as they land, so expert j computes while expert j+1 is still read.
    prefetch(layer, experts): speculative reads for a later layer, queued behind every read the model waits for,
        only into room that evicting nothing the current layer needs, nothing predicted for a layer still to come,
        and nothing the policy values more than the prediction (BasePolicy.should_replace) can make.
    Every byte of a resident expert, an in-flight read or a spare buffer counts against the budget (page-rounded
    buffers plus alignment slack). An evicted expert's buffer is the spare the next read of the same size lands in:
    a fresh buffer costs a page fault per page when O_DIRECT pins it and an munmap when it goes; spares of other
    sizes are freed before anything resident is evicted. Large buffers are mmap-backed (see
    memory_limits.return_freed_memory), so a freed buffer really gives memory back instead of staying in glibc's heap.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from concurrent.futures import Future

from .budget import minimum_budget, record_footprint
from .errors import EdgeMoeError
from .experts import ExpertSource, ResidentExpert
from .manifest import Manifest, expert_seed
from .memory_limits import return_freed_memory
from .prefetch import PrefetchGate
from .residency import ResidencySet, ResidencyView
from .store import ExpertLocation, ExpertStore, aligned_empty


def store_for(manifest: Manifest, io_threads: int = 8, direct: bool = True, throttle=None) -> ExpertStore:
    locations = [ExpertLocation(r.key, str(r.blob), r.offset, r.length, r.checksum, expert_seed(r.key))
                 for r in manifest.experts.values()]
    return ExpertStore(locations, io_threads=io_threads, direct=direct, throttle=throttle)


class CacheStats:
    def __init__(self):
        self.hits = self.misses = self.evictions = 0
        self.prefetch_issued = self.prefetch_dropped = self.prefetch_skipped = 0
        self.stall_seconds = 0.0
        self.peak_resident_bytes = 0


class ExpertCache(ResidencyView, ExpertSource):
    """Experts resident under `budget` bytes, chosen by `policy`, read through `store`."""

    def __init__(self, manifest: Manifest, store: ExpertStore, policy, budget: int, trace: list | None = None,
                 kernel: bool = True):
        super().__init__(trace)
        return_freed_memory()
        self.manifest, self.store = manifest, store
        # which experts hold bytes (resident, in flight, spare buffers), pins and the eviction order
        self.residency = ResidencySet(budget, policy)
        self.kernel = kernel  # quantized experts as edge_moe's kernel reads them, no session (quant.kernel_reads)
        self._sizes = {key: record_footprint(record, kernel) for key, record in manifest.experts.items()}
        self.minimum = minimum_budget(manifest, kernel)  # what one layer's top-k experts need; pins must leave it free
        self.resident: dict[tuple, ResidentExpert] = {}  # the payloads of self.residency's resident keys
        self.inflight: dict[tuple, Future] = {}  # the reads of its reserved keys
        self.now = 0
        self.stats = CacheStats()
        self._protected: set[tuple] = set()
        self._buffers: dict[tuple, object] = {}  # key -> its whole aligned buffer (resident and in-flight keys)
        self._spare: dict[int, list] = {}  # footprint -> buffers of evicted experts, waiting for a read that size
        self._predicted: dict[int, set[tuple]] = {}  # layer still to run -> keys prefetched for it
        self._layer = None  # the layer running now
        self.gate = PrefetchGate()
        self._lock = threading.RLock()

    def size(self, key) -> int:
        return self._sizes[key]

    @property
    def spare_bytes(self) -> int:
        return self.residency.spare_bytes

    @property
    def pinned(self) -> set[tuple]:
        return self.residency.pinned

    # The generation loop's side -------------------------------------------------------------------------

    def fetch(self, layer: int, experts: list[int]):
        """Returns a generator of ResidentExpert in the order of `experts`; all misses are submitted now."""
        return (expert for _, expert in self._hand_out(self._lookup(layer, experts), ready_first=False))

    def fetch_ready_first(self, layer: int, experts: list[int]):
        """Like fetch, but yields (position in `experts`, ResidentExpert) with the experts that are ready first, so
        the caller computes them while the misses are still reading (it must combine results by position)."""
        return self._hand_out(self._lookup(layer, experts), ready_first=True)

    def _lookup(self, layer: int, experts: list[int]) -> list[tuple]:
        """Counts hits and misses, records the trace and submits the misses' reads; returns the keys."""
        keys = [(layer, int(e)) for e in experts]
        with self._lock:
            self._layer = layer
            # before any room is made for the layer's misses: the policy weighs victims from this layer on (the
            # prefetches that follow are for later layers and do not change which layer runs)
            self.policy.on_layer(layer, self.now)
            self._predicted.pop(layer, None)
            self._protected = set(keys)
            self.gate.observe(layer, self._protected)
            hits = []
            room = True
            for key in keys:
                hits.append(self._ready(key))
                if room and key not in self.resident and key not in self.inflight:
                    # A prefill layer may route to more experts than the budget holds at once: read what fits
                    # now, the rest in turn as earlier ones are computed and can make room (_hand_out).
                    room = self._make_room(self.size(key), self._protected, wait=False)
                    if room:
                        self._start_read(key)
            self.stats.hits += sum(hits)
            self.stats.misses += len(hits) - sum(hits)
            self.record(layer, experts, hits)
        return keys

    def _ready(self, key) -> bool:
        return key in self.resident or (key in self.inflight and self.inflight[key].done())

    def _hand_out(self, keys, ready_first: bool):
        todo = list(range(len(keys)))
        while todo:
            with self._lock:
                self._protected = {keys[j] for j in todo}  # experts already computed may now be evicted
                j = next((j for j in todo if self._ready(keys[j])), todo[0]) if ready_first else todo[0]
                todo.remove(j)
                key = keys[j]
                self.now += 1
                expert = self.resident.get(key)
                if expert is None and key not in self.inflight:
                    self._reserve(self.size(key))
                    self._start_read(key)
                future = None if expert is not None else self.inflight[key]
                if future is not None:
                    self.store.prioritize(future, 0)  # a prefetch the model now waits for goes first
            if future is not None:
                start = time.perf_counter()
                try:
                    future.exception()  # wait; _admit raises a failed read's error with the cache consistent
                finally:
                    self.stats.stall_seconds += time.perf_counter() - start
                with self._lock:
                    expert = self._admit(key)
            with self._lock:
                self.residency.access(key, self.now)
            yield j, expert

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Starts reads of predicted experts of a later layer, best first, while room can be made."""
        with self._lock:
            predicted = [(layer, int(e)) for e in experts]
            self.policy.on_predict(predicted, self.now)
            pending = self._predicted.setdefault(layer, set())
            pending.update(predicted)
            keep = self._protected.union(*self._predicted.values())
            # nearer layers' reads first; a depth-d prediction waits behind every demand read (priority 0)
            ahead = layer - self._layer if self._layer is not None and layer > self._layer else 1
            self.gate.adapt(time.perf_counter(), self.store.busy_seconds())
            for rank, key in enumerate(predicted):
                if key in self.resident or key in self.inflight:
                    continue
                rank = min(rank, 8)  # a prefill's long tail of predictions shares one bucket
                self.gate.note(key, ahead, rank)
                if not self.gate.allows(ahead, rank):
                    self.stats.prefetch_skipped += 1
                    continue
                if not self._make_room(self.size(key), keep, wait=False, incoming=key):
                    break
                self._start_read(key, priority=ahead)
                self.stats.prefetch_issued += 1

    def on_route(self, layer: int, scores, now=None) -> None:
        with self._lock:
            self.policy.on_route(layer, scores, self.now)

    # Pinning --------------------------------------------------------------------------------------------

    def pin(self, keys) -> None:
        """Loads the experts now and never evicts them. All or nothing: on any error none of `keys` stays pinned.

        Raises:
            EdgeMoeError: an unknown expert, or the pinned set would not leave room for a layer's top-k experts.
        """
        keys = [tuple(k) for k in keys]
        with self._lock:
            unknown = [k for k in keys if k not in self.manifest.experts]
            if unknown:
                raise EdgeMoeError(f"cannot pin expert {unknown[0]}: no such (layer, index) in the model")
            added = [k for k in dict.fromkeys(keys) if k not in self.pinned]
            pinned_bytes = sum(self.size(k) for k in self.pinned.union(added))
            if pinned_bytes + self.minimum > self.budget:
                raise EdgeMoeError(f"pinning {len(added)} more experts would hold {pinned_bytes:,} bytes of a "
                                   f"{self.budget:,}-byte budget that needs {self.minimum:,} free for a layer's "
                                   "top-k experts; pin fewer or raise the budget")
            self.residency.pin(added)
            try:
                for key in added:
                    if key not in self.resident:
                        if key not in self.inflight:
                            self._reserve(self.size(key))
                            self._start_read(key)
                        self.inflight[key].result()
                        self._admit(key)
            except BaseException:
                self.residency.unpin(added)  # they stay resident, evictable like any other
                raise

    def unpin(self, keys) -> None:
        with self._lock:
            self.residency.unpin(map(tuple, keys))

    # Live controls and state (the demo app, the planner) ----------------------------------------------------

    def set_budget(self, nbytes: int) -> None:
        """Changes the budget now; shrinking evicts (policy order) down to it. Parse with budget.parse_budget."""
        with self._lock:
            self.residency.set_capacity(nbytes)
            self._make_room(0, self._protected, wait=True)

    def set_policy(self, policy) -> None:
        """Swaps the residency policy; the new one learns from the accesses that follow."""
        with self._lock:
            self.residency.set_policy(policy, self.now)

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

    def _start_read(self, key, priority: int = 0) -> None:
        """Submits the read of a key whose room is made (a spare buffer of its size, or free budget); its bytes
        count from now on."""
        size = self.size(key)
        spares = self._spare.get(size)
        if spares:
            buffer = spares.pop()  # its bytes are already counted
            self.residency.reserve(key, size, from_spare=True)
        else:
            buffer = aligned_empty(self.store.buffer_size(key))
            self.residency.reserve(key, size)
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.used)
        self._buffers[key] = buffer
        self.inflight[key] = self.store.submit(key, into=buffer, priority=priority)

    def _make_room(self, nbytes: int, keep: set, wait: bool, incoming=None) -> bool:
        """Makes room for one read of footprint `nbytes`: a spare buffer that size, or free budget. Never evicts
        `keep` or pinned experts. False if impossible (prefetch only), or if the policy values a victim more
        than `incoming` (a prediction)."""
        room = self.residency
        while not self._spare.get(nbytes) and not room.fits(nbytes):
            other = next((size for size, buffers in self._spare.items() if buffers), None)
            if other is not None:  # a spare of another size is worth less than any resident expert
                self._spare[other].pop()
                room.drop_spare(other)
                continue
            self._reap()
            victims = room.make_room(nbytes, keep, incoming)
            if victims is None:  # the policy values a victim more than the prediction
                return False
            for key in victims:
                del self.resident[key]
                self._recycle(key, nbytes)
                self.stats.evictions += 1
            if victims:  # room made, or every resident candidate gone: look again, after reads that landed
                continue
            # Only in-flight prefetches remain evictable: drop one that has not started, else wait for one to land
            # (then it is resident, and the policy weighs it). A running read's buffer is never handed on.
            droppable = [k for k in self.inflight if k not in keep and k not in self.pinned]
            if not droppable or not wait:
                if wait:
                    raise EdgeMoeError(f"budget of {self.budget:,} bytes cannot hold the experts one layer needs "
                                       f"plus the pinned ones; raise the budget or unpin experts")
                return False
            queued = next((k for k in droppable if self.inflight[k].cancel()), None)
            if queued is None:
                concurrent.futures.wait([self.inflight[k] for k in droppable],
                                        return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            del self.inflight[queued]
            room.release(queued)
            self._recycle(queued, nbytes)
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
            # the reservation goes with the failed read (its buffer is not reused): the cache stays consistent
            del self._buffers[key]
            self.residency.release(key)
            raise
        expert = self.resident[key] = ResidentExpert.from_bytes(self.manifest.experts[key], buffer, self.kernel)
        self.residency.admit(key, now=self.now)
        return expert

    def _recycle(self, key, wanted: int) -> None:
        """The buffer of a key nobody computes with any more (evicted, never the running layer's; or cancelled
        before its read started; its bytes are given back already): the spare the pending read of footprint
        `wanted` lands in if it is that size, else freed (a spare of another size would only be dropped next)."""
        buffer = self._buffers.pop(key)
        size = self.size(key)
        if size == wanted and self.residency.keep_spare(size):
            self._spare.setdefault(size, []).append(buffer)
