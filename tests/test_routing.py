"""Top-k routing against a brute-force reference (a full sort), for decode (T=1) and prefill shapes."""

import numpy as np
import pytest

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
        indices, weights = route(logits, k, normalize)
        assert (indices == order).all()
        np.testing.assert_allclose(weights, expected, rtol=1e-6)


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
