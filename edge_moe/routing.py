"""Top-k routing from router logits, as the families define it, and the grouping of tokens by expert."""

from __future__ import annotations

import os

import numpy as np

from .errors import EdgeMoeError
from .family_spec import RouterSpec, router_spec
from .package_files import open_regular


def read_backbone_tensor(manifest, entry: dict) -> np.ndarray:
    """A tensor the manifest's `backbone.routers` locates in the backbone blob (router, norm, biases), as float32
    (verified at load; manifest_checks bounds offset and size)."""
    fd = open_regular(manifest.backbone_blob, "backbone.blob")
    try:
        raw = os.pread(fd, entry["nbytes"], entry["offset"])
    finally:
        os.close(fd)
    if len(raw) != entry["nbytes"]:
        raise EdgeMoeError(f"{manifest.backbone_blob}: short read of a router; the file changed after load")
    return np.frombuffer(raw, dtype=entry["dtype"]).reshape(entry["shape"]).astype(np.float32)


class Router:
    """A package's router: the family's spec and each MoE layer's selection bias, applied to router logits."""

    def __init__(self, manifest):
        self.spec = router_spec(manifest.config)
        self.bias = {}
        if self.spec.selection_bias:
            for layer in manifest.config["moe_layers"]:
                entry = manifest.routers.get(layer, {}).get("selection_bias")
                if entry is None:
                    raise EdgeMoeError(f"{manifest.root}/manifest.json: backbone.routers has no selection_bias for "
                                       f"layer {layer}; re-export the model with `edge-moe export HF_DIR OUT_DIR`")
                self.bias[layer] = read_backbone_tensor(manifest, entry)

    def __call__(self, layer: int, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """logits [T, E] of MoE layer `layer` -> (indices [T, k], weights [T, k]), as `route`."""
        return route(logits, self.spec, self.bias.get(layer))

    def ranked(self, layer: int, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k experts (k may exceed top_k) the router prefers, by the family's selection scores (bias and
        groups included), best first, with their scores (0 outside the allowed groups): what a predictor ranks."""
        scores = _scores(logits, self.spec)  # sparsemixer ranks as softmax does: by the logits
        choice = selection_scores(scores, self.spec, self.bias.get(layer))
        indices = _top_k(choice, k)
        return indices, np.take_along_axis(np.where(np.isfinite(choice), scores, 0.0), indices, axis=-1)


def route(logits: np.ndarray, spec: RouterSpec, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each token's experts and weights, as the family's router defines them.

    Args:
        logits: [T, E] router logits.
        spec: the family's router (scoring, selection bias, groups, normalization, scaling).
        bias: [E] the layer's selection-only bias when `spec.selection_bias`.
    Returns:
        (indices [T, k] int64, weights [T, k] float32), best choice first.
    """
    if spec.scoring == "sparsemixer":
        return _sparsemixer(logits.astype(np.float32, copy=False), spec.jitter_eps)
    scores = _scores(logits, spec)
    choice = selection_scores(scores, spec, bias)
    indices = _top_k(choice, spec.top_k)
    # decode (one token): plain indexing, several times cheaper than take_along_axis; the same values
    weights = scores[:, indices[0]] if scores.shape[0] == 1 else np.take_along_axis(scores, indices, axis=-1)
    if spec.normalize:
        # DeepSeek-V3 adds 1e-20 so that all-zero sigmoid weights cannot divide by zero; softmax never needs it
        weights = weights / (weights.sum(axis=-1, keepdims=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
    if spec.scaling_factor != 1.0:
        weights = weights * np.float32(spec.scaling_factor)
    return indices, weights.astype(np.float32, copy=False)


def selection_scores(scores: np.ndarray, spec: RouterSpec, bias: np.ndarray | None = None) -> np.ndarray:
    """[T, E] scores whose top-k are the chosen experts: plus the selection bias, and -inf outside the topk_group
    best groups where routing is group-limited."""
    choice = scores + bias if spec.selection_bias and bias is not None else scores
    if spec.n_group == 1:
        return choice
    tokens, size = choice.shape[0], spec.num_experts // spec.n_group
    grouped = choice.reshape(tokens, spec.n_group, size)                               # [T, G, E/G]
    if spec.group_score == "max":
        group = grouped.max(axis=-1)
    else:
        group = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)                       # best two of each group
    keep = _top_k(group, spec.topk_group)                                              # [T, topk_group]
    mask = np.ones((tokens, spec.n_group), bool)
    np.put_along_axis(mask, keep, False, axis=-1)
    return np.where(np.repeat(mask, size, axis=-1), -np.inf, choice).astype(np.float32)


def _scores(logits: np.ndarray, spec: RouterSpec) -> np.ndarray:
    """Per-expert scores: a sigmoid each (DeepSeek-V3), else the softmax over experts."""
    return 1.0 / (1.0 + np.exp(-logits)) if spec.scoring == "sigmoid" else _softmax(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[T, k] int64 indices of each row's k highest scores, highest first (ties: lower index first)."""
    if scores.shape[0] == 1:  # decode: plain indexing is several times cheaper than the general path
        row = scores[0]
        best = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
        return best[np.argsort(-row[best], kind="stable")][None, :].astype(np.int64)
    if k < scores.shape[-1]:
        part = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1).astype(np.int64)


def _sparsemixer(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Phi-3.5-MoE's router at inference: the best expert, then the best of the rest; each weight is a softmax
    over the logits that lie within 2 * eps (relative) of that round's best, the first round's expert excluded
    from the second."""
    indices, weights = [], []
    remaining = logits
    for _ in range(2):
        best = remaining.argmax(axis=-1)[:, None]                                     # [T, 1]
        top = np.take_along_axis(remaining, best, axis=-1)
        far = (top - logits) / np.maximum(np.abs(logits), top) > 2 * eps
        gates = _softmax(np.where(far, -np.inf, remaining))
        indices.append(best)
        weights.append(np.take_along_axis(gates, best, axis=-1))
        remaining = remaining.copy()
        np.put_along_axis(remaining, best, -np.inf, axis=-1)
    return np.concatenate(indices, axis=-1).astype(np.int64), np.concatenate(weights, axis=-1).astype(np.float32)


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
