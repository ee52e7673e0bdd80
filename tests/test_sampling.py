"""Sampling and stopping: each option changes the distribution as defined (checked against brute-force loops),
stop strings cut streamed text where the whole text would be cut, log-probabilities are the model's own."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe.sampling import (Sampler, SamplingOptions, StopStrings, penalized, token_logprobs,
                               truncated_probabilities)


def brute_force_distribution(logits, temperature, top_k, top_p, min_p):
    """The definitions one token at a time: softmax(logits / T); keep a token if fewer than k tokens are more
    likely, if the tokens more likely than it (ties: lower id first) have mass < top_p, and if p >= min_p p_max."""
    z = [x / temperature for x in logits]
    m = max(z)
    p = [math.exp(x - m) for x in z]
    p = [x / sum(p) for x in p]

    def renormalize(keep):
        total = sum(p[i] for i in range(len(p)) if keep[i])
        return [p[i] / total if keep[i] else 0.0 for i in range(len(p))]

    if top_k:
        p = renormalize([sum(q > p[i] for q in p) < top_k for i in range(len(p))])
    if top_p < 1:
        before = lambda i: sum(p[j] for j in range(len(p)) if p[j] > p[i] or (p[j] == p[i] and j < i))
        p = renormalize([before(i) < top_p for i in range(len(p))])
    if min_p:
        p = renormalize([p[i] >= min_p * max(p) for i in range(len(p))])
    return p


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-32, 32), min_size=2, max_size=12), st.floats(0.3, 2.0), st.integers(0, 5),
       st.floats(0.05, 1.0), st.floats(0.0, 0.9))
def test_truncation_matches_the_definitions(logits, temperature, top_k, top_p, min_p):
    # logits on a 1/8 grid: ties are exact (near-ties would compare rounding, not the definitions)
    logits = [x / 8 for x in logits]
    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = truncated_probabilities(np.asarray(logits, np.float32), options)
    expected = brute_force_distribution([float(np.float32(x)) for x in logits], temperature, top_k, top_p, min_p)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_each_truncation_changes_which_tokens_are_drawn():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04], np.float32))

    def draws(**options):
        sampler = Sampler(SamplingOptions(temperature=1.0, seed=0, **options))
        return {sampler(logits, [], []) for _ in range(600)}

    assert draws() == {0, 1, 2, 3, 4}
    assert draws(top_k=2) == {0, 1}
    assert draws(min_p=0.45) == {0, 1, 2}  # p >= 0.18
    assert draws(top_p=0.65) == {0, 1}
    sampler = Sampler(SamplingOptions(temperature=1.0, top_k=3, seed=0))
    counts = np.bincount([sampler(logits, [], []) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, [4 / 9, 3 / 9, 2 / 9, 0, 0], atol=0.03)


def test_penalties_follow_their_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=10).astype(np.float32)
    prompt, output = [1, 2, 2], [2, 3, 3, 3, 7]
    got = penalized(logits, SamplingOptions(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
                    prompt, output)
    for token in range(10):
        expected = float(logits[token])
        if token in prompt or token in output:  # CTRL: divide a positive logit, multiply a negative one
            expected = expected / 1.3 if expected > 0 else expected * 1.3
        expected -= 0.5 * (token in output) + 0.25 * output.count(token)  # OpenAI: output tokens only
        assert got[token] == pytest.approx(expected, abs=1e-6)
    assert penalized(logits, SamplingOptions(), prompt, output) is logits  # off: untouched


def test_greedy_repetition_penalty_changes_output_as_defined(tiny_package):
    """Each greedy token under penalties is the argmax of the penalized logits of a fresh prefill."""
    model = edge_moe.load(tiny_package[0])
    prompt = [5, 6, 7, 8]
    plain = model.generate(prompt, max_new_tokens=12).token_ids
    options = dict(repetition_penalty=3.0, frequency_penalty=1.5)
    tokens = model.generate(prompt, max_new_tokens=12, **options).token_ids
    assert tokens != plain
    for i, token in enumerate(tokens):
        logits = model.logits(prompt + tokens[:i])[-1]
        assert token == int(np.argmax(penalized(logits, SamplingOptions(**options), prompt, tokens[:i])))


def test_logprobs_are_the_models_log_softmax(tiny_package):
    model = edge_moe.load(tiny_package[0])
    prompt = [3, 9, 4]
    result = model.generate(prompt, max_new_tokens=5, temperature=0.8, seed=2, logprobs=3)
    for i, (token, (chosen, top)) in enumerate(zip(result.token_ids, result.logprobs)):
        logits = model.logits(prompt + result.token_ids[:i])[-1].astype(np.float64)
        reference = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert chosen == pytest.approx(reference[token], abs=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-reference)[:3])
        assert [v for _, v in top] == pytest.approx(sorted(reference, reverse=True)[:3], abs=1e-4)
    assert token_logprobs(np.zeros(4, np.float32), 1, 0) == (pytest.approx(math.log(0.25)), [])


def first_stop(text, stops):
    """Oracle: the stop occurrence that ends first in the whole text (ties: the longer); the text before it."""
    best = None
    for s in stops:
        for i in range(len(text) - len(s) + 1):
            if s and text[i:i + len(s)] == s:
                best = min(best or (i + len(s), i), (i + len(s), i))
    return (text[:best[1]], True) if best else (text, False)


@settings(max_examples=200, deadline=None)
@given(st.text("ab\n", max_size=20), st.lists(st.text("ab\n", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(1, 5), min_size=20, max_size=20))
def test_stop_strings_cut_streamed_text_like_the_whole_text(text, stops, cuts):
    matcher, emitted, pos = StopStrings(stops), "", 0
    for n in cuts:
        if pos >= len(text) or matcher.stopped:
            break
        emitted += matcher.feed(text[pos:pos + n])
        pos += n
    if not matcher.stopped:
        emitted += matcher.flush()
    assert (emitted, matcher.stopped) == first_stop(text, stops)


def test_stop_string_ends_generation(shipped_package):
    model = edge_moe.load(shipped_package)
    full = model.generate("def fibonacci(n):", max_new_tokens=30).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    result = model.generate("def fibonacci(n):", max_new_tokens=30, stop=[stop, "zzzz-never"])
    assert result.finish_reason == "stop"
    assert result.text == full[:full.index(stop)]
    streamed = "".join(r.text for r in model.stream_generate("def fibonacci(n):", max_new_tokens=30, stop=stop))
    assert streamed == result.text


@pytest.mark.parametrize("which", ["tiny", "shipped"])  # plain-ONNX attention; GroupQueryAttention in place
def test_prompt_cache_prefills_only_new_tokens_and_changes_nothing(tiny_package, shipped_package, which):
    model = edge_moe.load(tiny_package[0] if which == "tiny" else shipped_package)
    cache = model.prompt_cache()
    first = model.generate([5, 6, 7], max_new_tokens=4, prompt_cache=cache)
    assert first.stats["cached_prompt_tokens"] == 0
    follow = [5, 6, 7] + first.token_ids + [9, 10]
    second = model.generate(follow, max_new_tokens=6, prompt_cache=cache)
    assert second.stats["cached_prompt_tokens"] == 3 + 4 - 1  # the last sampled token was never fed
    assert second.token_ids == model.generate(follow, max_new_tokens=6).token_ids
    edited = model.generate([5, 8, 8, 8, 8], max_new_tokens=6, prompt_cache=cache)  # diverges after one token
    assert edited.stats["cached_prompt_tokens"] == 1
    assert edited.token_ids == model.generate([5, 8, 8, 8, 8], max_new_tokens=6).token_ids


@pytest.mark.parametrize("option, value", [("top_k", -1), ("min_p", 1.5), ("repetition_penalty", 0),
                                           ("presence_penalty", 3), ("seed", -1), ("top_p", 0), ("temperature", -1)])
def test_bad_sampling_values_are_one_line_errors(tiny_package, option, value):
    model = edge_moe.load(tiny_package[0])
    with pytest.raises(EdgeMoeError, match=option):
        model.generate([1, 2], max_new_tokens=2, **{option: value})


def test_prompt_cache_pool_hands_out_the_longest_shared_prefix(tiny_package):
    from edge_moe.generate import PromptCachePool

    model = edge_moe.load(tiny_package[0])
    pool = PromptCachePool(model.forward, size=2)
    caches = []
    for prompt in ([5, 6, 7], [5, 9, 9, 9], [8, 8]):
        cache = pool.take(prompt)
        model.generate(prompt, max_new_tokens=2, prompt_cache=cache)
        caches.append(cache)
        pool.give(cache)
    assert pool.take([1, 2]) is not caches[1] and pool.take([5, 9, 9, 9, 4]) is caches[1]
    assert pool.take([5, 6, 7, 1]) is not caches[0]  # the oldest was dropped (size 2)
    empty = PromptCachePool(model.forward, size=0)
    empty.give(caches[2])
    assert empty.take([8, 8, 1]) is not caches[2]
