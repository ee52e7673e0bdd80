"""Reads a Hugging Face checkpoint one tensor at a time: config.json, safetensors shards, tokenizer.json.

safetensors' own numpy loader cannot return bfloat16 (most real MoE checkpoints), so the format is read here
directly: an 8-byte header length, a JSON header, then raw little-endian tensor bytes. Each tensor is read with
one pread into a fresh array; nothing else of the shard is held.

Encodings people download are decoded here, tensor by tensor, so that families never see them (export/encodings.py):
- FP8 with block scales (DeepSeek-V3, Qwen3-FP8): `W` float8_e4m3fn and `W_scale_inv` (float32, or e8m0 powers of
  two) -> `W` in float32.
- MXFP4 (GPT-OSS experts): `X_blocks` and `X_scales` -> a tensor `X` in the layout transformers dequantizes to,
  [E, in, out]; `read(X, index=e)` decodes one expert only, `read_mxfp4(X, e)` gives its codes untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from edge_moe.errors import EdgeMoeError

from .encodings import decode_e4m3fn, decode_e8m0, dequantize_fp8_blocks, dequantize_mxfp4

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_, "F8_E4M3": np.uint8,
           "F8_E8M0": np.uint8}
FP8_SCALE_SUFFIX = "_scale_inv"


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
        self._mxfp4: dict[str, tuple[str, str]] = {}  # X -> (X_blocks, X_scales)

    @property
    def _index(self) -> dict:
        """Shard headers, read on first use so that config errors come first."""
        if self._tensors is None:
            self._tensors = {}
            for shard in self._shards():
                self._index_shard(shard)
            self._pair_mxfp4()
        return self._tensors

    @property
    def _mxfp4_pairs(self) -> dict[str, tuple[str, str]]:
        self._index  # noqa: B018 (pairs are found while indexing)
        return self._mxfp4

    def _pair_mxfp4(self) -> None:
        for blocks in [name for name in self._tensors if name.endswith("_blocks")]:
            base, scales = blocks[:-len("_blocks")], blocks[:-len("_blocks")] + "_scales"
            if scales not in self._tensors:
                continue
            *prefix, n, groups, width = self._tensors[blocks][2]
            if self._tensors[scales][2] != [*prefix, n, groups] or width != 16:
                raise EdgeMoeError(f"{self.dir}: {blocks} {self._tensors[blocks][2]} and {scales} "
                                   f"{self._tensors[scales][2]} are not MXFP4 blocks of 32 with their scales")
            self._mxfp4[base] = (blocks, scales)

    def _fp8_block(self) -> tuple[int, int]:
        block = (self.config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise EdgeMoeError(f"{self.dir / 'config.json'}: quantization_config.weight_block_size {block!r} is not "
                               "two positive integers such as [128, 128]")
        return block[0], block[1]

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
        return name in self._index or name in self._mxfp4_pairs

    def names(self) -> list[str]:
        """Tensor names as the model sees them: scales and MXFP4 blocks folded into the tensor they encode."""
        hidden = {part for pair in self._mxfp4_pairs.values() for part in pair}
        hidden |= {name for name in self._index if name.endswith(FP8_SCALE_SUFFIX)
                   and self._index.get(name[:-len(FP8_SCALE_SUFFIX)], (None, ""))[1] == "F8_E4M3"}
        return [name for name in self._index if name not in hidden] + list(self._mxfp4_pairs)

    def shape(self, name: str) -> list[int]:
        if name in self._mxfp4_pairs:
            *prefix, n, groups, _ = self._entry(self._mxfp4_pairs[name][0])[2]
            return [*prefix, 32 * groups, n]
        return self._entry(name)[2]

    def nbytes(self, name: str) -> int:
        """Bytes stored for the tensor (both parts of an MXFP4 tensor, not an FP8 tensor's scales)."""
        return sum(self._entry(part)[4] for part in self._mxfp4_pairs.get(name, (name,)))

    def _entry(self, name: str):
        try:
            return self._index[name]
        except KeyError:
            raise EdgeMoeError(f"{self.dir}: tensor {name} is missing from the checkpoint") from None

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Returns the tensor (or its slice `index` along the first axis, e.g. one expert of a fused tensor) as a
        float32 array (integers as they are), decoding FP8 and MXFP4.

        Raises:
            EdgeMoeError: a missing or truncated tensor, an index out of range, scales that do not fit.
        """
        if name in self._mxfp4_pairs:
            blocks, scales = self.read_mxfp4(name, index)
            return np.swapaxes(dequantize_mxfp4(blocks, scales), -1, -2)
        array, dtype = self._read_raw(name, index)
        if dtype == "F8_E4M3":
            return self._dequantize_fp8(name, array, index)
        if dtype == "F8_E8M0":  # power-of-two scales (DeepSeek-V3.1-style UE8M0 weight_scale_inv)
            return decode_e8m0(array)
        if dtype == "BF16":
            return bfloat16_to_float32(array)
        if array.dtype.kind == "f" and array.dtype != np.float32:
            return array.astype(np.float32)
        return array

    def read_mxfp4(self, name: str, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The raw MXFP4 codes of `name` (or of its slice `index`): blocks [..., N, G, 16], scales [..., N, G]."""
        if name not in self._mxfp4_pairs:
            raise EdgeMoeError(f"{self.dir}: tensor {name} is not MXFP4-encoded")
        return tuple(self._read_raw(part, index)[0] for part in self._mxfp4_pairs[name])

    def is_mxfp4(self, name: str) -> bool:
        return name in self._mxfp4_pairs

    def _dequantize_fp8(self, name: str, bits: np.ndarray, index: int | None) -> np.ndarray:
        scale_name = name + FP8_SCALE_SUFFIX
        if scale_name not in self._index:  # a plain float8 tensor, unscaled
            return decode_e4m3fn(bits)
        scales = self.read(scale_name, index)
        block = self._fp8_block()
        try:
            if bits.ndim == 2:
                return dequantize_fp8_blocks(bits, scales, block)
            return np.stack([dequantize_fp8_blocks(b, s, block) for b, s in zip(bits, scales)])
        except ValueError as exc:
            raise EdgeMoeError(f"{self.dir}: tensor {name}: {exc}; check quantization_config.weight_block_size") \
                from None

    def _read_raw(self, name: str, index: int | None) -> tuple[np.ndarray, str]:
        path, dtype, shape, offset, length = self._entry(name)
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise EdgeMoeError(f"{self.dir}: tensor {name} {shape} has no slice {index}")
            length //= shape[0]
            offset += index * length
            shape = shape[1:]
        raw = np.empty(length, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(memoryview(raw)) != length:
                raise EdgeMoeError(f"{path}: short read of tensor {name}; the shard is truncated")
        return raw.view(_DTYPES[dtype]).reshape(shape), dtype

    def write_tokenizer(self, destination: Path) -> bool:
        """Copies the checkpoint's tokenizer.json to destination; False where it has none."""
        path = self.dir / "tokenizer.json"
        if not path.exists():
            return False
        shutil.copyfile(path, destination)
        return True
