"""The KV cache of one generation: per layer a growable [capacity, kvH, D] buffer for keys and one for values.

What a layer caches is the family's attention spec (edge_moe.family_spec.AttentionSpec): K and V per KV head for
GQA; for MLA the compressed latent [1, kv_lora_rank] as "key" and the shared roped key [1, rope_dim] as "value".

The layer graph takes `past_key` [P, kvH, D]; slicing the first axis of a C-contiguous buffer gives a contiguous
view, so onnxruntime reads the cache in place and only this call's new rows are copied in.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int = 256,
                 value_shape: tuple[int, int] | None = None):
        self.offset = 0  # tokens cached
        self._shapes = ((kv_heads, head_dim), tuple(value_shape or (kv_heads, head_dim)))
        self.keys = [np.zeros((capacity, *self._shapes[0]), np.float32) for _ in range(num_layers)]
        self.values = [np.zeros((capacity, *self._shapes[1]), np.float32) for _ in range(num_layers)]

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[layer][:self.offset], self.values[layer][:self.offset]

    def write(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Stores this call's [T, kvH, D] entries after the cached ones (committed by `advance`)."""
        end = self.offset + key.shape[0]
        if end > self.keys[layer].shape[0]:
            capacity = max(end, 2 * self.keys[layer].shape[0])
            for store, shape in zip((self.keys, self.values), self._shapes):
                grown = np.zeros((capacity, *shape), np.float32)
                grown[:self.offset] = store[layer][:self.offset]
                store[layer] = grown
        self.keys[layer][self.offset:end] = key
        self.values[layer][self.offset:end] = value

    def advance(self, tokens: int) -> None:
        self.offset += tokens

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
