"""The budgeted cache: same tokens as all-resident, the budget never exceeded, pinning, errors, two threads."""

import json
import shutil
import threading

import numpy as np
import pytest

import edge_moe
from edge_moe.budget import full_budget, minimum_budget, parse_budget
from edge_moe import cache as cache_module
from edge_moe.cache import ExpertCache, store_for
from edge_moe.errors import EdgeMoeError
from edge_moe.manifest import Manifest
from edge_moe.policies import make_policy
from edge_moe_export.exporter import export_checkpoint

from conftest import build_checkpoint, tiny_config


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    build_checkpoint(root / "hf", tiny_config("qwen3_moe", layers=3, experts=16, top_k=2, hidden=64, ffn=96))
    return export_checkpoint(root / "hf", root / "pkg", progress=False)


PROMPT = list(range(3, 40))


@pytest.mark.parametrize("policy, prefetch", [("lru", 0), ("lfu", 1), ("adaptive", 1), ("adaptive", 2)])
def test_quarter_budget_generates_the_same_tokens(package, policy, prefetch):
    expected = edge_moe.load(package).generate(PROMPT, max_new_tokens=16).token_ids
    model = edge_moe.load(package, budget="25%", policy=policy, prefetch=prefetch)
    result = model.generate(PROMPT, max_new_tokens=16)
    assert result.token_ids == expected
    stats = result.stats
    assert stats["misses"] > 0 and stats["bytes_read"] > 0, "a 25% budget must stream experts"
    assert stats["peak_resident_bytes"] <= model.budget


def test_budget_never_exceeded_on_random_routing(package):
    manifest = Manifest.load(package)
    rng = np.random.default_rng(0)
    for policy in ("lru", "lfu", "adaptive"):
        budget = int(minimum_budget(manifest) * 1.7)
        cache = ExpertCache(manifest, store_for(manifest), make_policy(policy), budget)
        real_start = cache._start_read

        def checked_start(key, **kw):
            real_start(key, **kw)
            assert cache.used <= cache.budget, (policy, cache.used, cache.budget)

        cache._start_read = checked_start
        for step in range(60):
            layer = int(rng.integers(0, 3))
            experts = rng.choice(16, size=int(rng.integers(1, 6)), replace=False).tolist()
            for expert in cache.fetch(layer, experts):
                assert expert.record.layer == layer
            cache.prefetch((layer + 1) % 3, rng.choice(16, size=3, replace=False).tolist())
            resident = sum(cache.size(k) for k in cache.resident) + sum(cache.size(k) for k in cache.inflight)
            spare = sum(size * len(buffers) for size, buffers in cache._spare.items())  # recycled buffers count too
            assert resident + spare == cache.used <= cache.budget


def test_budget_parsing_and_minimum(package):
    manifest = Manifest.load(package)
    assert parse_budget("100%", manifest) == full_budget(manifest)
    assert parse_budget("2GiB", manifest) == 2 * 2**30
    assert parse_budget("1.5MB", manifest) == 1_500_000
    with pytest.raises(EdgeMoeError, match=f"minimum of {minimum_budget(manifest):,} bytes"):
        parse_budget("1KB", manifest)
    with pytest.raises(EdgeMoeError, match="not understood"):
        parse_budget("lots", manifest)


def test_pinned_experts_stay(package):
    model = edge_moe.load(package, budget=minimum_budget(Manifest.load(package)) * 2, policy="lru")
    pinned = [(0, 0), (1, 1)]
    model.pin(pinned)
    model.generate(PROMPT, max_new_tokens=8)
    assert all(model.experts.snapshot()[k] == "pinned" for k in pinned)


def test_corrupt_expert_under_budget_is_reported_and_cache_stays_consistent(package, tmp_path):
    broken = tmp_path / "pkg"
    shutil.copytree(package, broken)
    manifest = Manifest.load(broken)
    record = manifest.experts[(1, 3)]
    data = bytearray(record.blob.read_bytes())
    data[record.offset + 10] ^= 0xFF
    record.blob.write_bytes(bytes(data))
    cache = ExpertCache(manifest, store_for(manifest), make_policy("lru"), full_budget(manifest))
    with pytest.raises(EdgeMoeError, match="checksum"):
        list(cache.fetch(1, [2, 3, 4]))
    accounted = sum(cache.size(k) for k in list(cache.resident) + list(cache.inflight)) + cache.spare_bytes
    assert cache.used == accounted and (1, 3) not in cache.resident
    assert len(list(cache.fetch(0, [0, 1]))) == 2  # still usable


def test_two_threads_share_one_model(package):
    expected = edge_moe.load(package).generate(PROMPT, max_new_tokens=12).token_ids
    model = edge_moe.load(package, budget="30%")
    results, errors = {}, []

    def worker(name):
        try:
            results[name] = model.generate(PROMPT, max_new_tokens=12).token_ids
        except Exception as exc:  # noqa: BLE001 - the test reports whatever happened
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == expected and results[1] == expected


def test_cli_trace_lines(package, tmp_path):
    from edge_moe.cli import main

    trace = tmp_path / "trace.jsonl"
    assert main(["generate", "--model", str(package), "--prompt-ids", "5,6,7", "-n", "4", "--budget", "25%",
                 "--trace", str(trace), "--json"]) == 0
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 4 * 3  # 4 forward steps (prefill + 3 decodes) x 3 MoE layers
    assert set(lines[0]) == {"step", "layer", "experts", "hit"}
    assert all(len(line["experts"]) == len(line["hit"]) for line in lines)
    assert not any(lines[0]["hit"]), "nothing is resident before the first step"


