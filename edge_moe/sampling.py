"""Choosing the next token: penalties, temperature, top-k, top-p, min-p; log-probabilities; stop strings.

    # V = vocabulary
    logits [V] -> penalties (repetition over prompt + output, presence/frequency over output)
               -> greedy argmax at temperature 0
               -> / temperature -> keep top_k -> keep the smallest set with mass >= top_p
               -> keep tokens with p >= min_p * p_max -> renormalize and draw
Log-probabilities are the model's own (log-softmax of the raw logits), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import EdgeMoeError


@dataclass(frozen=True)
class SamplingOptions:
    """How `generate` picks tokens. The defaults are plain greedy decoding.

    temperature: 0 greedy, else the softmax temperature. top_p: nucleus mass in (0, 1]. top_k: keep the k most
    likely tokens (0: all). min_p: drop tokens less likely than min_p times the most likely one (0: off).
    repetition_penalty: >1 divides a positive logit (multiplies a negative one) of every token already in the
    prompt or output (the CTRL / transformers rule; 1: off). presence_penalty, frequency_penalty: subtract p once,
    and f times the count, from the logit of every token already generated (the OpenAI rule; 0: off).
    seed: makes sampling reproducible.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature >= 0, "use 0 for greedy or a positive value"),
            ("top_p", 0.0 < self.top_p <= 1.0, "use a value in (0, 1]; 1 disables nucleus sampling"),
            ("top_k", self.top_k >= 0, "use 0 (off) or a positive count"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "use a value in [0, 1]; 0 disables it"),
            ("repetition_penalty", self.repetition_penalty > 0, "use a positive value; 1 disables it"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "use a value in [-2, 2] as OpenAI does"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "use a value in [-2, 2] as OpenAI does"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "use a non-negative integer"),
        )
        for name, ok, fix in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):  # nan passes no range; inf some
                raise EdgeMoeError(f"{name} {value} is out of range; {fix}")


def penalized(logits: np.ndarray, options: SamplingOptions, prompt: list[int], output: list[int]) -> np.ndarray:
    """The logits after the repetition, presence and frequency penalties (a copy; the input is untouched)."""
    if options.repetition_penalty == 1.0 and not options.presence_penalty and not options.frequency_penalty:
        return logits
    logits = logits.astype(np.float32, copy=True)
    if options.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(prompt + output, dtype=np.int64))
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / options.repetition_penalty, values * options.repetition_penalty)
    if output and (options.presence_penalty or options.frequency_penalty):
        tokens, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
        logits[tokens] -= options.presence_penalty + options.frequency_penalty * counts
    return logits


def truncated_probabilities(logits: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p: the distribution a token is drawn from (float64 [V], sums to 1)."""
    scaled = logits.astype(np.float64) / options.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if options.top_k and options.top_k < len(probs):
        kth = np.partition(probs, -options.top_k)[-options.top_k]
        probs = np.where(probs >= kth, probs, 0.0)
        probs /= probs.sum()
    if options.top_p < 1.0:  # the smallest most-likely prefix with mass >= top_p
        order = np.argsort(-probs, kind="stable")
        keep = order[:int(np.searchsorted(np.cumsum(probs[order]), options.top_p)) + 1]
        mask = np.zeros(len(probs), bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    if options.min_p > 0.0:
        probs = np.where(probs >= options.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


class Sampler:
    """sampler(logits [V], prompt ids, output ids so far) -> the next token id."""

    def __init__(self, options: SamplingOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray, prompt: list[int], output: list[int]) -> int:
        logits = penalized(logits, self.options, prompt, output)
        if self.options.temperature == 0:
            return int(np.argmax(logits))
        probs = truncated_probabilities(logits, self.options)
        return int(self.rng.choice(len(probs), p=probs))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and its `top` most likely tokens with theirs, most likely first."""
    logprobs = log_softmax(logits)
    best = np.argsort(-logprobs, kind="stable")[:top] if top else []
    return float(logprobs[token]), [(int(t), float(logprobs[t])) for t in best]


class StopStrings:
    """Cuts the streamed text at the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string appeared (the text before it is returned)."""
        if not self.stops:
            return piece
        text = self.pending + piece
        # the occurrence that ends first (ties: the longer) is the one a stream sees first, however it is cut
        hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)[1]]
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
