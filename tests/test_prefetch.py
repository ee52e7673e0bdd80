"""Speculative routing many layers ahead, and the prefetch gate.

The prefetch gate reads a (layers ahead, rank) bucket only while its predictions of non-resident experts are
right often enough, keeps scoring the predictions it does not read, and reads the bucket again once they are."""

import numpy as np
import pytest

from edge_moe.manifest import Manifest
from edge_moe.prefetch import NextLayerPredictor, PrefetchGate


def run_layer(gate, layer, predicted, used):
    for rank, expert in enumerate(predicted):
        gate.note((layer, expert), 2, rank)
    gate.observe(layer, {(layer, e) for e in used})


def test_gate_closes_a_bucket_that_is_mostly_wrong_and_reopens_it():
    gate = PrefetchGate(min_precision=0.6, warmup=10)
    assert gate.allows(2, 0) and gate.allows(2, 1)  # new buckets are read
    for layer in range(20):  # rank 0 always right, rank 1 right one time in four
        run_layer(gate, layer, [0, 1], [0] + ([1] if layer % 4 == 0 else []))
    assert gate.allows(2, 0)
    assert not gate.allows(2, 1)
    for layer in range(20, 60):  # rank 1 becomes right every time: unread predictions are still scored
        run_layer(gate, layer, [0, 1], [0, 1])
    assert gate.allows(2, 1)


def test_gate_scores_each_prediction_once_per_layer_run():
    gate = PrefetchGate(min_precision=0.5, warmup=1)
    gate.note((3, 7), 1, 0)
    gate.observe(3, {(3, 7)})
    gate.observe(3, set())  # the layer's next run has no open prediction: nothing more is counted
    assert gate.counts == {(1, 0): [1.0, 1.0]}
    gate.observe(4, set())  # a layer without predictions
    assert gate.counts == {(1, 0): [1.0, 1.0]}


@pytest.mark.parametrize("depth", [1, 3, 99])
def test_decode_prediction_of_many_layers_at_once_equals_one_router_at_a_time(tiny_package, depth):
    manifest = Manifest.load(tiny_package[0])
    stacked = NextLayerPredictor(manifest, depth=depth)
    looped = NextLayerPredictor(manifest, depth=depth)
    looped._stack = None  # the per-layer path (prefill's)
    rng = np.random.default_rng(depth)
    for layer in sorted(manifest.config["moe_layers"]):
        hidden = rng.standard_normal((1, manifest.config["hidden_size"])).astype(np.float32)
        assert stacked.predict(layer, hidden) == looped.predict(layer, hidden)
