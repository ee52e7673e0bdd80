"""Streaming safetensors writer: sharded Hugging Face checkpoints written one tensor chunk at a time, no torch.

Format of a shard: u64 little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` padded with
spaces to a multiple of 8, then the tensors' bytes back to back. Every shape is known before any value, so each
header is written first and the values follow as they are produced: memory holds one chunk, never a tensor set.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

# name -> (safetensors dtype code, bytes per element)
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does.

    Args:
        x: float32 array.
    Returns:
        uint16 array of the same shape holding the upper 16 bits of the rounded float32.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = u >> np.uint32(16)                # in place from here on: one temporary the size of x
    r &= np.uint32(1)
    r += np.uint32(0x7FFF)                # + 0x7FFF + lsb: ties round to the even neighbour
    r += u
    r >>= np.uint32(16)
    out = r.astype(np.uint16)
    nan = np.isnan(x)                     # rounding could carry a NaN's payload into the exponent: keep it NaN
    if nan.any():
        out[nan] = 0x7FC0
    return out


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the array whose bytes are `dtype`'s safetensors encoding."""
    if dtype == "bfloat16":
        return to_bfloat16_bits(values)
    return values.astype(np.float16) if dtype == "float16" else np.ascontiguousarray(values, dtype=np.float32)


def plan_shards(shapes: Sequence[tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[range]:
    """Greedy split of tensors (in order) into shards of at most shard_bytes; a larger tensor gets its own.

    Returns:
        One range of tensor positions per shard.
    """
    bounds, size = [0], 0
    for i, shape in enumerate(shapes):
        n = math.prod(shape) * itemsize
        if i > bounds[-1] and size + n > shard_bytes:
            bounds.append(i)
            size = 0
        size += n
    bounds.append(len(shapes))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def write_sharded(directory: Path, tensors: Sequence[tuple[str, tuple[int, ...]]],
                  chunks: Callable[[int], Iterable[np.ndarray]], dtype: str, shard_bytes: int,
                  on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Writes `model-0000i-of-0000N.safetensors` shards and `model.safetensors.index.json` into directory.

    Args:
        directory: an existing directory.
        tensors: (name, shape) in write order.
        chunks: chunks(i) yields tensor i's float32 values as C-order row blocks; called once per tensor, in order.
        dtype: key of DTYPES.
        shard_bytes: shard size limit.
        on_bytes: called with the byte count of each chunk written (progress bars).
    Returns:
        Total tensor bytes written.
    """
    code, itemsize = DTYPES[dtype]
    shards = plan_shards([s for _, s in tensors], itemsize, shard_bytes)
    weight_map, total = {}, 0
    for k, positions in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in positions:
            t, shape = tensors[i]
            n = math.prod(shape) * itemsize
            header[t] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            weight_map[t] = name
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)   # data starts 8-byte aligned
        with open(directory / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i in positions:
                start = f.tell()
                for chunk in chunks(i):
                    data = encode(chunk, dtype)
                    f.write(data.data)
                    on_bytes(data.nbytes)
                want = header[tensors[i][0]]["data_offsets"]
                if f.tell() - start != want[1] - want[0]:   # a short tensor would shift every later one
                    raise RuntimeError(f"{tensors[i][0]}: wrote {f.tell() - start} bytes, header says "
                                       f"{want[1] - want[0]}")
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total
