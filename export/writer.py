"""Writes a package directory aside and renames it into place at the end, so an interrupted export never leaves
a directory that loads. Blobs are appended one tensor at a time with the alignment the format promises."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import xxhash

from edge_moe.errors import EdgeMoeError
from edge_moe.files import MARKER, alive, exchange, fsync_directory, fsync_tree, stale_pid, write_marker
from edge_moe.manifest import TensorRecord
from edge_moe.manifest_checks import TENSOR_ALIGN

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

    def __init__(self, blob: BlobWriter, seed: int = 0):
        self.blob = blob
        self.offset = blob.pad_to(PAGE)
        self.tensors: list[TensorRecord] = []
        self._hasher = xxhash.xxh3_64(seed=seed)  # seed: manifest.expert_seed(key) in packages

    def write(self, name: str, array: np.ndarray, dtype: str) -> None:
        """Appends `array` in `dtype` as tensor `name`, 64-byte aligned within the expert for SIMD loads."""
        pad = -(self.blob.size - self.offset) % TENSOR_ALIGN
        if pad:
            self.blob.write(np.zeros(pad, np.uint8), self._hasher)
        start, nbytes = self.blob.write(array.astype(dtype, copy=False), self._hasher)
        self.tensors.append(TensorRecord(name, dtype, tuple(array.shape), start - self.offset, nbytes))

    def finish(self) -> tuple[int, int, str]:
        """Returns (offset, length, checksum) of the expert's span."""
        return self.offset, self.blob.size - self.offset, f"xxh3_64:{self._hasher.hexdigest()}"


class StagedDirectory:
    """OUT_DIR is built in OUT_DIR.partial-<pid> (with edge_moe's marker file) and appears only when `commit()`
    swaps it in, complete and fsynced. An existing OUT_DIR (--overwrite) is exchanged atomically where Linux
    allows it (renameat2), so OUT_DIR never disappears; elsewhere the old one is renamed aside first and the next
    export puts it back if the process died in between. Leftovers of dead exports of OUT_DIR are removed first."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool):
        self.final = Path(out_dir)
        self.path = self.final.with_name(f"{self.final.name}.partial-{os.getpid()}")
        self.old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
        recover_leftovers(self.final)
        if self.final.is_symlink() or (self.final.exists() and not self.final.is_dir()):
            raise EdgeMoeError(f"{self.final}: exists and is not a directory; choose another output directory")
        if self.final.exists() and not overwrite and any(self.final.iterdir()):
            raise EdgeMoeError(f"{self.final}: already exists and is not empty; choose another directory "
                               "or pass --overwrite")
        try:
            # the staging name appears with its marker inside (built under a random name and renamed): a kill
            # before the rename leaves a hidden folder holding at most the marker, which recover_leftovers knows
            self.final.parent.mkdir(parents=True, exist_ok=True)
            fresh = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.new-{os.getpid()}-"))
            write_marker(fresh, os.getpid())
            os.rename(fresh, self.path)
        except OSError as exc:
            raise EdgeMoeError(f"{self.path}: cannot create ({exc.strerror}); choose a writable directory") from None

    def commit(self) -> Path:
        fsync_tree(self.path)
        if self.final.exists():
            write_marker(self.final, os.getpid())  # from here on the old package is this export's to remove
            if exchange(self.path, self.final):  # self.path now holds the old package
                _remove(self.path)
            else:
                os.replace(self.final, self.old)
                os.replace(self.path, self.final)
                _remove(self.old)
        else:
            os.replace(self.path, self.final)
        (self.final / MARKER).unlink(missing_ok=True)
        fsync_directory(self.final)
        fsync_directory(self.final.parent)
        return self.final

    def abort(self) -> None:
        _remove(self.path)


def recover_leftovers(final: Path) -> None:
    """Before an export into `final`: a dead export's staging folders go; its renamed-aside old package comes back
    when `final` itself is gone (the process died between the two renames of a non-atomic swap)."""
    for fresh in final.parent.glob(f".{glob.escape(final.name)}.new-*-*"):
        pid = fresh.name.split(".new-", 1)[1].split("-", 1)[0]
        if (pid.isdigit() and not alive(int(pid)) and fresh.is_dir() and not fresh.is_symlink()
                and all(MARKER in entry.name for entry in fresh.iterdir())):
            _remove(fresh)
    for leftover in sorted(final.parent.glob(f"{glob.escape(final.name)}.*-*")):
        if stale_pid(leftover) is None:
            continue
        if ".old-" in leftover.name and not final.exists():
            (leftover / MARKER).unlink(missing_ok=True)
            os.replace(leftover, final)
        else:
            _remove(leftover)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
