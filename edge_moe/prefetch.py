"""Predicting which experts the next layers will route to, so the I/O pool can read them while this layer computes.

Speculative routing (mixtral-offloading, MoE-Infinity): layer l+d's router applied to layer l's post-attention
hidden state, after layer l+d's own post-attention norm. Consecutive layers' residual streams differ by a small
update, so the prediction is usually right; precision and recall are measured as the model runs.
"""

from __future__ import annotations

import math

import numpy as np

from .manifest import Manifest
from .routing import Router, read_backbone_tensor


class NextLayerPredictor:
    """Holds every MoE layer's router and post-attention norm weights (E x H each: small)."""

    def __init__(self, manifest: Manifest, depth: int = 1, extra: int = 0):
        c = manifest.config
        self.router = Router(manifest)  # the family's own router: scoring, selection bias, groups
        self.top_k, self.eps, self.depth, self.extra = self.router.spec.top_k, float(c["rms_norm_eps"]), depth, extra
        self.moe_layers = sorted(c["moe_layers"])
        self.routers = {layer: (read_backbone_tensor(manifest, e["weight"]), read_backbone_tensor(manifest, e["norm"]))
                        for layer, e in manifest.routers.items()}
        # GPT-OSS's router has a bias: logits then depend on the RMS scale, so the decode shortcut is off
        self.logit_bias = {layer: read_backbone_tensor(manifest, e["bias"])
                           for layer, e in manifest.routers.items() if "bias" in e}
        self.tp = self.predicted = self.actual = 0
        self._pending: dict[int, set[int]] = {}
        # decode: every router with its norm folded in, stacked [layers, E, H], so that predicting many layers ahead
        # is one matrix-vector product instead of a Python loop over layers
        self._stacked_layers = [l for l in self.moe_layers if l in self.routers]
        shapes = {self.routers[l][0].shape for l in self._stacked_layers}
        self._stack = (np.stack([self.routers[l][0] * self.routers[l][1][None, :] for l in self._stacked_layers])
                       if len(shapes) == 1 else None)
        self._row = {l: i for i, l in enumerate(self._stacked_layers)}
        self._later: dict[int, list[int]] = {}  # layer -> the MoE layers to predict from it

    def predict(self, layer: int, hidden: np.ndarray) -> dict[int, list[int]]:
        """hidden [T, H] after layer `layer`'s attention -> {later layer: experts to prefetch, best first}."""
        later = self._later.get(layer)
        if later is None:
            later = self._later[layer] = [l for l in self.moe_layers if l > layer][:self.depth]
        if (hidden.shape[0] == 1 and self._stack is not None and later and self.router.spec.ranks_by_logits
                and not self.logit_bias):
            # a token's RMS scale is one positive number for every target layer: it cannot change the ranking
            return self._predict_token(later, hidden[0])
        predictions = {}
        # the RMS scale is the same for every target layer; only the norm weights differ
        unit = hidden / np.sqrt(np.mean(hidden * hidden, axis=-1, keepdims=True) + self.eps)
        for target in later:
            if target not in self.routers:
                continue
            weight, norm = self.routers[target]
            logits = (unit * norm) @ weight.T
            if target in self.logit_bias:
                logits = logits + self.logit_bias[target]
            indices, weights = self.router.ranked(target, logits, min(self.top_k + self.extra, weight.shape[0]))
            if indices.shape[0] == 1:  # decode: ranked() already ranks the token's experts best first
                chosen = indices[0].tolist()
            else:  # over several tokens (prefill) rank experts by their summed routing weight
                scores = np.zeros(weight.shape[0], np.float32)
                np.add.at(scores, indices.ravel(), weights.ravel())
                chosen = [int(e) for e in np.argsort(-scores, kind="stable") if scores[e] > 0]
            predictions[target] = chosen
            self._pending[target] = set(chosen)
        return predictions

    def _predict_token(self, later: list[int], hidden: np.ndarray) -> dict[int, list[int]]:
        """One decoded token: all target layers' router logits at once, each layer's top experts best first
        (for a router that ranks by logits: softmax and sigmoid keep their order; bias or groups would not)."""
        rows = [self._row[l] for l in later if l in self._row]
        logits = self._stack[rows[0]:rows[-1] + 1] @ hidden  # later layers are consecutive rows
        # one sort of a few rows of E logits costs less than partition-then-sort's four numpy calls
        chosen = np.argsort(-logits, axis=1, kind="stable")[:, :self.top_k + self.extra].tolist()
        predictions = {}
        for i, target in enumerate(self._stacked_layers[rows[0]:rows[-1] + 1]):
            predictions[target] = chosen[i]
            self._pending[target] = set(chosen[i])
        return predictions

    def observe(self, layer: int, used) -> None:
        """Scores the last prediction for `layer` against the experts it really used."""
        predicted = self._pending.pop(layer, None)
        if predicted is None:
            return
        used = set(int(e) for e in used)
        self.tp += len(predicted & used)
        self.predicted += len(predicted)
        self.actual += len(used)

    @property
    def precision(self) -> float:
        return self.tp / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.actual if self.actual else 0.0


