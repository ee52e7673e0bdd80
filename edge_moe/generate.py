"""The generation loop: `stream_tokens` yields one `GenerationResponse` per token; `PromptCache` keeps the KV of
what a previous call processed so the next call (a chat's next turn) prefills only its new tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .sampling import StopStrings, token_logprobs


@dataclass
class GenerationResponse:
    """One generated token.

    text: the new piece of text (may be "" while a multi-byte character is incomplete or while the text could
        still become a stop string). token: the token id. index: 0-based position among the generated tokens.
    prompt_tokens, prefill_seconds: the prompt's length and the time to process it.
    elapsed: seconds since the call started. decode_tps: decode tokens/s so far (tokens after the first).
    finish_reason: None, or "length" / "stop" on the last response.
    logprob, top_logprobs: with `logprobs=N`, the model's log-probability of this token and the N most likely
        tokens as (token id, log-probability), most likely first; else None.
    cached_tokens: prompt tokens whose KV came from the prompt cache (not prefilled again).
    """

    text: str
    token: int
    index: int
    prompt_tokens: int
    prefill_seconds: float
    elapsed: float
    decode_tps: float
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list | None = None
    cached_tokens: int = 0


@dataclass
class GenerationResult:
    """What `generate` returns: the text, the generated token ids, and stats (timings, expert cache)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)
    logprobs: list | None = None  # per token (logprob, top_logprobs) when asked for


class PromptCache:
    """The KV cache of the tokens processed so far (`ids`); pass it to consecutive calls of one conversation."""

    def __init__(self, forward):
        self.kv = forward.new_cache()
        self.ids: list[int] = []

    def reuse(self, prompt_ids: list[int]) -> int:
        """Rewinds to the longest cached prefix of the prompt (leaving at least one token to prefill, whose
        logits the first sample needs); returns how many prompt tokens need no prefill."""
        common = 0
        for a, b in zip(self.ids, prompt_ids[:-1]):
            if a != b:
                break
            common += 1
        self.kv.offset, self.ids = common, self.ids[:common]  # rows after offset are overwritten by the next write
        return common


def stream_tokens(forward, prompt_ids: list[int], max_new_tokens: int, sampler, eos_ids, decoder, *, stop=(),
                  logprobs: int | None = None, cache: PromptCache | None = None):
    """The loop: prefill the prompt (after what `cache` holds), then one token at a time through the KV cache."""
    start = time.perf_counter()
    cache = cache if cache is not None else PromptCache(forward)
    cached = cache.reuse(prompt_ids)
    h = forward.hidden(np.asarray(prompt_ids[cached:], dtype=np.int64), cache.kv)
    cache.ids.extend(prompt_ids[cached:])
    logits = forward.logits(h[-1:])[0]
    prefill_seconds = time.perf_counter() - start
    stops, output = StopStrings(stop), []
    for index in range(max_new_tokens):
        token = sampler(logits, prompt_ids, output)
        chosen, top = token_logprobs(logits, token, logprobs) if logprobs is not None else (None, None)
        output.append(token)
        text = stops.feed(decoder.add(token))
        finish = "stop" if token in eos_ids or stops.stopped else ("length" if index == max_new_tokens - 1 else None)
        if finish:
            text += stops.flush()
        now = time.perf_counter()
        decode_tps = index / (now - start - prefill_seconds) if index else 0.0
        yield GenerationResponse(text, token, index, len(prompt_ids), prefill_seconds, now - start, decode_tps,
                                 finish, chosen, top, cached)
        if finish:
            return
        logits = forward.logits(forward.hidden(np.asarray([token], dtype=np.int64), cache.kv))[0]
        cache.ids.append(token)
