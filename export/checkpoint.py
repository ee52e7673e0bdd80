"""Reads a Hugging Face checkpoint one tensor at a time: config.json, safetensors shards, tokenizer.json.

safetensors' own numpy loader cannot return bfloat16 (most real MoE checkpoints), so the format is read here
directly: an 8-byte header length, a JSON header, then raw little-endian tensor bytes. Each tensor is read with
one pread into a fresh array; nothing else of the shard is held.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from edge_moe.errors import EdgeMoeError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the upper half of a float32: widen exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Checkpoint:
    """The tensors of a checkpoint directory by name, loaded on demand as float32 numpy arrays."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise EdgeMoeError(f"{self.dir}: not a directory; pass a Hugging Face checkpoint directory")
        self.config = self._read_config()
        self._tensors: dict[str, tuple[Path, str, list[int], int, int]] | None = None

    @property
    def _index(self) -> dict:
        """Shard headers, read on first use so that config errors come first."""
        if self._tensors is None:
            self._tensors = {}
            for shard in self._shards():
                self._index_shard(shard)
        return self._tensors

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise EdgeMoeError(f"{path}: missing; a Hugging Face checkpoint needs its config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgeMoeError(f"{path}: not valid JSON ({exc}); restore the file from the checkpoint") from None

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EdgeMoeError(f"{index}: no valid weight_map ({exc}); restore the file") from None
            return [self.dir / name for name in sorted(set(weight_map.values()))]
        single = self.dir / "model.safetensors"
        if single.exists():
            return [single]
        raise EdgeMoeError(f"{self.dir}: no model.safetensors or model.safetensors.index.json; "
                           "export needs safetensors weights (convert .bin checkpoints with transformers first)")

    def _index_shard(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise EdgeMoeError(f"{path}: shard listed in the index is missing") from None
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, OverflowError, MemoryError):
            raise EdgeMoeError(f"{path}: not a valid safetensors file") from None
        size = path.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in _DTYPES:
                raise EdgeMoeError(f"{path}: tensor {name} has dtype {info['dtype']}, which export cannot read")
            if 8 + header_len + end > size:
                raise EdgeMoeError(f"{path}: truncated (tensor {name} ends past the end of the file)")
            self._tensors[name] = (path, info["dtype"], info["shape"], 8 + header_len + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def shape(self, name: str) -> list[int]:
        return self._entry(name)[2]

    def nbytes(self, name: str) -> int:
        return self._entry(name)[4]

    def _entry(self, name: str):
        try:
            return self._index[name]
        except KeyError:
            raise EdgeMoeError(f"{self.dir}: tensor {name} is missing from the checkpoint") from None

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Returns the tensor as a float32 array (integers as they are); with `index`, only tensor[index] (one
        expert of a fused [E, ...] tensor, read alone: the other experts' bytes are not touched)."""
        path, dtype, shape, offset, length = self._entry(name)
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise EdgeMoeError(f"{self.dir}: tensor {name} of shape {shape} has no row {index}; the checkpoint "
                                   "does not match its config.json")
            length //= shape[0]
            offset += index * length
            shape = shape[1:]
        raw = np.empty(length, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(memoryview(raw)) != length:
                raise EdgeMoeError(f"{path}: short read of tensor {name}; the shard is truncated")
        array = raw.view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return bfloat16_to_float32(array)
        if array.dtype.kind == "f" and array.dtype != np.float32:
            return array.astype(np.float32)
        return array

    def tokenizer_path(self) -> Path | None:
        path = self.dir / "tokenizer.json"
        return path if path.exists() else None