class PrefetchGate:
    """Learns which predictions are worth a read: the precision of predictions of experts that were not resident,
    per (layers ahead, rank in the prediction). The last of a token's top-k predicted two layers ahead is right about
    half the time on our synthetic 2 GB model while the first three are right ~90%: reading it anyway cost a quarter
    more flash bytes per token than the demand misses, on a disk that is already the bottleneck. A bucket is read
    while it is new (fewer than `warmup` outcomes) or right at least `threshold` of the time; predictions that are
    not read are still scored, so a bucket that becomes good is read again.

    The threshold follows the disk's load (its busy share, averaged over about `window` seconds): `min_precision`
    while the reads leave it idle part of the time, rising to `max_precision` as it nears saturation. A speculative
    read fills idle time when the disk has some; on a saturated disk it saves nothing when right (the demand read
    would have kept the disk just as busy) and delays every demand read queued behind it when wrong. Measured on
    the 2-core VM (disk 1.2-1.6 GB/s), 1 thread, float16 Qwen3-MoE (12 layers) at a 78 MiB budget, where the disk
    is 96 % busy whatever is read: a fixed 0.6 read 63.8 MiB a token and decoded 17.8-21.8 tok/s, 0.95 56.4 MiB
    and 24.0-25.4; on the 20-layer 2 GB model at 25 % (busy 81-91 %) 0.6, 0.8 and 0.95 decode alike (17-19).
    Following the load (2 threads, 166 MiB cgroup): 64.3 -> 59.4 MiB a token, median decode 21.5 -> 25.1 tok/s;
    the 2 GB model settles near 0.8 and reads 8 % fewer bytes at the same speed."""

    def __init__(self, min_precision: float = 0.6, max_precision: float = 0.95, warmup: int = 16, memory: int = 512,
                 idle_load: float = 0.8, saturated_load: float = 0.9, window: float = 0.5):
        self.min_precision, self.max_precision, self.warmup, self.memory = min_precision, max_precision, warmup, memory
        self.idle_load, self.saturated_load, self.window = idle_load, saturated_load, window
        self.threshold = min_precision
        self.load = 0.0  # the disk's busy share, averaged
        self._sample: tuple[float, float] | None = None  # (time, busy seconds) at the last adapt
        self.counts: dict[tuple[int, int], list[float]] = {}  # bucket -> [right, outcomes]
        self._open: dict[int, list] = {}  # layer -> [(key, bucket)] predicted for its next run

    def adapt(self, now: float, busy_seconds: float) -> None:
        """Takes the store's busy seconds so far at time `now` (perf_counter) and sets the threshold."""
        if self._sample is not None and now > self._sample[0]:
            elapsed = now - self._sample[0]
            share = min(1.0, max(0.0, (busy_seconds - self._sample[1]) / elapsed))
            self.load += (1.0 - math.exp(-elapsed / self.window)) * (share - self.load)
        self._sample = (now, busy_seconds)
        span = min(1.0, max(0.0, (self.load - self.idle_load) / (self.saturated_load - self.idle_load)))
        self.threshold = self.min_precision + (self.max_precision - self.min_precision) * span

    def allows(self, ahead: int, rank: int) -> bool:
        right, total = self.counts.get((ahead, rank), (0.0, 0.0))
        return total < self.warmup or right >= self.threshold * total

    def note(self, key: tuple, ahead: int, rank: int) -> None:
        self._open.setdefault(key[0], []).append((key, (ahead, rank)))

    def observe(self, layer: int, used: set) -> None:
        for key, bucket in self._open.pop(layer, ()):
            c = self.counts.setdefault(bucket, [0.0, 0.0])
            c[0] += key in used
            c[1] += 1.0
            if c[1] > self.memory:  # forget slowly, so a change of topic or phase shows
                c[0], c[1] = c[0] / 2, c[1] / 2
