"""The generation loop: `stream_tokens` yields one `GenerationResponse` per token; `PromptCache` keeps the KV of
what a previous call processed so the next call (a chat's next turn) prefills only its new tokens."""

from __future__ import annotations

import threading
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

    def shared(self, prompt_ids: list[int]) -> int:
        """How many leading prompt tokens it holds, leaving at least one to prefill (the first sample needs the
        logits of the prompt's last token)."""
        common = 0
        for a, b in zip(self.ids, prompt_ids[:-1]):
            if a != b:
                break
            common += 1
        return common

    def reuse(self, prompt_ids: list[int]) -> int:
        """Rewinds to the longest cached prefix of the prompt; returns how many prompt tokens need no prefill."""
        common = self.shared(prompt_ids)
        self.kv.offset, self.ids = common, self.ids[:common]  # rows after offset are overwritten by the next write
        return common


class PromptCachePool:
    """The prompt caches of a server's recent requests: a request takes the one that shares the longest prefix with
    its prompt (a chat's next turn finds its conversation), and gives it back when done; `size` are kept."""

    def __init__(self, forward, size: int = 4):
        self.forward, self.size = forward, size
        self._free: list[PromptCache] = []  # oldest first
        self._lock = threading.Lock()

    def take(self, prompt_ids: list[int]) -> PromptCache:
        with self._lock:
            best = max(self._free, key=lambda c: c.shared(prompt_ids), default=None)
            if best is not None and best.shared(prompt_ids) > 0:
                self._free.remove(best)
                return best
        return PromptCache(self.forward)

    def give(self, cache: PromptCache) -> None:
        with self._lock:
            self._free.append(cache)
            del self._free[:max(0, len(self._free) - self.size)]  # the oldest go


RESERVE_LIMIT = 8192  # tokens a generation reserves in its KV cache at most


class Sequence:
    """One generation between tokens: its prompt, KV cache, sampler, stop strings and text so far. The solo loop
    (`stream_tokens`) and the batched one (batching.py) drive it the same way: `prefill`, then `emit(logits)`
    per token and, until a response finishes, run `next_input` through the model."""

    def __init__(self, forward, prompt_ids: list[int], max_new_tokens: int, sampler, eos_ids, decoder, *, stop=(),
                 logprobs: int | None = None, cache: PromptCache | None = None):
        self.prompt_ids, self.max_new_tokens, self.sampler, self.eos_ids = prompt_ids, max_new_tokens, sampler, eos_ids
        self.decoder, self.logprobs = decoder, logprobs
        self.cache = cache if cache is not None else PromptCache(forward)
        self.stops, self.output = StopStrings(stop), []
        self.start = time.perf_counter()
        self.prefill_seconds, self.cached = 0.0, 0

    def prefill(self, forward) -> np.ndarray:
        """Runs the prompt after what the cache holds; returns the logits [V] of its last token."""
        self.cached = self.cache.reuse(self.prompt_ids)
        # the whole generation's KV rows up front (a growth mid-decode stalls one token), up to RESERVE_LIMIT: past
        # it the cache doubles as it fills (a device cache and the RoPE tables are paid for when reserved)
        limit = int(forward.config.get("max_position_embeddings") or RESERVE_LIMIT)
        self.cache.kv.reserve(min(len(self.prompt_ids) + self.max_new_tokens, limit, RESERVE_LIMIT))
        h = forward.hidden(np.asarray(self.prompt_ids[self.cached:], dtype=np.int64), self.cache.kv)
        self.cache.ids.extend(self.prompt_ids[self.cached:])
        logits = forward.logits(h[-1:])[0]
        self.prefill_seconds = time.perf_counter() - self.start
        return logits

    def emit(self, logits: np.ndarray) -> GenerationResponse:
        """Samples the next token from `logits`; the response's finish_reason says whether the sequence ended."""
        index = len(self.output)
        token = self.sampler(logits, self.prompt_ids, self.output)
        chosen, top = token_logprobs(logits, token, self.logprobs) if self.logprobs is not None else (None, None)
        self.output.append(token)
        text = self.stops.feed(self.decoder.add(token))
        finish = ("stop" if token in self.eos_ids or self.stops.stopped
                  else ("length" if index == self.max_new_tokens - 1 else None))
        if finish:
            text += self.stops.flush()
        now = time.perf_counter()
        decode_tps = index / (now - self.start - self.prefill_seconds) if index else 0.0
        return GenerationResponse(text, token, index, len(self.prompt_ids), self.prefill_seconds, now - self.start,
                                  decode_tps, finish, chosen, top, self.cached)

    def next_input(self) -> np.ndarray:
        """The last sampled token as the next step's input ids [1]; call `advanced` once it went through."""
        return np.asarray(self.output[-1:], dtype=np.int64)

    def advanced(self) -> None:
        self.cache.ids.append(self.output[-1])


def stream_tokens(forward, sequence: Sequence):
    """The solo loop: prefill the prompt (after what its cache holds), then one token at a time."""
    logits = sequence.prefill(forward)
    while True:
        response = sequence.emit(logits)
        yield response
        if response.finish_reason:
            return
        logits = forward.logits(forward.hidden(sequence.next_input(), sequence.cache.kv))[0]
        sequence.advanced()
