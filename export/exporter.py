"""`edge-moe export`: a Hugging Face MoE checkpoint becomes an edge_moe package, streaming one tensor at a time.

Peak memory is about one checkpoint tensor in float32 plus its converted copy: every tensor goes from the shard
(one pread) to its blob (one write) and is dropped; graphs only reference blob offsets.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe.expert_graph import ExpertShape, build_expert_graph
from edge_moe.manifest import ExpertRecord, Manifest, expert_seed
from edge_moe.onnx_build import GraphBuilder

from .checkpoint import Checkpoint
from .encodings import concat_rows
from .families import family_for
from .quantize import BLOCK_SIZES, QuantizedMatrix, quantize
from .writer import BlobWriter, ExpertWriter, StagedDirectory

DTYPES = ("float32", "float16")
# What the exporter writes, beyond the package format: bumped when the graphs it emits change in a way a cached
# export should not miss (3: routing inside the layer graphs, GroupQueryAttention for small heads, the embedding
# gathered before its cast). The default model's cache key carries it (edge_moe.default_model).
REVISION = 3


class BackboneWeights:
    """Streams backbone tensors into one blob, each written once however many graphs use it (tied embeddings).

    With `bits` (8 or 4), the matrices `quantizable(key)` accepts (attention projections, an untied lm_head) are
    stored block-quantized for MatMulNBits: in decode they are most of the bytes a token reads outside the experts
    (float32 attention of the 12-layer test model: 38 MB a token against 21 MB of 4-bit experts)."""

    def __init__(self, checkpoint: Checkpoint, blob: BlobWriter, dtype: str, bits: int | None = None,
                 block_size: int = 32, quantizable=lambda key: False):
        self.checkpoint, self.blob, self.dtype = checkpoint, blob, dtype
        self.bits, self.block_size, self.quantizable = bits, block_size, quantizable
        self.written: dict[str, tuple[str, list[int], int, int]] = {}

    def bind(self, g: GraphBuilder):
        """Returns weight(key) -> name of the tensor's float32 value in graph g (or of a quantized weight that only
        g.linear may consume)."""
        used: dict[str, str] = {}

        def weight(key: str, stored: bool = False):
            """stored: (name, dtype) of the tensor as the package stores it, no cast (an embedding table gathers
            first and casts the rows: cast first, onnxruntime folds the cast into a float32 copy of the table)."""
            if stored:
                dtype, shape, offset, length = self.write(key)
                name = used.get(f"{key}#stored") or g.external(key, dtype, shape, self.blob.path.name, offset, length)
                used[f"{key}#stored"] = name
                return name, dtype
            if key in used:
                return used[key]
            if self.bits and self.quantizable(key):
                n, k = self.checkpoint.shape(key)
                for name in self._write_quantized(key):
                    dtype, shape, offset, length = self.written[name]
                    g.external(name, dtype, shape, self.blob.path.name, offset, length)
                g.quantized[key] = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size}
                used[key] = key
            else:
                name, dtype = weight(key, stored=True)
                used[key] = g.as_float32(name, dtype)
            return used[key]

        return weight

    def _write_quantized(self, key: str) -> list[str]:
        """Writes `key` block-quantized once (`{key}.qweight`, `{key}.scales`); returns those tensor names."""
        names = [f"{key}.qweight", f"{key}.scales"]
        if names[0] not in self.written:
            tensors = quantize(self.checkpoint.read(key), self.bits, self.block_size).tensors(key)
            for name, array in tensors.items():
                self.blob.pad_to(64)
                offset, length = self.blob.write(array)
                self.written[name] = (str(array.dtype), list(array.shape), offset, length)
        return names

    def write(self, key: str):
        if key not in self.written:
            array = self.checkpoint.read(key)
            # Norm weights and biases stay float32: they are tiny and float16 would cost accuracy for nothing.
            dtype = self.dtype if array.ndim >= 2 else "float32"
            self.blob.pad_to(64)
            offset, length = self.blob.write(array.astype(dtype, copy=False))
            self.written[key] = (dtype, list(array.shape), offset, length)
        return self.written[key]


def export_checkpoint(hf_dir, out_dir, *, dtype: str = "float32", overwrite: bool = False,
                      progress: bool = True, bits=None, block_size: int = 32, zero_points: bool = False,
                      expert_bytes=None, calibration=None, backbone_bits: int | None = None,
                      source_bits: bool = True, attention: str = "auto") -> Path:
    """Exports a checkpoint directory to a package directory.

    Args:
        hf_dir: directory with config.json, safetensors shards and (optionally) tokenizer.json; or a .gguf file
            (export/gguf_checkpoint.py), whose experts keep the file's precision unless `bits` says otherwise.
        out_dir: the package directory to create; it appears only when the export is complete.
        dtype: float32 or float16 for the weights (the backbone's, and the experts' unless `bits` says otherwise).
        overwrite: replace an existing non-empty out_dir.
        progress: show a progress bar on stderr.
        bits: None (experts in `dtype`), 16 (float16), 8, 4 or 2 (MatMulNBits), or "mixed" (per expert, from
            calibration on the text `calibration` to fit `expert_bytes` in total; export/calibrate.py).
        block_size, zero_points: the quantization blocks (8-, 4- and 2-bit experts).
        backbone_bits: None (backbone in `dtype`), 8 or 4: attention projections and an untied lm_head stored
            block-quantized (MatMulNBits, symmetric, `block_size`); embeddings, norms and routers stay in `dtype`.
        source_bits: with bits None, keep a GGUF file's expert precision (False: experts in `dtype`, as the
            calibration of --bits mixed needs them).
        attention: "auto" (GroupQueryAttention layer graphs where the family and head size allow, else plain
            ONNX), or "generic" (plain ONNX always: onnxruntime's GroupQueryAttention has no float32 CUDA kernel,
            so a package meant for --device cuda runs faster this way; README).
    Returns:
        The package path.
    Raises:
        EdgeMoeError: unsupported model_type, dtype or bits, missing tensors, unwritable output.
    """
    if dtype not in DTYPES:
        raise EdgeMoeError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    checkpoint = open_checkpoint(hf_dir)
    if bits is None and source_bits and hasattr(checkpoint, "source_bits"):
        bits = checkpoint.source_bits()
    choose = expert_formats(bits, dtype, block_size, zero_points)
    if backbone_bits not in (None, 8, 4):
        raise EdgeMoeError(f"--backbone-bits {backbone_bits!r} is not supported; choose 8 or 4 (or leave it out)")
    family = family_for(checkpoint.config)
    if family.expert_kind != "swiglu" and bits == "mixed":
        raise EdgeMoeError(f"--bits mixed: calibration knows SwiGLU experts only, not {family.model_type}'s "
                           f"{family.expert_kind}; use --bits 8, 4 or 2")
    if bits == "mixed":
        from .calibrate import choose_bits

        chosen = choose_bits(hf_dir, out_dir, expert_bytes, calibration, block_size, zero_points, progress)
        choose = lambda layer, index, h, f: _shape(chosen[(layer, index)], dtype, h, f, block_size, zero_points)  # noqa: E731
    if attention not in ("auto", "generic"):
        raise EdgeMoeError(f"--attention {attention!r} is not supported; choose auto or generic")
    if attention == "generic":
        family.arch.attention_kernel = "generic"
    arch = family.arch
    for key in family.expert_keys(arch.moe_layers[0], 0) if arch.moe_layers else ():
        checkpoint.shape(key)  # fail early, before writing anything, on a checkpoint of another layout
    staged = StagedDirectory(out_dir, overwrite)
    try:
        steps = 2 + arch.num_layers + len(arch.moe_layers) * arch.num_experts
        with tqdm(total=steps, desc=f"export {family.model_type}", unit="graph", disable=not progress) as bar:
            backbone = _export_backbone(staged.path, checkpoint, family, dtype, bar, backbone_bits, block_size)
            experts = _export_experts(staged.path, checkpoint, family, choose, bar)
        tokenizer = checkpoint.write_tokenizer(staged.path / "tokenizer.json")
        source_dir = getattr(checkpoint, "dir", None)  # a Hugging Face directory (a GGUF file has none)
        if source_dir is not None and (source_dir / "tokenizer_config.json").is_file():  # its chat_template
            shutil.copyfile(source_dir / "tokenizer_config.json", staged.path / "tokenizer_config.json")
        root = staged.path
        Manifest(
            root=root, family=family.model_type, dtype=dtype, config=arch.to_config(),
            source_config=checkpoint.config, tokenizer=root / "tokenizer.json" if tokenizer else None,
            embed=root / backbone["embed"], layers=[root / p for p in backbone["layers"]], head=root / backbone["head"],
            backbone_bytes=backbone["bytes"], backbone_blob=root / backbone["blob"], routers=backbone["routers"],
            experts={record.key: record for record in experts}, edge_moe_version=edge_moe.__version__,
            quantization={"bits": bits, "block_size": block_size, "zero_points": zero_points,
                          "expert_bytes_target": expert_bytes,
                          "calibration": calibration and Path(calibration).name} if bits is not None else None,
            backbone_quantization={"bits": backbone_bits, "block_size": block_size} if backbone_bits else None,
        ).save()
        return staged.commit()
    except BaseException:
        staged.abort()
        raise


def open_checkpoint(path):
    """A Hugging Face checkpoint directory, or a GGUF file, read through the same interface."""
    if Path(path).suffix.lower() == ".gguf":
        from .gguf_checkpoint import GgufCheckpoint

        return GgufCheckpoint(path)
    return Checkpoint(path)


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def _export_backbone(root: Path, checkpoint, family, dtype, bar, bits=None, block_size=32) -> dict:
    (root / "backbone").mkdir()
    blob = BlobWriter(root / "backbone" / "weights.bin")
    weights = BackboneWeights(checkpoint, blob, dtype, bits, block_size, family.quantizable_backbone_weight)
    files = {"embed": "backbone/embed.onnx", "head": "backbone/head.onnx", "layers": []}
    for name, emit in (("embed", family.emit_embed), ("head", family.emit_head)):
        g = GraphBuilder(name)
        emit(g, weights.bind(g))
        _save(g.model(), root / files[name])
        bar.update()
    for layer in range(family.arch.num_layers):
        g = GraphBuilder(f"layer_{layer:03d}")
        family.emit_layer(g, layer, weights.bind(g))
        files["layers"].append(f"backbone/layer_{layer:03d}.onnx")
        _save(g.model(), root / files["layers"][-1])
        bar.update()
    for layer in family.arch.moe_layers:  # read by the runtime's router, by no graph
        if family.selection_bias_key(layer):
            weights.write(family.selection_bias_key(layer))
    blob.close()
    # Where each MoE layer's router and post-attention norm lie, for speculative next-layer routing at run time.
    routers = {}
    for layer in family.arch.moe_layers:
        entries = {"weight": family.router_key(layer),
                   "norm": family.layer_key(layer, "post_attention_layernorm.weight")}
        if family.selection_bias_key(layer):
            entries["selection_bias"] = family.selection_bias_key(layer)
        if family.router_bias_key(layer):
            entries["bias"] = family.router_bias_key(layer)
        routers[str(layer)] = {role: dict(zip(("dtype", "shape", "offset", "nbytes"), weights.written[key]))
                               for role, key in entries.items()}
    return {**files, "blob": "backbone/weights.bin", "bytes": blob.size, "routers": routers}


def _shape(bits, dtype: str, h: int, f: int, block_size: int, zero_points: bool) -> ExpertShape:
    if bits is None:
        return ExpertShape("swiglu", h, f, dtype)
    if bits == 16:
        return ExpertShape("swiglu", h, f, "float16")
    return ExpertShape("swiglu", h, f, f"q{bits}", block_size, zero_points)


def expert_formats(bits, dtype: str, block_size: int, zero_points: bool):
    """(layer, index, hidden, ffn) -> ExpertShape for a uniform bitwidth (mixed: export/calibrate.py).

    Raises:
        EdgeMoeError: bits or block_size that no kernel takes.
    """
    if bits not in (None, 16, 8, 4, 2, "mixed"):
        raise EdgeMoeError(f"--bits {bits!r} is not supported; choose 16, 8, 4, 2 or mixed")
    if bits is not None and block_size not in BLOCK_SIZES:
        raise EdgeMoeError(f"--block-size {block_size} is not supported by MatMulNBits; choose one of "
                           f"{', '.join(map(str, BLOCK_SIZES))}")
    return lambda layer, index, h, f: _shape(None if bits == "mixed" else bits, dtype, h, f, block_size,
                                             zero_points)


def expert_tensors(shape: ExpertShape, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> dict[str, np.ndarray]:
    """One expert's stored tensors, in blob order, from Hugging Face [out, in] weights."""
    if shape.quantized:
        out = quantize(np.concatenate([gate, up], axis=0), shape.bits, shape.block_size,
                       not shape.zero_points).tensors("gate_up_proj")
        out.update(quantize(down, shape.bits, shape.block_size, not shape.zero_points).tensors("down_proj"))
        return out
    # Hugging Face [out, in] -> [in, out] (see ExpertShape); gate columns first, then up.
    return {"gate_up_proj": np.concatenate([gate.T, up.T], axis=1).astype(shape.dtype),
            "down_proj": down.T.astype(shape.dtype)}


