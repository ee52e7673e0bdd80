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
                moe = forward.moe(layer, np.concatenate([o[1] for o in outs]),
                                  np.concatenate([o[2] for o in outs]), residual)
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
    """One thread that decodes every submitted sequence together (at most `max_batch` per step; more wait)."""

    def __init__(self, forward, max_batch: int = 16):
        if max_batch < 1:
            raise EdgeMoeError(f"max_batch {max_batch}: use at least 1")
        self.forward, self.max_batch = forward, max_batch
        self.steps = self.sequence_steps = self.largest_batch = 0  # batching statistics
        self._pending: list[_Entry] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edge-moe-batcher", daemon=True)
        self._thread.start()

    def submit(self, sequence):
        """Queues a generation.Sequence now; returns a generator of its GenerationResponses."""
        entry = _Entry(sequence)
        with self._wake:
            if self._closed:
                raise EdgeMoeError("the model was closed; load it again to generate")
            self._pending.append(entry)
            self._wake.notify()
        return self._responses(entry)

    @staticmethod
    def _responses(entry: _Entry):
        try:
            while True:
                item = entry.responses.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            entry.cancelled = True  # a consumer that stops early (a client gone) leaves the batch next step

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        active: list[_Entry] = []
        while True:
            with self._wake:
                while not self._pending and not active and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for entry in active + self._pending:
                        entry.responses.put(EdgeMoeError("the model was closed while generating"))
                    return
                room = self.max_batch - len(active)
                joining, self._pending = self._pending[:room], self._pending[room:]
            for entry in joining:  # a newcomer prefills alone, then joins the batch
                self._emit(entry, lambda e=entry: e.sequence.prefill(self.forward), active)
            active = [e for e in active if not e.cancelled]
            if not active:
                continue
            try:
                logits = batched_step(self.forward, [e.sequence for e in active])
            except BaseException as exc:  # noqa: BLE001 - every waiting consumer gets the error
                for entry in active:
                    entry.responses.put(exc)
                active = []
                continue
            self.steps += 1
            self.sequence_steps += len(active)
            self.largest_batch = max(self.largest_batch, len(active))
            still: list[_Entry] = []
            for entry, row in zip(active, logits):
                entry.sequence.advanced()
                self._emit(entry, lambda r=row: r, still)
            active = still

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
