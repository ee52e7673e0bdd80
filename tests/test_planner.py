"""The planner's cost model on hand-computed cases (a one-layer model, four 12 KiB experts, a trace of 4 steps)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edge_moe import quant
from edge_moe.errors import EdgeMoeError
from edge_moe.expert_graph import ExpertShape
from edge_moe.planner import load_routing, plan, predict
from edge_moe.profiles import load_profile

from conftest import fake_expert_record

LENGTH = 3 * 4096  # footprint: 3 pages + 1 page of slack = 16 KiB
SEQ = LENGTH * 100  # one expert read = 10 ms


def manifest():
    experts = {(0, i): fake_expert_record(0, LENGTH) for i in range(4)}
    config = {"hidden_size": 8, "moe_intermediate_size": 8, "vocab_size": 10, "top_k": 1, "moe_layers": [0],
              "tie_word_embeddings": False}
    return SimpleNamespace(config=config, dtype="float32", backbone_bytes=1000, expert_bytes=4 * LENGTH,
                           experts=experts)


def profile(seq=SEQ, ram=10**9):
    p = load_profile("rpi5-8gb-nvme")
    p.flash_seq_read = p.flash_rand4k_read = float(seq)  # no per-read latency
    p.ram_bytes, p.usable_fraction = ram, 1.0
    p.measured = {"hash_gb_s": 1e9, "expert_shape": "8x8", "expert_ms": {"cpu": {"m1": 1.0}},
                  "model": {"shape": "8x8", "dtype": "float32", "moe_layers": 1, "backbone_bytes": 1000,
                            "decode_ms_per_token": 10.0, "prefill_ms_per_token": 2.0}}
    return p


# expert 0 (prompt), then 1, 0, 2: under LRU with room for 2 experts: miss, miss, hit, miss (evicts 1)
STATS = {"format_version": 1, "prompt_tokens": 1, "prefetch_precision": 1.0, "prefetch_recall": 0.5,
         "steps": [[[0, [0]]], [[0, [1]]], [[0, [0]]], [[0, [2]]]]}


def test_decode_without_prefetch_adds_io_to_compute():
    r = predict(manifest(), STATS, profile(), budget=2 * 16384, policy="lru", prefetch=0)
    # step times: 10 ms compute + 10 ms per miss -> decode steps 20, 10, 20 ms -> 3 tokens / 50 ms
    assert r["decode_tokens_per_second"] == pytest.approx(60.0, rel=1e-3)
    assert r["hit_rate"] == pytest.approx(0.25)
    assert r["bytes_read_per_token"] == pytest.approx(2 * LENGTH / 3)
    # prefill: 1 token x 2 ms + (step 0: 20 ms) - its 10 ms decode compute = 12 ms
    assert r["prefill_tokens_per_second"] == pytest.approx(1 / 0.012, rel=1e-3)
    assert r["peak_memory_bytes"] > 1000 + 2 * 16384


def test_prefetch_overlaps_by_recall():
    r = predict(manifest(), STATS, profile(), budget=2 * 16384, policy="lru", prefetch=1)
    # max(10, 10) + (1 - 0.5) x 10 = 15 ms per missing step: 15 + 10 + 15 ms for 3 tokens
    assert r["decode_tokens_per_second"] == pytest.approx(75.0, rel=1e-3)


def test_half_bitwidth_halves_reads_and_expert_compute():
    r = predict(manifest(), STATS, profile(), budget=2 * 16384, policy="lru", prefetch=0, bits=16)
    # reads 5 ms; compute 10 - 1 x (1 - 0.5) = 9.5 ms: 14.5 + 9.5 + 14.5 ms
    assert r["decode_tokens_per_second"] == pytest.approx(3 / 0.0385, rel=1e-3)


def test_a_quantized_expert_costs_its_session_where_the_kernels_do_not_run():
    """cpu.isa decides what a resident quantized expert costs: its read buffer where edge_moe's kernels read it
    (x86-64-v3), its MatMulNBits session's prepacked weights beside it elsewhere (arm64): the same budget holds all
    four experts on one and one on the other."""
    q4 = manifest()
    for record in q4.experts.values():
        record.dtype, record.block_size = "q4", 32  # 512 x 512: large enough for a session of its own
    session = quant.session_bytes(ExpertShape("swiglu", 512, 512, "q4", 32))
    assert session > 16 * 16384  # the session, not the 16 KiB buffer, is the cost
    budget = 2 * (16384 + session) - 1
    x86, arm = profile(), profile()
    x86.isa, arm.isa = "x86-64-v3", "arm64"
    on_x86 = predict(q4, STATS, x86, budget=budget, policy="lru", prefetch=0)
    on_arm = predict(q4, STATS, arm, budget=budget, policy="lru", prefetch=0)
    # x86: 0, 1, 0 (hit), 2; arm, room for one: every step misses
    assert on_x86["hit_rate"] == pytest.approx(0.25) and on_arm["hit_rate"] == 0.0
    assert on_arm["bytes_read_per_token"] > on_x86["bytes_read_per_token"]
    # the recommended budget for every expert: their buffers on one, the sessions too on the other
    assert plan(q4, STATS, x86)["budget_bytes"] == 4 * 16384
    assert plan(q4, STATS, arm)["budget_bytes"] == 4 * (16384 + session)


def test_what_if_bitwidths_scale_from_the_packaged_experts():
    """A 4-bit package's what-ifs scale from 4 bits (its manifest dtype is its float backbone's): 4 bits is the
    package itself, 32 bits reads 1 / 0.156 as many bytes a miss, and the plan does not prefer 32 bits for nothing."""
    q4 = manifest()
    for record in q4.experts.values():
        record.dtype, record.block_size = "q4", 32
    x86 = profile()
    x86.isa = "x86-64-v3"  # every expert its buffer; a budget they all fit in at any width: the same misses
    as_packaged = predict(q4, STATS, x86, budget=10**7, policy="lru", prefetch=0)
    at_4 = predict(q4, STATS, x86, budget=10**7, policy="lru", prefetch=0, bits=4)
    at_32 = predict(q4, STATS, x86, budget=10**7, policy="lru", prefetch=0, bits=32)
    assert as_packaged["bits"] == 4 and at_4["decode_tokens_per_second"] == as_packaged["decode_tokens_per_second"]
    assert at_32["bytes_read_per_token"] == pytest.approx(as_packaged["bytes_read_per_token"] / 0.156, rel=0.01)
    assert at_32["decode_tokens_per_second"] < as_packaged["decode_tokens_per_second"]


def test_plan_names_flash_as_the_bottleneck_when_reads_dominate():
    result = plan(manifest(), STATS, profile(seq=LENGTH * 2, ram=10**9), tokens=None)
    assert result["fits_in_ram"] and result["bottleneck"] == "flash bandwidth"
    result = plan(manifest(), STATS, profile(seq=LENGTH * 10**5), tokens=None)
    assert result["bottleneck"].startswith("compute")


def test_prompt_larger_than_budget_is_an_error():
    stats = dict(STATS, steps=[[[0, [0, 1, 2]]], [[0, [0]]]])
    with pytest.raises(EdgeMoeError, match="over the .* expert budget"):
        predict(manifest(), stats, profile(), budget=2 * 16384, policy="lru")


def test_missing_routing_stats_say_how_to_record(tmp_path):
    with pytest.raises(EdgeMoeError, match="--record"):
        load_routing(tmp_path)


def test_measured_cost_of_a_miss_adds_to_compute():
    p = profile()
    p.measured["model"]["miss_overhead_ms"] = 2.0  # what `edge-moe profile` measured per miss on these shapes
    r = predict(manifest(), STATS, p, budget=2 * 16384, policy="lru", prefetch=0)
    # step times: (10 + 2) ms compute + 10 ms read per miss -> 22, 10, 22 ms for 3 tokens
    assert r["decode_tokens_per_second"] == pytest.approx(3 / 0.054, rel=1e-3)
    r = predict(manifest(), STATS, p, budget=2 * 16384, policy="lru", prefetch=1)
    # max(10, 12) + (1 - 0.5) x 10 = 17 ms per missing step: 17 + 10 + 17 ms
    assert r["decode_tokens_per_second"] == pytest.approx(3 / 0.044, rel=1e-3)


def two_layer_manifest():
    experts = {(layer, i): fake_expert_record(layer, LENGTH) for layer in (0, 1) for i in range(4)}
    config = dict(manifest().config, top_k=2, moe_layers=[0, 1])
    return SimpleNamespace(config=config, dtype="float32", backbone_bytes=1000, expert_bytes=8 * LENGTH,
                           experts=experts)


def test_a_prefetched_read_hides_behind_at_most_the_compute_it_was_issued_ahead_of():
    # the decode step reads two new experts at layer 0 (2 x 10 ms) and none at layer 1; compute is measured at 10 ms
    # per MoE layer (profile()), so 20 ms a token
    stats = dict(STATS, prefetch_recall=1.0, steps=[[[0, [0, 1]], [1, [0, 1]]], [[0, [2, 3]], [1, [0, 1]]]])
    # depth 1: the reads hide behind one layer's 10 ms -> stall 20 - 10 = 10 ms -> 20 + 10 = 30 ms a token
    r = predict(two_layer_manifest(), stats, profile(), budget=8 * 16384, policy="lru", prefetch=1)
    assert r["decode_tokens_per_second"] == pytest.approx(1 / 0.030, rel=1e-3)
    # depth 2: two layers' 20 ms ahead -> no stall -> 20 ms (the old max(IO, C) + (1 - recall) x min(IO, C) said 20
    # at any depth)
    r = predict(two_layer_manifest(), stats, profile(), budget=8 * 16384, policy="lru", prefetch=2)
    assert r["decode_tokens_per_second"] == pytest.approx(1 / 0.020, rel=1e-3)


def test_unmeasured_device_costs_weight_streaming_plus_per_layer_glue_scaled_by_core_speed():
    from edge_moe.planner import GLUE_REF_GFLOPS_PER_CORE, LAYER_GLUE_S, STREAM_EFFICIENCY, compute_costs

    p = profile()
    p.measured = {}
    p.memory_bandwidth, p.cpu_flops, p.cores = 10e9, 4 * GLUE_REF_GFLOPS_PER_CORE * 1e9 / 2, 4  # cores half as fast
    costs = compute_costs(manifest(), p)
    # backbone 1000 bytes minus the 10 x 8 x 4-byte embedding table, plus the top-1 expert, at 60 % of 10 GB/s;
    # one MoE layer of glue at twice the reference time
    streamed = (1000 - 10 * 8 * 4 + LENGTH) / (STREAM_EFFICIENCY * 10e9)
    assert costs["decode_s"] == pytest.approx(streamed + 2 * LAYER_GLUE_S)
