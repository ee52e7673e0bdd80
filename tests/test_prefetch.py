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


def test_gate_raises_its_threshold_as_the_disk_saturates_and_lowers_it_when_the_disk_idles():
    """A bucket right 80 % of the time is read while the disk idles part of the time and skipped once it is busy
    all the time (a wrong speculative read then delays the demand reads behind it); the threshold follows the load."""
    gate = PrefetchGate(min_precision=0.6, max_precision=0.95, warmup=1, window=0.5)
    gate.counts[(1, 0)] = [80.0, 100.0]
    now = busy = 0.0
    for _ in range(40):  # 2 s busy half the time
        now, busy = now + 0.05, busy + 0.025
        gate.adapt(now, busy)
    assert gate.threshold == pytest.approx(0.6) and gate.allows(1, 0)
    for _ in range(40):  # 2 s busy all the time: the averaged load nears 1
        now, busy = now + 0.05, busy + 0.05
        gate.adapt(now, busy)
    assert gate.load > 0.95 and gate.threshold == pytest.approx(0.95) and not gate.allows(1, 0)
    for _ in range(40):  # and idle again
        now += 0.05
        gate.adapt(now, busy)
    assert gate.load < 0.05 and gate.threshold == pytest.approx(0.6) and gate.allows(1, 0)


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


@pytest.mark.parametrize("family, shape", [
    ("deepseek_v3", dict(kv_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, layers=3,
                         experts=8, top_k=2, n_group=4, topk_group=2, first_k_dense_replace=0)),
    ("gpt_oss", dict(head_dim=8, layers=3, top_k=2, experts=8)),
])
def test_predictor_given_the_true_hidden_state_predicts_the_family_routing(family, shape, tmp_path):
    """Fed the layer's own post-attention state, the predictor must choose exactly what the runtime routes: with a
    selection bias and groups (DeepSeek-V3) or a router bias (GPT-OSS) raw logits would rank differently."""
    import edge_moe
    from edge_moe_export.exporter import export_checkpoint

    from conftest import build_checkpoint, tiny_config

    build_checkpoint(tmp_path / "hf", tiny_config(family, **shape), seed=4)
    package = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False)
    model = edge_moe.load(package)
    predictor = NextLayerPredictor(Manifest.load(package), depth=1)
    seen = []
    moe = model.forward.moe

    def recording_moe(layer, x, logits, residual, routed=None):
        seen.append((layer, x.copy(), model.forward.router(layer, logits)[0]))
        return moe(layer, x, logits, residual, routed)

    model.forward.moe = recording_moe
    model.logits(list(range(2, 12)))
    checked = 0
    for layer, x, indices in seen:
        if layer == 0:
            continue
        norm = predictor.routers[layer][1]
        for t in range(x.shape[0]):  # x = norm(h) * w: x / w has h's direction, which is all the predictor uses
            predicted = predictor.predict(layer - 1, (x[t:t + 1] / norm))[layer]
            assert predicted == indices[t].tolist()
            checked += 1
    assert checked == 2 * 10
