"""edge_moe's layer kernel (native_layer.py, csrc/layer.c): a float16 or block-quantized backbone's attention block and
router in place of the exported layer graphs, against those graphs (onnxruntime over the same weights in float32,
or MatMulNBits over the same blocks) and transformers, on every family it expresses, over a float32 or a float16 KV
cache; and the packages it leaves to the graphs, with the reason."""

import os
import subprocess
import sys

import numpy as np
import pytest

import edge_moe
from edge_moe import native_layer
from edge_moe.errors import EdgeMoeError

from conftest import assert_agrees, build_checkpoint, export_float16, reference_logits, tiny_config
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


def test_a_package_the_kernels_run_whole_never_imports_onnxruntime(qwen3):
    """Importing onnxruntime holds ~20 MiB (lazy_imports.py): a package whose layers and experts all run in
    edge_moe's kernels loads and generates without it, streamed or resident, on the command line's shared pool too
    (onnxruntime makes it at the first session); graphs import it when first used."""
    code = ("import sys, edge_moe; m = edge_moe.load(sys.argv[1], budget=sys.argv[2], native_kernel=sys.argv[3] == '1', "
            "progress=False); m.generate([1, 2, 3], 3); print('onnxruntime' in sys.modules)")

    def imports(budget: str, native_kernel: str, pool: str = "per-session") -> str:
        run = subprocess.run([sys.executable, "-c", code, str(qwen3), budget, native_kernel],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "EDGE_MOE_THREAD_POOL": pool})
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.split()[-1]

    assert imports("50%", "1") == "False"
    assert imports("100%", "1") == "False"
    assert imports("50%", "1", pool="shared") == "False"
    assert imports("50%", "0") == "True"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return exported("qwen3_moe", tmp_path_factory)[2]


def test_a_float16_kv_cache_runs_in_the_kernel(package):
    """half_attention: the cache and RoPE tables in float16, as the graphs keep them; the kernel rounds keys and
    values into it as they do and attends in float32 (the graphs in float16: a few 1e-4 apart)."""
    _, hf, path = package
    model, graphs = edge_moe.load(path, half_attention=True), edge_moe.load(path, half_attention=True,
                                                                              native_kernel=False)
    assert model.backbone.native_layers is not None and model.backbone.kv_dtype == np.float16
    a, b, exact = model.logits(IDS), graphs.logits(IDS), reference_logits(hf, IDS)
    scale = np.abs(exact).max()
    assert np.abs(a - b).max() <= 2e-3 * scale and np.abs(a - exact).max() <= np.abs(b - exact).max() + 1e-4 * scale
    assert model.generate(IDS, 12).token_ids == graphs.generate(IDS, 12).token_ids


@pytest.mark.parametrize("dtype,bits,block", [("float16", 8, 32), ("float16", 4, 128), ("float32", 8, 128),
                                              ("float32", 4, 32)])
def test_a_block_quantized_backbone_runs_in_the_kernel(tmp_path, dtype, bits, block):
    """export --backbone-bits: q/k/v/o and the lm_head as MatMulNBits blocks, read in place by the kernel with int8
    activations as MatMulNBits computes them: a first token to float32 rounding of the graphs; a whole prompt (where
    a rounding difference may move an activation across an int8 step) no further from transformers' float model
    than the graphs are, give or take. Embedding, norms and router stay in `dtype`."""
    import torch
    from edge_moe_export.exporter import export_checkpoint

    config = tiny_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, experts=8, top_k=3, ffn=44, layers=3,
                         max_position_embeddings=512, head_dim=16, tie_word_embeddings=False)
    hf = build_checkpoint(tmp_path / "hf", config, dtype=getattr(torch, dtype))
    path = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", dtype=dtype, backbone_bits=bits, block_size=block,
                             progress=False)
    exact = reference_logits(hf, IDS)
    scale = np.abs(exact).max()
    for half in (False, True):
        model = edge_moe.load(path, half_attention=half)
        graphs = edge_moe.load(path, half_attention=half, native_kernel=False)
        assert model.backbone.native_reason is None and model.backbone.native_layers[0].params.wq.bits == bits
        assert model.backbone.head.weight.bits == bits and model.backbone.head.weight.block == block
        one = graphs.logits(IDS[:1])
        assert np.abs(model.logits(IDS[:1]) - one).max() <= (2e-3 if half else 1e-5) * np.abs(one).max()
        reference_error = np.abs(graphs.logits(IDS) - exact).max()
        assert np.abs(model.logits(IDS) - exact).max() <= 1.5 * reference_error + 0.01 * scale
        calls, natives = model.clock.calls, model.clock.native_calls
        model.generate(IDS[:3], 2)  # the embedding, a layer call a layer and the head in the kernel; float16 experts
        assert model.clock.native_calls - natives == 2 * (2 + 3 + (3 if dtype == "float16" else 0))
        if dtype == "float16":  # too: no onnxruntime call (float32 experts run in their graphs)
            assert model.clock.calls - calls == model.clock.native_calls - natives


