"""The one validation pass over a loaded manifest: everything a later step would index, allocate or read by.

Counts are bounded by bytes actually present (a huge vocabulary or KV width needs that many weights in the
backbone blob; every expert the config promises needs a record, and records need bytes in a blob), expert
ranges are aligned, inside their blob and disjoint, and each tensor table is exactly what the expert's kind,
sizes and dtype imply. `config` stays a dict: only the keys the runtime reads are checked here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import EdgeMoeError
from .expert_graph import KINDS, ExpertShape
from .family_spec import attention_spec, router_spec
from .fields import Fields
from .package_files import REEXPORT
from .quant_graph import BLOCK_SIZES

PAGE = 4096
TENSOR_ALIGN = 64  # a tensor's offset within its expert (SIMD loads)
_ITEMSIZE = {"float32": 4, "float16": 2, "uint8": 1}


def validate(manifest, path: Path) -> None:
    """Raises EdgeMoeError naming the field at fault; returns quietly for a consistent manifest."""
    c = _config(manifest, path)
    if len(manifest.layers) != c["num_layers"]:
        raise EdgeMoeError(f"{path}: backbone.layers lists {len(manifest.layers)} graphs for "
                           f"{c['num_layers']} layers; {REEXPORT}")
    blob_size = manifest.backbone_blob.stat().st_size
    if manifest.backbone_bytes != blob_size:
        raise EdgeMoeError(f"{manifest.backbone_blob}: {blob_size:,} bytes where backbone.bytes says "
                           f"{manifest.backbone_bytes:,}; {REEXPORT}")
    _routers(manifest, c, path, blob_size)
    expected = {(layer, e) for layer in c["moe_layers"] for e in range(c["num_experts"])}
    missing = sorted(expected - set(manifest.experts))
    if missing:
        raise EdgeMoeError(f"{path}: no record for expert {missing[0]} (layer, index); {REEXPORT}")
    extra = sorted(set(manifest.experts) - expected)
    if extra:
        raise EdgeMoeError(f"{path}: expert {extra[0]} (layer, index) is outside config.moe_layers x "
                           f"config.num_experts; {REEXPORT}")
    for record in manifest.experts.values():
        _expert(record, c, path)
    _blob_ranges(manifest)


def _config(manifest, path: Path) -> dict:
    f = Fields(manifest.config, str(path), "config")
    c = manifest.config
    # Sizes the backbone's weights must hold: an embedding [V, H] and per layer K/V projections [kvH * D, H] of
    # at least 2 bytes a weight. Checking them against the blob's size bounds every allocation sized by them.
    weight_bytes = max(manifest.backbone_bytes, 1)
    hidden = f.int("hidden_size", 1, weight_bytes)
    layers = f.int("num_layers", 1, 1 << 16)
    f.int("vocab_size", 1, weight_bytes // (2 * hidden))
    experts = f.int("num_experts", 1, 1 << 20)
    f.int("top_k", 1, experts)
    f.int("num_attention_heads", 1, 1 << 16)
    kv_width = f.int("num_key_value_heads", 1, 1 << 16) * f.int("head_dim", 1, 1 << 16)
    if 2 * kv_width * hidden > weight_bytes:
        raise EdgeMoeError(f"{path}: config.num_key_value_heads x head_dim = {kv_width} needs more key/value "
                           f"weights than the backbone's {weight_bytes:,} bytes hold; {REEXPORT}")
    f.number("rms_norm_eps", 0.0, 1.0)
    f.bool("norm_topk_prob")
    moe_layers = f.ints("moe_layers", 0, layers - 1)
    if len(set(moe_layers)) != len(moe_layers):
        raise EdgeMoeError(f"{path}: config.moe_layers lists a layer twice ({moe_layers[:20]}); {REEXPORT}")
    f.ints("eos_token_ids", 0, 1 << 40, required=False)  # an id past the vocabulary just never ends generation
    if "attention_kernel" in c:
        f.choice("attention_kernel", ("generic", "gqa"), "or install a newer edge_moe")
    if c.get("max_position_embeddings") is not None:
        f.int("max_position_embeddings", 1, 1 << 40)
    router, _ = router_spec(c), attention_spec(c)  # the family's records validate themselves (family_spec.py)
    if (router.num_experts, router.top_k) != (experts, c["top_k"]):
        raise EdgeMoeError(f"{path}: config.router has {router.num_experts} experts, top-{router.top_k}; config says "
                           f"{experts}, top-{c['top_k']}; {REEXPORT}")
    return c


def _routers(manifest, c: dict, path: Path, blob_size: int) -> None:
    """Each MoE layer's router [E, H] and post-attention norm [H], inside the backbone blob."""
    shapes = {"weight": [c["num_experts"], c["hidden_size"]], "norm": [c["hidden_size"]],
              "selection_bias": [c["num_experts"]], "bias": [c["num_experts"]]}
    optional = ("selection_bias", "bias")  # DeepSeek-V3's selection-only bias, GPT-OSS's router bias
    if manifest.routers and set(manifest.routers) != set(c["moe_layers"]):
        raise EdgeMoeError(f"{path}: backbone.routers covers layers {sorted(manifest.routers)[:20]}, not "
                           f"config.moe_layers; {REEXPORT}")
    for layer, entry in manifest.routers.items():
        roles = Fields(entry, str(path), f"backbone.routers[{layer}]")
        for role, shape in shapes.items():
            if role in optional and role not in entry:
                continue
            t = roles.object(role)
            dtype = t.choice("dtype", ("float32", "float16"))
            if t.ints("shape", 0, 1 << 40) != shape:
                raise EdgeMoeError(f"{t.where}.shape: {t.data['shape'][:4]} is not {shape}; {REEXPORT}")
            offset, nbytes = t.int("offset", 0), t.int("nbytes", 0)
            if nbytes != math.prod(shape) * _ITEMSIZE[dtype] or offset + nbytes > blob_size:
                raise EdgeMoeError(f"{t.where}: {nbytes} bytes at offset {offset} do not hold a {dtype} "
                                   f"{shape} inside the {blob_size:,}-byte backbone blob; {REEXPORT}")


