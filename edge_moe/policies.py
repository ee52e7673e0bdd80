"""Residency policies: which resident expert to evict when the budget is full.

The cache owns the budget and the resident set; a policy only watches events and, asked with the list of
evictable candidates (resident, not pinned, not needed by the current layer), names a victim. Every
`victim` call is O(candidates): per-key state is O(1) to read, so no heap has to be kept in sync.

Keys are (layer, index). `now` is a monotonically increasing access counter supplied by the caller.
A caller that runs layers (the RAM tier, the simulator) announces each layer's visit with on_layer before it makes
room for that layer's misses, so that a policy that weighs the distance to a layer weighs victims from the layer
that is about to run, not from the one before.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Protocol

import numpy as np

from edge_moe.errors import EdgeMoeError

Key = Hashable  # (layer, index) in the runtime; any hashable in the simulators' tests


class Policy(Protocol):
    name: str

    def on_layer(self, layer: int, now: int) -> None: ...
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

    def on_layer(self, layer: int, now: int) -> None:
        pass

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
      hints: the prefetcher's predictions (on_predict) set p1 = 1 until that layer runs; the router's recent
          scores of a layer (on_route, an EMA, as MoE-Infinity's activation-aware caching) can raise p, but
          are off by default: on the 2 GB synthetic model at a 25% budget they cost reads (990 demand reads
          in 56 tokens without them, 1183 with weight 0.5 on the chosen experts' weights, 1010 on the full
          router distribution): the pick frequency already holds what they add.
    Miss cost and freed room are both proportional to size, so the score ignores size.

    Args:
        half_life: visits of a layer after which an old pick counts half. Replaying 104 tokens of the 2 GB
            synthetic model at 25%: 1750 misses at 32, 1633 at 64, 1557 at 256 (OPT 1056); but on a trace whose
            popular experts change every 100 tokens, 256 falls behind LRU. 64 serves both.
        route_weight: weight of the router EMA against the pick frequency, in [0, 1] (default 0, see hints).
        num_layers: L, if known; otherwise learned from the keys (largest layer seen + 1).
    """

    name = "adaptive"

    def __init__(self, half_life: float = 64.0, route_weight: float = 0.0, num_layers: int | None = None):
        if not half_life > 0:
            raise EdgeMoeError(f"adaptive policy: half_life={half_life} must be > 0 (visits of a layer)")
        if not 0.0 <= route_weight <= 1.0:
            raise EdgeMoeError(f"adaptive policy: route_weight={route_weight} must lie in [0, 1]")
        self._decay = 2.0 ** (-1.0 / half_life)  # per visit of the expert's layer
        self._log_decay = np.log(self._decay)
        self._route_w = route_weight
        self._L = num_layers or 1
        self._cur = None  # layer being visited now
        # Per-expert state in [layer, index] arrays (grown as keys appear), so that scoring every candidate is a
        # few numpy operations: the cache asks for a victim ~40 times a token over ~150 candidates, on the
        # generation loop's thread (as Python loops this was ~15% of decode time on the 2 GB synthetic model).
        self._visits = np.zeros(0, np.int64)  # layer -> visits seen
        self._f = np.zeros((0, 0))  # decayed picks as of the visit in _at
        self._at = np.zeros((0, 0), np.int64)  # visit of the layer at the last pick
        self._pred = np.zeros((0, 0), np.int64)  # visit of its layer the expert is predicted for (-1: none)
        self._last = np.zeros((0, 0))  # last access (tie-break by recency; -1: never)
        self._route = np.zeros((0, 0))  # EMA of router probabilities
        self._routed = np.zeros(0, bool)  # layers with router scores
        self._picks = 0  # (expert, visit) pairs: picks / visits estimates top-k
        self._total_visits = 0
        # decayed sums over picks that had a previous visit: repeats, and the repeats p alone predicts
        self._rep = self._rep_expected = self._rep_n = 0.0
        # scores memoized until an event changes them, as an array and (for victim) as lists of rows
        self._version, self._grid_version, self._grid, self._grid_rows = 0, -1, None, None

    def _ensure(self, layer: int, index: int) -> None:
        rows, cols = self._f.shape
        if layer < rows and index < cols:
            return
        rows, cols = max(rows, layer + 1, self._L), max(cols, index + 1)
        self._version += 1  # the memoized scores are of the old shape: a key outside them must not be looked up

        def grow(a, fill):
            out = np.full((rows,) + ((cols,) if a.ndim == 2 else ()), fill, a.dtype)
            out[tuple(slice(0, n) for n in a.shape)] = a
            return out

        self._f, self._at, self._route = grow(self._f, 0.0), grow(self._at, 0), grow(self._route, 0.0)
        self._pred, self._last = grow(self._pred, -1), grow(self._last, -1.0)
        self._visits, self._routed = grow(self._visits, 0), grow(self._routed, False)

    def on_layer(self, layer, now):
        """A visit of `layer` starts (every call is a new visit, as every fetch of a layer is)."""
        self._version += 1
        self._ensure(layer, 0)
        self._cur = layer
        self._visits[layer] += 1
        self._total_visits += 1
        if layer >= self._L:
            self._L = layer + 1

    def on_admit(self, key, nbytes, now):
        self._ensure(*key)  # pinned or prefetched, it may be resident (a victim candidate) before any access

    def on_access(self, key, now):
        self._version += 1
        layer, index = key
        self._ensure(layer, index)
        if layer != self._cur:  # not announced by on_layer (the accelerator tier): a new layer is a new visit
            self.on_layer(layer, now)
        v = int(self._visits[layer])
        f, at = float(self._f[layer, index]), int(self._at[layer, index])
        if at != v or f == 0.0:  # count each expert once per visit of its layer
            if v > 1:  # fit rho: was this pick a repeat of the previous visit, and how likely was that by p?
                g = 0.999  # the fit forgets over ~1000 picks
                self._rep = g * self._rep + (at == v - 1 and f > 0)
                self._rep_expected = g * self._rep_expected + self._base_p(f, at, v - 1)
                self._rep_n = g * self._rep_n + 1.0
            self._f[layer, index] = f * self._decay ** (v - at) + 1.0
            self._at[layer, index] = v
            self._picks += 1
        self._last[layer, index] = now
        self._pred[layer, index] = -1

    def on_evict(self, key):
        # keep the frequency: an evicted popular expert must come back with its history; forgetting is
        # the decay's job
        if key[0] < self._pred.shape[0] and key[1] < self._pred.shape[1]:
            self._pred[key] = -1

    def on_route(self, layer, scores, now):
        if self._route_w == 0.0:
            return  # unused: leave the memoized scores valid
        self._version += 1
        s = np.asarray(scores, dtype=np.float64)
        self._ensure(layer, len(s) - 1)
        row = self._route[layer, :len(s)]
        row[:] = s if not self._routed[layer] else 0.5 * row + 0.5 * s
        self._routed[layer] = True

    def on_predict(self, keys, now):
        shape = self._f.shape
        patch = self._grid_version == self._version
        for layer, index in keys:
            self._ensure(layer, index)
            # predicted for the coming visit of its layer (the one after, if that layer is running now)
            self._pred[layer, index] = self._visits[layer] + (1 if layer == self._cur else 0)
        if patch and self._f.shape == shape:
            # a predicted expert's score is its layer's distance alone (p1 = 1): patch the memoized scores instead
            # of recomputing them all (the prefetcher predicts at every layer, just before the cache asks for victims)
            cur = self._cur if self._cur is not None else 0
            for layer, index in keys:
                score = ((layer - cur - 1) % self._L + 1) * 1e12 - float(self._last[layer, index])
                self._grid[layer, index] = score
                if self._grid_rows is not None:
                    self._grid_rows[layer][index] = score
        else:
            self._version += 1

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

    def victim(self, candidates):
        self._check(candidates)
        self._scores()
        if self._grid_rows is None:  # Python lists: ~150 lookups cost less than converting keys for numpy
            self._grid_rows = self._grid.tolist()
        g = self._grid_rows
        scores = [g[layer][index] for layer, index in candidates]
        return candidates[scores.index(max(scores))]  # the first of equal scores

    def should_replace(self, victim, incoming):
        # a prediction is only worth the victim's room if the victim's next use is expected later
        g = self._scores()
        return bool(g[victim] > g[incoming])

    def _scores(self) -> np.ndarray:
        """[layer, index] -> expected steps to the next use (x 1e12, minus recency to break ties): larger is
        evicted first. Memoized until the next event that changes it (an access, router scores, predictions);
        it runs on the generation loop's thread about twice a layer, so it is written for few numpy calls."""
        if self._grid_version == self._version:
            return self._grid
        L = self._L
        cur = self._cur if self._cur is not None else 0
        layers = np.arange(self._f.shape[0])
        d = ((layers - cur - 1) % L + 1)[:, None]  # steps until the layer runs again (L if it is running now)
        v = self._visits[:, None]
        # p: decayed picks over the decayed picks of "picked at every visit" (0 for a layer never visited)
        full = (1.0 - self._decay ** np.maximum(v, 1)) / (1.0 - self._decay)
        p = np.minimum(1.0, self._f * np.exp(self._log_decay * (v - self._at)) / full)
        if self._route_w > 0 and self._routed.any():
            # router probabilities sum to 1 over E experts, picks to top-k: scale by the observed k
            topk = self._picks / max(1, self._total_visits)
            routed = (1.0 - self._route_w) * p + self._route_w * np.minimum(1.0, topk * self._route)
            p = np.where(self._routed[:, None], routed, p)
        # a repeat is only pending if the expert was picked at its layer's latest visit and that visit is
        # over (while its layer runs, a candidate of that layer was not picked this time)
        rho = self.rho()
        repeat = (self._at == v) & (self._f > 0)
        if self._cur is not None and self._cur < len(layers):
            repeat[self._cur] = False
        p1 = np.where(repeat, rho + (1.0 - rho) * p, p)
        p1[self._pred >= v] = 1.0
        # furthest expected next use: as if the next-visit probability p1 held at every visit. The exact
        # expectation under the model, d + L * (1 - p1) / p, lets the long tail of rare experts dominate and
        # loses to LRU on correlated traces (0.46 vs 0.60 hit rate); this short-horizon form keeps
        # just-picked experts and equals the exact one for independent routing (p1 = p)
        never = p1 <= 0
        p1[never] = 1.0  # scored below as never used again
        score = (d + L * (1.0 - p1) / p1) * 1e12 - self._last
        score[never] = np.inf
        self._grid, self._grid_version, self._grid_rows = score, self._version, None
        return self._grid


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
