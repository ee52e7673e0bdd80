"""Top-k routing against a brute-force reference (a full sort), for decode (T=1) and prefill shapes."""

import numpy as np
import pytest

from edge_moe.errors import EdgeMoeError
from edge_moe.family_spec import RouterSpec
from edge_moe.routing import group_by_expert, route


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("normalize", [False, True])
def test_route_matches_full_sort(tokens, normalize):
    rng = np.random.default_rng(tokens)
    for _ in range(50):
        experts = int(rng.integers(2, 20))
        k = int(rng.integers(1, experts + 1))
        logits = rng.standard_normal((tokens, experts)).astype(np.float32)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)[:, :k]
        expected = np.take_along_axis(probs, order, -1)
        if normalize:
            expected /= expected.sum(-1, keepdims=True)
        indices, weights = route(logits, RouterSpec(experts, k, normalize=normalize))
        assert (indices == order).all()
        np.testing.assert_allclose(weights, expected, rtol=1e-6)


def _torch_router(kind: str, experts: int, k: int, **config):
    """transformers' own router module of a family, with random weights; returns (module, logits fn)."""
    import torch
    import transformers

    if kind == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as cls
        c = transformers.DeepseekV3Config(n_routed_experts=experts, num_experts_per_tok=k, hidden_size=16,
                                          num_attention_heads=4, num_key_value_heads=4, **config)
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as cls
        c = transformers.DeepseekV2Config(n_routed_experts=experts, num_experts_per_tok=k, hidden_size=16,
                                          num_attention_heads=4, num_key_value_heads=4, **config)
    module = cls(c).eval()
    with torch.no_grad():
        module.weight.normal_()
        if kind == "deepseek_v3":
            module.e_score_correction_bias.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("case", [
    ("deepseek_v3", 16, 4, dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    ("deepseek_v3", 12, 3, dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)),
    ("deepseek_v2", 16, 3, dict(n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                 routed_scaling_factor=16.0)),
    ("deepseek_v2", 10, 2, dict(n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0)),
])
def test_deepseek_routers_match_transformers(tokens, case):
    """Sigmoid scoring with a selection-only bias and group-limited top-k (V3), softmax with groups (V2)."""
    torch = pytest.importorskip("torch")
    kind, experts, k, config = case
    module = _torch_router(kind, experts, k, **config)
    v3 = kind == "deepseek_v3"
    spec = RouterSpec(experts, k, scoring="sigmoid" if v3 else "softmax", normalize=config.get("norm_topk_prob", False),
                      selection_bias=v3, n_group=config["n_group"], topk_group=config["topk_group"],
                      group_score="top2_sum" if v3 else "max", scaling_factor=config["routed_scaling_factor"])
    x = torch.randn(tokens, 16)
    with torch.no_grad():
        logits, expected_w, expected_i = module(x)
    bias = module.e_score_correction_bias.numpy() if v3 else None
    indices, weights = route(logits.numpy(), spec, bias)
    for t in range(tokens):  # transformers returns its top-k unsorted: compare as {expert: weight}
        ours = dict(zip(indices[t].tolist(), weights[t].tolist()))
        theirs = dict(zip(expected_i[t].tolist(), expected_w[t].tolist()))
        assert ours.keys() == theirs.keys()
        np.testing.assert_allclose([ours[e] for e in theirs], list(theirs.values()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tokens", [1, 11])
def test_sparsemixer_matches_transformers(tokens):
    """Phi-3.5-MoE's router at inference, including logits within the jitter threshold of the best."""
    torch = pytest.importorskip("torch")
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    rng = np.random.default_rng(tokens)
    for eps in (0.01, 0.3):
        logits = rng.standard_normal((tokens, 8)).astype(np.float32)
        logits[0, 3] = logits[0].max() * 0.999  # a near tie, inside the threshold
        expected_w, expected_i = sparsemixer(torch.tensor(logits), jitter_eps=eps, training=False)
        indices, weights = route(logits, RouterSpec(8, 2, scoring="sparsemixer", jitter_eps=eps))
        assert (indices == expected_i.numpy()).all()
        np.testing.assert_allclose(weights, expected_w.numpy(), rtol=1e-6)


def test_router_spec_round_trips_and_rejects_bad_fields():
    spec = RouterSpec(16, 4, scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2,
                      group_score="top2_sum", scaling_factor=2.5)
    assert RouterSpec.from_dict(spec.to_dict()) == spec
    for bad, words in [(dict(scoring="relu"), "supported: softmax, sigmoid, sparsemixer"),
                       (dict(n_group=3), "n_group=3 must divide"), (dict(top_k="4"), "top_k='4' is not of type int"),
                       (dict(colour=1), "colour=1 is not a field"), (dict(top_k=2, topk_group=1), "topk_group")]:
        data = {**spec.to_dict(), **bad}
        if "topk_group" in words:
            data["topk_group"] = 5
        with pytest.raises(EdgeMoeError, match=words) as info:
            RouterSpec.from_dict(data)
        assert "manifest config.router" in str(info.value) and "\n" not in str(info.value)


def test_group_by_expert_covers_every_assignment_once():
    indices = np.random.default_rng(0).integers(0, 6, (9, 3))
    seen = set()
    for expert, rows, slots in group_by_expert(indices):
        assert (indices[rows, slots] == expert).all()
        seen.update(zip(rows.tolist(), slots.tolist()))
    assert seen == {(t, j) for t in range(9) for j in range(3)}


def test_sampler_follows_the_distribution_and_nucleus():
    from edge_moe.sampling import Sampler, SamplingOptions

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    full = Sampler(SamplingOptions(temperature=1.0, seed=0))
    counts = np.bincount([full(logits, [], []) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = Sampler(SamplingOptions(temperature=1.0, top_p=0.7, seed=0))  # smallest prefix with mass >= 0.7
    picks = {nucleus(logits, [], []) for _ in range(500)}
    assert picks == {0, 1}
    assert Sampler(SamplingOptions())(logits, [], []) == 0


def test_weight_on_input_scales_what_the_expert_sees():
    """Llama 4 style: y = expert(w * x) rather than w * expert(x); the two differ for a nonlinear expert."""
    from types import SimpleNamespace

    from edge_moe.model import Forward

    kernels = SimpleNamespace(run=lambda expert, x: np.tanh(x) * 3.0)
    x, w = np.array([[0.5, -2.0, 1.5]], np.float32), np.float32(0.25)
    for weight_on, expected in (("output", np.tanh(x) * 3.0 * w), ("input", np.tanh(x * w) * 3.0)):
        spec = RouterSpec(4, 2, weight_on=weight_on)
        stub = SimpleNamespace(kernels=kernels, _weight_on_input=spec.weight_on == "input")  # as Forward sets it
        np.testing.assert_allclose(Forward._weighted(stub, None, x, w), expected, rtol=1e-6)
