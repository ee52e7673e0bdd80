"""edge_moe's layer kernel (native_layer.py, csrc/layer_f16.c): a float16 backbone's attention block and router in
place of the exported layer graphs, against those graphs (onnxruntime over the same weights in float32) and
transformers, on every family it expresses; and the packages it leaves to the graphs, with the reason."""

import numpy as np
import pytest

import edge_moe
from edge_moe import native_layer
from edge_moe.errors import EdgeMoeError

from conftest import assert_agrees, export_float16, tiny_config
from test_native_kernel import _cpu_has_f16c

pytestmark = pytest.mark.skipif(not _cpu_has_f16c(), reason="this CPU lacks AVX2/FMA/F16C; the kernel is not used")

IDS = [5, 6, 7, 8, 30, 31, 2, 40, 41, 11]


def export_gqa(root, family, **extra):
    """A head size of 16 (GroupQueryAttention graphs), in float16 (conftest.export_float16)."""
    return export_float16(root, tiny_config(
        family, hidden=64, heads=4, kv_heads=2, experts=8, top_k=3, ffn=44, layers=3, max_position_embeddings=512,
        **({"head_dim": 16} if family == "qwen3_moe" else {}), **extra))


_exported: dict = {}


def exported(family, tmp_path_factory):
    """(family, transformers model, package), exported once a module run."""
    if family not in _exported:
        _exported[family] = (family, *export_gqa(tmp_path_factory.mktemp(family), family))
    return _exported[family]


@pytest.fixture(scope="module", params=sorted(native_layer.FAMILIES))
def package(request, tmp_path_factory):
    return exported(request.param, tmp_path_factory)


def test_layers_run_in_the_kernel_and_compute_what_the_graphs_and_transformers_do(package):
    family, hf, path = package
    model = edge_moe.load(path)
    assert model.backbone.native_layers is not None and model.backbone.native_reason is None
    graphs = edge_moe.load(path, native_kernel=False)
    assert graphs.backbone.native_layers is None and graphs.backbone.native_reason == "native_kernel=False"
    assert_agrees(model, graphs, hf, IDS)
    # a token: the embedding, a layer-kernel and an expert-kernel call a layer, the head; none in onnxruntime
    calls, natives = model.clock.calls, model.clock.native_calls
    model.generate(IDS[:3], 2)
    layers = model.config["num_layers"]
    assert isinstance(model.backbone.head, native_layer.NativeHead)
    assert isinstance(model.backbone.embed, native_layer.NativeEmbed)
    assert model.clock.native_calls - natives == model.clock.calls - calls == 2 * (2 + 2 * layers)
    with pytest.raises(ValueError, match="token ids outside"):
        model.forward.hidden(np.array([-1]), model.forward.new_cache())


def test_three_hundred_steps_through_the_growing_cache_equal_the_graphs(package):
    """Prefill, then token after token past the cache's first capacity (256): every step's logits as the graphs
    give them, fed the same tokens."""
    _, _, path = package
    models = [edge_moe.load(path), edge_moe.load(path, native_kernel=False)]
    caches = [m.forward.new_cache() for m in models]
    ids = np.array(IDS * 5, np.int64)
    for step in range(300):
        logits = [m.forward.logits(m.forward.hidden(ids, c)[-1:])[0] for m, c in zip(models, caches)]
        assert np.abs(logits[0] - logits[1]).max() <= 1e-5 * np.abs(logits[1]).max(), f"step {step}"
        ids = np.array([int(np.argmax(logits[0]))], np.int64)
    assert caches[0].capacity > 256 and caches[0].offset == 299 + 5 * len(IDS)


def test_q_k_v_biases_run_in_the_kernel(tmp_path):
    """Qwen3-MoE with attention_bias (Qwen2-MoE's biases are covered by its family's package)."""
    hf, biased = export_gqa(tmp_path, "qwen3_moe", attention_bias=True)
    model = edge_moe.load(biased)
    assert model.backbone.native_layers is not None and model.backbone.native_layers[0].params.bq
    assert_agrees(model, edge_moe.load(biased, native_kernel=False), hf, IDS)


