"""Perplexity against transformers' own loss; KL and routing statistics on known cases."""

import math

import numpy as np

import edge_moe
from edge_moe.evaluate import evaluate, routing_statistics, unigram_perplexity

from conftest import torch


def test_perplexity_matches_transformers_loss(tiny_package):
    from transformers import AutoModelForCausalLM

    package, hf = tiny_package
    ids = np.random.default_rng(5).integers(2, 128, 50).tolist()
    ours = evaluate(edge_moe.load(package), ids, window=20)
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, 19):  # windows of 20 overlapping by one token
        chunk = ids[start:start + 20]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            loss = reference(torch.tensor([chunk]), labels=torch.tensor([chunk])).loss.item()
        total += loss * (len(chunk) - 1)
        count += len(chunk) - 1
    assert ours["tokens"] == count == 49
    assert math.isclose(ours["perplexity"], math.exp(total / count), rel_tol=1e-4)


def test_kl_to_itself_is_zero(tiny_package):
    model = edge_moe.load(tiny_package[0])
    result = evaluate(model, list(range(2, 30)), window=16, reference=model)
    assert abs(result["mean_kl_vs_reference"]) < 1e-9


def test_unigram_baseline_by_hand():
    # counts +1 smoothing over vocab 4: token 0 seen 3x, 1 once -> p = [4, 2, 1, 1] / 8
    ppl = unigram_perplexity([0, 0, 1, 0], vocab=4)
    expected = math.exp(-(math.log(4 / 8) + math.log(2 / 8) + math.log(4 / 8)) / 3)
    assert math.isclose(ppl, expected)


def test_routing_statistics_are_in_range(tiny_package):
    model = edge_moe.load(tiny_package[0])
    rows = routing_statistics(model, np.random.default_rng(0).integers(2, 128, 64).tolist(), window=32)
    assert [r["layer"] for r in rows] == model.config["moe_layers"]
    experts = model.config["num_experts"]
    for r in rows:
        assert 0 < r["entropy_vs_uniform"] <= 1 + 1e-9
        assert (experts // 4) / experts - 1e-9 <= r["top25_share"] <= 1  # uniform routing gives the lower bound
        assert 0 <= r["consecutive_reuse"] <= 1
