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
    def should_replace(self, victim: Key, incoming: Key) -> bool: ...
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

    def should_replace(self, victim: Key, incoming: Key) -> bool:
        """May a speculative read of `incoming` evict `victim` (the policy's own choice)? Yes unless the policy
        can tell that the victim is needed sooner."""
        return True

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
    visit. Model: at a visit of layer l, expert e is picked again with probability p1 if it was picked at
    that layer's previous visit (consecutive tokens share experts) and with its base rate p otherwise. If
    the layer's next visit is d steps away, we score its next use at  d + L * (1 - p1) / p1  steps away.
    (LRU gets d exactly wrong: the experts it evicts first are those of the layer that runs next.)
      p   a per-layer frequency with exponential decay (half-life in visits of that layer, so a layer's
          clock does not run while other layers are busy) over the decayed visit count: new experts and
          one-off scans get a small p (LFU's scan resistance) and a finished phase fades out;
      p1  = rho + (1 - rho) * p for an expert picked at its layer's latest visit, where the repeat rate
          rho is fitted online from how often picks repeat beyond what p predicts; p1 = p otherwise;
      hints: the router's recent scores of a layer (on_route, an EMA, as MoE-Infinity's activation-aware
          caching) raise p; the prefetcher's predictions (on_predict) set p1 = 1 until that layer runs.
    Miss cost and freed room are both proportional to size, so the score ignores size.

    Args:
        half_life: visits of a layer after which an old pick counts half.
        route_weight: weight of the router EMA against the pick frequency, in [0, 1].
        num_layers: L, if known; otherwise learned from the keys (largest layer seen + 1).
    """

    name = "adaptive"

    def __init__(self, half_life: float = 32.0, route_weight: float = 0.5, num_layers: int | None = None):
        if not half_life > 0:
            raise EdgeMoeError(f"adaptive policy: half_life={half_life} must be > 0 (visits of a layer)")
        if not 0.0 <= route_weight <= 1.0:
            raise EdgeMoeError(f"adaptive policy: route_weight={route_weight} must lie in [0, 1]")
        self._decay = 2.0 ** (-1.0 / half_life)  # per visit of the expert's layer
        self._route_w = route_weight
        self._L = num_layers or 1
        self._cur = None  # layer being visited now
        self._visits: dict[int, int] = {}  # layer -> visits seen
        self._freq: dict[Key, tuple[float, int]] = {}  # key -> (decayed picks, layer visit of the last pick)
        self._route: dict[int, np.ndarray] = {}  # layer -> EMA of router probabilities
        self._predicted: dict[Key, int] = {}  # key -> layer visit number it is predicted for
        self._last: dict[Key, int] = {}  # tie-break by recency
        self._picks = 0  # (expert, visit) pairs: picks / visits estimates top-k
        self._total_visits = 0
        # decayed sums over picks that had a previous visit: repeats, and the repeats p alone predicts
        self._rep = self._rep_expected = self._rep_n = 0.0
        self._version, self._memo_version = 0, -1  # bumped by every event that changes scores (see _score)

    def on_access(self, key, now):
        self._version += 1
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
            if v > 1:  # fit rho: was this pick a repeat of the previous visit, and how likely was that by p?
                g = 0.999  # the fit forgets over ~1000 picks
                self._rep = g * self._rep + (at == v - 1 and f > 0)
                self._rep_expected = g * self._rep_expected + self._base_p(f, at, v - 1)
                self._rep_n = g * self._rep_n + 1.0
            self._freq[key] = (f * self._decay ** (v - at) + 1.0, v)
            self._picks += 1
        self._last[key] = now
        self._predicted.pop(key, None)

    def on_evict(self, key):
        # keep the frequency: an evicted popular expert must come back with its history; forgetting is
        # the decay's job
        self._predicted.pop(key, None)

    def on_route(self, layer, scores, now):
        self._version += 1
        s = np.asarray(scores, dtype=np.float64)
        old = self._route.get(layer)
        self._route[layer] = s if old is None or old.shape != s.shape else 0.5 * old + 0.5 * s

    def on_predict(self, keys, now):
        self._version += 1
        for k in keys:
            # predicted for the coming visit of its layer (the one after, if that layer is running now)
            self._predicted[k] = self._visits.get(k[0], 0) + (1 if k[0] == self._cur else 0)

    def rho(self) -> float:
        """Fitted probability that an expert picked at a layer's visit is picked again at the next one
        beyond its base rate (0 for independent routing)."""
        if self._rep_n < 1.0:
            return 0.0
        r, e = self._rep / self._rep_n, self._rep_expected / self._rep_n
        return min(1.0, max(0.0, (r - e) / (1.0 - e))) if e < 1.0 else 0.0

    def _base_p(self, f: float, at: int, v: int) -> float:
        if v <= 0:
            return 0.0
        full = (1.0 - self._decay ** v) / (1.0 - self._decay)  # decayed picks of "picked at every visit"
        return min(1.0, f * self._decay ** (v - at) / full)

    @staticmethod
    def _dist(d: int, L: int, p: float, p1: float) -> float:
        # as if the next-visit probability p1 held at every visit. The exact expectation under the model,
        # d + L * (1 - p1) / p, lets the long tail of rare experts dominate and loses to LRU on correlated
        # traces (0.46 vs 0.60 hit rate); this short-horizon form keeps just-picked experts (0.58, ~LRU)
        # and equals the exact one for independent routing (p1 = p)
        return d + L * (1.0 - p1) / p1 if p1 > 0 else math.inf

    def victim(self, candidates):
        self._check(candidates)
        return max(candidates, key=self._score)  # the first of equal scores, as a plain loop would pick

    def should_replace(self, victim, incoming):
        # a prediction is only worth the victim's room if the victim's next use is expected later
        return self._score(victim) > self._score(incoming)

    def _score(self, key) -> float:
        """Scores are memoized until the next event that changes them (an access, router scores, predictions):
        a fetch that evicts for several misses, or a prefetch for several predictions, scores each candidate
        once instead of once per eviction (the scoring was ~20 ms a token on the generation loop's thread)."""
        if self._memo_version != self._version:
            self._memo_fn, self._memo, self._memo_version = self._scorer(), {}, self._version
        score = self._memo.get(key)
        if score is None:
            score = self._memo[key] = self._memo_fn(key)
        return score

    def _scorer(self) -> Callable[[Key], float]:
        """key -> expected steps to its next use (x 1e12, minus recency to break ties): larger is evicted first.
        The same arithmetic as _base_p and _dist, inlined with per-layer terms hoisted: the cache calls this on
        every eviction over ~100 candidates, on the generation loop's thread."""
        L, cur = self._L, self._cur if self._cur is not None else 0
        freq, pred, last, visits, decay = self._freq, self._predicted, self._last, self._visits, self._decay
        topk, rho, w = self._picks / max(1, self._total_visits), self.rho(), self._route_w
        per_layer = {}  # layer -> (steps until it runs again, its visits, picks at full rate, weighted router EMA)

        def layer_info(layer):
            d = (layer - cur - 1) % L + 1  # steps until the layer runs again (L if it is running now)
            v = visits.get(layer, 0)
            full = (1.0 - decay ** v) / (1.0 - decay) if v > 0 else 0.0  # decayed picks of "picked every visit"
            r = self._route.get(layer)
            # router probabilities sum to 1 over E experts, picks to top-k: scale by the observed k
            routed = None if r is None else (w * np.minimum(1.0, topk * r)).tolist()
            info = per_layer[layer] = (d, v, full, routed, layer != self._cur)
            return info

        def score(k) -> float:
            d, v, full, routed, done = per_layer.get(k[0]) or layer_info(k[0])
            f, at = freq.get(k, (0.0, v))
            p = min(1.0, f * decay ** (v - at) / full) if full > 0.0 else 0.0
            if routed is not None and 0 <= k[1] < len(routed):
                p = (1.0 - w) * p + routed[k[1]]
            # a repeat is only pending if the expert was picked at its layer's latest visit and that
            # visit is over (while its layer runs, a candidate of that layer was not picked this time)
            p1 = rho + (1.0 - rho) * p if at == v and f > 0 and done else p
            if pred.get(k, -1) >= v:
                p1 = 1.0
            if p1 <= 0.0:
                return math.inf
            # furthest expected next use (_dist); ties (e.g. never-picked keys) go to the least recent
            return (d + L * (1.0 - p1) / p1) * 1e12 - last.get(k, -1)

        return score

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
