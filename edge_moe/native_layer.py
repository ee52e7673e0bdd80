"""A backbone in edge_moe's own kernel (csrc/layer.c) on the CPU, in place of its exported graphs, where the family's
layer is one the kernel expresses: each decoder layer's attention block and router (NativeLayer), the head
(NativeHead) and the embedding (NativeEmbed, numpy). A token then makes no onnxruntime call.

    hidden [T, H] -> RMSNorm -> q/k/v -> head norms -> RoPE -> KV cache -> attention -> o_proj -> + hidden = residual
      -> RMSNorm = moe_input -> router logits -> softmax top-k = (indices, weights)      (the layer graph's outputs)

Why: onnxruntime (1.32) holds a float16 backbone as float32 copies and reads them every token (55 MB of q3-f16e's
130 MB a token), and its products and attention for one token barely gain from a second thread; the kernel reads
the package's bytes on every thread: float16 rows, or `--backbone-bits` 8 / 4 blocks in place (matrix.c, with int8
activations as MatMulNBits computes them). It writes the same KV cache buffers (float32, or float16 where the
graphs attend in it) and reads the same RoPE tables as the graph (kv_cache.GqaKVCache), so the results are the
graph's to float32 rounding (tests/test_native_layer.py).

Expressed: Qwen3-MoE (per-head q/k norms), OLMoE (q/k norms over all heads, no clipping), Mixtral (none) and
Qwen2-MoE (q/k/v biases, a gated shared expert), with GroupQueryAttention graphs (head_dim a multiple of 8, plain
RoPE), full attention, every layer a MoE layer, a softmax top-k router, a float16 or block-quantized backbone
(symmetric blocks of a multiple of 32, where the CPU has AVX-512 VNNI: native.blocks_fused_reason). Anything else
keeps the layer graphs; the reason says why.
"""

from __future__ import annotations

import numpy as np

from . import native
from .errors import EdgeMoeError
from .family_spec import ROUTE_OUTPUTS, router_spec, routes_in_graph
from .layer_graphs import external_weights
from .manifest import Manifest

# family -> (head norms: 0 none, 1 per head, 2 over all heads; the router's key in a layer). q/k/v biases and a
# shared expert (Qwen2-MoE's, gated by sigmoid(shared_expert_gate . x)) are taken where a layer's graph has them.
FAMILIES = {"qwen3_moe": (1, "mlp.gate.weight"), "olmoe": (2, "mlp.gate.weight"),
            "mixtral": (0, "block_sparse_moe.gate.weight"), "qwen2_moe": (0, "mlp.gate.weight")}
SHARED = "mlp.shared_expert."
_FLOAT16, _FLOAT32, _UINT8 = 10, 1, 2  # onnx TensorProto data types
_TYPES = {_FLOAT16: np.float16, _FLOAT32: np.float32, _UINT8: np.uint8}


