"""What a family declares and the runtime obeys: its router and its attention's KV cache, as typed records.

One module serves both sides (as gguf-py does for GGUF): the exporter builds these dataclasses from a checkpoint's
config.json and writes `to_dict()` under the manifest's `config["router"]` / `config["attention"]`; the runtime reads
them back with `from_dict()`, which validates every field in one place. Packages written before these keys existed
get the router they were exported with (softmax top-k, `norm_topk_prob`) and GQA attention.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from .errors import EdgeMoeError

SCORINGS = ("softmax", "sigmoid", "sparsemixer")
GROUP_SCORES = ("max", "top2_sum")     # DeepSeek-V2: a group's best expert; DeepSeek-V3: its best two summed
WEIGHT_ON = ("output", "input")        # where a routed expert's weight multiplies (Llama 4: its input)
ATTENTION_KINDS = ("gqa", "mla")
_REEXPORT = "re-export the model with `edge-moe export HF_DIR OUT_DIR`"


def _fail(name: str, value, fix: str):
    raise EdgeMoeError(f"{name}={value!r} {fix}")


def _from_dict(cls, data, where: str):
    """Builds dataclass `cls` from a manifest dict; one-line errors for missing, unknown, mistyped or invalid
    fields."""
    try:
        return _build(cls, data)
    except EdgeMoeError as exc:
        raise EdgeMoeError(f"{where}: {exc}; {_REEXPORT}") from None


def _build(cls, data):
    if not isinstance(data, dict):
        _fail(cls.__name__, data, "is not an object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        _fail(unknown[0], data[unknown[0]], f"is not a field of {cls.__name__} (install a newer edge_moe)")
    values = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING:
                _fail(name, None, "is missing")
            continue
        value, kind = data[name], f.type
        ok = {"int": isinstance(value, int) and not isinstance(value, bool), "bool": isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str)}[kind]
        if not ok:
            _fail(name, value, f"is not of type {kind}")
        values[name] = float(value) if kind == "float" else value
    return cls(**values)  # __post_init__ validates


@dataclass(frozen=True)
class RouterSpec:
    """How router logits [T, E] become each token's experts and weights.

    scoring: softmax over all experts; sigmoid per expert (DeepSeek-V3); sparsemixer (Phi-3.5-MoE at inference:
        two argmax rounds, each weight a softmax over the logits within `jitter_eps` of that round's best).
    normalize: renormalize the chosen weights to sum to 1 (Mixtral, norm_topk_prob).
    selection_bias: a per-layer bias (the package's router entry `selection_bias`) is added to the scores to choose
        experts but not to weight them (DeepSeek-V3's e_score_correction_bias).
    n_group, topk_group, group_score: group-limited top-k: experts split into n_group equal groups, only the
        topk_group best groups (by group_score) may be chosen.
    scaling_factor: multiplies every weight after normalization (DeepSeek's routed_scaling_factor; Granite's
        residual_multiplier, which scales the whole MoE output).
    weight_on: "output" (y = w * expert(x)) or "input" (y = expert(w * x), Llama 4).
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    normalize: bool = False
    selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    scaling_factor: float = 1.0
    weight_on: str = "output"
    jitter_eps: float = 0.0

    def __post_init__(self):
        if self.num_experts < 1:
            _fail("num_experts", self.num_experts, "must be at least 1")
        if not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"must be between 1 and num_experts={self.num_experts}")
        for name, allowed in (("scoring", SCORINGS), ("group_score", GROUP_SCORES), ("weight_on", WEIGHT_ON)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"is not supported; supported: {', '.join(allowed)}")
        if self.scoring == "sparsemixer" and self.top_k != 2:
            _fail("top_k", self.top_k, "must be 2 with sparsemixer scoring (it picks two experts)")
        if self.n_group < 1 or self.num_experts % self.n_group:
            _fail("n_group", self.n_group, f"must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            _fail("topk_group", self.topk_group, f"must be between 1 and n_group={self.n_group}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            _fail("top_k", self.top_k, "exceeds the experts in topk_group groups")
        if self.group_score == "top2_sum" and self.n_group > 1 and self.num_experts // self.n_group < 2:
            _fail("group_score", self.group_score, "needs at least two experts a group")

    @property
    def ranks_by_logits(self) -> bool:
        """The chosen experts are the top-k router logits, best first (so a predictor may rank raw logits)."""
        return self.n_group == 1 and not self.selection_bias

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "manifest config.router") -> "RouterSpec":
        return _from_dict(cls, data, where)


@dataclass(frozen=True)
class AttentionSpec:
    """What the layer graphs' attention caches per token and layer: `key` [key_heads, key_dim] and `value`
    [value_heads, value_dim]. GQA caches K and V per KV head; MLA (DeepSeek-V2/V3) caches the normalized latent
    (1 x kv_lora_rank) as `key` and the shared roped key (1 x qk_rope_head_dim) as `value`, not expanded K/V."""

    kind: str
    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            _fail("kind", self.kind, f"is not supported; supported: {', '.join(ATTENTION_KINDS)}")
        for name in ("key_heads", "key_dim", "value_heads", "value_dim"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be at least 1")

    @property
    def cache_floats_per_token(self) -> int:
        return self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "manifest config.attention") -> "AttentionSpec":
        return _from_dict(cls, data, where)


# A MoE layer graph's outputs that carry each token's experts and weights, in front of key/value, where the router
# is a plain softmax top-k (routes_in_graph): routing then happens inside the graph, not in numpy (model.Backbone)
ROUTE_OUTPUTS = ("route_indices", "route_weights")


def routes_in_graph(spec: RouterSpec) -> bool:
    """Whether a layer graph can route exactly as routing.route does for this router: softmax scores, top-k (ties
    to the lower index), renormalized or not, scaled or not; no selection bias, groups, sigmoid or sparsemixer."""
    return (spec.scoring == "softmax" and not spec.selection_bias and spec.n_group == 1
            and spec.weight_on == "output")


def router_spec(config: dict) -> RouterSpec:
    """The router of a manifest `config` (packages without `router`: softmax top-k as they were exported)."""
    if "router" in config:
        return RouterSpec.from_dict(config["router"])
    return RouterSpec(num_experts=int(config["num_experts"]), top_k=int(config["top_k"]),
                      normalize=bool(config.get("norm_topk_prob", False)))


def attention_spec(config: dict) -> AttentionSpec:
    """The attention cache layout of a manifest `config` (packages without `attention`: GQA)."""
    if "attention" in config:
        return AttentionSpec.from_dict(config["attention"])
    kv, d = int(config["num_key_value_heads"]), int(config["head_dim"])
    return AttentionSpec("gqa", kv, d, kv, d)
