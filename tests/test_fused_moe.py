"""The fused MoE layer (one onnxruntime call a layer, fused_moe.py) against the per-expert path, its reference, and
against transformers: every family whose router and experts the kernel can express gives logits within 1e-5 and
the same greedy tokens; the others, and a budget, are refused with a one-line reason when asked for and fall back
to the per-expert path when not."""

import numpy as np
import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe.fused_moe import unfusable_reason

from conftest import EXPERT_KEY, build_checkpoint, reference_greedy, reference_logits, tiny_config

IDS = [5, 6, 7, 8, 30, 31, 2, 40, 41, 11]
# every router (routing runs on the host) with float SwiGLU experts; GPT-OSS's clamped SwiGLU with biases is not
FUSABLE = set(EXPERT_KEY) - {"gpt_oss"}
REFUSED = {"gpt_oss"}


@pytest.fixture(scope="module", params=sorted(EXPERT_KEY))
def family_package(request, tmp_path_factory):
    from edge_moe_export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp(request.param)
    extra = {"kv_heads": 4} if request.param.startswith("deepseek") else {}  # its attention has no GQA
    if request.param == "deepseek_v3":  # group-limited routing needs whole groups of at least two experts
        extra.update(n_group=2, topk_group=1, first_k_dense_replace=0, norm_topk_prob=True,
                     routed_scaling_factor=2.5)
    hf = build_checkpoint(root / "hf", tiny_config(request.param, experts=8, top_k=2 if request.param == "phimoe" else 3,
                                                       **extra))
    return request.param, hf, export_checkpoint(root / "hf", root / "pkg", progress=False)


def test_fused_layers_equal_the_per_expert_path_and_transformers(family_package):
    family, hf, package = family_package
    per_expert = edge_moe.load(package, fused_moe=False)
    fusable = unfusable_reason(per_expert.manifest) is None
    assert family not in FUSABLE or fusable
    assert family not in REFUSED or not fusable
    if not fusable:
        with pytest.raises(EdgeMoeError, match="fused MoE kernel cannot run this model"):
            edge_moe.load(package, fused_moe=True)
        return
    fused = edge_moe.load(package, fused_moe=True)
    assert fused.forward.fused is not None and per_expert.forward.fused is None
    a, b = fused.logits(IDS), per_expert.logits(IDS)
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale
    assert np.abs(a - reference_logits(hf, IDS)).max() <= 1e-4 * scale
    tokens = fused.generate(IDS, 12).token_ids
    assert tokens == per_expert.generate(IDS, 12).token_ids == reference_greedy(hf, IDS, 12)
    # one call a MoE layer: embed + (layer graph + fused experts) per layer + head for a decoded token
    calls = fused.clock.calls
    fused.generate(IDS[:3], 2)
    layers = fused.config["num_layers"]
    assert fused.clock.calls - calls == 2 * (2 + 2 * layers)  # prefill + one decode step, each the same calls


def test_fused_layers_need_every_expert_resident(family_package):
    """Under a budget the fused path is refused (the budget is checked first, whatever the family); not asked for,
    the CPU keeps the per-expert path."""
    _, _, package = family_package
    with pytest.raises(EdgeMoeError, match="needs every expert resident"):
        edge_moe.load(package, fused_moe=True, budget="60%")
    # not asked for: the CPU keeps the per-expert path (the fused kernel pays where calls are dear, on a GPU)
    assert edge_moe.load(package).forward.fused is None


FUSABLE_FAMILIES = sorted(FUSABLE)


@pytest.mark.parametrize("family", FUSABLE_FAMILIES)
def test_fused_layers_report_routing_to_observers_and_the_trace(family, tmp_path):
    from edge_moe_export.exporter import export_checkpoint

    extra = {"kv_heads": 4} if family.startswith("deepseek") else {}
    if family == "deepseek_v3":
        extra.update(n_group=2, topk_group=1, first_k_dense_replace=0)
    build_checkpoint(tmp_path / "hf", tiny_config(family, experts=8, top_k=2, **extra))
    package = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", progress=False)
    fused = edge_moe.load(package, fused_moe=True, trace=True)
    per_expert = edge_moe.load(package, fused_moe=False, trace=True)
    seen = {m: [] for m in ("fused", "per")}
    fused.forward.route_observers.append(lambda layer, indices: seen["fused"].append((layer, indices.tolist())))
    per_expert.forward.route_observers.append(lambda layer, indices: seen["per"].append((layer, indices.tolist())))
    fused.generate(IDS, 4)
    per_expert.generate(IDS, 4)
    assert seen["fused"] == seen["per"]
    experts = lambda model: [sorted(e["experts"]) for e in model.trace]  # noqa: E731
    assert experts(fused) == experts(per_expert) and all(all(e["hit"]) for e in fused.trace)


