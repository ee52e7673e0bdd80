"""Emulation: the flash throttle holds its bandwidth, budgets follow the profile, the cgroup limit is real or
skipped with its reason."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xxhash

from edge_moe.emulate import RUNTIME_OVERHEAD, TokenBucket, emulation_options, memory_limit, profile_budget
from edge_moe.errors import EdgeMoeError
from edge_moe.profiles import load_profile
from edge_moe.store import ExpertLocation, ExpertStore

from conftest import fake_expert_record


def test_token_bucket_rejects_bad_rates():
    with pytest.raises(EdgeMoeError, match="rate"):
        TokenBucket(0)
    with pytest.raises(EdgeMoeError, match="latency"):
        TokenBucket(1e6, latency=-1)


def test_throttled_store_holds_the_bandwidth(tmp_path):
    size, count, rate = 256 << 10, 24, 20e6  # 6 MiB at 20 MB/s: 0.31 s
    blob = tmp_path / "blob.bin"
    payload = np.random.default_rng(0).integers(0, 256, size * count, dtype=np.uint8)
    blob.write_bytes(payload.tobytes())
    locs = [ExpertLocation((0, i), str(blob), i * size, size,
                           "xxh3_64:" + xxhash.xxh3_64_hexdigest(payload[i * size:(i + 1) * size]))
            for i in range(count)]
    with ExpertStore(locs, io_threads=3, throttle=TokenBucket(rate)) as store:
        start = time.perf_counter()
        futures = [store.submit((0, i)) for i in range(count)]
        for f in futures:
            f.result()
        seconds = time.perf_counter() - start
    measured = size * count / seconds
    assert measured == pytest.approx(rate, rel=0.10)


def test_latency_is_charged_per_read():
    # reserve() without sleeping: ten back-to-back reads finish 10 x (latency + bytes / rate) after the first starts
    bucket = TokenBucket(1e6, latency=0.01)
    start = time.monotonic()
    deadlines = [bucket.reserve(4096) for _ in range(10)]
    assert deadlines[-1] - start == pytest.approx(10 * (0.01 + 4096 / 1e6), abs=2e-3)
    assert deadlines == sorted(deadlines)


def fake_manifest(backbone=100_000_000, experts=8, length=3 << 20, top_k=2):
    records = {(0, i): fake_expert_record(0, length) for i in range(experts)}
    return SimpleNamespace(backbone_bytes=backbone, experts=records, config={"top_k": top_k})


def test_budget_is_usable_ram_minus_backbone_and_runtime():
    p = load_profile("rpi4-2gb-usb-ssd")  # 2 GB x 0.6 usable
    m = fake_manifest(experts=1000)
    assert profile_budget(p, m) == int(2e9 * 0.6) - 100_000_000 - RUNTIME_OVERHEAD
    small = fake_manifest(experts=4)  # everything fits: the budget is all experts
    assert profile_budget(p, small) == 4 * ((3 << 20) + 4096)
    with pytest.raises(EdgeMoeError, match="usable RAM cannot hold"):
        profile_budget(p, fake_manifest(backbone=2_000_000_000))


def test_emulation_options_report_real_and_emulated():
    kwargs, report = emulation_options("laptop-16gb-nvme-dgpu", fake_manifest(), host_cores=2)
    assert kwargs["threads"] == 2 and kwargs["throttle"].rate == 5000e6 and "budget" in kwargs
    text = "\n".join(report)
    assert "profile has 8; this machine has 2" in text and "emulated" in text and "not emulated" in text


def test_memory_cgroup_limit_or_clear_skip():
    with memory_limit(4 << 30) as limit:
        if not limit.real:
            assert limit.reason
            pytest.skip(f"no memory cgroup here: {limit.reason}")
        assert "edge_moe_" in Path("/proc/self/cgroup").read_text()
        assert "real" in limit.describe()
    assert "edge_moe_" not in Path("/proc/self/cgroup").read_text()
    assert not Path(limit.cgroup.split()[-1]).exists()


def test_memory_limit_disabled():
    with memory_limit(1 << 30, enabled=False) as limit:
        assert not limit.real and "disabled" in limit.describe()
