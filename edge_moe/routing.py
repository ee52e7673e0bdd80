"""Top-k routing from router logits, as the families define it, and the grouping of tokens by expert."""

from __future__ import annotations

import numpy as np


def route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over experts, the top-k, optionally renormalized.

    Args:
        logits: [T, E] router logits.
        top_k: experts per token.
        normalize: renormalize the top-k probabilities to sum to 1 (norm_topk_prob; always for Mixtral).
    Returns:
        (indices [T, k] int64, weights [T, k] float32), highest probability first.
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    if probs.shape[0] == 1:  # decode: plain indexing is several times cheaper than the general path
        row = probs[0]
        best = np.argpartition(-row, top_k - 1)[:top_k] if top_k < row.shape[0] else np.arange(row.shape[0])
        best = best[np.argsort(-row[best], kind="stable")]
        weights = row[best]
        if normalize:
            weights = weights / weights.sum()
        return best[None, :].astype(np.int64), weights[None, :].astype(np.float32)
    if top_k < probs.shape[-1]:
        part = np.argpartition(-probs, top_k - 1, axis=-1)[:, :top_k]
    else:
        part = np.broadcast_to(np.arange(probs.shape[-1]), probs.shape)
    order = np.argsort(-np.take_along_axis(probs, part, axis=-1), axis=-1, kind="stable")
    indices = np.take_along_axis(part, order, axis=-1)
    weights = np.take_along_axis(probs, indices, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return indices.astype(np.int64), weights.astype(np.float32)


def group_by_expert(indices: np.ndarray):
    """Yields (expert, token rows, top-k slots) for every expert routed at least once, in expert order.

    Prefill runs each expert once on all the tokens routed to it rather than once per token.
    """
    flat = indices.ravel()
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    k = indices.shape[1]
    bounds = list(starts[1:]) + [len(flat)]
    for expert, start, end in zip(experts, starts, bounds):
        positions = order[start:end]
        yield int(expert), positions // k, positions % k