def unsupported_reason(manifest: Manifest) -> str | None:
    """None where every layer of the package runs in the layer kernel here, else why not (one line)."""
    if manifest.dtype != "float16" and not manifest.backbone_quantization:
        return f"its backbone is {manifest.dtype}; the kernel reads float16 or block-quantized ones"
    reason = native.unavailable_reason() or (native.blocks_fused_reason() if manifest.backbone_quantization
                                             else None)
    if reason is not None:
        return reason
    c = manifest.config
    if manifest.family not in FAMILIES:
        return f"the kernel expresses {', '.join(sorted(FAMILIES))} layers, not {manifest.family}"
    if c.get("attention_kernel") != "gqa":
        return "its layer graphs attend without GroupQueryAttention"
    heads, kv_heads, head_dim = (int(c[k]) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    if head_dim % 8 or kv_heads < 1 or heads % kv_heads:  # the kernel's vectors of 8; whole groups of query heads
        return f"head_dim {head_dim} is not a multiple of 8 or {heads} heads do not group over {kv_heads}"
    if any(c.get("sliding_windows") or []):
        return "it attends within sliding windows"
    if sorted(c["moe_layers"]) != list(range(int(c["num_layers"]))):
        return "it has layers without routed experts"
    spec = router_spec(c)
    if not routes_in_graph(spec):
        return f"its router ({spec.scoring}) is not a plain softmax top-k"
    if manifest.source_config.get("clip_qkv") is not None:
        return "it clips q, k and v"
    return None


class NativeLayer:
    """One decoder layer run by the kernel; GqaKVCache.run calls `run_in` with its buffers."""

    runs_natively = True
    output_names = ["residual", "moe_input", "router_logits", *ROUTE_OUTPUTS]

    def __init__(self, params: native.LayerParams, arrays: list[np.ndarray], clock, threads: int):
        self.params, self._arrays, self.clock, self.threads = params, arrays, clock, threads

    def run_in(self, keys: np.ndarray, values: np.ndarray, cos: np.ndarray, sin: np.ndarray, past: int,
               hidden: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(hidden, np.float32)
        return self.clock.time_native(native.layer, self.params, x, keys, values, past, cos, sin, self.threads)


def load_native_layers(manifest: Manifest, clock, threads: int) -> tuple[list[NativeLayer] | None, str | None]:
    """Every layer's weights read from the backbone blob for the kernel: (layers, None), or (None, why not) where a
    layer's graph holds other weights than the kernel's (biases, quantized or float32 projections)."""
    reason = unsupported_reason(manifest)
    if reason is not None:
        return None, reason
    c = manifest.config
    head_norm, router_key = FAMILIES[manifest.family]
    hidden, heads, kv_heads, d = (int(c[k]) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                      "head_dim"))
    spec = router_spec(c)
    norm_widths = {0: (None, None), 1: (d, d), 2: (heads * d, kv_heads * d)}[head_norm]
    wanted = {"input_norm": ("input_layernorm.weight", (hidden,)),
              "post_norm": ("post_attention_layernorm.weight", (hidden,)),
              "wq": ("self_attn.q_proj.weight", (heads * d, hidden)),
              "wk": ("self_attn.k_proj.weight", (kv_heads * d, hidden)),
              "wv": ("self_attn.v_proj.weight", (kv_heads * d, hidden)),
              "wo": ("self_attn.o_proj.weight", (hidden, heads * d)),
              "router": (router_key, (spec.num_experts, hidden))}
    if head_norm:
        wanted["q_norm"] = ("self_attn.q_norm.weight", (norm_widths[0],))
        wanted["k_norm"] = ("self_attn.k_norm.weight", (norm_widths[1],))
    plans = []
    for layer, path in enumerate(manifest.layers):
        stored = external_weights(path, manifest.backbone_blob)
        prefix = f"model.layers.{layer}."
        layer_wants = dict(wanted)
        biases = {p for p in ("q", "k", "v", "o") if prefix + f"self_attn.{p}_proj.bias" in stored}
        if biases - {"o"} not in (set(), {"q", "k", "v"}):
            return None, f"its attention has biases on {', '.join(sorted(biases))}, not on all of q, k and v"
        widths = {"q": heads * d, "k": kv_heads * d, "v": kv_heads * d, "o": hidden}
        layer_wants.update({f"b{p}": (f"self_attn.{p}_proj.bias", (widths[p],)) for p in biases})
        shared = stored.get(prefix + SHARED + "gate_proj.weight") or \
            stored.get(prefix + SHARED + "gate_proj.weight.qweight")
        if shared is not None:
            ffn = (shared[3][:1] or (0,))[0]  # a malformed shape fails the plan below
            layer_wants.update({"shared_gate": (SHARED + "gate_proj.weight", (ffn, hidden)),
                                "shared_up": (SHARED + "up_proj.weight", (ffn, hidden)),
                                "shared_down": (SHARED + "down_proj.weight", (hidden, ffn)),
                                "shared_expert_gate": ("mlp.shared_expert_gate.weight", (1, hidden))})
        plan = _plan(path, stored, {field: (prefix + key, shape) for field, (key, shape) in layer_wants.items()},
                     _backbone_bits(manifest))
        if isinstance(plan, str):
            return None, plan
        # the kernel quantizes each input once, for its first consumer: every block matrix of a layer must share
        # one layout (the exporter writes one; a package that does not would have the others read out of bounds)
        layouts = {layout for _, _, layout in plan.values() if layout is not None}
        if len(layouts) > 1:
            return None, f"{path.name}: its quantized matrices mix {sorted(layouts)} (bits, block); the kernel " \
                         "takes one a layer"
        plans.append(plan)
    layers = []
    for arrays in _read(manifest.backbone_blob, plans):
        fields = {field: value if isinstance(value, native.Matrix) else value.ctypes.data
                  for field, value in arrays.items()}
        params = native.LayerParams(
            hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=d, experts=spec.num_experts, top_k=spec.top_k,
            head_norm=head_norm, normalize=int(spec.normalize), eps=float(c["rms_norm_eps"]), scale=d ** -0.5,
            routing_scale=float(spec.scaling_factor),
            shared_ffn=arrays["shared_down"].k if "shared_down" in arrays else 0, **fields)
        layers.append(NativeLayer(params, list(arrays.values()), clock, threads))
    return layers, None


class NativeHead:
    """The head (final RMSNorm and the lm_head) in the kernel: Forward calls `run` as it would the graph's."""

    def __init__(self, norm: np.ndarray, weight: native.Matrix, eps: float, clock, threads: int):
        self.norm, self.weight, self.eps, self.clock, self.threads = norm, weight, eps, clock, threads

    def run(self, feeds: dict) -> list[np.ndarray]:
        return [self.clock.time_native(native.head, self.norm, self.eps, self.weight, feeds["hidden_states"],
                                       self.threads)]


def load_native_head(manifest: Manifest, clock, threads: int) -> NativeHead | None:
    """The head for the kernel where its graph is a plain RMSNorm and lm_head (float16 / float32 rows or symmetric
    blocks; the layers' families, no bias, no logit scale), else None: the graph stays."""
    c = manifest.config
    lm_head = "model.embed_tokens.weight" if c.get("tie_word_embeddings") else "lm_head.weight"
    stored = external_weights(manifest.head, manifest.backbone_blob)
    if set(stored) not in ({"model.norm.weight", lm_head},
                           {"model.norm.weight", lm_head + ".qweight", lm_head + ".scales"}):
        return None
    plan = _plan(manifest.head, stored, {"norm": ("model.norm.weight", (int(c["hidden_size"]),)),
                                         "weight": (lm_head, (int(c["vocab_size"]), int(c["hidden_size"])))},
                 _backbone_bits(manifest))
    if isinstance(plan, str):
        return None
    arrays = _read(manifest.backbone_blob, [plan])[0]
    return NativeHead(arrays["norm"], arrays["weight"], float(c["rms_norm_eps"]), clock, threads)


class NativeEmbed:
    """The embedding (a table's rows as float32) in numpy: with the layers and head in the kernel no onnxruntime
    session is left on a token's path (its first session's set-up alone was ~10 MiB of RSS)."""

    def __init__(self, table: np.ndarray, clock):
        self.table, self.clock = table, clock

    def run(self, feeds: dict) -> list[np.ndarray]:
        return [self.clock.time_native(self._rows, feeds["input_ids"])]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.table.shape[0]):  # numpy would wrap a negative id
            raise ValueError(f"token ids outside [0, {self.table.shape[0]})")
        return self.table[ids].astype(np.float32)


