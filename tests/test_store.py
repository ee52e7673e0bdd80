"""ExpertStore: correct bytes, page cache really bypassed (mincore), clear errors, thread safety."""
import ctypes
import ctypes.util
import errno
import mmap
import os
import threading

import numpy as np
import pytest
import xxhash

from edge_moe import store as store_mod
from edge_moe.errors import EdgeMoeError
from edge_moe.store import ALIGN, ExpertLocation, ExpertStore

# a few experts of odd lengths, 4096-aligned offsets, blob padded to 4096 (format v1)
LENGTHS = [300_000, 4096, 1_000_001, 77]


def write_blob(path, lengths=LENGTHS, layer=0, seed=0):
    rng = np.random.default_rng(seed)
    locs, chunks, off = [], [], 0
    for i, n in enumerate(lengths):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        locs.append(ExpertLocation((layer, i), str(path), off, n, "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)))
        pad = (-n) % ALIGN
        chunks.append(data + b"\0" * pad)
        off += n + pad
    with open(path, "wb") as f:
        f.write(b"".join(chunks))
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted; make them clean first
    return locs, [c[:n] for c, n in zip(chunks, lengths)]


def test_reads_match_written_bytes(tmp_path):
    locs, datas = write_blob(tmp_path / "layer_000.bin")
    with ExpertStore(locs) as st:
        for loc, data in zip(locs, datas):
            got = st.read(loc.key)
            assert got.dtype == np.uint8 and got.shape == (loc.length,)
            assert got.tobytes() == data
        assert st.stats.reads == len(locs)
        assert st.stats.bytes_read == sum(LENGTHS)
        assert st.stats.direct_reads + st.stats.buffered_reads == len(locs)


def test_buffer_is_aligned(tmp_path):
    locs, _ = write_blob(tmp_path / "b.bin")
    with ExpertStore(locs) as st:
        arr = st.read((0, 0))
        assert arr.ctypes.data % ALIGN == 0  # offset 0 in the blob -> the view starts at the aligned buffer


# -- page cache residency via mincore ---------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path, offset, length):
    """How many pages of path[offset:offset+length] are in the page cache (mapping them faults nothing in)."""
    page = mmap.PAGESIZE
    start = offset - offset % page
    n = length + (offset - start)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = ctypes.create_string_buffer((n + page - 1) // page)
            if _libc.mincore(addr, n, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, n)
    finally:
        os.close(fd)


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evictable_blob(tmp_path):
    """A blob whose pages we can evict and observe, or skip saying why (tmpfs and friends cannot evict)."""
    path = tmp_path / "layer_000.bin"
    locs, datas = write_blob(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.read()  # fault everything in, so "0 resident" later is the store's doing, not a cold file
    if resident_pages(path, 0, size) == 0:
        pytest.skip(f"{tmp_path}: mincore reports no cached pages even after reading; cannot observe the page cache")
    evict(path)
    if resident_pages(path, 0, size) != 0:
        pytest.skip(f"{tmp_path}: fadvise(DONTNEED) does not evict here (tmpfs?); "
                    "run the tests with --basetemp on a disk-backed filesystem such as /var/tmp")
    return path, locs, datas


@pytest.mark.parametrize("direct", [True, False])
def test_cold_read_bypasses_page_cache(tmp_path, direct):
    path, locs, datas = evictable_blob(tmp_path)
    with ExpertStore(locs, direct=direct) as st:
        big = locs[2]  # 1 MB: 245 pages that a buffered read without fadvise would leave behind
        assert st.read(big.key).tobytes() == datas[2]
        assert resident_pages(path, big.offset, big.length) == 0
        if direct:
            assert st.stats.direct_reads == 1, "O_DIRECT works on this filesystem but the store did not use it"
        else:
            assert st.stats.buffered_reads == 1


def test_falls_back_to_buffered_when_odirect_refused(tmp_path, monkeypatch):
    locs, datas = write_blob(tmp_path / "b.bin")
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *a)

    monkeypatch.setattr(store_mod.os, "open", no_direct)
    with ExpertStore(locs) as st:
        for loc, data in zip(locs, datas):
            assert st.read(loc.key).tobytes() == data
        assert st.stats.buffered_reads == len(locs) and st.stats.direct_reads == 0


# -- errors -----------------------------------------------------------------------------------------

def test_corrupted_byte_raises_checksum_error(tmp_path):
    path = tmp_path / "layer_003.bin"
    locs, datas = write_blob(path, layer=3)
    with open(path, "r+b") as f:
        f.seek(locs[2].offset + 12345)
        b = f.read(1)
        f.seek(locs[2].offset + 12345)
        f.write(bytes([b[0] ^ 0x40]))
    with ExpertStore(locs) as st:
        with pytest.raises(EdgeMoeError) as ei:
            st.read((3, 2))
        msg = str(ei.value)
        assert str(path) in msg and "layer 3, index 2" in msg and "re-export" in msg
        assert st.read((3, 1)).tobytes() == datas[1]  # the store stays usable
        assert st.stats.reads == 1  # the failed read is not counted as delivered


def test_truncated_blob_raises_clear_error(tmp_path):
    path = tmp_path / "layer_000.bin"
    locs, datas = write_blob(path)
    cut = locs[2].offset + 5000
    os.truncate(path, cut)
    with ExpertStore(locs) as st:
        for key in [(0, 2), (0, 3)]:
            with pytest.raises(EdgeMoeError) as ei:
                st.read(key)
            loc = locs[key[1]]
            msg = str(ei.value)
            assert str(path) in msg and f"offset {loc.offset}" in msg and str(loc.length) in msg
        assert "ends after 5000" in str(pytest.raises(EdgeMoeError, st.read, (0, 2)).value)
        assert st.read((0, 0)).tobytes() == datas[0]


def test_missing_file_and_unknown_key(tmp_path):
    loc = ExpertLocation((0, 0), str(tmp_path / "nope.bin"), 0, 10, "xxh3_64:" + "0" * 16)
    with ExpertStore([loc]) as st:
        with pytest.raises(EdgeMoeError, match="nope.bin.*offset 0, length 10"):
            st.read((0, 0))
        with pytest.raises(EdgeMoeError, match=r"\(5, 5\)"):
            st.read((5, 5))


def test_bad_checksum_format_rejected(tmp_path):
    loc = ExpertLocation((1, 2), "/x.bin", 0, 10, "crc32:1234")
    with pytest.raises(EdgeMoeError, match=r"\(1, 2\).*crc32:1234"):
        ExpertStore([loc])


def test_submit_errors_come_back_through_the_future(tmp_path):
    path = tmp_path / "b.bin"
    locs, _ = write_blob(path)
    os.truncate(path, 4096)
    with ExpertStore(locs) as st:
        with pytest.raises(EdgeMoeError, match="truncated"):
            st.submit((0, 2)).result()


# -- concurrency ------------------------------------------------------------------------------------

def test_concurrent_submits_from_two_threads(tmp_path):
    locs, datas = [], []
    for layer in range(2):  # two blobs so the fd table is populated concurrently too
        l, d = write_blob(tmp_path / f"layer_{layer:03d}.bin", layer=layer, seed=layer)
        locs += l
        datas += d
    want = {loc.key: data for loc, data in zip(locs, datas)}
    errors = []
    with ExpertStore(locs, io_threads=3) as st:
        def worker(seed):
            rng = np.random.default_rng(seed)
            keys = [locs[i].key for i in rng.integers(0, len(locs), 40)]
            futs = [(k, st.submit(k)) for k in keys]
            for k, f in futs:
                if f.result().tobytes() != want[k]:
                    errors.append(k)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert st.stats.reads == 80
    assert errors == []


def test_sequential_bandwidth_and_hash_bandwidth(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(2 << 20))
    try:
        bw = ExpertStore.sequential_bandwidth(str(path), nbytes=2 << 20, block=1 << 20)
    except EdgeMoeError as e:
        pytest.skip(str(e))
    assert bw > 0
    assert store_mod.hash_bandwidth(1 << 20) > 0


# -- recycled buffers and priorities ----------------------------------------------------------------

def test_read_into_a_recycled_buffer(tmp_path):
    locs, datas = write_blob(tmp_path / "b.bin")
    with ExpertStore(locs) as st:
        buf = store_mod.aligned_empty(max(st.buffer_size(loc.key) for loc in locs))
        for loc, data in zip(locs, datas):
            got = st.submit(loc.key, into=buf).result()
            assert got.tobytes() == data and got.ctypes.data == buf.ctypes.data  # no copy, no new buffer
        with pytest.raises(EdgeMoeError, match="at least"):
            st.read(locs[0].key, into=store_mod.aligned_empty(4096))
        with pytest.raises(EdgeMoeError, match="aligned"):
            st.read(locs[1].key, into=store_mod.aligned_empty(3 * 4096)[1:])


def test_demand_reads_overtake_queued_prefetches(tmp_path, monkeypatch):
    locs, _ = write_blob(tmp_path / "b.bin")
    gate, order = threading.Event(), []
    with ExpertStore(locs, io_threads=1) as st:
        real_read = st.read

        def logged_read(key, into=None):
            gate.wait()
            order.append(key)
            return real_read(key, into)

        monkeypatch.setattr(st, "read", logged_read)
        blocker = st.submit(locs[0].key, priority=0)  # occupies the one I/O thread until the gate opens
        late = [st.submit(locs[i].key, priority=2) for i in (1, 2)]
        near = st.submit(locs[3].key, priority=1)
        demand = st.submit(locs[0].key, priority=0)
        st.prioritize(late[1], 0)  # the model now waits for this prefetch
        dropped = st.submit(locs[1].key, priority=3)
        assert dropped.cancel()
        gate.set()
        for f in [blocker, demand, near, *late]:
            f.result()
        assert dropped.cancelled()
    assert order == [(0, 0), (0, 0), (0, 2), (0, 3), (0, 1)]


def test_sequential_bandwidth_measures_files_smaller_than_a_block(tmp_path):
    """Small models have blobs of a few MB: the block shrinks to the file instead of refusing it."""
    path = tmp_path / "small.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3 * 4096 + 100, dtype=np.uint8).tobytes())
    try:
        bandwidth = ExpertStore.sequential_bandwidth(str(path))
    except EdgeMoeError as exc:  # a filesystem without O_DIRECT (tmpfs) says so; the size must not be the reason
        assert "O_DIRECT" in str(exc)
        pytest.skip(f"no O_DIRECT here: {exc}")
    assert bandwidth > 0