def _codes_bits(shape: ExpertShape) -> int | None:
    """The bitwidth at which a family may hand over its checkpoint's own codes (GPT-OSS's MXFP4) instead of float
    weights: MatMulNBits blocks of 32 without zero points, as MXFP4's."""
    if shape.quantized and shape.bits in (4, 8) and shape.block_size == 32 and not shape.zero_points:
        return shape.bits
    return None


def kind_tensors(shape: ExpertShape, parts: dict) -> dict[str, np.ndarray]:
    """A non-SwiGLU kind's stored tensors (swiglu_oss), in blob order, from the family's `read_expert`: weights
    [in, out] in float32, or already MatMulNBits codes (QuantizedMatrix) where the checkpoint's codes map to them.

    Raises:
        EdgeMoeError: a weight whose size disagrees with the config's (a checkpoint of another shape).
    """
    if not shape.quantized:
        tensors = {name: array.astype(shape.dtype if array.ndim else np.float32)  # scalars stay exact
                   for name, array in parts.items()}
        expected = {name: dims for name, (_, dims) in shape.stored_tensors().items()}
    else:
        from edge_moe.quant_graph import quantized_tensor_shapes

        tensors = {}
        for name, value in parts.items():
            if name in ("gate_up_proj", "down_proj"):  # [in, out] -> MatMulNBits' [out, in]
                matrix = value if isinstance(value, QuantizedMatrix) else \
                    quantize(value.T, shape.bits, shape.block_size, not shape.zero_points)
                tensors.update(matrix.tensors(name))
            else:
                tensors[name] = np.asarray(value, np.float32)
        expected = {name: dims for name, (_, dims) in quantized_tensor_shapes(shape).items()}
    for name, dims in expected.items():
        if list(tensors[name].shape) != dims:
            raise EdgeMoeError(f"expert tensor {name} has shape {list(tensors[name].shape)}, not {dims} as the "
                               "config's hidden_size and intermediate_size say; check config.json")
    return {name: tensors[name] for name in expected}