def test_a_layer_whose_blocks_differ_keeps_its_graphs(tmp_path, monkeypatch):
    """The kernel quantizes a layer input once for all its consumers: a package whose block matrices do not share one
    (bits, block) (the exporter never writes one; this one is made so by the layout reader) is refused, not read."""
    from edge_moe_export.exporter import export_checkpoint

    config = tiny_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, experts=8, top_k=3, ffn=44, layers=2,
                         max_position_embeddings=512, head_dim=16)
    build_checkpoint(tmp_path / "hf", config)
    path = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", dtype="float16", backbone_bits=8, progress=False)
    manifest = edge_moe.load(path).manifest
    layout = native_layer._block_layout
    monkeypatch.setattr(native_layer, "_block_layout", lambda shape, codes, scales, bits: (
        (8, 64) if shape[0] == 32 else layout(shape, codes, scales, bits)))  # k and v ([32, 64]) in blocks of 64
    layers, reason = native_layer.load_native_layers(manifest, None, 1)
    assert layers is None
    assert reason == "layer_000.onnx: its quantized matrices mix [(8, 32), (8, 64)] (bits, block); the kernel takes " \
                     "one a layer"


def test_without_vnni_a_quantized_backbone_keeps_its_graphs(tmp_path):
    """edge_moe's AVX2 block kernel streams experts but does not take a quantized backbone (native.blocks_fused_reason:
    onnxruntime's graphs were faster than it where both ran); forced here as on a CPU without AVX-512 VNNI."""
    from edge_moe import native
    from edge_moe_export.exporter import export_checkpoint

    config = tiny_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, experts=8, top_k=3, ffn=44, layers=2,
                         max_position_embeddings=512, head_dim=16)
    build_checkpoint(tmp_path / "hf", config)
    path = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", dtype="float16", backbone_bits=8, progress=False)
    native.use_block_instructions("avx2")
    try:
        model = edge_moe.load(path)
        assert model.backbone.native_layers is None
        assert model.backbone.native_reason.startswith("this CPU lacks AVX-512 VNNI")
    finally:
        native.use_block_instructions(None)
    assert edge_moe.load(path).backbone.native_layers is not None or native.blocks_instructions() != "avx512-vnni"


def test_what_the_kernel_leaves_to_the_graphs_says_why(qwen3, tmp_path, monkeypatch):
    _, granite = export_gqa(tmp_path / "granite", "granitemoe")
    assert edge_moe.load(granite).backbone.native_reason == \
        "the kernel expresses mixtral, olmoe, qwen2_moe, qwen3_moe layers, not granitemoe"
    float32 = edge_moe.load(qwen3).manifest
    float32.dtype = "float32"
    assert native_layer.unsupported_reason(float32) == "its backbone is float32; the kernel reads float16 or " \
                                                       "block-quantized ones"
    manifest = edge_moe.load(qwen3).manifest  # a config the exporter never writes: GQA with a head size of 12
    manifest.config["head_dim"] = 12
    assert native_layer.unsupported_reason(manifest) == "head_dim 12 is not a multiple of 8 or 4 heads do not group " \
                                                         "over 2"
    monkeypatch.setattr(native_layer.native, "unavailable_reason", lambda: "edge_moe's kernels were not built")
    assert edge_moe.load(qwen3).backbone.native_reason == "edge_moe's kernels were not built"


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
