"""KV caches of one generation, one class per attention kernel of the layer graphs (manifest config
`attention_kernel`); each runs a layer graph on new hidden states and keeps that layer's keys and values.

    # T = tokens in this call, P = cached tokens, M = capacity, kvH = KV heads, D = head dim
- KVCache ("generic" graphs): per layer a growable [M, kvH, D] buffer; the graph takes past [P, kvH, D] (a
  contiguous view, read in place) and returns this call's [T, kvH, D] rows, which are copied in. What a layer
  caches is the family's attention spec (edge_moe.family_spec.AttentionSpec): K and V per KV head for GQA; for MLA
  the compressed latent [1, kv_lora_rank] as "key" and the shared roped key [1, rope_dim] as "value".
- GqaKVCache ("gqa" graphs, com.microsoft.GroupQueryAttention): per layer one [1, kvH, M, D] buffer bound as both
  past and present through IOBinding, so the graph writes the new rows in place and nothing is copied per token;
  the RoPE tables (cos/sin [M, D/2]) are computed here once per capacity and shared by every layer.

On an accelerator a GqaKVCache's capacity is a power of two and its buffers come from a pool they return to when
the cache goes or grows, as do the RoPE tables: a decode step captured as a CUDA graph (step_graph.py) replays over
the addresses it was captured with, so the next generation's cache must get the same buffers, not new ones.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from .family_spec import attention_spec
from .lazy_imports import ort


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int = 256,
                 value_shape: tuple[int, int] | None = None):
        self.offset = 0  # tokens cached
        self._shapes = ((kv_heads, head_dim), tuple(value_shape or (kv_heads, head_dim)))
        self.keys = [np.zeros((capacity, *self._shapes[0]), np.float32) for _ in range(num_layers)]
        self.values = [np.zeros((capacity, *self._shapes[1]), np.float32) for _ in range(num_layers)]

    def run(self, layer: int, session, hidden: np.ndarray) -> list:
        """Runs the layer graph on hidden [T, H]; returns its outputs before key and value."""
        outputs = session.run({"hidden_states": hidden, "past_key": self.keys[layer][:self.offset],
                               "past_value": self.values[layer][:self.offset]})
        self.write(layer, outputs[-2], outputs[-1])
        return outputs[:-2]

    def write(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Stores this call's [T, kvH, D] entries after the cached ones (committed by `advance`)."""
        end = self.offset + key.shape[0]
        if end > self.keys[layer].shape[0]:
            self._grow(layer, max(end, 2 * self.keys[layer].shape[0]))
        self.keys[layer][self.offset:end] = key
        self.values[layer][self.offset:end] = value

    def advance(self, tokens: int) -> None:
        self.offset += tokens

    def reserve(self, total: int) -> None:
        """Room for `total` tokens in all, now (a growth copies every layer's cache: see GqaKVCache.reserve)."""
        for layer in range(len(self.keys)):
            if total > self.keys[layer].shape[0]:
                self._grow(layer, total)

    def _grow(self, layer: int, capacity: int) -> None:
        """The layer's buffers at `capacity` rows, the cached ones copied over."""
        for store, shape in zip((self.keys, self.values), self._shapes):
            grown = np.zeros((capacity, *shape), np.float32)
            grown[:self.offset] = store[layer][:self.offset]
            store[layer] = grown

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


class GqaKVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, rope_theta: float, capacity: int = 256,
                 device: str = "cpu", dtype=np.float32):
        """dtype: of the cache and the RoPE tables (float16 where the layer graphs attend in it, layer_graphs.py)."""
        self.offset = 0
        self.dtype = np.dtype(dtype)
        self.num_layers, self.kv_heads, self.head_dim, self.rope_theta = num_layers, kv_heads, head_dim, rope_theta
        # with an accelerator the buffers and RoPE tables live on it, where the layer graphs run: binding host
        # buffers would copy the whole cache over and back on every call
        self.device = device
        self.keys: list[np.ndarray] = []  # the host buffers (on the CPU only)
        self.values: list[np.ndarray] = []
        # seqlens_k and total_sequence_length live in these arrays; bound OrtValues read them in place
        self._seqlens, self._total = np.zeros(1, np.int32), np.zeros((), np.int32)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        pooled = pooled_on(self.device)
        if pooled:
            capacity = 1 << (capacity - 1).bit_length()  # few capacities: pooled buffers and captured graphs recur
        shape = (1, self.kv_heads, capacity, self.head_dim)
        if not pooled:
            # the OrtValues are views of the numpy buffers (no copy): bound as past and present, the graph writes
            # the new rows in place
            keys = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
            values = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                keys[layer][:, :, :self.offset] = k[:, :, :self.offset]
                values[layer][:, :, :self.offset] = v[:, :, :self.offset]
            self.keys, self.values = keys, values
            self.cos, self.sin = (t.astype(self.dtype) for t in rope_tables(self.head_dim, self.rope_theta, capacity))
            self._kv = self._shared = None  # the OrtValues over them, made when a graph first binds (_bound)
        else:  # the buffers are on the device, the only copy of what the graphs wrote: copied over through the host
            key = (self.device, shape, self.dtype.str)
            kv = _DEVICE_POOL.take(key, self.num_layers)
            if self.offset:
                for (old_k, old_v), (k, v) in zip(self._kv, kv):
                    for old, new in ((old_k, k), (old_v, v)):
                        rows = new.numpy()
                        rows[:, :, :self.offset] = old.numpy()[:, :, :self.offset]
                        new.update_inplace(rows)
            if getattr(self, "_release", None) is not None:
                self._release()  # the old buffers back to the pool
            self._kv = kv
            self._release = weakref.finalize(self, _DEVICE_POOL.give, key, kv)
            self._shared = self._shared_values(*_DEVICE_POOL.rope(self.device, self.head_dim, self.rope_theta,
                                                                  capacity, self.dtype))
        self.capacity = capacity
        self._decode: dict[int, tuple] = {}  # layer -> (binding, hidden buffer, output buffers), built on first use

    def _shared_values(self, cos, sin) -> dict:
        return {"seqlens_k": ort.OrtValue.ortvalue_from_numpy(self._seqlens),
                "total_sequence_length": ort.OrtValue.ortvalue_from_numpy(self._total), "cos_cache": cos,
                "sin_cache": sin}

    def _bound(self) -> tuple[list, dict]:
        """(each layer's (key, value) OrtValues, the shared inputs') that graphs bind. On the CPU they are views of
        the host buffers, made on first use: the layer kernel reads the numpy buffers themselves, and a process
        whose layers all run there never imports onnxruntime (lazy_imports.py)."""
        if self._kv is None:
            self._kv = [(ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v))
                        for k, v in zip(self.keys, self.values)]
            self._shared = self._shared_values(ort.OrtValue.ortvalue_from_numpy(self.cos),
                                               ort.OrtValue.ortvalue_from_numpy(self.sin))
        return self._kv, self._shared

    def buffer_addresses(self) -> tuple:
        """Where the buffers a graph binds lie (each layer's KV, the RoPE tables): what a captured graph keeps."""
        kv, shared = self._bound()
        values = [v for pair in kv for v in pair] + [shared["cos_cache"], shared["sin_cache"]]
        return tuple(v.data_ptr() for v in values)

    def reserve(self, total: int) -> None:
        """Room for `total` tokens in all, now: a generation reserves its prompt and output up front, since growing
        mid-decode copies every layer's cache into new memory (140-360 ms at 2,048-4,096 tokens on the 2-core VM,
        one token's stall). Pages of the new buffers are only paid for as tokens fill them (np.zeros)."""
        if total > self.capacity:
            self._allocate(total)

    def prepare(self, tokens: int) -> None:
        """Room for `tokens` more (a larger capacity means new buffers: bindings made before are stale) and the
        sequence lengths the graphs read for them."""
        total = self.offset + tokens
        if total > self.capacity:
            self._allocate(max(total, 2 * self.capacity))
        self._seqlens[0], self._total[()] = total - 1, total

    def run(self, layer: int, session, hidden: np.ndarray) -> list:
        self.prepare(hidden.shape[0])
        if getattr(session, "runs_natively", False):  # edge_moe's layer kernel (native_layer.py), on these buffers
            return session.run_in(self.keys[layer], self.values[layer], self.cos, self.sin, self.offset, hidden)
        # Decode on the CPU: everything stays bound between tokens and only the numbers in the bound arrays change.
        # Not on an accelerator: a CUDA session's IOBinding copies host inputs when they are bound, so the sequence
        # length would stay the first token's (measured: logits drift from the CPU's token after token).
        if hidden.shape[0] == 1 and self.device == "cpu":
            io, hidden_value, outputs = self._decode.get(layer) or self._bind_decode(layer, session, hidden)
            hidden_value.update_inplace(hidden)
            session.run_bound(io, 0)
            return [out.copy() for out in outputs]
        io = session.io_binding()
        io.bind_cpu_input("hidden_states", hidden)
        for name in session.output_names[:-2]:
            io.bind_output(name)
        self._bind_kv(io, layer)  # after the outputs the caller reads: get_outputs() keeps binding order
        return session.run_bound(io, len(session.output_names) - 2)

    def _bind_kv(self, io, layer: int) -> None:
        self.bind(io, [layer], lambda name, _: name)

    def bind(self, io, layers, named=lambda name, layer: f"{name}.{layer}") -> None:
        """Binds the shared inputs (sequence lengths, RoPE tables) and each of `layers`' buffers as its past and
        present, under the names `named(name, layer)` gives (a graph of several layers, step_graph.py)."""
        kv, shared = self._bound()
        for name, ort_value in shared.items():
            io.bind_ortvalue_input(name, ort_value)
        for layer in layers:
            key, value = kv[layer]
            io.bind_ortvalue_input(named("past_key", layer), key)
            io.bind_ortvalue_input(named("past_value", layer), value)
            io.bind_ortvalue_output(named("key", layer), key)
            io.bind_ortvalue_output(named("value", layer), value)

    def _bind_decode(self, layer: int, session, hidden: np.ndarray):
        io = session.io_binding()
        hidden_value = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(hidden))
        io.bind_ortvalue_input("hidden_states", hidden_value)
        outputs = []
        for name, width, dtype in zip(session.output_names[:-2], session.output_widths[:-2],
                                      session.output_dtypes[:-2]):
            outputs.append(np.zeros((1, width), dtype))
            io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(outputs[-1]))
        self._bind_kv(io, layer)
        self._decode[layer] = (io, hidden_value, outputs)
        return self._decode[layer]

    def advance(self, tokens: int) -> None:
        self.offset += tokens

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.capacity * self.head_dim * self.dtype.itemsize