def _encoded_expert(checkpoint, shape: ExpertShape, keys) -> dict[str, np.ndarray] | None:
    """The expert's tensors taken over from the checkpoint's own codes (GGUF Q8_0 / Q4_0), or None where they do not
    map exactly to this shape and the weights go through float."""
    if not (shape.quantized and shape.block_size == 32 and not shape.zero_points
            and hasattr(checkpoint, "read_quantized")):
        return None
    gate, up, down = (checkpoint.read_quantized(key, shape.bits) for key in keys)
    if gate is None or up is None or down is None:
        return None
    return {**concat_rows(gate, up).tensors("gate_up_proj"), **down.tensors("down_proj")}


def _export_experts(root: Path, checkpoint, family, choose, bar) -> list[ExpertRecord]:
    (root / "experts").mkdir()
    arch, records = family.arch, []
    for layer in arch.moe_layers:
        blob_name = f"layer_{layer:03d}.bin"
        blob = BlobWriter(root / "experts" / blob_name)
        for index in range(arch.num_experts):
            keys = family.expert_keys(layer, index)
            tensors = None
            if family.expert_kind == "swiglu" and len(keys) == 3:  # per-expert tensors: codes may carry over as-is
                shape = choose(layer, index, arch.hidden_size, checkpoint.shape(keys[2])[1])
                tensors = _encoded_expert(checkpoint, shape, keys)
            if tensors is None:
                if family.expert_kind == "swiglu":   # (gate, up, down) in Hugging Face's [out, in] layout
                    parts = family.read_expert(checkpoint, layer, index)
                    shape = choose(layer, index, arch.hidden_size, parts[2].shape[1])
                    tensors = expert_tensors(shape, *parts)
                else:                                # the kind's own tensors, already in the graph's layout
                    shape = dataclasses.replace(choose(layer, index, arch.hidden_size, arch.moe_intermediate_size),
                                                kind=family.expert_kind)
                    parts = family.read_expert(checkpoint, layer, index, codes_bits=_codes_bits(shape))
                    tensors = kind_tensors(shape, parts)
                del parts
            ffn = shape.intermediate_size
            writer = ExpertWriter(blob, expert_seed((layer, index)))
            for name, array in tensors.items():
                writer.write(name, array, str(array.dtype))
            del tensors
            offset, length, checksum = writer.finish()
            external = {t.name: (blob_name, offset + t.offset, t.nbytes) for t in writer.tensors}
            graph = f"experts/L{layer:03d}_E{index:03d}.onnx"
            _save(build_expert_graph(shape, external), root / graph)
            records.append(ExpertRecord(
                layer, index, root / graph, root / "experts" / blob_name, offset, length, shape.dtype, checksum,
                shape.kind, shape.hidden_size, ffn, tuple(writer.tensors),
                shape.block_size, shape.zero_points))
            bar.update()
        blob.close()
    return records
