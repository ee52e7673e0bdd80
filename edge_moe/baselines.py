"""The expert sources the benchmark measures the cache against.

    NoCacheExperts: every expert read from flash on every use (a layer's reads in parallel), nothing kept.
    MmapExperts: the blobs memory-mapped and the OS page cache doing the streaming, as llama.cpp does.
"""

from __future__ import annotations

import numpy as np

from .budget import record_footprint
from .experts import ExpertSource, ResidentExpert
from .manifest import Manifest


class NoCacheExperts(ExpertSource):
    def __init__(self, manifest: Manifest, store, trace: list | None = None):
        super().__init__(trace)
        self.manifest, self.store = manifest, store
        self.peak = 0

    def fetch(self, layer: int, experts: list[int]):
        self.record(layer, experts, [False] * len(experts))
        futures = [self.store.submit((layer, int(e))) for e in experts]
        self.peak = max(self.peak, sum(record_footprint(self.manifest.experts[(layer, int(e))])
                                       for e in experts))
        return (ResidentExpert.from_bytes(self.manifest.experts[(layer, int(e))], f.result())
                for e, f in zip(experts, futures))

    def resident_bytes(self) -> int:
        return self.peak


class MmapExperts(ExpertSource):
    """Expert weights are views into read-only memory maps: pages come in on first touch, and stay as long as the
    kernel likes. Hits are not observable per expert here; the benchmark counts bytes the process read."""

    def __init__(self, manifest: Manifest, trace: list | None = None):
        super().__init__(trace)
        maps = {blob: np.memmap(blob, dtype=np.uint8, mode="r") for blob in {r.blob for r in manifest.experts.values()}}
        self.experts = {key: ResidentExpert.from_bytes(r, maps[r.blob][r.offset:r.offset + r.length])
                        for key, r in manifest.experts.items()}

    def fetch(self, layer: int, experts: list[int]):
        self.record(layer, experts, [False] * len(experts))
        return (self.experts[(layer, int(e))] for e in experts)

    def resident_bytes(self) -> int:
        return 0  # the page cache's, not ours
