"""What every MoE family shares: config normalization, Hugging Face key names, and the backbone graphs.

A family module subclasses `MoEFamily` and overrides only what differs (key names, q/k norms, shared expert).
Graphs per layer (T = tokens in this call, P = cached tokens, S = P + T, G = query heads per KV head):

    hidden_states [T,H] --rms_norm--> x --q/k/v Gemm--> q [T,nH,D], k/v [T,kvH,D] --(qk norm)--> RoPE(q, k)
      k, v -----------------------------------------------------------------------> outputs key, value
      concat(past, new) [S,kvH,D] --> softmax(q K^T / sqrt(D) + causal mask) V --o_proj--> + hidden_states = h
    h --rms_norm--> moe_input --router Gemm--> router_logits [T,E]
    residual = h (+ sigmoid(gate) * shared_expert(moe_input)) (or h + dense mlp on layers without experts)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_moe.errors import EdgeMoeError
from edge_moe.family_spec import ROUTE_OUTPUTS, AttentionSpec, RouterSpec, routes_in_graph
from edge_moe.onnx_build import GraphBuilder

from .rope import inverse_frequencies, rope_parameters

ATTENTION_HOOKS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Arch:
    """The architecture fields the runtime needs, normalized across families (manifest `config`)."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    moe_layers: list[int]
    sliding_windows: list[int | None]
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    router: RouterSpec | None = None        # what the runtime routes by (manifest config.router)
    attention: AttentionSpec | None = None  # what the KV cache holds (manifest config.attention)

    def to_config(self) -> dict:
        """The manifest's `config`: these fields, with the router and attention in their typed format."""
        plain = {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in ("router", "attention")}
        return {**plain, "router": self.router.to_dict(), "attention": self.attention.to_dict()}
    # "gqa": layer graphs attend with com.microsoft.GroupQueryAttention over a KV buffer the runtime preallocates
    # and the graph updates in place; "generic": plain ONNX ops over a [P, kvH, D] past (model.py reads this).
    attention_kernel: str = "generic"


def _required(config: dict, *names: str):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise EdgeMoeError(f"config.json: field {names[0]!r} is missing; the checkpoint's config is incomplete")