def load_native_embed(manifest: Manifest, clock) -> NativeEmbed | None:
    """The embedding where its graph is a plain gather of a float16 or float32 table (the layers' families), else
    None."""
    c = manifest.config
    stored = external_weights(manifest.embed, manifest.backbone_blob)
    if set(stored) != {"model.embed_tokens.weight"}:
        return None
    plan = _plan(manifest.embed, stored, {"table": ("model.embed_tokens.weight", (int(c["vocab_size"]),
                                                                                 int(c["hidden_size"])))})
    return None if isinstance(plan, str) else \
        NativeEmbed(_read(manifest.backbone_blob, [plan])[0]["table"].arrays[0], clock)


def _backbone_bits(manifest: Manifest) -> int | None:
    """The bits of a quantized backbone's blocks (export --backbone-bits), or None."""
    bits = (manifest.backbone_quantization or {}).get("bits")
    return bits if bits in (4, 8) else None


def _plan(path, stored: dict, wanted: dict, bits: int | None = None) -> dict | str:
    """field -> (shape, parts, layout) of the weights `wanted` (field -> (name, shape)) in the blob, each part
    (offset, length, numpy type, stored shape): a vector float16 or float32; a matrix [N, K] as float16 / float32
    rows (layout None), or, where the backbone is quantized to `bits`, as MatMulNBits' symmetric blocks
    (`name.qweight` [N, ceil(K / B), B * bits / 8] uint8 and `name.scales` [N, blocks] float32; layout (bits, B)).
    Or why not (a weight missing, of another shape or type)."""
    plan = {}
    for field, (name, shape) in wanted.items():
        entry, codes, scales = stored.get(name), stored.get(name + ".qweight"), stored.get(name + ".scales")
        layout = _block_layout(shape, codes, scales, bits) if name + ".zero_points" not in stored else None
        if entry is not None and entry[3] == shape and entry[2] in (_FLOAT16, _FLOAT32):
            plan[field] = (shape, [(entry[0], entry[1], _TYPES[entry[2]], shape)], None)
        elif layout is not None:
            plan[field] = (shape, [(e[0], e[1], _TYPES[e[2]], e[3]) for e in (codes, scales)], layout)
        else:
            kinds = "float16 / float32" + (" or symmetric 8- / 4-bit blocks" if len(shape) == 2 else "")
            return f"{path.name}: {name} is not a {kinds} {list(shape)} weight"
    return plan


