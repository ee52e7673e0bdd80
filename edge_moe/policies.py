"""Residency policies: which resident expert to evict when the budget is full.

The cache owns the budget and the resident set; a policy only watches events and, asked with the list of
evictable candidates (resident, not pinned, not needed by the current layer), names a victim. Every
`victim` call is O(candidates): per-key state is O(1) to read, so no heap has to be kept in sync.

Keys are (layer, index). `now` is a monotonically increasing access counter supplied by the caller.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, Protocol

import numpy as np

from edge_moe.errors import EdgeMoeError

Key = Hashable  # (layer, index) in the runtime; any hashable in the simulators' tests


class Policy(Protocol):
    name: str

    def on_access(self, key: Key, now: int) -> None: ...
    def on_admit(self, key: Key, nbytes: int, now: int) -> None: ...
    def on_evict(self, key: Key) -> None: ...
    def victim(self, candidates: list) -> Key: ...
    def on_route(self, layer: int, scores: np.ndarray, now: int) -> None: ...
    def on_predict(self, keys: Iterable[Key], now: int) -> None: ...


class BasePolicy:
    """No-op hints and a shared empty-candidates check; subclasses override what they use."""

    name = "base"

    def on_access(self, key: Key, now: int) -> None:
        pass

    def on_admit(self, key: Key, nbytes: int, now: int) -> None:
        pass

    def on_evict(self, key: Key) -> None:
        pass

    def on_route(self, layer: int, scores: np.ndarray, now: int) -> None:
        pass

    def on_predict(self, keys: Iterable[Key], now: int) -> None:
        pass

    def victim(self, candidates: list) -> Key:
        raise NotImplementedError

    def _check(self, candidates: list) -> None:
        if not candidates:
            raise EdgeMoeError(f"policy {self.name!r} asked for a victim among no candidates: every resident "
                               "expert is pinned or needed now; raise the memory budget")


class LRUPolicy(BasePolicy):
    """Evict the least recently accessed candidate (mixtral-offloading's policy)."""

    name = "lru"

    def __init__(self):
        self._last: dict[Key, int] = {}

    def on_access(self, key, now):
        self._last[key] = now

    def on_evict(self, key):
        self._last.pop(key, None)

    def victim(self, candidates):
        self._check(candidates)
        last = self._last
        return min(candidates, key=lambda k: last.get(k, -1))


class LFUPolicy(BasePolicy):
    """Evict the least frequently accessed candidate; ties go to the least recently accessed.

    Args:
        keep_history: count accesses since the start (perfect LFU) instead of since admission (in-cache
            LFU, the classic definition and the default). Perfect LFU suits a stationary expert popularity
            but never forgets a phase that ended.
    """

    name = "lfu"

    def __init__(self, keep_history: bool = False):
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}
        self._keep = keep_history

    def on_access(self, key, now):
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = now

    def on_evict(self, key):
        if not self._keep:
            self._count.pop(key, None)
            self._last.pop(key, None)

    def victim(self, candidates):
        self._check(candidates)
        c, last = self._count, self._last
        return min(candidates, key=lambda k: (c.get(k, 0), last.get(k, -1)))