def test_the_thread_count_changes_no_bit(package):
    _, _, path = package
    one, two = edge_moe.load(path, threads=1), edge_moe.load(path, threads=2)
    assert two.backbone.native_layers[0].threads == 2
    assert np.array_equal(one.logits(IDS), two.logits(IDS))
    assert one.generate(IDS, 8).token_ids == two.generate(IDS, 8).token_ids


def test_under_a_budget_the_layers_run_in_the_kernel_and_experts_stream(package):
    _, _, path = package
    budgeted, graphs = edge_moe.load(path, budget="50%"), edge_moe.load(path, native_kernel=False)
    assert budgeted.backbone.native_layers is not None and budgeted.fused is None
    a, b = budgeted.logits(IDS), graphs.logits(IDS)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return exported("qwen3_moe", tmp_path_factory)[2]


def test_what_the_kernel_leaves_to_the_graphs_says_why(qwen3, tmp_path, monkeypatch):
    assert edge_moe.load(qwen3, half_attention=True).backbone.native_reason == \
        "attention in float16 (half_attention) is the layer graphs'"
    _, granite = export_gqa(tmp_path / "granite", "granitemoe")
    assert edge_moe.load(granite).backbone.native_reason == \
        "the kernel expresses mixtral, olmoe, qwen2_moe, qwen3_moe layers, not granitemoe"
    float32 = edge_moe.load(qwen3).manifest
    float32.dtype = "float32"
    assert native_layer.unsupported_reason(float32) == "its weights are float32; the kernel reads float16"
    manifest = edge_moe.load(qwen3).manifest  # a config the exporter never writes: GQA with a head size of 12
    manifest.config["head_dim"] = 12
    assert native_layer.unsupported_reason(manifest) == "head_dim 12 is not a multiple of 8 or 4 heads do not group " \
                                                         "over 2"
    monkeypatch.setattr(native_layer.native, "unavailable_reason", lambda: "edge_moe's float16 kernel was not built")
    assert edge_moe.load(qwen3).backbone.native_reason == "edge_moe's float16 kernel was not built"


def test_a_layer_weight_outside_the_backbone_blob_is_refused(qwen3, tmp_path):
    import onnx

    from edge_moe.layer_graphs import external_weights

    manifest = edge_moe.load(qwen3).manifest
    graph = onnx.load(str(manifest.layers[0]), load_external_data=False)
    entry = next(e for e in graph.graph.initializer[1].external_data if e.key == "offset")
    entry.value = str(manifest.backbone_blob.stat().st_size)
    bad = tmp_path / "layer.onnx"
    onnx.save(graph, str(bad))
    with pytest.raises(EdgeMoeError, match="layer.onnx: initializer .* lies at bytes .* of weights.bin, which has .*; "
                                           "re-export the model"):
        external_weights(bad, manifest.backbone_blob)


def test_the_weights_the_kernel_reads_are_those_onnx_reads_and_a_torn_graph_is_refused(qwen3, tmp_path):
    """external_weights reads the graphs' protobuf itself (importing onnx cost 8.8 MiB of the baseline)."""
    import onnx

    from edge_moe.layer_graphs import external_weights

    manifest = edge_moe.load(qwen3).manifest
    for path in [*manifest.layers, manifest.head]:
        graph = onnx.load(str(path), load_external_data=False).graph
        expected = {}
        for t in graph.initializer:
            entry = {e.key: e.value for e in t.external_data}
            if t.data_location == onnx.TensorProto.EXTERNAL:
                expected[t.name] = (int(entry.get("offset", 0)), int(entry["length"]), t.data_type, tuple(t.dims))
        assert external_weights(path, manifest.backbone_blob) == expected and expected
    torn = tmp_path / "torn.onnx"
    torn.write_bytes(manifest.layers[0].read_bytes()[:-7])
    with pytest.raises(EdgeMoeError, match="torn.onnx: not a readable ONNX graph .*; re-export the model"):
        external_weights(torn, manifest.backbone_blob)
