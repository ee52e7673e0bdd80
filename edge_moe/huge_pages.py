"""Resident weights on 2 MiB pages: the decode step stops paying a page walk per 4 KiB of weights.

A decoded token touches every resident expert it routes to once, cold: 48 experts of 0.5-1.5 MB each for the
default benchmark model, scattered over hundreds of MB. On 4 KiB pages that is a TLB miss every 4 KiB, and in a
virtual machine (nested paging) each miss is a two-level walk. Measured on the 2-core VM (docs/bench, 1 thread):
a 4-bit expert cycling over 384 resident experts took 170-290 us on 4 KiB pages and 96-105 us on 2 MiB pages,
and whole-model decode went 1.5-2x faster. llama.cpp gets the same effect for free: it maps its file, and the
kernel's page cache hands out large folios.

onnxruntime and numpy allocate through malloc, which we do not control, so instead of allocating on huge pages we
collapse what is already resident: madvise(MADV_COLLAPSE) (Linux 6.1+) copies a 2 MiB-aligned block of anonymous
memory onto one huge page. Only blocks whose 4 KiB pages are nearly all resident are collapsed, so RSS grows by
at most (1 - density) of what is collapsed (measured: +0.2 MiB for 350-700 MiB collapsed). Collapsing is a copy
(~5 ms a block here), so a background thread does it after load and again while the resident set changes (the
expert cache admits and evicts). Elsewhere (other systems, THP set to never, older kernels) it does nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
import time

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25
DENSITY = 0.9  # share of a block's 4 KiB pages that must be resident before it is collapsed
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

_libc = None
_scan_lock = threading.Lock()
_unsupported: str | None = None  # why collapsing is off in this process, once known


def unsupported_reason() -> str | None:
    """None where collapsing can work, else why not (one line)."""
    global _libc, _unsupported
    if _unsupported is None and _libc is None:
        if not sys.platform.startswith("linux"):
            _unsupported = f"{sys.platform} has no MADV_COLLAPSE"
        else:
            try:
                with open(THP_SETTING) as f:
                    if "[never]" in f.read():
                        _unsupported = f"{THP_SETTING} is never"
            except OSError:
                _unsupported = "this kernel has no transparent huge pages"
        if _unsupported is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return _unsupported


def _anonymous_regions():
    """(start, end) of this process's private writable anonymous mappings (malloc's heap and mmap chunks)."""
    with open("/proc/self/maps") as f:
        lines = f.readlines()
    for line in lines:
        fields = line.split()
        if fields[1][:2] != "rw" or fields[1][3] != "p":
            continue
        if len(fields) > 5 and fields[5] != "[heap]":  # files, the stack, vdso, ...
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        yield start, end


def collapse_dense(density: float = DENSITY, stop: threading.Event | None = None) -> int:
    """Collapses every 2 MiB-aligned block of anonymous memory whose pages are at least `density` resident onto a
    huge page (a block already on one costs the kernel a lookup). Returns the bytes of the blocks that are on
    huge pages now (0 where unsupported)."""
    global _unsupported
    if unsupported_reason():
        return 0
    pages = HUGE_PAGE // os.sysconf("SC_PAGE_SIZE")
    need = int(density * pages)
    vector = ctypes.create_string_buffer(pages)
    done = 0
    for start, end in _anonymous_regions():
        block = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        while block + HUGE_PAGE <= end:
            if stop is not None and stop.is_set():  # the model closed: a first pass over GBs takes seconds
                return done
            if _libc.mincore(block, HUGE_PAGE, vector) == 0 \
                    and pages - vector.raw.count(0) >= need:  # mincore sets bit 0 of a resident page's byte
                if _libc.madvise(block, HUGE_PAGE, MADV_COLLAPSE) == 0:
                    done += HUGE_PAGE
                elif ctypes.get_errno() == errno.EINVAL:  # a kernel before 6.1: no MADV_COLLAPSE
                    _unsupported = "this kernel has no MADV_COLLAPSE (Linux 6.1+)"
                    return done
                # EAGAIN / ENOMEM (no free huge page now), EBUSY: left on small pages, tried again next scan
            block += HUGE_PAGE
    return done


class HugePageKeeper:
    """A daemon thread that collapses the resident weights after load, then rescans every `interval` seconds
    while `activity()` (a counter: the model's onnxruntime calls) says the model has run since the last scan."""

    def __init__(self, activity, interval: float = 5.0):
        self.activity, self.interval = activity, interval
        self.huge_bytes = 0  # resident on huge pages after the last scan
        self.seconds = 0.0  # spent collapsing (a background thread's time, not the decode's)
        self._stop = threading.Event()
        self._first = threading.Event()
        self.reason = unsupported_reason()
        if self.reason:
            self._first.set()
            self._thread = None
            return
        self._thread = threading.Thread(target=self._loop, name="edge-moe-huge-pages", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the first scan after load has finished (benchmarks time the steady state)."""
        return self._first.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._first.set()  # nobody waits for a pass that will not come
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        seen = None
        while not self._stop.is_set():
            now = self.activity()
            if now != seen:
                seen = now
                start = time.perf_counter()
                try:
                    with _scan_lock:  # one scan at a time in the process: several models share its memory
                        self.huge_bytes = collapse_dense(stop=self._stop)
                except OSError:  # /proc unreadable (a sandbox): nothing to do
                    self._stop.set()
                self.seconds += time.perf_counter() - start
            self._first.set()
            self._stop.wait(self.interval)

    def stats(self) -> dict:
        return {"huge_pages_mib": round(self.huge_bytes / 2**20, 1),
                "huge_pages_seconds": round(self.seconds, 3), "huge_pages_off": self.reason}
