"""Sampling and the generation loop: `stream_generate` yields one `GenerationResponse` per token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import EdgeMoeError


@dataclass
class GenerationResponse:
    """One generated token.

    text: the new piece of text (may be "" while a multi-byte character is incomplete).
    token: the token id. index: 0-based position among the generated tokens.
    prompt_tokens, prefill_seconds: the prompt's length and the time to process it.
    elapsed: seconds since the call started. decode_tps: decode tokens/s so far (tokens after the first).
    finish_reason: None, or "length" / "stop" on the last response.
    """

    text: str
    token: int
    index: int
    prompt_tokens: int
    prefill_seconds: float
    elapsed: float
    decode_tps: float
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """What `generate` returns: the text, the generated token ids, and stats (timings, expert cache)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)


def make_sampler(temperature: float, top_p: float, seed: int | None):
    """Returns sample(logits [V]) -> token id: greedy at temperature 0, else nucleus sampling."""
    if not 0 <= temperature < float("inf"):  # also refuses nan, which compares false with everything
        raise EdgeMoeError(f"temperature {temperature} is not a finite number >= 0; use 0 for greedy or a "
                           "positive value")
    if not 0.0 < top_p <= 1.0:  # nan fails this too
        raise EdgeMoeError(f"top_p {top_p} is outside (0, 1]; use 1.0 to disable nucleus sampling")
    if seed is not None and not (isinstance(seed, int) and seed >= 0):
        raise EdgeMoeError(f"seed {seed!r} must be a non-negative integer")
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if top_p >= 1.0:  # no nucleus: skip sorting the whole vocabulary
            return int(rng.choice(len(probs), p=probs))
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[:int(np.searchsorted(cumulative, top_p)) + 1]  # smallest prefix with mass >= top_p
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])

    return sample


def stream_tokens(forward, prompt_ids: list[int], max_new_tokens: int, sample, eos_ids, decoder):
    """The loop: prefill the prompt, then one token at a time through the KV cache."""
    start = time.perf_counter()
    cache = forward.new_cache()
    h = forward.hidden(np.asarray(prompt_ids, dtype=np.int64), cache)
    logits = forward.logits(h[-1:])[0]
    prefill_seconds = time.perf_counter() - start
    for index in range(max_new_tokens):
        token = sample(logits)
        finish = "stop" if token in eos_ids else ("length" if index == max_new_tokens - 1 else None)
        now = time.perf_counter()
        decode_tps = index / (now - start - prefill_seconds) if index else 0.0
        yield GenerationResponse(decoder.add(token), token, index, len(prompt_ids), prefill_seconds,
                                 now - start, decode_tps, finish)
        if finish:
            return
        logits = forward.logits(forward.hidden(np.asarray([token], dtype=np.int64), cache))[0]