def _expert(record, c: dict, path: Path) -> None:
    where = f"{path}: expert {record.key}"
    if record.kind not in KINDS:
        raise EdgeMoeError(f"{where}: kind {record.kind[:40]!r} is not one of {', '.join(KINDS)}; "
                           "install a newer edge_moe or re-export")
    if record.hidden_size != c["hidden_size"]:
        raise EdgeMoeError(f"{where}: hidden_size {record.hidden_size} is not config.hidden_size "
                           f"{c['hidden_size']}; {REEXPORT}")
    if record.quantized and record.block_size not in BLOCK_SIZES:
        raise EdgeMoeError(f"{where}: block_size {record.block_size} is not one of "
                           f"{', '.join(map(str, BLOCK_SIZES))}; {REEXPORT}")
    if record.offset % PAGE:
        raise EdgeMoeError(f"{where}: offset {record.offset} is not a multiple of {PAGE}; {REEXPORT}")
    shape = ExpertShape(record.kind, record.hidden_size, record.intermediate_size, record.dtype,
                        record.block_size, record.zero_points)
    if record.quantized:
        from .quant_graph import quantized_tensor_shapes

        expected = quantized_tensor_shapes(shape)
    else:
        expected = shape.stored_tensors()
    if [t.name for t in record.tensors] != list(expected):
        raise EdgeMoeError(f"{where}: tensors {[t.name[:40] for t in record.tensors][:8]} are not "
                           f"{list(expected)}; {REEXPORT}")
    # The layout is fixed (export/writer.py ExpertWriter): tensors back to back, each at the next multiple of
    # TENSOR_ALIGN, the expert ending with the last. Any other offset would read padding or a neighbour as weights.
    end = 0
    for t in record.tensors:
        dtype, dims = expected[t.name]
        nbytes = math.prod(dims) * np.dtype(dtype).itemsize
        if t.dtype != dtype or list(t.shape) != list(dims) or t.nbytes != nbytes:
            raise EdgeMoeError(f"{where}: tensor {t.name} is {t.dtype[:20]!r} {list(t.shape)[:4]} in {t.nbytes} "
                               f"bytes, not {dtype} {dims} in {nbytes}; {REEXPORT}")
        offset = -(-end // TENSOR_ALIGN) * TENSOR_ALIGN
        if t.offset != offset:
            raise EdgeMoeError(f"{where}: tensor {t.name} at offset {t.offset}, where the format puts it at "
                               f"{offset}; {REEXPORT}")
        end = offset + nbytes
    if record.length != end:
        raise EdgeMoeError(f"{where}: length {record.length} is not the {end} bytes its tensors take; {REEXPORT}")


def _blob_ranges(manifest) -> None:
    """Per blob: expert ranges disjoint and inside the file (which also bounds their total by bytes on disk)."""
    by_blob: dict[Path, list] = {}
    for record in manifest.experts.values():
        by_blob.setdefault(record.blob, []).append(record)
    for blob, records in by_blob.items():
        size = blob.stat().st_size
        records.sort(key=lambda r: r.offset)
        end, previous = 0, None
        for r in records:
            if r.offset < end:
                raise EdgeMoeError(f"{blob}: experts {previous.key} and {r.key} overlap (offset {r.offset} < "
                                   f"{end}); {REEXPORT}")
            end, previous = r.offset + r.length, r
        if end > size:
            raise EdgeMoeError(f"{blob}: truncated ({size} bytes, experts need {end}); {REEXPORT}")
