"""Writes a package directory aside and renames it into place at the end, so an interrupted export never leaves
a directory that loads. Blobs are appended one tensor at a time with the alignment the format promises."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import xxhash

from edge_moe.errors import EdgeMoeError

PAGE = 4096


class BlobWriter:
    """An append-only weights file; returns where each tensor landed."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self.size = 0

    def pad_to(self, alignment: int) -> int:
        pad = -self.size % alignment
        if pad:
            self._file.write(b"\0" * pad)
            self.size += pad
        return self.size

    def write(self, array: np.ndarray, hasher=None) -> tuple[int, int]:
        """Appends the array's bytes; returns (offset, nbytes)."""
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        offset = self.size
        self._file.write(data)
        if hasher is not None:
            hasher.update(data)
        self.size += len(data)
        return offset, len(data)

    def close(self) -> None:
        self.pad_to(PAGE)  # a rounded-up O_DIRECT read of the last expert stays inside the file
        self._file.close()


class ExpertWriter:
    """Writes one expert's tensors back to back from a page boundary and checksums exactly those bytes."""

    def __init__(self, blob: BlobWriter):
        self.blob = blob
        self.offset = blob.pad_to(PAGE)
        self.tensors: list[dict] = []
        self._hasher = xxhash.xxh3_64()

    def write(self, name: str, array: np.ndarray, dtype: str) -> None:
        """Appends `array` in `dtype` as tensor `name`, 64-byte aligned within the expert for SIMD loads."""
        pad = -(self.blob.size - self.offset) % 64
        if pad:
            self.blob.write(np.zeros(pad, np.uint8), self._hasher)
        start, nbytes = self.blob.write(array.astype(dtype, copy=False), self._hasher)
        self.tensors.append({"name": name, "dtype": dtype, "shape": list(array.shape),
                             "offset": start - self.offset, "nbytes": nbytes})

    def finish(self) -> tuple[int, int, str]:
        """Returns (offset, length, checksum) of the expert's span."""
        return self.offset, self.blob.size - self.offset, f"xxh3_64:{self._hasher.hexdigest()}"


class StagedDirectory:
    """OUT_DIR is built in OUT_DIR.partial-<pid> and appears only when `commit()` renames it."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool):
        self.final = Path(out_dir)
        if self.final.exists() and not self.final.is_dir():  # --overwrite replaces a directory, never a file
            raise EdgeMoeError(f"{self.final}: exists and is not a directory; choose another output directory")
        if self.final.exists() and not overwrite and any(self.final.iterdir()):
            raise EdgeMoeError(f"{self.final}: already exists and is not empty; choose another directory "
                               "or pass --overwrite")
        self.path = self.final.with_name(f"{self.final.name}.partial-{os.getpid()}")
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.path.mkdir(parents=True)
        except OSError as exc:
            raise EdgeMoeError(f"{self.path}: cannot create ({exc.strerror}); choose a writable directory") from None

    def write_json(self, name: str, data: dict) -> None:
        (self.path / name).write_text(json.dumps(data, indent=1))

    def commit(self) -> Path:
        old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
