"""Continuous batching: sequences decoded together give each request the tokens it gets alone (greedy), on every
family's test model with every expert resident and under a small budget, with requests joining and leaving."""

import os
import threading

import numpy as np
import pytest

import edge_moe
from edge_moe import native
from edge_moe.budget import full_budget, minimum_budget

from conftest import EXPERT_KEY, build_checkpoint, tiny_config

PROMPTS = [[5, 6, 7, 8], [9, 3], [11, 12, 13, 14, 15, 16], [2, 40, 41], [7], [30, 31, 32, 33, 34]]
LENGTHS = [9, 14, 5, 11, 7, 12]  # different lengths: sequences leave the batch at different steps


@pytest.fixture(scope="module", params=sorted(EXPERT_KEY) + ["qwen3_moe-gqa", "qwen3_moe-gqa-float16"])
def package(request, tmp_path_factory):
    """Every family with plain-ONNX attention; a head size of 16 gets the GroupQueryAttention kernel, and in float16
    edge_moe's layer kernel (native_layer.py) where this CPU runs it."""
    from edge_moe_export.exporter import export_checkpoint

    family, _, kernel = request.param.partition("-")
    kernel, _, dtype = kernel.partition("-")
    root = tmp_path_factory.mktemp(request.param)
    extra = {"hidden": 64} if kernel else {}
    if family == "deepseek_v3":  # group-limited routing needs whole groups of at least two experts
        extra.update(n_group=2, topk_group=1)
    build_checkpoint(root / "hf", tiny_config(family, experts=8, **extra))
    package = export_checkpoint(root / "hf", root / "pkg", progress=False, **({"dtype": dtype} if dtype else {}))
    model = edge_moe.load(package)
    assert model.config.get("attention_kernel", "generic") == (kernel or "generic")
    assert (model.backbone.native_layers is not None) == (dtype == "float16" and native.unavailable_reason() is None)
    return package


def run_together(model, prompts, lengths):
    """Every prompt's stream on its own thread, all submitted before the first step runs: the test holds the
    batcher's step lock until they are queued (a start barrier alone let a fast first request finish its tokens
    before the others were submitted, within one interpreter switch interval: CI saw a batch of one)."""
    import time

    results = [None] * len(prompts)
    batcher = model.batcher

    def worker(i):
        results[i] = [r.token for r in model.stream_generate(prompts[i], lengths[i])]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    with batcher._stepping:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(batcher._pending) < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.001)
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("budget", ["all", "small"])
def test_batched_decode_equals_each_request_alone(package, budget):
    manifest = edge_moe.load(package).manifest
    # "small": the minimum a layer needs (~a quarter to a half of these 8-expert layers), so experts stream
    options = {} if budget == "all" else {"budget": max(minimum_budget(manifest), full_budget(manifest) // 4)}
    model = edge_moe.load(package, **options)
    alone = [model.generate(p, n).token_ids for p, n in zip(PROMPTS, LENGTHS)]
    model.enable_batching(max_batch=4)  # six requests, four at a time: two wait and join as others leave
    together = run_together(model, PROMPTS, LENGTHS)
    assert together == alone
    assert model.batcher.largest_batch >= 2 and model.batcher.sequence_steps > model.batcher.steps
    model.close()


def test_a_consumer_leaving_early_does_not_disturb_the_others(package):
    model = edge_moe.load(package)
    alone = model.generate(PROMPTS[0], 12).token_ids
    model.enable_batching()
    abandoned = model.stream_generate(PROMPTS[1], 50)
    next(abandoned)
    abandoned.close()  # a client that went away
    assert [r.token for r in model.stream_generate(PROMPTS[0], 12)] == alone
    model.close()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="side by side needs two CPUs")
def test_experts_side_by_side_equal_one_thread_on_every_family(package, monkeypatch):
    """threads=2 on a small model: each layer's experts on two threads (decode forced side by side too); logits and
    greedy tokens equal the one-thread run's bit for bit, every family."""
    from edge_moe import model as model_module

    monkeypatch.setattr(model_module, "DECODE_SIDE_BY_SIDE_BYTES", 0)
    # float16 experts fuse in one call a layer by default: one at a time here, as every other family's
    side, alone = (edge_moe.load(package, threads=t, fused_moe=False) for t in (2, 1))
    assert side.forward.workers == 1 and alone.forward.workers == 0
    ids = PROMPTS[2] + PROMPTS[5]
    np.testing.assert_array_equal(side.logits(ids), alone.logits(ids))
    assert [side.generate(p, n).token_ids for p, n in zip(PROMPTS, LENGTHS)] == \
        [alone.generate(p, n).token_ids for p, n in zip(PROMPTS, LENGTHS)]
    side.close()