class MoEFamily:
    """Base of every family. `emit_*` methods build graphs; `weight(key)` streams a checkpoint tensor into the
    backbone blob and returns the name of its float32 value in the graph being built."""

    model_type = ""
    expert_prefix = "mlp"            # model.layers.{i}.<prefix>.experts.{e}...
    expert_projections = ("gate_proj", "up_proj", "down_proj")
    qkv_bias = False
    o_bias = False                   # a bias on the attention output projection (Phi-3.5-MoE)
    expert_kind = "swiglu"           # edge_moe.expert_graph.KINDS
    rope_types = ("default", "yarn")  # what emit_rope_tables computes (rope.py); others are refused
    lm_head_bias = False
    # Families whose attention is standard GQA with Hugging Face RoPE run it as one fused kernel (emit_gqa_attention);
    # a family with another attention (MLA, sinks) sets this False and overrides emit_attention.
    fused_attention = True

    def __init__(self, config: dict):
        self.config = config
        self.arch = self.make_arch(config)
        try:
            self.arch.router = self.make_router(config, self.arch)
            self.arch.attention = self.make_attention(config, self.arch)
        except EdgeMoeError as exc:  # the spec names the field; say where it came from
            raise EdgeMoeError(f"config.json: {exc}") from None
        # onnxruntime's GroupQueryAttention takes head sizes that are multiples of 16 (every released model's are)
        # and computes plain RoPE from the tables the runtime passes (kv_cache.rope_tables)
        fused = (self.fused_attention and self.arch.head_dim % 16 == 0
                 and rope_parameters(config, self.rope_types)["rope_type"] == "default")
        self.arch.attention_kernel = "gqa" if fused else "generic"

    # Configuration ------------------------------------------------------------------------------------

    def make_arch(self, c: dict) -> Arch:
        hidden = int(_required(c, "hidden_size"))
        heads = int(_required(c, "num_attention_heads"))
        layers = int(_required(c, "num_hidden_layers"))
        eos = c.get("eos_token_id")
        return Arch(
            hidden_size=hidden, num_layers=layers, vocab_size=int(_required(c, "vocab_size")),
            num_attention_heads=heads, num_key_value_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            rope_theta=float(rope_parameters(c, self.rope_types)["rope_theta"]),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            num_experts=int(_required(c, "num_experts", "num_local_experts")),
            top_k=int(_required(c, "num_experts_per_tok")),
            moe_intermediate_size=int(_required(c, "moe_intermediate_size", "intermediate_size")),
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            moe_layers=self.moe_layers(c, layers), sliding_windows=self.sliding_windows(c, layers),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    def make_router(self, c: dict, arch: Arch) -> RouterSpec:
        """The family's router; the default is softmax top-k, renormalized where norm_topk_prob says so."""
        return RouterSpec(num_experts=arch.num_experts, top_k=arch.top_k, normalize=arch.norm_topk_prob)

    def make_attention(self, c: dict, arch: Arch) -> AttentionSpec:
        """What the layer graphs cache per token (their key/value outputs); GQA by default."""
        kv, d = arch.num_key_value_heads, arch.head_dim
        return AttentionSpec("gqa", kv, d, kv, d)

    def router_bias_key(self, layer: int) -> str | None:
        """A bias of the router's linear layer (GPT-OSS), part of the logits."""
        return None

    def selection_bias_key(self, layer: int) -> str | None:
        """The checkpoint tensor added to router scores for selection only, where the family has one."""
        return None

    def moe_layers(self, c: dict, layers: int) -> list[int]:
        """Layers with routed experts; Qwen-style configs can make some layers dense."""
        step = int(c.get("decoder_sparse_step", 1) or 1)
        dense = set(c.get("mlp_only_layers") or [])
        return [i for i in range(layers) if i not in dense and (i + 1) % step == 0]

    def sliding_windows(self, c: dict, layers: int) -> list[int | None]:
        window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
        return [window or None] * layers

    # Hugging Face key names --------------------------------------------------------------------------

    def layer_key(self, layer: int, name: str) -> str:
        return f"model.layers.{layer}.{name}"

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of one routed expert."""
        base = self.layer_key(layer, f"{self.expert_prefix}.experts.{expert}")
        return tuple(f"{base}.{proj}.weight" for proj in self.expert_projections)

    def read_expert(self, checkpoint, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate [F, H], up [F, H], down [H, F]) of one routed expert, Hugging Face [out, in] layout."""
        return tuple(checkpoint.read(key) for key in self.expert_keys(layer, expert))

    def router_key(self, layer: int) -> str:
        return self.layer_key(layer, f"{self.expert_prefix}.gate.weight")

    def quantizable_backbone_weight(self, key: str) -> bool:
        """Matrices `--backbone-bits` may store block-quantized: attention projections and an untied lm_head (the
        embedding is a gather of one row a token, routers decide which experts run and stay exact)."""
        if key == "lm_head.weight":
            return not self.arch.tie_word_embeddings
        return any(key.endswith(f"self_attn.{p}.weight") for p in ATTENTION_HOOKS)

    # Graph emission ------------------------------------------------------------------------------------

    def emit_embed(self, g: GraphBuilder, weight) -> None:
        a = self.arch
        ids = g.input("input_ids", "int64", ["T"])
        # the rows in the stored dtype, then float32: a float16 table stays float16 in memory (4 MiB of the baseline
        # of a 4096 x 512 table; a cast before the gather is folded into a float32 copy of the whole table)
        table, dtype = weight("model.embed_tokens.weight", stored=True)
        hidden = g.as_float32(g.op("Gather", table, ids, axis=0), dtype)
        if self.embedding_scale() != 1.0:
            hidden = g.op("Mul", hidden, g.const(self.embedding_scale()))
        g.output(hidden, "hidden_states", "float32", ["T", a.hidden_size])

    def emit_head(self, g: GraphBuilder, weight) -> None:
        a = self.arch
        x = g.input("hidden_states", "float32", ["T", a.hidden_size])
        x = self.emit_norm(g, x, "model.norm", weight)
        lm_head = "model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"
        logits = g.linear(x, weight(lm_head), weight("lm_head.bias") if self.lm_head_bias else None)
        if self.logit_scale() != 1.0:
            logits = g.op("Mul", logits, g.const(self.logit_scale()))
        g.output(logits, "logits", "float32", ["T", a.vocab_size])

    def emit_layer(self, g: GraphBuilder, layer: int, weight) -> None:
        a = self.arch
        w = lambda name: weight(self.layer_key(layer, name))  # noqa: E731
        hidden = g.input("hidden_states", "float32", ["T", a.hidden_size])
        g.scope = f"/model/layers.{layer}/attn"
        x = self.emit_norm(g, hidden, self.layer_key(layer, "input_layernorm"), weight)
        if a.attention_kernel == "gqa":
            attn, new_k, new_v = self.emit_gqa_attention(g, layer, x, w)
            kv_shapes = [[1, a.num_key_value_heads, "M", a.head_dim]] * 2
        else:
            kv = a.attention
            past_k = g.input("past_key", "float32", ["P", kv.key_heads, kv.key_dim])
            past_v = g.input("past_value", "float32", ["P", kv.value_heads, kv.value_dim])
            attn, new_k, new_v = self.emit_attention(g, layer, x, past_k, past_v, w)
            kv_shapes = [["T", kv.key_heads, kv.key_dim], ["T", kv.value_heads, kv.value_dim]]
        h = g.op("Add", hidden, self.scale_residual(g, attn))
        g.scope = f"/model/layers.{layer}/moe"
        moe_input = self.emit_norm(g, h, self.layer_key(layer, "post_attention_layernorm"), weight)
        if layer in a.moe_layers:
            residual = self.emit_shared_expert(g, layer, h, moe_input, w)
            bias_key = self.router_bias_key(layer)
            logits = g.linear(moe_input, weight(self.router_key(layer)), weight(bias_key) if bias_key else None)
            g.output(residual, "residual", "float32", ["T", a.hidden_size])
            g.output(moe_input, "moe_input", "float32", ["T", a.hidden_size])
            g.output(logits, "router_logits", "float32", ["T", a.num_experts])
            spec = self.arch.router
            if spec is not None and routes_in_graph(spec):  # routing inside the graph (family_spec.ROUTE_OUTPUTS)
                indices, weights = g.route_top_k(logits, spec.top_k, spec.normalize, spec.scaling_factor)
                g.output(indices, ROUTE_OUTPUTS[0], "int64", ["T", spec.top_k])
                g.output(weights, ROUTE_OUTPUTS[1], "float32", ["T", spec.top_k])
        else:
            residual = g.op("Add", h, self.scale_residual(g, self.emit_dense_mlp(g, layer, moe_input, w)))
            g.output(residual, "residual", "float32", ["T", a.hidden_size])
        g.output(new_k, "key", "float32", kv_shapes[0])
        g.output(new_v, "value", "float32", kv_shapes[1])

    def emit_gqa_attention(self, g: GraphBuilder, layer: int, x: str, w):
        """Attention as one com.microsoft.GroupQueryAttention node (RoPE inside, KV updated in place):

            x [T,H] --q/k/v--> (qkv post, head norms) --> GQA(q, k, v, past [1,kvH,M,D], seqlens_k, total, cos, sin)
              --> out [T, nH*D] --o_proj-->;   key/value outputs are the same [1,kvH,M,D] buffers, bound in place

        A dozen nodes instead of ~70 and no copy of the cache per call (kv_cache.py: GqaKVCache). Inputs the runtime
        feeds: past_key/past_value (capacity M >= total), seqlens_k [1] = total - 1, total_sequence_length, and
        cos_cache/sin_cache [>= total, D/2] (the RoPE tables, shared by every layer).
        """
        a = self.arch
        heads, kv_heads, d = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        past_k = g.input("past_key", "float32", [1, kv_heads, "M", d])
        past_v = g.input("past_value", "float32", [1, kv_heads, "M", d])
        seqlens = g.input("seqlens_k", "int32", [1])
        total = g.input("total_sequence_length", "int32", [])
        cos = g.input("cos_cache", "float32", ["C", d // 2])
        sin = g.input("sin_cache", "float32", ["C", d // 2])
        q, k, v = self.emit_qkv(g, layer, x, w)
        if type(self).emit_head_norms is not MoEFamily.emit_head_norms:
            q3 = g.op("Reshape", q, g.const([0, heads, d], "int64"))
            k3 = g.op("Reshape", k, g.const([0, kv_heads, d], "int64"))
            q3, k3 = self.emit_head_norms(g, layer, q3, k3, w)
            q = g.op("Reshape", q3, g.const([0, heads * d], "int64"))
            k = g.op("Reshape", k3, g.const([0, kv_heads * d], "int64"))
        batch = g.const([0], "int64")
        window = a.sliding_windows[layer]
        out, present_k, present_v = g.op(
            "GroupQueryAttention", *(g.op("Unsqueeze", t, batch) for t in (q, k, v)), past_k, past_v, seqlens,
            total, cos, sin, outputs=3, domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
            do_rotary=1, rotary_interleaved=0, scale=self.attention_scale(),
            local_window_size=window if window else -1)
        out = g.op("Squeeze", out, batch)  # [T, nH*D]
        o_bias = w("self_attn.o_proj.bias") if self.o_bias else None
        return g.linear(out, w("self_attn.o_proj.weight"), o_bias), present_k, present_v

    def emit_qkv(self, g: GraphBuilder, layer: int, x: str, w):
        """q, k, v [T, heads*D] from x [T, H]: the projections (with biases where the family has them), then
        emit_qkv_post; shared by both attention kernels."""
        bias = (lambda p: w(f"self_attn.{p}.bias")) if self.qkv_bias else (lambda p: None)
        q = g.linear(x, w("self_attn.q_proj.weight"), bias("q_proj"))
        k = g.linear(x, w("self_attn.k_proj.weight"), bias("k_proj"))
        v = g.linear(x, w("self_attn.v_proj.weight"), bias("v_proj"))
        return self.emit_qkv_post(g, layer, q, k, v, w)

    def emit_attention(self, g: GraphBuilder, layer: int, x: str, past_k: str, past_v: str, w):
        a = self.arch
        heads, kv_heads, d = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        q, k, v = self.emit_qkv(g, layer, x, w)
        q = g.op("Reshape", q, g.const([0, heads, d], "int64"))
        k = g.op("Reshape", k, g.const([0, kv_heads, d], "int64"))
        v = g.op("Reshape", v, g.const([0, kv_heads, d], "int64"))
        q, k = self.emit_head_norms(g, layer, q, k, w)
        q_pos, k_pos = self.emit_positions(g, past_k, x)
        cos, sin = self.emit_rope_tables(g, q_pos)
        q, k = self.apply_rope(g, q, cos, sin), self.apply_rope(g, k, cos, sin)
        keys = g.op("Concat", past_k, k, axis=0)    # [S, kvH, D]
        values = g.op("Concat", past_v, v, axis=0)
        # q [T,nH,D] -> [kvH, G, T, D]; keys -> [kvH, 1, D, S]: MatMul broadcasts G, no repeat of the cache.
        q4 = g.op("Reshape", g.op("Transpose", q, perm=[1, 0, 2]), g.const([kv_heads, heads // kv_heads, -1, d],
                                                                            "int64"))
        q4 = g.op("Mul", q4, g.const(self.attention_scale()))
        k4 = g.op("Unsqueeze", g.op("Transpose", keys, perm=[1, 2, 0]), g.const([1], "int64"))
        v4 = g.op("Unsqueeze", g.op("Transpose", values, perm=[1, 0, 2]), g.const([1], "int64"))
        scores = g.op("MatMul", q4, k4)               # [kvH, G, T, S]
        allowed = self.emit_mask(g, layer, q_pos, k_pos)
        scores = g.op("Where", allowed, scores, g.const(-np.inf))
        out = g.op("MatMul", self.emit_attention_softmax(g, layer, scores, w), v4)  # [kvH, G, T, D]
        out = g.op("Transpose", g.op("Reshape", out, g.const([heads, -1, d], "int64")), perm=[1, 0, 2])
        out = g.op("Reshape", out, g.const([-1, heads * d], "int64"))
        return g.linear(out, w("self_attn.o_proj.weight"), w("self_attn.o_proj.bias") if self.o_bias else None), k, v

    def emit_positions(self, g: GraphBuilder, past: str, x: str) -> tuple[str, str]:
        """(q_pos [T], k_pos [S]): this call's token positions after the P cached ones, and all S = P + T."""
        past_len = g.op("Gather", g.op("Shape", past), g.const(0, "int64"), axis=0)
        end = g.op("Add", past_len, g.op("Gather", g.op("Shape", x), g.const(0, "int64"), axis=0))
        one = g.const(1, "int64")
        return g.op("Range", past_len, end, one), g.op("Range", g.const(0, "int64"), end, one)

    def emit_mask(self, g: GraphBuilder, layer: int, q_pos: str, k_pos: str) -> str:
        """allowed [T, S]: causal, and within the sliding window where the layer has one."""
        q_col = g.op("Unsqueeze", q_pos, g.const([1], "int64"))
        k_row = g.op("Unsqueeze", k_pos, g.const([0], "int64"))
        allowed = g.op("LessOrEqual", k_row, q_col)
        window = self.arch.sliding_windows[layer]
        if window:
            recent = g.op("Less", g.op("Sub", q_col, k_row), g.const(window, "int64"))
            allowed = g.op("And", allowed, recent)
        return allowed

    def emit_rope_tables(self, g: GraphBuilder, positions: str):
        """(cos, sin) [T, 1, D] of the rotary dimension D = head_dim, times YaRN's attention factor if any."""
        inv_freq, factor = inverse_frequencies(self.config, self.arch.head_dim)
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=1), g.const([1], "int64")),
                     g.const(inv_freq[None, :]))                              # [T, D/2]
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1], "int64"))  # [T, 1, D]
        cos, sin = g.op("Cos", angles), g.op("Sin", angles)
        if factor != 1.0:
            cos, sin = g.op("Mul", cos, g.const(factor)), g.op("Mul", sin, g.const(factor))
        return cos, sin

    def apply_rope(self, g: GraphBuilder, x: str, cos: str, sin: str) -> str:
        """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1) (Hugging Face's non-interleaved RoPE)."""
        x1, x2 = g.op("Split", x, axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    # Hooks that families override ---------------------------------------------------------------------

    def emit_norm(self, g: GraphBuilder, x: str, name: str, weight) -> str:
        """The norm whose weights are `{name}.weight` (RMSNorm; Phi-3.5-MoE's LayerNorm has a bias too)."""
        return g.rms_norm(x, weight(f"{name}.weight"), self.arch.rms_norm_eps)

    def attention_scale(self) -> float:
        """Multiplies q K^T before the softmax (Granite: attention_multiplier)."""
        return self.arch.head_dim ** -0.5

    def scale_residual(self, g: GraphBuilder, update: str) -> str:
        """A block's output before it joins the residual stream (Granite: times residual_multiplier; the routed
        experts' share is scaled by the router's scaling_factor instead)."""
        return update

    def embedding_scale(self) -> float:
        return 1.0

    def logit_scale(self) -> float:
        return 1.0

    def emit_attention_softmax(self, g: GraphBuilder, layer: int, scores: str, w) -> str:
        """Attention probabilities from scores [kvH, G, T, S] (GPT-OSS adds a learned sink per head)."""
        return g.op("Softmax", scores, axis=-1)

    def emit_qkv_post(self, g: GraphBuilder, layer: int, q: str, k: str, v: str, w):
        """After the projections, on [T, heads*D] (OLMoE normalizes and clips here)."""
        return q, k, v

    def emit_head_norms(self, g: GraphBuilder, layer: int, q: str, k: str, w):
        """On [T, heads, D] before RoPE (Qwen3's per-head q/k norms)."""
        return q, k

    def emit_shared_expert(self, g: GraphBuilder, layer: int, h: str, moe_input: str, w) -> str:
        """The residual that routed experts add to: h, plus a shared expert where the family has one."""
        return h

    def emit_dense_mlp(self, g: GraphBuilder, layer: int, x: str, w) -> str:
        """The MLP of a layer without routed experts (Qwen's mlp_only_layers)."""
        gate_up = g.op("Concat", w("mlp.gate_proj.weight"), w("mlp.up_proj.weight"), axis=0)
        return g.swiglu(x, gate_up, w("mlp.down_proj.weight"))
