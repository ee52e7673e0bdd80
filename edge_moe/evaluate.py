"""`edge-moe eval`: perplexity on a text, against a unigram baseline and optionally a reference package (KL), and
the routing statistics of `edge-moe inspect --routing`.

Text is cut into windows of the model's context (or --window tokens) that overlap by one token; each window is one
fresh prefill and scores every token after its first, so every token of the text but the first is scored once,
from at most `window` - 1 tokens before it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import EdgeMoeError


def read_text_ids(model, path: str | Path) -> list[int]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeMoeError(f"{path}: no such text file") from None
    except UnicodeDecodeError:
        raise EdgeMoeError(f"{path}: not UTF-8 text") from None
    ids = model.encode(text)
    if len(ids) < 2:
        raise EdgeMoeError(f"{path}: needs at least 2 tokens of text to score")
    return ids


def windows(ids: list[int], window: int):
    """Windows that overlap by one token, so every token but the first is predicted exactly once."""
    window = max(window, 2)
    for start in range(0, len(ids) - 1, window - 1):
        chunk = ids[start:start + window]
        if len(chunk) >= 2:
            yield chunk


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def evaluate(model, ids: list[int], window: int, reference=None, progress=None) -> dict:
    """Negative log-likelihood per token (-> perplexity) and, with a reference model, mean KL(ref || model)."""
    nll, count, kl = 0.0, 0, 0.0
    for chunk in windows(ids, window):
        logp = log_softmax(model.logits(chunk).astype(np.float64))[:-1]
        targets = np.asarray(chunk[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        if reference is not None:
            ref = log_softmax(reference.logits(chunk).astype(np.float64))[:-1]
            kl += float((np.exp(ref) * (ref - logp)).sum())
        count += len(targets)
        if progress is not None:
            progress.update(len(chunk))
    result = {"tokens": count, "nll_per_token": nll / count, "perplexity": math.exp(nll / count)}
    if reference is not None:
        result["mean_kl_vs_reference"] = kl / count
    return result


def unigram_perplexity(ids: list[int], vocab: int, train_ids: list[int] | None = None) -> float:
    """Perplexity of an add-one-smoothed unigram model estimated on train_ids (default: the scored text itself,
    which flatters the baseline) over the same predicted tokens as `evaluate` (all but the first)."""
    counts = np.bincount(np.asarray(train_ids if train_ids is not None else ids), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-float(logp[np.asarray(ids[1:])].mean()))


def routing_statistics(model, ids: list[int], window: int) -> list[dict]:
    """Per MoE layer: expert popularity (entropy against uniform, share of routings taken by the top 25% of
    experts) and how often consecutive tokens reuse experts (mean share of token t's experts that token t-1 used)."""
    E, k = model.config["num_experts"], model.config["top_k"]
    counts: dict[int, np.ndarray] = {}
    reuse: dict[int, list[float]] = {}

    def observe(layer, indices):
        counts.setdefault(layer, np.zeros(E))
        np.add.at(counts[layer], indices.ravel(), 1)
        shared = [len(set(a) & set(b)) / k for a, b in zip(indices[1:].tolist(), indices[:-1].tolist())]
        reuse.setdefault(layer, []).extend(shared)

    model.forward.route_observers.append(observe)
    try:
        for chunk in windows(ids, window):
            model.logits(chunk)
    finally:
        model.forward.route_observers.remove(observe)
    rows = []
    for layer in sorted(counts):
        p = counts[layer] / counts[layer].sum()
        entropy = -float((p[p > 0] * np.log(p[p > 0])).sum())
        top = np.sort(p)[::-1][:max(1, E // 4)].sum()
        rows.append({"layer": layer, "entropy_vs_uniform": entropy / math.log(E), "top25_share": float(top),
                     "consecutive_reuse": float(np.mean(reuse[layer])) if reuse[layer] else 0.0,
                     "reuse_if_random": k / E})
    return rows
