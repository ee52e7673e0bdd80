"""Continuous batching: the sequences in flight decode together, one step for all of them.

    # B = sequences in this step, H = hidden
    per sequence: h_b = embed(last token)                      # [1, H], its own KV cache
    per layer:    residual_b, x_b, logits_b = layer(h_b, past_b)  (attention per sequence: its own length)
                  h_b = residual_b + moe(concat_b x_b)[b]        # one MoE call over [B, H]
    per sequence: logits_b = head(h_b)

The MoE layer runs once over all B rows, each expert once on every row routed to it (the prefill path of
Forward.moe), so an expert read from flash or uploaded serves every sequence that routed to it: the win a
single-stream runtime cannot get. A request joins (after its own prefill) or leaves between steps. Attention, the
embedding and the head run per sequence exactly as alone; a token's experts are summed as alone for top-2 (two
terms add the same in any order); greedy tokens equal running alone (tests/test_batching.py).
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from .errors import EdgeMoeError


def batched_step(forward, sequences) -> list[np.ndarray]:
    """Runs every sequence's last token through the model in one step; returns each one's logits [V]."""
    backbone = forward.backbone
    with forward._step_lock:
        forward.experts.begin_step()
        hs = [backbone.embed.run({"input_ids": s.next_input()})[0] for s in sequences]  # [1, H] each
        for layer, session in enumerate(backbone.layers):
            # each sequence's attention on its own KV cache, which keeps this step's keys and values
            outs = [s.cache.kv.run(layer, session, h) for s, h in zip(sequences, hs)]
            if layer in forward.moe_layers:
                residual = np.concatenate([o[0] for o in outs])  # [B, H]
                routed = tuple(np.concatenate([o[i] for o in outs]) for i in (3, 4)) if len(outs[0]) > 3 else None
                moe = forward.moe(layer, np.concatenate([o[1] for o in outs]),
                                  np.concatenate([o[2] for o in outs]), residual, routed)
                hs = [o[0] + moe[b:b + 1] for b, o in enumerate(outs)]
            else:
                hs = [o[0] for o in outs]
        for s in sequences:
            s.cache.kv.advance(1)
    return [forward.logits(h)[0] for h in hs]


class _Entry:
    def __init__(self, sequence):
        self.sequence, self.responses, self.cancelled = sequence, queue.Queue(), False


class ContinuousBatcher:
    """Decodes every submitted sequence together, at most `max_batch` per step (more wait and join later).

    No thread of its own: a consumer that needs its next token and finds none runs the next step for every
    sequence in flight (others wait for that step and find theirs made). A lone stream so computes its own tokens
    with no hand-over between threads, which costs up to the interpreter's 5 ms switch interval per token.
    """

    def __init__(self, forward, max_batch: int = 16):
        if max_batch < 1:
            raise EdgeMoeError(f"max_batch {max_batch}: use at least 1")
        self.forward, self.max_batch = forward, max_batch
        self.steps = self.sequence_steps = self.largest_batch = 0  # batching statistics
        self._lists = threading.Lock()  # guards _pending, _active and _closed
        self._stepping = threading.Lock()  # held by the consumer running a step
        self._pending: list[_Entry] = []  # submitted, not prefilled yet
        self._active: list[_Entry] = []  # prefilled, their last token not through the model yet
        self._closed = False

    def submit(self, sequence):
        """Queues a generation.Sequence now; returns a generator of its GenerationResponses."""
        entry = _Entry(sequence)
        with self._lists:
            if self._closed:
                raise EdgeMoeError("the model was closed; load it again to generate")
            self._pending.append(entry)
        return self._responses(entry)

    def _responses(self, entry: _Entry):
        try:
            while True:
                item = self._next(entry)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            entry.cancelled = True  # a consumer that stops early (a client gone) leaves the batch next step

    def _next(self, entry: _Entry):
        while True:
            try:
                return entry.responses.get_nowait()
            except queue.Empty:
                pass
            with self._stepping:
                if entry.responses.empty():  # nobody made it while this consumer waited for the lock
                    self.step()

    def close(self) -> None:
        """Generations still in flight end with an EdgeMoeError."""
        with self._lists:
            self._closed = True

    def step(self) -> None:
        """Admits waiting sequences (each prefills alone and makes its first token), then runs one batched step
        for the sequences that were already in flight. Called with `_stepping` held."""
        with self._lists:
            if self._closed:
                for entry in self._active + self._pending:
                    entry.responses.put(EdgeMoeError("the model was closed while generating"))
                self._active, self._pending = [], []
                return
            decoding = [e for e in self._active if not e.cancelled]
            room = self.max_batch - len(decoding)
            joining, self._pending = self._pending[:room], self._pending[room:]
        joined: list[_Entry] = []
        for entry in joining:
            self._emit(entry, lambda e=entry: e.sequence.prefill(self.forward), joined)
        still: list[_Entry] = []
        if decoding:
            try:
                logits = batched_step(self.forward, [e.sequence for e in decoding])
            except BaseException as exc:  # noqa: BLE001 - every sequence in the step gets the error
                for entry in decoding:
                    entry.responses.put(exc)
                logits = []
            else:
                self.steps += 1
                self.sequence_steps += len(decoding)
                self.largest_batch = max(self.largest_batch, len(decoding))
            for entry, row in zip(decoding, logits):
                entry.sequence.advanced()
                self._emit(entry, lambda r=row: r, still)
        with self._lists:
            self._active = still + joined

    @staticmethod
    def _emit(entry: _Entry, logits, keep: list) -> None:
        """Samples the entry's next token from logits() and hands it over; keeps the entry if it goes on."""
        try:
            response = entry.sequence.emit(logits())
        except BaseException as exc:  # noqa: BLE001
            entry.responses.put(exc)
            return
        entry.responses.put(response)
        if not response.finish_reason and not entry.cancelled:
            keep.append(entry)
