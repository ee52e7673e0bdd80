"""Synthetic random-weight Hugging Face MoE checkpoints, written tensor by tensor with numpy (no torch).

The output is what `AutoModelForCausalLM.from_config(cfg).save_pretrained(dir)` of transformers 5.24 writes for the
family (`qwen3_moe`, `olmoe`, `mixtral`, `qwen2_moe`, `deepseek_v2`, `deepseek_v3`, `granitemoe`, `phimoe`,
`gpt_oss`): the same config.json fields, tensor names and shapes, in `model-0000i-of-0000N.safetensors` shards plus
`model.safetensors.index.json` (always an index, even for one shard).
Each tensor is generated just before it is written, so peak memory is one tensor (at most a 4 MB chunk of a large
one) whatever the checkpoint size. `synthetic.json` records the parameters and the router's ground truth below.

Weights (std ~ 1/sqrt(fan_in), so activations stay O(1)):
- every linear layer is normal with std 1/sqrt(fan_in); the projections that write into the residual stream
  (o_proj, expert and shared-expert down projections) are scaled by a further 1/sqrt(2 * num_layers), as in
  GPT-2/OLMo init, so the residual stream grows by only about 2x over all layers;
- norm weights are 1 + N(0, 0.05) and attention biases N(0, 0.05): not exactly ones or zeros, so an exporter that
  drops them produces measurably different outputs;
- embeddings are N(0, 1) plus a shared direction u (below).

Router structure (benchmarks of caches and next-layer prediction depend on it):
- Popularity skew. Every token embedding carries the same component along one fixed unit direction u (real LLM
  hidden states have a large shared mean direction too), so the router input has a roughly constant coordinate
  along u for any token. Router row e of layer l is `g[l, e] + b[l, e] / s * u`, with g random and orthogonal to u,
  s the expected u-coordinate of the normalised hidden state, and `b[l, e] = -popularity_skew * log(1 + rank[l, e])`:
  a Zipf-like logit bias, so the expert of popularity rank r wins about (1 + r)^-popularity_skew as often as the
  most popular one for a typical hidden state. rank[0] is a random permutation of the experts.
- Layer-to-layer correlation. A fixed permutation P of the experts links consecutive layers:
  `g[l + 1, P[e]] = c * g[l, e] + sqrt(1 - c^2) * fresh`, with c = layer_correlation, and
  `rank[l + 1, P[e]] = rank[l, e]`. The residual stream changes little from one layer to the next, so a token
  routed to e in layer l tends to be routed to P[e] in layer l + 1: a next-layer predictor or a prefetcher
  has a pattern to learn. With popularity_skew = 0 and layer_correlation = 0 every router row is independent
  random and expert popularity is close to uniform.
`synthetic.json` stores P (`layer_permutation`) and rank (`popularity_rank[l][e]`, 0 = most popular).

CLI: `python -m edge_moe_export.synthetic OUT_DIR --preset NAME [--layers N] [--dtype D] [--seed N]`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_moe.errors import EdgeMoeError
from edge_moe_export.safetensors_writer import DTYPES, write_sharded
from edge_moe_export.synthetic_layout import FAMILIES, FAMILY_DEFAULTS, checkpoint_config, checkpoint_tensors
from edge_moe_export.writer import StagedDirectory

_CHUNK_ELEMENTS = 2**20              # rows of a large tensor are generated 4 MB (fp32) at a time
_NORM_JITTER = 0.05                  # std of norm weights around 1 and of attention biases around 0
_EMBED_SHARED = 1.0                  # energy of the shared direction u relative to the random part of an embedding

# Sizes are tensor bytes; `--layers N` scales the per-layer part.
PRESETS: dict[str, dict] = {
    # Quick tests and CLI smoke runs: 0.63 MB.
    "tiny": dict(family="qwen3_moe", hidden_size=64, num_layers=2, num_experts=8, top_k=2,
                 moe_intermediate_size=32, vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
                 dtype="float32"),
    # The package-format example model: 344 M parameters, 1.38 GB in fp32 (0.69 GB in bf16); 3 MB experts,
    # 0.10 GB per layer, 0.13 GB embeddings + lm_head.
    "qwen3-moe-1gb": dict(family="qwen3_moe", hidden_size=512, num_layers=12, num_experts=32, top_k=4,
                          moe_intermediate_size=512, vocab_size=32000, num_attention_heads=8,
                          num_key_value_heads=4, dtype="float32"),
    # OLMoE-1B-7B shapes, 4 of its 16 layers: 3.77 GB in bf16 (12.6 MB experts, 0.84 GB per layer).
    "olmoe-1b-7b-shapes": dict(family="olmoe", hidden_size=2048, num_layers=4, num_experts=64, top_k=8,
                               moe_intermediate_size=1024, vocab_size=50304, num_attention_heads=16,
                               num_key_value_heads=16, dtype="bfloat16"),
    # Qwen3-30B-A3B shapes, 4 of its 48 layers: 6.23 GB in bf16 (9.4 MB experts, 1.25 GB per layer,
    # 1.24 GB embeddings + lm_head).
    "qwen3-30b-a3b-shapes": dict(family="qwen3_moe", hidden_size=2048, num_layers=4, num_experts=128, top_k=8,
                                 moe_intermediate_size=768, vocab_size=151936, num_attention_heads=32,
                                 num_key_value_heads=4, head_dim=128, dtype="bfloat16"),
    # DeepSeek-V2-Lite shapes (MLA 512/64, YaRN, 2 shared experts, layer 0 dense), 4 of its 27 layers: 4.51 GB in
    # bf16 (17.3 MB experts, 1.1 GB per MoE layer, 0.84 GB embeddings + lm_head).
    "deepseek-v2-lite-shapes": dict(family="deepseek_v2", hidden_size=2048, num_layers=4, num_experts=64, top_k=6,
                                    moe_intermediate_size=1408, vocab_size=102400, num_attention_heads=16,
                                    num_key_value_heads=16, dtype="bfloat16"),
    # The same with DeepSeek-V3's router (sigmoid, selection bias, 8 groups of 8, top-4 groups) and q_lora 1536.
    "deepseek-v3-router-lite-shapes": dict(family="deepseek_v3", hidden_size=2048, num_layers=4, num_experts=64,
                                           top_k=6, moe_intermediate_size=1408, vocab_size=102400,
                                           num_attention_heads=16, num_key_value_heads=16, dtype="bfloat16",
                                           family_config=dict(q_lora_rank=1536, n_group=8, topk_group=4,
                                                              routed_scaling_factor=2.5)),
    # Granite-3.1-3B-A800M shapes (top-8 of 40 experts of 512, its multipliers), 4 of its 32 layers: 1.11 GB in
    # bf16 (4.7 MB experts, 0.20 GB per layer, 0.30 GB embeddings + lm_head).
    "granite-3.1-3b-a800m-shapes": dict(family="granitemoe", hidden_size=1536, num_layers=4, num_experts=40,
                                        top_k=8, moe_intermediate_size=512, vocab_size=49155,
                                        num_attention_heads=24, num_key_value_heads=8, dtype="bfloat16"),
    # Phi-3.5-MoE shapes (top-2 of 16 experts of 6400, LayerNorm, biases, longrope), 2 of its 32 layers: 5.73 GB in
    # bf16 (157 MB experts, 2.6 GB per layer, 0.53 GB embeddings + lm_head).
    "phi-3.5-moe-shapes": dict(family="phimoe", hidden_size=4096, num_layers=2, num_experts=16, top_k=2,
                               moe_intermediate_size=6400, vocab_size=32064, num_attention_heads=32,
                               num_key_value_heads=8, dtype="bfloat16"),
    # GPT-OSS-20B shapes (top-4 of 32 experts of 2880, 64 heads of 64, sinks, alternating sliding window, YaRN), 2
    # of its 24 layers, experts in bf16 rather than as shipped in MXFP4: 5.61 GB (49.8 MB experts, 1.65 GB per layer,
    # 2.3 GB embeddings + lm_head).
    "gpt-oss-20b-shapes": dict(family="gpt_oss", hidden_size=2880, num_layers=2, num_experts=32, top_k=4,
                               moe_intermediate_size=2880, vocab_size=201088, num_attention_heads=64,
                               num_key_value_heads=8, head_dim=64, dtype="bfloat16"),
}


@dataclass(frozen=True)
class _Arch:
    """The resolved, validated shape of a synthetic model."""
    family: str
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    shared_expert_intermediate_size: int | None
    family_config: dict | None = None   # more config.json fields the family reads (synthetic_layout.FAMILY_DEFAULTS)


# ---------------------------------------------------------------- weight values

class _Values:
    """Draws each tensor's values. Every tensor has its own generator seeded by (seed, crc32(name)), so a value
    does not depend on shard layout or dtype; only the routers carry state from one layer to the next."""

    def __init__(self, a: _Arch, seed: int, popularity_skew: float, layer_correlation: float):
        self.a, self.seed, self.skew, self.corr = a, seed, popularity_skew, layer_correlation
        rng = self._rng("router/structure")
        u = rng.standard_normal(a.hidden_size)
        self.u = u / np.linalg.norm(u)                                  # the shared direction, unit length
        self.permutation = rng.permutation(a.num_experts)               # P: expert e of layer l -> P[e] of l + 1
        self.rank = [rng.permutation(a.num_experts)]                    # rank[l][e], 0 = most popular
        for _ in range(1, a.num_layers):
            nxt = np.empty_like(self.rank[-1])
            nxt[self.permutation] = self.rank[-1]
            self.rank.append(nxt)
        # Expected u-coordinate of an RMS-normalised embedding: sqrt(H) * sqrt(shared / (shared + random)).
        self.s = math.sqrt(a.hidden_size * _EMBED_SHARED / (1.0 + _EMBED_SHARED))
        self.prev_g: np.ndarray | None = None                           # g of the last router drawn, [E, H]
        self.residual_scale = 1.0 / math.sqrt(2 * a.num_layers)

    def _rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def chunks(self, t: _Tensor):
        """Yields the tensor's float32 values as C-contiguous row blocks of at most _CHUNK_ELEMENTS."""
        rng = self._rng(t.name)
        if t.init == "router":
            yield self._router(rng, t.layer)
            return
        if t.init in ("norm", "bias"):
            v = rng.standard_normal(t.shape, dtype=np.float32) * np.float32(_NORM_JITTER)
            yield v + np.float32(1.0) if t.init == "norm" else v
            return
        cols, fan_in = t.shape[-1], t.shape[t.fan_in_axis]
        rows = math.prod(t.shape[:-1])  # fused expert tensors [E, ., .] are written as E * rows rows
        std = {"embed": 1.0, "linear": 1.0 / math.sqrt(fan_in), "residual": self.residual_scale / math.sqrt(fan_in)}
        if t.init == "embed":   # the same u component in every row; its norm is sqrt(_EMBED_SHARED * H)
            shared = (math.sqrt(_EMBED_SHARED * cols) * self.u).astype(np.float32)
        step = max(1, _CHUNK_ELEMENTS // cols)
        for r in range(0, rows, step):
            v = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
            v *= np.float32(std[t.init])
            if t.init == "embed":
                v += shared
            yield v

    def _router(self, rng: np.random.Generator, layer: int) -> np.ndarray:
        """Router rows g + b / s * u (see the module docstring). Random part: logits of std ~1."""
        E, H = self.a.num_experts, self.a.hidden_size
        fresh = rng.standard_normal((E, H)) * math.sqrt((1.0 + _EMBED_SHARED) / H)
        fresh -= np.outer(fresh @ self.u, self.u)                       # keep g orthogonal to u
        if self.prev_g is None:
            g = fresh
        else:
            g = np.empty_like(fresh)
            g[self.permutation] = self.corr * self.prev_g + math.sqrt(1.0 - self.corr ** 2) * fresh
        self.prev_g = g
        b = -self.skew * np.log1p(self.rank[layer].astype(np.float64))
        return (g + np.outer((b - b.mean()) / self.s, self.u)).astype(np.float32)


# ---------------------------------------------------------------- public API

def _resolve(family, hidden_size, num_layers, num_experts, top_k, moe_intermediate_size, vocab_size,
             num_attention_heads, num_key_value_heads, head_dim, shared_expert_intermediate_size,
             family_config=None) -> _Arch:
    """Validates the shape arguments; errors name the value and the fix."""
    if family not in FAMILIES:
        raise EdgeMoeError(f"family={family!r} is not supported; use one of {', '.join(sorted(FAMILIES))}")
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                 moe_intermediate_size=moe_intermediate_size, vocab_size=vocab_size,
                 num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads)
    for k, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise EdgeMoeError(f"{k}={v!r} must be a positive integer")
    if top_k > num_experts:
        raise EdgeMoeError(f"top_k={top_k} is larger than num_experts={num_experts}; lower top_k")
    if vocab_size < 8:
        raise EdgeMoeError(f"vocab_size={vocab_size} is too small (bos=1, eos=2 must fit); use at least 8")
    if num_attention_heads % num_key_value_heads:
        raise EdgeMoeError(f"num_attention_heads={num_attention_heads} is not a multiple of "
                           f"num_key_value_heads={num_key_value_heads}; pick a divisor")
    if head_dim is None:
        if hidden_size % num_attention_heads:
            raise EdgeMoeError(f"hidden_size={hidden_size} is not a multiple of num_attention_heads="
                               f"{num_attention_heads}; change one or pass head_dim")
        head_dim = hidden_size // num_attention_heads
    if family in ("olmoe", "granitemoe", "phimoe") and head_dim * num_attention_heads != hidden_size:
        raise EdgeMoeError(f"head_dim={head_dim}: {family} has no head_dim of its own, so head_dim must be "
                           f"hidden_size / num_attention_heads = {hidden_size / num_attention_heads:g}")
    if family == "qwen2_moe":
        shared_expert_intermediate_size = shared_expert_intermediate_size or 4 * moe_intermediate_size
    elif shared_expert_intermediate_size is not None:
        raise EdgeMoeError(f"shared_expert_intermediate_size={shared_expert_intermediate_size}: family {family} "
                           "has no shared expert; leave it None or use family='qwen2_moe'")
    unknown = sorted(set(family_config or {}) - set(FAMILY_DEFAULTS.get(family, ())))
    if unknown:
        raise EdgeMoeError(f"family_config field {unknown[0]!r} is not read for family {family}; leave it out")
    return _Arch(family, head_dim=head_dim, shared_expert_intermediate_size=shared_expert_intermediate_size,
                 family_config=family_config, **sizes)


