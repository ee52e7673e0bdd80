"""Reads a GGUF file (llama.cpp's format) as if it were a Hugging Face checkpoint, so that every family exports it.

    GGUF (what convert_hf_to_gguf.py writes)             Hugging Face (what the families ask for)
    general.architecture qwen3moe | qwen2moe | olmoe |     model_type qwen3_moe | qwen2_moe | olmoe | mixtral
      llama with experts
    {arch}.block_count, .embedding_length, ...             config.json fields
    blk.{i}.ffn_gate_exps [E, F, H] (numpy order)          ...experts.{e}.gate_proj.weight [F, H]: slice e
      or blk.{i}.ffn_gate.{e} [F, H] (early Mixtral files)
    blk.{i}.attn_q / attn_k (llama: rows permuted for       self_attn.q_proj / k_proj: rows un-permuted
      ggml's interleaved RoPE)
    tokenizer.ggml.*                                       tokenizer.json (export/gguf_tokenizer.py)

Split files (NAME-00001-of-0000N.gguf) are read as one. The gguf package parses the headers; each tensor (or one
expert's slice of a stacked tensor) is then read with one pread, so memory holds one tensor at a time as for
safetensors. Quantized tensors (Q8_0, Q4_0, Q4_K, ...) are
dequantized with the gguf package's numpy code, except where the exporter can take the codes over as they are
(`read_quantized`: Q8_0, Q4_0); experts keep the bits the file used (`source_bits`) unless told otherwise.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from edge_moe.errors import EdgeMoeError
from edge_moe.quant import QuantizedMatrix

from .encodings import q4_0_to_matmulnbits, q8_0_to_matmulnbits

# GGUF architecture -> Hugging Face model_type, and the prefix / projection names of that family's experts.
ARCHITECTURES = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "olmoe": "olmoe", "llama": "mixtral"}
_EXPERTS = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
_DEFAULT_EXPERTS = ("mlp", ("gate_proj", "up_proj", "down_proj"))
# llama.cpp renormalizes the top-k weights of these architectures unless the file says otherwise.
_NORM_TOPK = {"qwen3moe": True, "qwen2moe": False, "olmoe": False, "llama": True}
_PER_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
              "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
              "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
              **{f"ffn_{g}_shexp.weight": f"mlp.shared_expert.{g}_proj.weight" for g in ("gate", "up", "down")},
              **{f"attn_{g}.{kind}": f"self_attn.{h}_proj.{kind}" for g, h in
                 (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for kind in ("weight", "bias")}}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def _bits_of(gguf_type: str):
    """The expert precision a GGUF type maps to: float32 (None), float16, or the next bitwidth our kernels take at or
    above the type's (5/6-bit -> 8; 4-bit and below, i-quants included, -> 4: 2-bit experts cost too much accuracy)."""
    if gguf_type == "F32":
        return None
    if gguf_type in ("F16", "BF16"):
        return 16
    return 8 if gguf_type.startswith(("Q5", "Q6", "Q8")) else 4


_REQUIRED = object()
_REPACK = {("Q8_0", 8): q8_0_to_matmulnbits, ("Q4_0", 4): q4_0_to_matmulnbits}


def _open(path: Path):
    try:
        return _gguf().GGUFReader(path)
    except FileNotFoundError:
        raise EdgeMoeError(f"{path}: no such file") from None
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise EdgeMoeError(f"{path}: not a readable GGUF file ({exc})") from None


def _gguf():
    try:
        import gguf
    except ImportError:
        raise EdgeMoeError("reading GGUF needs the gguf package; install it with `pip install edge-moe[gguf]`") \
            from None
    return gguf