def _block_layout(shape, codes, scales, bits: int | None) -> tuple[int, int] | None:
    """(bits, block) of MatMulNBits tensors `codes` / `scales` (external_weights entries) for a [N, K] matrix of a
    backbone quantized to `bits`, where they are blocks the kernel reads (8 or 4 bits, a block of a multiple of 32),
    else None."""
    if codes is None or scales is None or bits not in (4, 8) or len(shape) != 2:
        return None
    (n, k), dims = shape, codes[3]
    if codes[2] != _UINT8 or scales[2] != _FLOAT32 or len(dims) != 3 or dims[0] != n or scales[3] != dims[:2]:
        return None
    block = dims[2] * 8 // bits
    return (bits, block) if block >= 32 and block % 32 == 0 and dims[1] == -(-k // block) else None


def _read(blob, plans: list[dict]) -> list[dict]:
    """The planned weights read into one buffer (one mapping, which huge_pages.py backs with 2 MiB pages: a decoded
    token reads every matrix once, cold), 64-byte aligned: vectors as float32 copies, matrices as native.Matrix
    views of the buffer."""
    ALIGN = 64
    total = sum(-(-length // ALIGN) * ALIGN for plan in plans for _, parts, _ in plan.values()
                for _, length, _, _ in parts)
    buffer = np.empty(total + ALIGN, np.uint8)
    at = -buffer.ctypes.data % ALIGN
    read = []
    with open(blob, "rb") as f:
        for plan in plans:
            arrays = {}
            for field, (shape, parts, layout) in plan.items():
                views = []
                for offset, length, dtype, stored_shape in parts:
                    f.seek(offset)
                    view = buffer[at:at + length]
                    if f.readinto(view) != length:
                        raise EdgeMoeError(f"{blob}: ends before byte {offset + length}; re-export the model")
                    views.append(view.view(dtype).reshape(stored_shape))
                    at += -(-length // ALIGN) * ALIGN
                if len(shape) == 1:
                    arrays[field] = np.ascontiguousarray(views[0], np.float32)
                elif layout is None:
                    arrays[field] = native.Matrix.of_rows(views[0])
                else:
                    codes, scales = views
                    arrays[field] = native.Matrix.of_blocks(codes.reshape(shape[0], -1), scales, *layout, shape[1])
            read.append(arrays)
    return read
