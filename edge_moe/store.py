"""Expert store: one contiguous, page-cache-bypassing flash read per expert, checksum verified.

The residency cache decides what stays in RAM; the OS page cache must not keep a second, invisible copy
of every expert we ever read (that is how mmap-based runtimes thrash once the model exceeds RAM). So reads
use O_DIRECT into a 4096-aligned buffer; where the filesystem refuses O_DIRECT (tmpfs, some FUSE/overlay
mounts) we read buffered and drop the pages right after with POSIX_FADV_DONTNEED.

The store holds no cache and no per-read state: a failed read raises and leaves nothing behind. Reads queue by
priority (a layer's own misses before speculative prefetches: a prefetch must never delay the read the model is
waiting for), and may land in a buffer the caller recycles (a fresh buffer costs a page fault per 4 KiB page when
O_DIRECT pins it, and an munmap with TLB shootdowns when it is freed).
"""
from __future__ import annotations

import concurrent.futures
import errno
import heapq
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import xxhash

from edge_moe.errors import EdgeMoeError
from edge_moe.package_files import OPEN_FLAGS, check_regular_fd

ALIGN = 4096  # O_DIRECT needs offset, length and buffer address aligned to the logical block size
_CHECKSUM_RE = re.compile(r"^xxh3_64:([0-9a-f]{16})$")
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # absent on macOS: every read is then buffered + fadvise


@dataclass(frozen=True)
class ExpertLocation:
    """Where one expert's bytes live (the part of a manifest expert record the store needs).

    Attributes:
        key: (layer, index) of the expert.
        path: absolute path of the blob file.
        offset: byte offset of the expert in the blob (a multiple of 4096 in format version 1).
        length: number of bytes of the expert.
        checksum: "xxh3_64:<16 hex digits>" of those bytes.
        seed: the XXH3 seed (packages of format 2: manifest.expert_seed(key), which binds the bytes to the expert
            they belong to, so records that swap their indices or blobs fail the check).
    """

    key: tuple[int, int]
    path: str
    offset: int
    length: int
    checksum: str
    seed: int = 0


@dataclass
class StoreStats:
    """Counters of one store; updated under the store's lock, read them any time."""

    bytes_read: int = 0  # payload bytes handed to callers (not the alignment padding)
    reads: int = 0
    read_seconds: float = 0.0  # wall time inside pread, summed over I/O threads
    busy_seconds: float = 0.0  # wall time during which at least one read was in progress (throughput = bytes/busy)
    checksum_seconds: float = 0.0
    direct_reads: int = 0
    buffered_reads: int = 0


def aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array of `nbytes` whose data starts at a 4096-aligned address (over-allocate and slice)."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = (-raw.ctypes.data) % ALIGN
    return raw[skip : skip + nbytes]


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ExpertStore:
    """Reads experts from blob files on flash.

    Args:
        locations: one ExpertLocation per expert; keys must be unique.
        io_threads: reader threads used by `submit` (the queue depth the disk sees; virtio and NVMe disks deliver
            more of their bandwidth at 4 or more reads in flight than at 1).
        direct: try O_DIRECT first (falls back per file where the filesystem refuses it).
        verify: check each expert's XXH3-64 checksum on every read.
        throttle: optional shared-device emulation (edge_moe.emulate.TokenBucket): each read reserves its bytes
            before the pread and waits out the emulated device time after it.

    Raises:
        EdgeMoeError: a duplicate key, a malformed checksum, a negative offset/length, or io_threads < 1.
    """

    def __init__(self, locations: Iterable[ExpertLocation], *, io_threads: int = 2, direct: bool = True,
                 verify: bool = True, throttle=None):
        if io_threads < 1:
            raise EdgeMoeError(f"io_threads={io_threads}: the expert store needs at least 1 I/O thread")
        self._locs: dict[tuple[int, int], ExpertLocation] = {}
        for loc in locations:
            key = tuple(loc.key)
            if key in self._locs:
                raise EdgeMoeError(f"expert {key} is listed twice (blobs {self._locs[key].path} and {loc.path}); "
                                   "re-export the model")
            if loc.offset < 0 or loc.length < 0:
                raise EdgeMoeError(f"expert {key} in {loc.path}: offset {loc.offset} / length {loc.length} "
                                   "must not be negative; re-export the model")
            if verify and not _CHECKSUM_RE.match(loc.checksum):
                raise EdgeMoeError(f"expert {key} in {loc.path}: checksum {loc.checksum!r} is not "
                                   "'xxh3_64:<16 lowercase hex digits>'; re-export the model")
            self._locs[key] = loc
        self._direct = direct and bool(_O_DIRECT)
        self._verify = verify
        self._throttle = throttle
        self._fds: dict[tuple[str, bool], int] = {}  # (path, direct) -> fd; pread on a shared fd is thread-safe
        self._direct_ok: dict[str, bool] = {}  # per blob: did O_DIRECT work? learned on first use
        self._lock = threading.Lock()
        self._queue: list = []  # heap of (priority, seq, _Job); stale entries (re-prioritized jobs) are skipped
        self._seq = itertools.count()
        self._jobs: dict[concurrent.futures.Future, _Job] = {}  # queued, not yet started
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"edge_moe_io_{i}", daemon=True)
                         for i in range(io_threads)]
        for t in self._workers:
            t.start()
        self._active, self._busy_since = 0, 0.0
        self.stats = StoreStats()

    def __contains__(self, key) -> bool:
        return tuple(key) in self._locs

    def location(self, key) -> ExpertLocation:
        """The ExpertLocation of `key`.

        Raises:
            EdgeMoeError: the key is not in the store.
        """
        try:
            return self._locs[tuple(key)]
        except (KeyError, TypeError):
            raise EdgeMoeError(f"expert {key!r} is not in the model package; keys are (layer, index) with "
                               f"{len(self._locs)} experts known") from None

    def buffer_size(self, key) -> int:
        """Bytes of the 4096-aligned buffer one read of `key` needs (`read(key, into=...)`)."""
        loc = self.location(key)
        return _round_up(loc.offset % ALIGN + loc.length)

    def read(self, key, into: np.ndarray | None = None) -> np.ndarray:
        """Read one expert's bytes.

        Args:
            key: (layer, index).
            into: optional uint8 buffer to read into (4096-aligned, at least `buffer_size(key)` bytes), e.g. the
                buffer of an evicted expert; a fresh one is allocated otherwise.

        Returns:
            A uint8 array of exactly `length` bytes, a view into a 4096-aligned buffer owned by the caller.

        Raises:
            EdgeMoeError: unknown key, a closed store, a bad `into` buffer, an I/O error, a short read (truncated
                blob) or a checksum mismatch. Nothing is cached, so a failed read leaves no state behind.
        """
        if self._closed:
            raise EdgeMoeError("the expert store is closed; open a new one to read experts")
        loc = self.location(key)
        start = loc.offset - loc.offset % ALIGN  # format v1 offsets are aligned; tolerate others anyway
        head = loc.offset - start
        need = _round_up(head + loc.length)
        if into is None:
            buf = aligned_empty(need)
        elif into.dtype != np.uint8 or into.nbytes < need or into.ctypes.data % ALIGN or not into.flags.c_contiguous:
            raise EdgeMoeError(f"read of expert {loc.key} into a buffer of {into.nbytes} bytes ({into.dtype}, address "
                               f"{into.ctypes.data:#x}): it needs a contiguous uint8 buffer of at least {need} bytes "
                               "at a 4096-aligned address; allocate it with edge_moe.store.aligned_empty")
        else:
            buf = into[:need]
        t0 = self._busy(+1)
        try:
            deadline = self._throttle.reserve(buf.nbytes) if self._throttle is not None else None
            direct = self._read_into(loc, buf, start, head + loc.length)
            if deadline is not None:
                self._throttle.wait(deadline)  # a read costs max(real, emulated device) time
        finally:
            t1 = self._busy(-1)
        data = buf[head : head + loc.length]
        if self._verify:
            got = xxhash.xxh3_64_hexdigest(data, seed=loc.seed)
            t2 = time.perf_counter()
            if "xxh3_64:" + got != loc.checksum:
                raise EdgeMoeError(
                    f"{loc.path}: expert (layer {loc.key[0]}, index {loc.key[1]}) at offset {loc.offset}, "
                    f"length {loc.length} has checksum xxh3_64:{got} but the manifest says {loc.checksum}; "
                    "the blob is corrupt or does not belong to this manifest: re-export the model")
        else:
            t2 = t1
        with self._lock:
            s = self.stats
            s.bytes_read += loc.length
            s.reads += 1
            s.read_seconds += t1 - t0
            s.checksum_seconds += t2 - t1
            if direct:
                s.direct_reads += 1
            else:
                s.buffered_reads += 1
        return data

    def _busy(self, delta: int) -> float:
        """Counts reads in progress; accumulates the wall time when any is (the union of read intervals)."""
        now = time.perf_counter()
        with self._lock:
            if self._active:
                self.stats.busy_seconds += now - self._busy_since
            self._busy_since = now
            self._active += delta
        return now

    def busy_seconds(self) -> float:
        """stats.busy_seconds with the interval still open (reads in progress now) counted up to now."""
        with self._lock:
            open_interval = time.perf_counter() - self._busy_since if self._active else 0.0
            return self.stats.busy_seconds + open_interval

    def submit(self, key, into: np.ndarray | None = None, priority: int = 0) -> concurrent.futures.Future:
        """Queue `read(key, into)` on the I/O threads; lower `priority` runs first (0: the model is waiting for it,
        larger: a prefetch that many layers ahead), FIFO within a priority. The future raises what `read` would
        raise; cancelling it before it starts drops the read."""
        self.location(key)  # an unknown key fails here, not on an I/O thread
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise EdgeMoeError("the expert store is closed; open a new one to read experts")
            job = _Job(tuple(key), into, future, priority)
            self._jobs[future] = job
            heapq.heappush(self._queue, (priority, next(self._seq), job))
            self._wake.notify()
        return future

    def prioritize(self, future: concurrent.futures.Future, priority: int) -> None:
        """Moves a queued read up to `priority` (a prefetch the model now waits for); no-op once it started."""
        with self._lock:
            job = self._jobs.get(future)
            if job is not None and priority < job.priority:
                job.priority = priority
                heapq.heappush(self._queue, (priority, next(self._seq), job))
                self._wake.notify()

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    while self._queue and self._queue[0][2].priority != self._queue[0][0]:
                        heapq.heappop(self._queue)  # stale: the job was moved up
                    if self._queue or self._closed:
                        break
                    self._wake.wait()
                if not self._queue:
                    return  # closed and drained
                job = heapq.heappop(self._queue)[2]
                del self._jobs[job.future]
                job.priority = -1  # any other heap entry of this job is stale now
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                job.future.set_result(self.read(job.key, job.into))
            except BaseException as e:  # noqa: BLE001 - the future hands it to the caller
                job.future.set_exception(e)

    def set_throttle(self, throttle) -> None:
        """Emulates a slower device from the next read on (emulate.TokenBucket), or None for the real one."""
        with self._lock:
            self._throttle = throttle

    def close(self) -> None:
        """Wait for queued and running reads, then close every file descriptor. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        for t in self._workers:
            if t is not threading.current_thread():
                t.join()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

    def _fd(self, path: str, direct: bool) -> int:
        with self._lock:
            fd = self._fds.get((path, direct))
            if fd is None:
                # a blob swapped for a FIFO, device or link after load must neither block nor lead elsewhere
                fd = os.open(path, OPEN_FLAGS | (_O_DIRECT if direct else 0))
                self._fds[(path, direct)] = check_regular_fd(fd, path, "expert blob")
            return fd

    def _read_into(self, loc: ExpertLocation, buf: np.ndarray, start: int, need: int) -> bool:
        """Fill buf from `start`; returns True if the read was O_DIRECT. `need` bytes must arrive."""
        try:
            if self._direct and self._direct_ok.get(loc.path, True):
                try:
                    self._pread_full(self._fd(loc.path, True), buf, start, need)
                    self._direct_ok[loc.path] = True
                    return True
                except OSError as e:
                    # tmpfs refuses O_DIRECT at open, some filesystems only at read time: both say EINVAL
                    if e.errno != errno.EINVAL or self._direct_ok.get(loc.path):
                        raise
                    self._direct_ok[loc.path] = False
            fd = self._fd(loc.path, False)
            self._pread_full(fd, buf, start, need)
            if hasattr(os, "posix_fadvise"):
                # drop what we just pulled into the page cache: the residency cache is the only copy we keep
                os.posix_fadvise(fd, start, len(buf), os.POSIX_FADV_DONTNEED)
            return False
        except _ShortRead as e:
            got = max(0, e.got - (loc.offset - start))
            raise EdgeMoeError(
                f"{loc.path}: short read of expert (layer {loc.key[0]}, index {loc.key[1]}): wanted {loc.length} "
                f"bytes at offset {loc.offset} but the file ends after {got} of them; the blob is truncated: "
                "re-export the model") from None
        except OSError as e:
            raise EdgeMoeError(
                f"{loc.path}: cannot read expert (layer {loc.key[0]}, index {loc.key[1]}) at offset {loc.offset}, "
                f"length {loc.length}: {e.strerror or e}; check that the model package is complete and readable"
            ) from None

    @staticmethod
    def _pread_full(fd: int, buf: np.ndarray, start: int, need: int) -> None:
        # preadv may return less than asked (signals, some filesystems); keep going until EOF or `need`.
        # Chunk boundaries stay 4096-aligned because a short O_DIRECT read only happens at EOF.
        view = memoryview(buf)
        done = 0
        while done < need:
            n = os.preadv(fd, [view[done:]], start + done)
            if n == 0:
                raise _ShortRead(done)
            done += n

    @staticmethod
    def sequential_bandwidth(path: str, nbytes: int = 256 << 20, block: int = 8 << 20) -> float:
        """Raw O_DIRECT sequential read bandwidth of a file, for benchmarks.

        Args:
            path: a file on the disk to measure (at least 4096 bytes).
            nbytes: how much to read at most (capped at the file size).
            block: bytes per read call (rounded up to 4096; capped at the file size, so small models' blobs,
                a few MB per layer, can be measured too).

        Returns:
            Bytes per second.

        Raises:
            EdgeMoeError: the file is too small or its filesystem refuses O_DIRECT.
        """
        size = os.path.getsize(path)
        block = min(_round_up(block), size // ALIGN * ALIGN) or ALIGN
        total = min(nbytes, size) // block * block
        if total == 0:
            raise EdgeMoeError(f"{path}: {size} bytes is smaller than one {block}-byte block; "
                               "measure a larger file or pass a smaller block")
        try:
            fd = os.open(path, os.O_RDONLY | _O_DIRECT)
        except OSError as e:
            raise EdgeMoeError(f"{path}: O_DIRECT open failed ({e.strerror}); measure a file on a real disk, "
                               "not tmpfs") from None
        buf = memoryview(aligned_empty(block))
        try:
            t0 = time.perf_counter()
            for off in range(0, total, block):
                if os.preadv(fd, [buf], off) != block:
                    raise EdgeMoeError(f"{path}: short read at offset {off}; the file changed while measuring")
            return total / (time.perf_counter() - t0)
        finally:
            os.close(fd)


@dataclass(eq=False)
class _Job:
    key: tuple
    into: np.ndarray | None
    future: concurrent.futures.Future
    priority: int


class _ShortRead(Exception):
    def __init__(self, got: int):
        self.got = got


def hash_bandwidth(nbytes: int = 64 << 20) -> float:
    """XXH3-64 throughput of this machine in bytes/s on an `nbytes` buffer (best of 3)."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        xxhash.xxh3_64_hexdigest(data)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


if __name__ == "__main__":  # python -m edge_moe.store [FILE]: print hash and disk bandwidth
    import sys

    print(f"xxh3_64: {hash_bandwidth() / 1e9:.2f} GB/s on 64 MiB")
    for p in sys.argv[1:]:
        print(f"{p}: O_DIRECT sequential {ExpertStore.sequential_bandwidth(p) / 1e9:.2f} GB/s")