class GgufCheckpoint:
    """The tensors of a .gguf file under Hugging Face names, loaded on demand as float32 numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = _open(self.path)
        shards = self._shards()
        if shards[0] != self.path:
            self._reader = _open(shards[0])  # metadata lives in the first shard only
        self.arch = self._field("general.architecture")
        self._tensors, self._file_of = {}, {}
        for shard in shards:
            for tensor in (self._reader if shard == shards[0] else _open(shard)).tensors:
                self._tensors[tensor.name], self._file_of[tensor.name] = tensor, shard
        self.config = self._config()
        self._names = self._hf_names()

    def _shards(self) -> list[Path]:
        """The files of a split GGUF (NAME-00001-of-0000N.gguf, as gguf-split and the converter write them)."""
        count = int(self._field("split.count", 1))
        if count <= 1:
            return [self.path]
        match = re.fullmatch(r"(.*)-\d{5}-of-(\d{5})\.gguf", self.path.name)
        if match is None or int(match.group(2)) != count:
            raise EdgeMoeError(f"{self.path}: a shard of a {count}-file split GGUF whose name does not follow "
                               "NAME-00001-of-0000N.gguf; rename the shards as gguf-split wrote them")
        return [self.path.with_name(f"{match.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]

    # Metadata -------------------------------------------------------------------------------------------

    def _field(self, key: str, default=_REQUIRED):
        """A metadata value; `default` where the key is absent, an error where it is required."""
        field = self._reader.get_field(key)
        if field is not None:
            return field.contents()
        if default is _REQUIRED:
            raise EdgeMoeError(f"{self.path}: metadata {key} is missing; the file is incomplete")
        return default

    def _config(self) -> dict:
        arch, f = self.arch, self._field
        experts = f(f"{arch}.expert_count", 0)
        if arch not in ARCHITECTURES or not experts:
            raise EdgeMoeError(f"{self.path}: GGUF architecture {arch!r}{'' if experts else ' without experts'} is "
                               f"not supported; supported: {', '.join(ARCHITECTURES)} (with experts)")
        first = next((n for n in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate.0.weight") if n in self._tensors),
                     None)
        if first is None:
            raise EdgeMoeError(f"{self.path}: layer 0 has no expert tensors (blk.0.ffn_gate_exps or "
                               "blk.0.ffn_gate.0); the file is not a mixture of experts this reader knows")
        if "token_embd.weight" not in self._tensors:
            raise EdgeMoeError(f"{self.path}: tensor token_embd.weight is missing; the file is incomplete")
        heads = int(f(f"{arch}.attention.head_count"))
        embed = self._tensors["token_embd.weight"]
        model_type = ARCHITECTURES[arch]
        ffn = int(self._tensors[first].shape[1])  # ggml order: [H, F(, E)]
        config = {
            "model_type": model_type, "hidden_size": int(f(f"{arch}.embedding_length")),
            "num_hidden_layers": int(f(f"{arch}.block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(f(f"{arch}.attention.head_count_kv", heads)),
            "vocab_size": int(embed.shape[1]),
            "rms_norm_eps": float(f(f"{arch}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(f(f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(f(f"{arch}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "num_experts_per_tok": int(f(f"{arch}.expert_used_count")),
            "norm_topk_prob": bool(f(f"{arch}.expert_weights_norm", _NORM_TOPK[arch])),
            "moe_intermediate_size": ffn, "intermediate_size": ffn,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors, "qkv_bias": "blk.0.attn_q.bias" in self._tensors,
            "bos_token_id": f("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": f("tokenizer.ggml.eos_token_id", None),
        }
        config["num_local_experts" if model_type == "mixtral" else "num_experts"] = int(experts)
        head_dim = f(f"{arch}.attention.key_length", None)
        if head_dim is not None:
            config["head_dim"] = int(head_dim)
        scaling = f(f"{arch}.rope.scaling.type", None)
        if scaling not in (None, "none"):
            raise EdgeMoeError(f"{self.path}: rope scaling {scaling!r} is not supported yet; supported: none")
        return config

    # Names ----------------------------------------------------------------------------------------------

    def _hf_names(self) -> dict[str, tuple[str, int | None]]:
        """Hugging Face name -> (GGUF tensor name, expert index or None)."""
        prefix, projections = _EXPERTS.get(self.config["model_type"], _DEFAULT_EXPERTS)
        names = {hf: (g, None) for g, hf in _GLOBAL.items() if g in self._tensors}
        for layer in range(self.config["num_hidden_layers"]):
            base = f"model.layers.{layer}"
            for g, hf in _PER_LAYER.items():
                if f"blk.{layer}.{g}" in self._tensors:
                    names[f"{base}.{hf}"] = (f"blk.{layer}.{g}", None)
            if f"blk.{layer}.ffn_gate_inp.weight" in self._tensors:
                names[f"{base}.{prefix}.gate.weight"] = (f"blk.{layer}.ffn_gate_inp.weight", None)
            for kind, projection in zip(("gate", "up", "down"), projections):
                stacked = f"blk.{layer}.ffn_{kind}_exps.weight"
                for e in range(self.config.get("num_experts") or self.config["num_local_experts"]):
                    single = f"blk.{layer}.ffn_{kind}.{e}.weight"
                    if stacked in self._tensors:
                        names[f"{base}.{prefix}.experts.{e}.{projection}.weight"] = (stacked, e)
                    elif single in self._tensors:
                        names[f"{base}.{prefix}.experts.{e}.{projection}.weight"] = (single, None)
        return names

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return list(self._names)

    def _source(self, name: str):
        try:
            gguf_name, index = self._names[name]
        except KeyError:
            raise EdgeMoeError(f"{self.path}: no GGUF tensor holds {name}; the file lacks it or uses names "
                               "this reader does not know") from None
        return self._tensors[gguf_name], index

    def shape(self, name: str) -> list[int]:
        tensor, index = self._source(name)
        dims = [int(d) for d in reversed(tensor.shape)]
        return dims[1:] if index is not None else dims

    def tensor_type(self, name: str) -> str:
        """The GGUF type the tensor is stored in (F16, Q8_0, Q4_K, ...)."""
        return self._source(name)[0].tensor_type.name

    def source_bits(self):
        """The lowest precision among the expert tensors (None: float32; Q4_K_M files mix Q4_K and Q6_K: 4 bits):
        what export stores experts in unless --bits says otherwise."""
        kinds = {self.tensor_type(name) for name in self._names if ".experts." in name}
        bits = {_bits_of(kind) for kind in kinds}
        return min(bits, key=lambda b: 32 if b is None else b) if bits else None

    # Tensors --------------------------------------------------------------------------------------------

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 [out, in] (Hugging Face layout), dequantized.

        Raises:
            EdgeMoeError: the tensor is missing or its type cannot be dequantized.
        """
        gguf = _gguf()
        tensor, index = self._source(name)
        data = self._read_raw(tensor, index)
        shape = [int(d) for d in reversed(tensor.shape)][0 if index is None else 1:]
        try:
            array = gguf.quants.dequantize(data, tensor.tensor_type)
        except NotImplementedError:
            raise EdgeMoeError(f"{self.path}: tensor {tensor.name} is {tensor.tensor_type.name}, which the gguf "
                               "package cannot dequantize; requantize the file to Q8_0, Q4_K or F16") from None
        array = np.asarray(array, np.float32).reshape(shape)
        if name.endswith("shared_expert_gate.weight") and array.ndim == 1:  # llama.cpp takes it as [H]; HF [1, H]
            array = array[None, :]
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            array = unpermute_rope_rows(array, heads)
        return array

    def read_quantized(self, name: str, bits: int) -> QuantizedMatrix | None:
        """The tensor as MatMulNBits codes (block 32, no zero points) taken over from the file without going through
        float, where its type maps exactly (Q8_0 -> 8 bits, Q4_0 -> 4 bits); None otherwise (then `read` it)."""
        tensor, index = self._source(name)
        repack = _REPACK.get((tensor.tensor_type.name, bits))
        if repack is None or (self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight"))):
            return None
        return repack(self._read_raw(tensor, index))

    def _read_raw(self, tensor, index: int | None) -> np.ndarray:
        """The stored bytes of a tensor (or of its slice along the outermost dimension) with one pread, in the
        reader's dtype and shape: the reader's memory map would keep every page read resident (RSS ~ file size)."""
        shape, length, offset = tensor.data.shape, tensor.n_bytes, tensor.data_offset
        if index is not None:
            shape, length = shape[1:], length // shape[0]
            offset += index * length
        raw = np.empty(length, np.uint8)
        path = self._file_of[tensor.name]
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(memoryview(raw)) != length:
                raise EdgeMoeError(f"{path}: short read of tensor {tensor.name}; the file is truncated")
        return raw.view(tensor.data.dtype).reshape(shape)

    def write_tokenizer(self, destination: Path) -> bool:
        """Writes tokenizer.json built from the GGUF metadata; False where the file has no tokenizer."""
        from .gguf_tokenizer import tokenizer_json

        text = tokenizer_json(self._reader, self.path)
        if text is None:
            return False
        destination.write_text(text)
        return True


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf's permute of llama q/k rows: per head, rows (pairs, 2) -> (2, pairs), i.e. ggml's
    interleaved RoPE layout back to Hugging Face's rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