def write_synthetic_checkpoint(out_dir, *, family="qwen3_moe", hidden_size=512, num_layers=12, num_experts=32,
                               top_k=4, moe_intermediate_size=512, vocab_size=32000, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=None, shared_expert_intermediate_size=None,
                               family_config=None, dtype="float32", shard_bytes=512 * 2**20, seed=0,
                               popularity_skew=1.0,
                               layer_correlation=0.6, progress=True, overwrite=False) -> Path:
    """Writes a random-weight Hugging Face checkpoint of the family, one tensor at a time.

    Args:
        out_dir: directory to create; written as `<out_dir>.partial-<pid>` and renamed into place at the end (export/writer.py).
        family: config.json model_type: "qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3",
            "granitemoe", "phimoe", "gpt_oss".
        hidden_size ... num_key_value_heads: the architecture (moe_intermediate_size is each routed expert's
            intermediate size whatever field name the family's config uses for it).
        head_dim: attention head size; None means hidden_size / num_attention_heads.
        shared_expert_intermediate_size: qwen2_moe only; None means 4 * moe_intermediate_size.
        family_config: DeepSeek: MLA ranks, shared experts, dense layers, groups; Granite: multipliers
            (synthetic_layout.FAMILY_DEFAULTS).
        dtype: "float32", "float16" or "bfloat16" (round to nearest even).
        shard_bytes: largest shard size before a new shard starts (a bigger tensor gets its own shard).
        seed: same seed and shape -> same values, whatever dtype or shard_bytes.
        popularity_skew: Zipf exponent of the experts' popularity in each layer; 0 = no skew.
        layer_correlation: 0..1, how strongly layer l's routing predicts layer l + 1's (module docstring).
        progress: show a tqdm progress bar on stderr.
        overwrite: replace an existing non-empty out_dir.
    Returns:
        The checkpoint directory.
    Raises:
        EdgeMoeError: invalid arguments, out_dir exists and is not empty (without overwrite), or too little disk.
    """
    a = _resolve(family, hidden_size, num_layers, num_experts, top_k, moe_intermediate_size, vocab_size,
                 num_attention_heads, num_key_value_heads, head_dim, shared_expert_intermediate_size, family_config)
    if dtype not in DTYPES:
        raise EdgeMoeError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if not shard_bytes or shard_bytes < 1:
        raise EdgeMoeError(f"shard_bytes={shard_bytes!r} must be a positive number of bytes")
    if popularity_skew < 0:
        raise EdgeMoeError(f"popularity_skew={popularity_skew} must be >= 0 (0 = uniform popularity)")
    if not 0.0 <= layer_correlation <= 1.0:
        raise EdgeMoeError(f"layer_correlation={layer_correlation} must be between 0 and 1")
    out = Path(out_dir)
    tensors = checkpoint_tensors(a)
    total = sum(math.prod(t.shape) for t in tensors) * DTYPES[dtype][1]
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total * 1.01:
        raise EdgeMoeError(f"{out.parent}: {total / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; "
                           "free space or lower num_layers / use dtype='bfloat16'")

    staged = StagedDirectory(out, overwrite)
    tmp = staged.path
    try:
        values = _Values(a, seed, popularity_skew, layer_correlation)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"synthetic {a.family}", disable=not progress) as bar:
            write_sharded(tmp, [(t.name, t.shape) for t in tensors], lambda i: values.chunks(tensors[i]), dtype,
                          shard_bytes, bar.update)
        _write_json(tmp / "config.json", checkpoint_config(a, dtype))
        _write_json(tmp / "synthetic.json", {
            "generator": "edge_moe_export.synthetic", "arch": asdict(a), "dtype": dtype, "seed": seed,
            "popularity_skew": popularity_skew, "layer_correlation": layer_correlation,
            "layer_permutation": values.permutation.tolist(),
            "popularity_rank": [r.tolist() for r in values.rank]})
        return staged.commit()
    except BaseException:
        staged.abort()
        raise


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `synth` options to a parser (the edge-moe CLI mounts it as a subcommand)."""
    parser.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to create")
    parser.add_argument("--preset", default="qwen3-moe-1gb", choices=sorted(PRESETS),
                        help="model shape (default: qwen3-moe-1gb)")
    parser.add_argument("--layers", type=int, help="number of decoder layers (overrides the preset)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (overrides the preset)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--popularity-skew", type=float, default=1.0, help="Zipf exponent of expert popularity")
    parser.add_argument("--layer-correlation", type=float, default=0.6,
                        help="0..1: how much layer l's routing predicts layer l+1's")
    parser.add_argument("--shard-mb", type=int, default=512, help="shard size in MiB (default 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs the `synth` command from parsed arguments; returns the exit status. Raises EdgeMoeError."""
    kw = dict(PRESETS[args.preset])
    if args.layers is not None:
        kw["num_layers"] = args.layers
    if args.dtype is not None:
        kw["dtype"] = args.dtype
    path = write_synthetic_checkpoint(
        args.out_dir, seed=args.seed, popularity_skew=args.popularity_skew,
        layer_correlation=args.layer_correlation, shard_bytes=args.shard_mb * 2**20, progress=not args.quiet,
        overwrite=args.overwrite, **kw)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path} ({kw['family']}, {kw['num_layers']} layers, {kw['dtype']}, {size / 1e9:.2f} GB)")
    return 0


def main(argv=None) -> int:
    """`python -m edge_moe_export.synthetic OUT_DIR --preset NAME ...`; errors print one line, status 1."""
    parser = argparse.ArgumentParser(prog="python -m edge_moe_export.synthetic", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except EdgeMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