class AdaptivePolicy(BasePolicy):
    """Evict the candidate whose next use is expected furthest away (an online estimate of Belady's OPT).

    The runtime visits layers 0..L-1 cyclically, one visit per token, and picks top-k experts at each
    visit. If expert (l, e) is picked with probability p at a visit of layer l, and that layer's next visit
    is d steps away, its expected next use is  d + L * (1/p - 1)  steps away. LRU gets exactly this
    wrong: the experts it evicts first are those of the layer that comes next. We estimate:
      p  from a per-layer frequency with exponential decay (half-life in visits of that layer, so a layer's
         clock does not run when other layers are busy), normalised by the decayed visit count, so a new
         expert or a one-off scan gets a small p (LFU's protection against scans) and a phase change fades;
      p  is raised by the router's recent scores for that layer (on_route: an EMA of the probabilities,
         MoE-Infinity's activation awareness) and set to 1 for the prefetcher's predictions (on_predict),
         valid until that layer's next visit;
      d  from the current layer (the layer of the latest access) and L (largest layer seen + 1, or given).
    Miss cost is proportional to size (bytes from flash) and so is the room a victim frees, so the score
    ignores size.

    Args:
        half_life: visits of a layer after which an old access counts half.
        route_weight: weight of the router EMA against the access frequency, in [0, 1].
        num_layers: L, if known; otherwise learned from the keys.
    """

    name = "adaptive"

    def __init__(self, half_life: float = 64.0, route_weight: float = 0.5, num_layers: int | None = None):
        if not half_life > 0:
            raise EdgeMoeError(f"adaptive policy: half_life={half_life} must be > 0 (visits of a layer)")
        if not 0.0 <= route_weight <= 1.0:
            raise EdgeMoeError(f"adaptive policy: route_weight={route_weight} must lie in [0, 1]")
        self._decay = 2.0 ** (-1.0 / half_life)  # per visit of the expert's layer
        self._route_w = route_weight
        self._L = num_layers or 1
        self._cur = None  # layer being visited now
        self._visits: dict[int, int] = {}  # layer -> visits seen
        self._freq: dict[Key, tuple[float, int]] = {}  # key -> (decayed count, layer visit of last update)
        self._route: dict[int, np.ndarray] = {}  # layer -> EMA of router probabilities
        self._predicted: dict[Key, int] = {}  # key -> layer visit number it is predicted for
        self._last: dict[Key, int] = {}  # tie-break by recency
        self._picks = 0  # (expert, visit) pairs seen: picks / visits estimates top-k
        self._total_visits = 0

    def on_access(self, key, now):
        layer = key[0]
        if layer != self._cur:  # a new visit starts when the layer changes (layers run one after another)
            self._cur = layer
            self._visits[layer] = self._visits.get(layer, 0) + 1
            self._total_visits += 1
            if layer >= self._L:
                self._L = layer + 1
        v = self._visits[layer]
        f, at = self._freq.get(key, (0.0, v))
        if at != v or f == 0.0:  # count each expert once per visit of its layer
            self._freq[key] = (f * self._decay ** (v - at) + 1.0, v)
            self._picks += 1
        self._last[key] = now
        self._predicted.pop(key, None)

    def on_evict(self, key):
        # keep the frequency: an evicted popular expert must come back with its history (MoE popularity
        # is mostly stationary); forgetting is the decay's job
        self._predicted.pop(key, None)

    def on_route(self, layer, scores, now):
        s = np.asarray(scores, dtype=np.float64)
        old = self._route.get(layer)
        self._route[layer] = s if old is None or old.shape != s.shape else 0.5 * old + 0.5 * s

    def on_predict(self, keys, now):
        for k in keys:
            # predicted for the coming visit of its layer (or the next one, if that layer is running now)
            self._predicted[k] = self._visits.get(k[0], 0) + (1 if k[0] == self._cur else 0)

    def victim(self, candidates):
        self._check(candidates)
        L, cur = self._L, self._cur if self._cur is not None else 0
        freq, pred, last, decay = self._freq, self._predicted, self._last, self._decay
        topk = self._picks / max(1, self._total_visits)
        per_layer = {}  # layer -> (steps until it runs again, its visits, full count, router EMA)
        best, best_score = None, None
        for k in candidates:
            layer = k[0]
            info = per_layer.get(layer)
            if info is None:
                v = self._visits.get(layer, 0)
                # decayed count of an expert picked at every visit so far: sum of decay^i for i < v
                full = (1.0 - decay ** v) / (1.0 - decay) if v else 1.0
                d = (layer - cur - 1) % L + 1  # steps until the layer runs again (L if it is running now)
                info = per_layer[layer] = (d, v, full, self._route.get(layer))
            d, v, full, r = info
            if pred.get(k, -1) >= v:
                p = 1.0
            else:
                f, at = freq.get(k, (0.0, v))
                p = min(1.0, f * decay ** (v - at) / full)
                if r is not None and 0 <= k[1] < r.shape[0]:
                    # router probabilities sum to 1 over E experts, picks to top-k: scale by the observed k
                    p = (1.0 - self._route_w) * p + self._route_w * min(1.0, topk * float(r[k[1]]))
            dist = d + L * (1.0 / p - 1.0) if p > 0 else math.inf
            score = (dist, -last.get(k, -1))  # furthest expected next use; on a tie, the least recent
            if best_score is None or score > best_score:
                best, best_score = k, score
        return best

POLICIES: dict[str, Callable[..., BasePolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "adaptive": AdaptivePolicy,
}


def make_policy(name: str, **kw) -> BasePolicy:
    """Build a residency policy by name.

    Args:
        name: one of POLICIES ("lru", "lfu", "adaptive").
        **kw: the policy's own options (see its class).

    Returns:
        A fresh policy instance.

    Raises:
        EdgeMoeError: unknown name, or options the policy does not take.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise EdgeMoeError(f"unknown residency policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    try:
        return cls(**kw)
    except TypeError as e:
        raise EdgeMoeError(f"policy {name!r}: {e}; see edge_moe.policies.{cls.__name__} for its options") from None