@pytest.fixture(scope="module")
def gqa_package(tmp_path_factory):
    """A head size of 16 gets GroupQueryAttention layer graphs (attention_kernel "gqa")."""
    from edge_moe_export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("gqa")
    hf = build_checkpoint(root / "hf", tiny_config("qwen3_moe", hidden=64, experts=8, top_k=3))
    package = export_checkpoint(root / "hf", root / "pkg", progress=False)
    assert edge_moe.load(package).config["attention_kernel"] == "gqa"
    return hf, package


def test_half_attention_follows_the_float32_graphs_over_a_long_decode(gqa_package):
    """The accelerator's rewrite (float16 attention and KV cache, half_attention.py), run here on the CPU provider:
    logits within float16 rounding of the float32 graphs' and of transformers', the same greedy tokens over 40
    steps, with the fused MoE layers as on a GPU."""
    hf, package = gqa_package
    half = edge_moe.load(package, half_attention=True, fused_moe=True)
    full = edge_moe.load(package)
    assert half.backbone.half_attention and not full.backbone.half_attention
    cache = half.forward.new_cache()
    assert cache.keys[0].dtype == np.float16 and cache.cos.dtype == np.float16
    a, b = half.logits(IDS), full.logits(IDS)
    scale = np.abs(b).max()
    assert 0 < np.abs(a - b).max() <= 2e-3 * scale  # not bit-equal: the attention really ran in float16
    assert np.abs(a - reference_logits(hf, IDS)).max() <= 2e-3 * scale
    assert half.generate(IDS, 40).token_ids == full.generate(IDS, 40).token_ids == reference_greedy(hf, IDS, 40)


def test_layer_graphs_route_as_the_family_router_does(family_package):
    """Where the exported layer graph routes (softmax top-k routers, family_spec.ROUTE_OUTPUTS), its experts equal
    routing.Router's on the same logits and its weights agree to float32 rounding, prefill and decode; other routers
    stay on the host."""
    from edge_moe.family_spec import routes_in_graph

    family, _, package = family_package
    model = edge_moe.load(package)
    forward = model.forward
    assert (forward.backbone.routed == set(model.config["moe_layers"])) == routes_in_graph(forward.router.spec)
    assert family not in ("mixtral", "qwen3_moe", "olmoe") or forward.backbone.routed
    seen = []
    moe = forward.moe

    def spy(layer, x, logits, residual, routed=None):
        seen.append((layer, logits.copy(), routed))
        return moe(layer, x, logits, residual, routed)

    forward.moe = spy
    model.generate(IDS, 3)
    assert len(seen) == 3 * len(model.config["moe_layers"])
    for layer, logits, routed in seen:
        if not forward.backbone.routed:
            assert routed is None
            continue
        indices, weights = forward.router(layer, logits)
        np.testing.assert_array_equal(routed[0], indices)
        np.testing.assert_allclose(routed[1], weights, rtol=1e-5, atol=1e-7)


def test_packages_exported_without_route_outputs_route_on_the_host(gqa_package, tmp_path, monkeypatch):
    """Packages from before routing moved into the graphs (or of routers it cannot express) keep numpy routing:
    the same greedy tokens as the graph-routed package."""
    from edge_moe_export.exporter import export_checkpoint
    from edge_moe_export.families import base

    _, package = gqa_package
    monkeypatch.setattr(base, "routes_in_graph", lambda spec: False)
    old = export_checkpoint(package.parent / "hf", tmp_path / "old", progress=False)
    host, graph = edge_moe.load(old), edge_moe.load(package)
    assert not host.backbone.routed and graph.backbone.routed == set(graph.config["moe_layers"])
    assert host.generate(IDS, 20).token_ids == graph.generate(IDS, 20).token_ids