class _DevicePool:
    """KV buffer sets and RoPE tables on accelerators, kept for the next cache of the same shape. A set goes back
    when its cache is collected or grows; a pool holds at most as many sets of a shape as caches of it were alive at
    once (generations side by side)."""

    def __init__(self):
        self._free: dict[tuple, list] = {}
        self._tables: dict[tuple, tuple] = {}
        self._lock = threading.Lock()  # caches are collected on whatever thread drops them

    def take(self, key: tuple, layers: int) -> list:
        """A set of `layers` (key, value) buffers; key: (device, shape, dtype.str)."""
        device, shape, dtype = key
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        new = lambda: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0)  # noqa: E731
        return [(new(), new()) for _ in range(layers)]

    def give(self, key: tuple, kv: list) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(kv)

    def rope(self, device: str, head_dim: int, theta: float, capacity: int, dtype) -> tuple:
        key = (device, head_dim, theta, capacity, np.dtype(dtype).str)
        with self._lock:
            tables = self._tables.get(key)
            if tables is None:
                tables = self._tables[key] = tuple(ort.OrtValue.ortvalue_from_numpy(t.astype(dtype), device, 0)
                                                   for t in rope_tables(head_dim, theta, capacity))
            return tables


_DEVICE_POOL = _DevicePool()


def pooled_on(device: str) -> bool:
    """Whether caches on this OrtValue device take pooled buffers (accelerators: the KV cache lives there)."""
    return device != "cpu"


def rope_tables(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, D/2] in float32, computed as transformers does (float32 inverse frequencies)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.ascontiguousarray(np.cos(angles), np.float32), np.ascontiguousarray(np.sin(angles), np.float32)


def new_kv_cache(config: dict, device: str = "cpu", dtype=np.float32):
    """The cache for the package's layer graphs; `device` is where they run (an OrtValue device name); `dtype` of a
    "gqa" cache (float16 for graphs rewritten by layer_graphs.py)."""
    layers, kv_heads, head_dim = config["num_layers"], config["num_key_value_heads"], config["head_dim"]
    if config.get("attention_kernel", "generic") == "gqa":
        return GqaKVCache(layers, kv_heads, head_dim, float(config["rope_theta"]), device=device, dtype=dtype)
    a = attention_spec(config)
    return KVCache(layers, a.key_heads, a.key_dim, value_shape=(a.value_heads, a.value_dim))
