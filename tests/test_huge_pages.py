"""Resident memory onto 2 MiB pages (edge_moe.huge_pages): dense blocks move, sparse ones are left (no RSS
growth), and the model's keeper collapses its weights in the background and stops with the model."""

import ctypes
import os
import threading
import time

import numpy as np
import pytest

import edge_moe
from edge_moe import huge_pages

MiB = 1 << 20
PROT_NONE, PROT_RW, MAP_PRIVATE_ANONYMOUS = 0x0, 0x3, 0x22

needs_collapse = pytest.mark.skipif(huge_pages.unsupported_reason() is not None,
                                    reason=f"no huge pages here: {huge_pages.unsupported_reason()}")


class Mapping:
    """A private anonymous mapping of its own (its own line in /proc/self/smaps): between two inaccessible guard
    pages, so the kernel cannot merge it with a neighbouring read-write mapping (it did, when another mapping of the
    process happened to end where this one began: its smaps line then counted 13-17 MiB for a 12 MiB mapping)."""

    def __init__(self, nbytes: int):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.libc, self.nbytes, page = libc, nbytes, os.sysconf("SC_PAGE_SIZE")
        self.base = libc.mmap(None, nbytes + 2 * page, PROT_NONE, MAP_PRIVATE_ANONYMOUS, -1, 0)
        assert self.base not in (None, ctypes.c_void_p(-1).value)
        self.address = self.base + page
        assert libc.mprotect(self.address, nbytes, PROT_RW) == 0, ctypes.get_errno()
        self.bytes = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.address))

    def smaps(self) -> dict[str, int]:
        """kB fields of the mapping's /proc/self/smaps entry."""
        fields, inside = {}, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and not head[0].endswith(":"):
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    inside = start <= self.address < end
                elif inside and len(head) == 3 and head[2] == "kB":
                    fields[head[0].rstrip(":")] = int(head[1])
        return fields

    def close(self):
        self.libc.munmap(self.base, self.nbytes + 2 * os.sysconf("SC_PAGE_SIZE"))


@needs_collapse
def test_dense_memory_moves_onto_huge_pages():
    mapping = Mapping(12 * MiB)
    try:
        mapping.bytes[:] = 7  # every page resident: at least five aligned 2 MiB blocks inside 12 MiB
        # the kernel answers EAGAIN while it has no free huge page (another process churning the page cache
        # fragments memory); a later scan gets one, as the keeper's do, and compaction makes one where allowed
        for attempt in range(5):
            # what collapse_dense reports counts every dense region of the process: this mapping's own pages decide
            huge_pages.collapse_dense()
            if mapping.smaps()["AnonHugePages"] >= 5 * 2048:
                break
            if attempt == 1 and os.access("/proc/sys/vm/compact_memory", os.W_OK):
                with open("/proc/sys/vm/compact_memory", "w") as compact:
                    compact.write("1")
            time.sleep(0.5)
        else:
            pytest.skip("the kernel had no free 2 MiB page in five scans (memory fragmented by other processes)")
        after = mapping.smaps()
        assert after["AnonHugePages"] >= 5 * 2048, after
        assert after["Rss"] <= 12 * 1024, after  # nothing outside the mapping was added to it
        assert np.all(mapping.bytes == 7)  # collapsing copies: the contents are unchanged
    finally:
        mapping.close()


@needs_collapse
def test_sparse_memory_stays_on_small_pages_and_rss_does_not_grow():
    mapping = Mapping(12 * MiB)
    try:
        mapping.bytes[::64 * 1024] = 1  # one page in 16 resident: collapsing would fill the rest
        before = mapping.smaps()
        huge_pages.collapse_dense()
        after = mapping.smaps()
        assert after["Rss"] <= before["Rss"], (before, after)
        assert after["AnonHugePages"] <= before["AnonHugePages"]
    finally:
        mapping.close()


def test_the_model_keeper_collapses_in_the_background_and_stops_with_the_model(tiny_package):
    package = tiny_package[0]
    model = edge_moe.load(package)
    keeper = model.huge_pages
    model.settle()
    ids = [1, 2, 3, 4]
    expected = edge_moe.load(package, huge_pages=False).logits(ids)
    np.testing.assert_array_equal(model.logits(ids), expected)
    stats = model.expert_stats()
    assert stats["huge_pages_off"] == huge_pages.unsupported_reason()
    if stats["huge_pages_off"] is None:
        assert stats["huge_pages_mib"] > 0  # the process holds dense resident memory: some of it moved
    model.close()
    assert not any(t.name == "edge-moe-huge-pages" and t is keeper._thread for t in threading.enumerate())
