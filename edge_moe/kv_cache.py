"""The KV cache of one generation: per layer a growable [capacity, kvH, D] buffer.

The layer graph takes `past_key` [P, kvH, D]; slicing the first axis of a C-contiguous buffer gives a contiguous
view, so onnxruntime reads the cache in place and only this call's new rows are copied in.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int = 256):
        self.offset = 0  # tokens cached
        self._shape = (kv_heads, head_dim)
        self.keys = [np.zeros((capacity, *self._shape), np.float32) for _ in range(num_layers)]
        self.values = [np.zeros((capacity, *self._shape), np.float32) for _ in range(num_layers)]

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[layer][:self.offset], self.values[layer][:self.offset]

    def write(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Stores this call's [T, kvH, D] entries after the cached ones (committed by `advance`)."""
        end = self.offset + key.shape[0]
        if end > self.keys[layer].shape[0]:
            capacity = max(end, 2 * self.keys[layer].shape[0])
            for store in (self.keys, self.values):
                grown = np.zeros((capacity, *self._shape), np.float32)
                grown[:self.offset] = store[layer][:self.offset]
                store[layer] = grown
        self.keys[layer][self.offset:end] = key
        self.values[layer][self.offset:end] = value

    def advance(self, tokens: int) -> None:
        self.offset += tokens

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
