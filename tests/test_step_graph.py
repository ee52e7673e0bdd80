"""One graph a token (step_graph.py): embed and every layer with its fused MoE composed at load. Against the
per-layer fused path (its reference), the per-expert path and transformers: logits within 1e-5, the same greedy
tokens, across the KV cache's growth; two onnxruntime calls a decoded token; routing still observed; refused with a
one-line reason where the package's graphs cannot be composed, and not used when not asked for."""

import numpy as np
import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError

from conftest import build_checkpoint, reference_greedy, reference_logits, tiny_config

IDS = [5, 6, 7, 8, 30, 31, 2, 40, 41, 11]
# softmax top-k routers: their layer graphs route (family_spec.ROUTE_OUTPUTS), which the step graph needs; Qwen2-MoE
# with its shared expert inside the layer graph, Granite with its multipliers, and a Qwen3-MoE whose first layer is
# dense (a layer graph without experts between two MoE layers)
ROUTED_FAMILIES = ["mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "granitemoe", "qwen3_moe+dense"]


@pytest.fixture(scope="module", params=ROUTED_FAMILIES)
def gqa_family(request, tmp_path_factory):
    """A head size of 16 gets GroupQueryAttention layer graphs; 512 positions let a decode outgrow the cache's
    first capacity (256)."""
    from edge_moe_export.exporter import export_checkpoint

    family, _, variant = request.param.partition("+")
    extra = {"mlp_only_layers": [0]} if variant == "dense" else {}
    root = tmp_path_factory.mktemp(family)
    hf = build_checkpoint(root / "hf", tiny_config(family, hidden=64, layers=3, experts=8, top_k=3,
                                                   max_position_embeddings=512, **extra))
    return request.param, hf, export_checkpoint(root / "hf", root / "pkg", progress=False)


def test_one_graph_a_token_equals_the_per_layer_path_and_transformers(gqa_family):
    family, hf, package = gqa_family
    step = edge_moe.load(package, fused_moe=True)
    layered = edge_moe.load(package, fused_moe=True, step_graph=False)
    per_expert = edge_moe.load(package)
    assert step.config["moe_layers"] == ([1, 2] if family.endswith("+dense") else [0, 1, 2])
    assert step.step_graph is not None and layered.step_graph is None and per_expert.step_graph is None
    a, b = step.logits(IDS), layered.logits(IDS)
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale
    assert np.abs(a - per_expert.logits(IDS)).max() <= 1e-5 * scale
    assert np.abs(a - reference_logits(hf, IDS)).max() <= 1e-4 * scale
    assert step.generate(IDS, 16).token_ids == layered.generate(IDS, 16).token_ids == reference_greedy(hf, IDS, 16)
    calls = step.clock.calls
    step.generate(IDS[:3], 2)
    assert step.clock.calls - calls == 2 * 2  # prefill and one decoded token: the step graph and the head each


def test_one_graph_a_token_across_the_cache_growing(gqa_family):
    """300 decoded tokens: the KV cache reallocates past 256 and the binding follows it; tokens stay the per-layer
    path's, and a second generation on the same model (a new cache) starts clean."""
    _, _, package = gqa_family
    step = edge_moe.load(package, fused_moe=True)
    layered = edge_moe.load(package, fused_moe=True, step_graph=False)
    expected = layered.generate(IDS, 300).token_ids
    assert step.generate(IDS, 300).token_ids == expected
    assert step.generate(IDS[:4], 8).token_ids == layered.generate(IDS[:4], 8).token_ids


def test_one_graph_a_token_reports_routing(gqa_family):
    _, _, package = gqa_family
    step = edge_moe.load(package, fused_moe=True, trace=True)
    layered = edge_moe.load(package, fused_moe=True, step_graph=False, trace=True)
    seen = {"step": [], "layered": []}
    for name, model in (("step", step), ("layered", layered)):
        model.forward.route_observers.append(lambda layer, ix, name=name: seen[name].append((layer, ix.tolist())))
        model.generate(IDS, 4)
    assert seen["step"] == seen["layered"] and len(seen["step"]) == 4 * len(step.config["moe_layers"])
    assert [(e["layer"], e["experts"]) for e in step.trace] == [(e["layer"], e["experts"]) for e in layered.trace]


def test_half_attention_in_one_graph(gqa_family):
    """The accelerator's float16 attention (layer_graphs.py) inside the composed graph, on the CPU provider: what
    the per-layer half-attention graphs compute, to float32 rounding."""
    _, _, package = gqa_family
    step = edge_moe.load(package, fused_moe=True, half_attention=True)
    layered = edge_moe.load(package, fused_moe=True, half_attention=True, step_graph=False)
    assert step.step_graph is not None
    a, b = step.logits(IDS), layered.logits(IDS)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert step.generate(IDS, 24).token_ids == layered.generate(IDS, 24).token_ids


def test_one_graph_a_token_is_refused_where_it_cannot_run(gqa_family, tmp_path, monkeypatch):
    """Without fused layers, with plain-ONNX attention or without routing in the graphs: refused when asked for
    (one line naming the reason), the per-layer path when not."""
    from edge_moe_export.exporter import export_checkpoint
    from edge_moe_export.families import base

    _, _, package = gqa_family
    with pytest.raises(EdgeMoeError, match="cannot run as one graph a token: it needs fused MoE layers"):
        edge_moe.load(package, step_graph=True)
    generic = export_checkpoint(package.parent / "hf", tmp_path / "generic", attention="generic", progress=False)
    with pytest.raises(EdgeMoeError, match="plain ONNX ops"):
        edge_moe.load(generic, fused_moe=True, step_graph=True)
    assert edge_moe.load(generic, fused_moe=True).step_graph is None
    monkeypatch.setattr(base, "routes_in_graph", lambda spec: False)
    unrouted = export_checkpoint(package.parent / "hf", tmp_path / "unrouted", progress=False)
    with pytest.raises(EdgeMoeError, match="do not route"):
        edge_moe.load(unrouted, fused_moe=True, step_graph=True)
    model = edge_moe.load(unrouted, fused_moe=True)
    assert model.step_graph is None
    assert model.generate(IDS, 8).token_ids == edge_moe.load(package, fused_moe=True).generate(IDS, 8).token_ids


def test_graphs_that_do_not_compose_fall_back_or_are_refused(gqa_family, monkeypatch):
    """A package whose graphs cannot be composed (here: the embedding graph declares another opset than the layer
    graphs) runs one call a graph when not asked, and is refused with the reason when asked."""
    import onnx

    _, _, package = gqa_family
    real = onnx.load

    def other_opset(path, *args, **kwargs):
        model = real(path, *args, **kwargs)
        if str(path).endswith("embed.onnx"):
            model.opset_import[0].version += 1
        return model

    monkeypatch.setattr(onnx, "load", other_opset)
    with pytest.raises(EdgeMoeError, match="opsets"):
        edge_moe.load(package, fused_moe=True, step_graph=True)
    model = edge_moe.load(package, fused_moe=True)
    assert model.step_graph is None and model.fused is not None


def test_per_layer_sessions_open_when_batching_first_needs_them(gqa_family):
    """With one graph a token the per-layer sessions (a second copy of the backbone) are closed after load; a batched
    decode step, which runs one call a layer, opens them again and decodes what each request decodes alone."""
    import threading

    _, _, package = gqa_family
    model = edge_moe.load(package, fused_moe=True)
    prompts, lengths = (IDS, IDS[:4], IDS[3:]), (10, 14, 8)
    alone = [model.generate(p, n).token_ids for p, n in zip(prompts, lengths)]
    assert len(model.backbone.layers) == model.config["num_layers"]
    assert all(s is None for s in model.backbone.layers._sessions)  # one graph a token needed none of them
    model.enable_batching(max_batch=3)
    results, start = [None] * 3, threading.Barrier(3)

    def worker(i):
        start.wait()
        results[i] = model.generate(prompts[i], lengths[i]).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    batched = model.batcher.largest_batch >= 2
    assert batched == all(s is not None for s in model.backbone.layers._sessions)
    model.close()


@pytest.mark.parametrize("pooled", [True, False])
def test_decoded_tokens_replay_over_fixed_buffers(gqa_family, monkeypatch, pooled):
    """The decode step a CUDA graph captures (step_graph.Replay), run on the CPU provider without capture: token and
    position written into buffers bound once, total_sequence_length held at the capacity. Tokens equal one graph a
    token run the usual way, over the cache growing mid-decode (new buffers: a new replay) and over generations.
    With pooled cache buffers (as on an accelerator) later generations reuse the first one's buffers and replay."""
    from edge_moe import kv_cache

    monkeypatch.setattr(kv_cache, "pooled_on", lambda device: pooled)
    _, _, package = gqa_family
    replayed = edge_moe.load(package, fused_moe=True, cuda_graph=True)
    usual = edge_moe.load(package, fused_moe=True, cuda_graph=False)
    assert replayed.step_graph.replay_decode and not usual.step_graph.replay_decode
    forward, cache = replayed.forward, replayed.forward.new_cache()  # no reservation: it grows past 256 rows
    expected, h, got = usual.generate(IDS, 290).token_ids, forward.hidden(np.array(IDS), cache), []
    for _ in range(290):
        got.append(int(np.argmax(forward.logits(h[-1:])[0])))
        h = forward.hidden(np.array(got[-1:]), cache)
    assert got == expected and cache.capacity >= 512
    assert len(replayed.step_graph._replays) == 2  # one over the first buffers, one over the grown ones
    for prompt, length in ((IDS[:4], 8), (IDS[2:], 12), (IDS[:4], 8)):
        assert replayed.generate(prompt, length).token_ids == usual.generate(prompt, length).token_ids
    # pooled: the generations' caches took the buffers the first cache gave back when it grew, and replayed the
    # first replay; else each cache is new
    assert len(replayed.step_graph._replays) == (2 if pooled else 5)