def test_recycled_buffers_stay_within_the_budget(package):
    manifest = Manifest.load(package)
    budget = int(minimum_budget(manifest) * 1.5)
    cache = ExpertCache(manifest, store_for(manifest), make_policy("lru"), budget)
    fresh = []
    real_empty = cache_module.aligned_empty

    def counted_empty(nbytes):
        fresh.append(nbytes)
        return real_empty(nbytes)

    cache_module.aligned_empty, allocated = counted_empty, None
    try:
        rng = np.random.default_rng(1)
        for step in range(40):
            layer = step % 3
            keys = rng.choice(16, size=2, replace=False).tolist()
            for expert in cache.fetch(layer, keys):
                assert expert.record.layer == layer
            cache.prefetch((layer + 1) % 3, rng.choice(16, size=2, replace=False).tolist())
            held = sum(cache.size(k) for k in list(cache.resident) + list(cache.inflight)) + cache.spare_bytes
            assert held == cache.used <= budget
        allocated = len(fresh)
    finally:
        cache_module.aligned_empty = real_empty
    # every buffer ever allocated fits in the budget at once: after warm-up, reads land in evicted experts' buffers
    assert allocated * cache.size((0, 0)) <= budget
    assert cache.stats.evictions > 0 and cache.store.stats.reads > allocated


def test_demand_miss_keeps_its_experts_while_prefetches_are_dropped(package):
    manifest = Manifest.load(package)
    cache = ExpertCache(manifest, store_for(manifest), make_policy("adaptive"), minimum_budget(manifest))
    for _ in range(3):
        cache.prefetch(1, [5, 6])  # at the minimum budget a prefetch can only use room nobody needs
        got = [e.record.key for e in cache.fetch(0, [0, 1])]
        assert got == [(0, 0), (0, 1)] and cache.used <= cache.budget


def test_prefetch_gate_skips_reads_of_predictions_that_are_mostly_wrong(package):
    manifest = Manifest.load(package)
    cache = ExpertCache(manifest, store_for(manifest), make_policy("lru"), full_budget(manifest))
    list(cache.fetch(0, [0, 1]))  # layer 0 runs: a prediction for layer 1 is one layer ahead
    cache.gate.counts[(1, 0)] = [10.0, 100.0]  # rank-0 predictions one layer ahead: right 10 % of the time
    cache.prefetch(1, [2, 3])
    assert (1, 2) not in cache.inflight and (1, 2) not in cache.resident  # skipped: no read
    assert (1, 3) in cache.inflight or (1, 3) in cache.resident  # rank 1 has no record yet: read
    assert cache.stats.prefetch_skipped == 1 and cache.stats.prefetch_issued == 1
    list(cache.fetch(1, [2, 3]))  # both were used: the gate learns from the skipped prediction too
    assert cache.gate.counts[(1, 0)] == [11.0, 101.0]


def test_prefetch_reads_fewer_uncertain_predictions_while_the_disk_is_saturated(package, monkeypatch):
    """The cache tells the gate how busy its store has been: a store busy all the time (its busy seconds grow with
    the clock) raises the threshold over a bucket right 80 % of the time, which an idle store reads."""
    import time

    manifest = Manifest.load(package)
    readings = {}
    for load in (0.0, 1.0):
        store = store_for(manifest)
        start = time.perf_counter()
        monkeypatch.setattr(store, "busy_seconds", lambda: load * (time.perf_counter() - start))
        cache = ExpertCache(manifest, store, make_policy("lru"), full_budget(manifest))
        cache.gate.window = 0.01  # the load is averaged over a hundredth of a second, not half a second
        list(cache.fetch(0, [0, 1]))
        cache.gate.counts[(1, 0)] = [80.0, 100.0]
        for _ in range(5):  # prefetches of nothing: each gives the gate the store's load since the last
            time.sleep(0.02)
            cache.prefetch(1, [])
        cache.prefetch(1, [2])
        readings[load] = (1, 2) in cache.inflight or (1, 2) in cache.resident
    assert readings == {0.0: True, 1.0: False}


def test_ready_first_hands_out_resident_experts_while_a_miss_reads(package):
    """The generation loop computes the experts it has while a miss is still on its way, and learns each one's
    position; a plain fetch keeps routing order (the loop sums results in routing order either way: test above)."""
    manifest = Manifest.load(package)
    store = store_for(manifest)
    cache = ExpertCache(manifest, store, make_policy("lru"), full_budget(manifest))
    list(cache.fetch(0, [1]))  # (0, 1) is resident now
    held = {}
    real_submit = store.submit

    def submit(key, into=None, priority=0):
        if key == (0, 2):  # this read does not land until the test says so
            held["future"] = future = cache_module.concurrent.futures.Future()
            held["args"] = (key, into)
            return future
        return real_submit(key, into=into, priority=priority)

    def land():
        if held["future"].set_running_or_notify_cancel():
            held["future"].set_result(store.read(*held["args"]))

    store.submit = submit
    handed = cache.fetch_ready_first(0, [2, 1])
    safety = threading.Timer(5.0, land)  # lands the read anyway, so a wrong order fails instead of hanging
    safety.start()
    position, expert = next(handed)
    landed_first = held["future"].done()
    safety.cancel()
    assert (position, expert.record.key) == (1, (0, 1)) and not landed_first  # handed out before the miss landed
    land()
    position, expert = next(handed)
    assert (position, expert.record.key) == (0, (0, 2))
    assert list(handed) == []
