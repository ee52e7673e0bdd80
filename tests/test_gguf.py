"""GGUF in: tiny Hugging Face models written as llama.cpp's converter writes them (gguf's GGUFWriter, its tensor name
map, stacked experts, llama's q/k row permutation), imported with `edge-moe export model.gguf`, and compared with
transformers and with the export of the same checkpoint from safetensors."""

import json

import numpy as np
import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe_export.exporter import export_checkpoint

from conftest import build_checkpoint, reference_logits, tiny_config

gguf = pytest.importorskip("gguf")

from gguf_writer import Q, write_gguf  # noqa: E402 (needs gguf)

_quantize = gguf.quants.quantize


def kl_divergence(reference_logits_, logits):
    """Mean over positions of KL(softmax(reference) || softmax(ours)), in nats."""
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p_log, q_log = log_softmax(reference_logits_.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return float((np.exp(p_log) * (p_log - q_log)).sum(axis=-1).mean())


IDS = list(range(2, 34))
SHAPES = {  # K a multiple of 32 so that Q8_0 / Q4_0 blocks fit
    "qwen3_moe": dict(hidden=64, ffn=64, heads=4, kv_heads=2, experts=6, top_k=2, norm_topk_prob=True),
    "mixtral": dict(hidden=64, ffn=64, heads=4, kv_heads=2, experts=4, top_k=2),
    "olmoe": dict(hidden=64, ffn=64, heads=4, kv_heads=4, experts=6, top_k=3),
    "qwen2_moe": dict(hidden=64, ffn=64, heads=4, kv_heads=2, experts=5, top_k=2),  # shared expert, q/k/v biases
}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_float32_gguf_exports_to_transformers_logits(family, tmp_path):
    reference = build_checkpoint(tmp_path / "hf", tiny_config(family, **SHAPES[family]), seed=11)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf")
    package = export_checkpoint(path, tmp_path / "pkg", progress=False)
    ours = edge_moe.load(package).logits(IDS)
    np.testing.assert_allclose(ours, reference_logits(reference, IDS), atol=1e-4, rtol=0)
    from_safetensors = edge_moe.load(export_checkpoint(tmp_path / "hf", tmp_path / "pkg_hf", progress=False))
    np.testing.assert_allclose(ours, from_safetensors.logits(IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("stacked", [True, False])
def test_float16_gguf_equals_the_float16_export(stacked, tmp_path):
    """Mixtral as current converters write it (stacked experts) and as early ones did (a tensor per expert)."""
    build_checkpoint(tmp_path / "hf", tiny_config("mixtral", **SHAPES["mixtral"]), seed=12)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=Q.F16, weight_type=Q.F16,
                      stacked=stacked)
    assert ("blk.0.ffn_down.3.weight" in {t.name for t in gguf.GGUFReader(path).tensors}) != stacked
    package = export_checkpoint(path, tmp_path / "pkg", dtype="float16", progress=False)
    manifest = json.loads((package / "manifest.json").read_text())
    assert {e["dtype"] for e in manifest["experts"]} == {"float16"}
    expected = export_checkpoint(tmp_path / "hf", tmp_path / "pkg_hf", dtype="float16", progress=False)
    np.testing.assert_allclose(edge_moe.load(package).logits(IDS), edge_moe.load(expected).logits(IDS), atol=1e-5,
                               rtol=0)


def with_gguf_experts(reference, path):
    """The transformers model with every expert weight replaced by gguf's own dequantization of the file's."""
    import torch

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with torch.no_grad():
        for layer, block in enumerate(reference.model.layers):
            def weights(kind):
                t = tensors[f"blk.{layer}.ffn_{kind}_exps.weight"]
                return torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
            block.mlp.experts.gate_up_proj.copy_(torch.cat([weights("gate"), weights("up")], dim=1))
            block.mlp.experts.down_proj.copy_(weights("down"))
    return reference


@pytest.mark.parametrize("family,qtype,bits,zero_points", [
    ("qwen3_moe", Q.Q8_0, 8, False), ("qwen3_moe", Q.Q4_0, 4, False), ("mixtral", Q.Q4_0, 4, False),
    ("qwen3_moe", Q.Q4_0, 4, True)])
def test_quantized_gguf_experts_become_our_quantized_experts(family, qtype, bits, zero_points, tmp_path):
    """Q8_0 / Q4_0 experts are taken over code for code (block 32, no zero points): the export computes what the GGUF
    file means, transformers on gguf's dequantization of it. With zero points they go through float and are
    requantized. KL against transformers on the float weights is printed for each route and for our own quantizer."""
    reference = build_checkpoint(tmp_path / "hf", tiny_config(family, **SHAPES[family]), seed=13)
    exact = reference_logits(reference, IDS)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=qtype)
    package = export_checkpoint(path, tmp_path / "pkg", zero_points=zero_points, progress=False)
    manifest = json.loads((package / "manifest.json").read_text())
    assert {e["bits"] for e in manifest["experts"]} == {bits}
    ours = edge_moe.load(package).logits(IDS)
    file_means = reference_logits(with_gguf_experts(reference, path), IDS)
    if not zero_points:
        np.testing.assert_allclose(ours, file_means, atol=1e-4, rtol=0)
    kl = kl_divergence(exact, ours)
    own = export_checkpoint(tmp_path / "hf", tmp_path / "pkg_hf", bits=bits, zero_points=zero_points, progress=False)
    kl_own = kl_divergence(exact, edge_moe.load(own).logits(IDS))
    route = "requantized with zero points" if zero_points else "codes taken over"
    print(f"\n{family} {qtype.name} experts -> {bits}-bit ({route}): KL {kl:.2e} nats against float weights "
          f"(the GGUF itself {kl_divergence(exact, file_means):.2e}; our {bits}-bit from float {kl_own:.2e})")
    assert 0 < kl < (1e-4 if bits == 8 else 3e-3)


def test_split_gguf_reads_as_one_file(tmp_path):
    """Large GGUFs ship split (NAME-00001-of-0000N.gguf, metadata in the first): the export of the split file equals
    that of the single file; a missing shard is a one-line error."""
    build_checkpoint(tmp_path / "hf", tiny_config("olmoe", **SHAPES["olmoe"]), seed=16)
    single = write_gguf(tmp_path / "hf", tmp_path / "single.gguf", expert_type=Q.Q8_0)
    first = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=Q.Q8_0, split_tensors=7)
    shards = sorted(tmp_path.glob("model-*-of-*.gguf"))
    assert first == shards[0] and len(shards) > 2
    expected = edge_moe.load(export_checkpoint(single, tmp_path / "pkg1", progress=False)).logits(IDS)
    ours = edge_moe.load(export_checkpoint(first, tmp_path / "pkg2", progress=False)).logits(IDS)
    np.testing.assert_array_equal(ours, expected)
    shards[-1].unlink()
    with pytest.raises(EdgeMoeError, match=f"{shards[-1].name}: no such file"):
        export_checkpoint(first, tmp_path / "pkg3", progress=False)


def test_not_a_gguf_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(EdgeMoeError, match="not a readable GGUF file"):
        export_checkpoint(bad, tmp_path / "pkg", progress=False)
    with pytest.raises(EdgeMoeError, match="no such file"):
        export_checkpoint(tmp_path / "missing.gguf", tmp_path / "pkg", progress=False)


def test_dense_architecture_is_refused_with_the_supported_list(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "dense.gguf", "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EdgeMoeError, match="'qwen2' without experts is not supported; supported: qwen3moe"):
        export_checkpoint(tmp_path / "dense.gguf", tmp_path / "pkg", progress=False)


def trained_tokenizer(pre):
    """A small byte-level BPE trained here (no download) with the split regex llama.cpp calls `pre`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from edge_moe_export.gguf_tokenizer import PRE_TOKENIZER_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["The experts of a mixture stream from flash; the hot ones stay resident. 12345 tokens, 2048 experts!",
              "Ein Würfel kostet 3,50 € — don't we'll they've I'm   spaces\n\nnew lines\ttabs."] * 20
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def gguf_tokenizer_metadata(tokenizer, pre):
    """What convert_hf_to_gguf's _set_vocab_gpt2 writes: tokens by id, their types, merges, special ids."""
    state = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in state["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]

    def add(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(vocab["<|im_start|>"])
        writer.add_eos_token_id(vocab["<|endoftext|>"])
    return add, len(tokens)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_tokenizer_comes_from_gguf_metadata(pre, tmp_path):
    from tokenizers import Tokenizer

    original = trained_tokenizer(pre)
    metadata, vocab = gguf_tokenizer_metadata(original, pre)
    build_checkpoint(tmp_path / "hf", tiny_config("qwen3_moe", **{**SHAPES["qwen3_moe"], "vocab": vocab}), seed=2)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", tokenizer=metadata)
    package = export_checkpoint(path, tmp_path / "pkg", progress=False)
    imported = Tokenizer.from_file(str(package / "tokenizer.json"))
    for text in ["The hot experts stay resident.", "Würfel 3,50 € 1234567 don't\n\n  x\ttabs",
                 "<|im_start|>user flash<|endoftext|>", "unseen words: quixotic zebra 9"]:
        assert imported.encode(text).ids == original.encode(text).ids, text  # no BOS added for BPE by default
        assert imported.decode(imported.encode(text).ids, skip_special_tokens=False) == text
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["source_config"]["eos_token_id"] == original.token_to_id("<|endoftext|>")


def test_mixed_bits_from_a_quantized_gguf(tmp_path):
    """--bits mixed from a Q8_0 GGUF (calibrated on the file's weights in float, the tokenizer from its metadata):
    the experts fit the target between all-4-bit and the file's 8 bits, with several bitwidths."""
    from edge_moe.manifest import Manifest

    metadata, vocab = gguf_tokenizer_metadata(trained_tokenizer("qwen2"), "qwen2")
    shape = {**SHAPES["qwen3_moe"], "vocab": vocab}
    build_checkpoint(tmp_path / "hf", tiny_config("qwen3_moe", **shape), seed=3)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=Q.Q8_0, tokenizer=metadata)
    text = tmp_path / "calibration.txt"
    text.write_text("The hot experts stay resident while the others stream from flash. " * 20)
    four = Manifest.load(export_checkpoint(path, tmp_path / "q4", bits=4, progress=False)).expert_bytes
    eight = Manifest.load(export_checkpoint(path, tmp_path / "q8", progress=False)).expert_bytes
    mixed = Manifest.load(export_checkpoint(path, tmp_path / "mixed", bits="mixed", expert_bytes=(four + eight) // 2,
                                            calibration=text, progress=False))
    assert four < mixed.expert_bytes <= (four + eight) // 2
    assert len({record.dtype for record in mixed.experts.values()}) >= 2  # really mixed


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    metadata, vocab = gguf_tokenizer_metadata(trained_tokenizer("qwen2"), "deepseek-v3")
    build_checkpoint(tmp_path / "hf", tiny_config("qwen3_moe", **{**SHAPES["qwen3_moe"], "vocab": vocab}), seed=2)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", tokenizer=metadata)
    with pytest.raises(EdgeMoeError, match="tokenizer.ggml.pre 'deepseek-v3' is not supported; supported: qwen2"):
        export_checkpoint(path, tmp_path / "pkg", progress=False)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_taken_over_codes_run_in_matmulnbits_as_gguf_dequantizes_them(qtype):
    """Large experts run in onnxruntime's MatMulNBits (tiny ones are dequantized in numpy): Q4_0's scales are negative
    in about half the blocks, so check the kernel itself on the repacked codes against gguf's dequantization."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from edge_moe_export.encodings import q4_0_to_matmulnbits, q8_0_to_matmulnbits

    rng = np.random.default_rng(3)
    n, k = 96, 256
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    q = (q8_0_to_matmulnbits if qtype == Q.Q8_0 else q4_0_to_matmulnbits)(raw)
    assert (q.scales < 0).any() == (qtype == Q.Q4_0)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=q.bits, block_size=32, accuracy_level=0)
    graph = helper.make_graph(
        [node], "expert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        initializer=[numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.reshape(-1), "scales")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ gguf.quants.dequantize(raw, qtype).T, atol=1e-4, rtol=1e-5)


def quantize_q4_k(w):
    """float32 [N, K] (K a multiple of 256) -> GGUF Q4_K bytes [N, K / 256 * 144], the gguf package having no Q4_K
    quantizer: per 32 weights a 6-bit scale and min (w = d sc q - dmin m), per 256 float16 d and dmin, packed as
    ggml's block_q4_K (d, dmin, 12 bytes of scales and mins, 128 bytes of nibbles: sub-blocks 2c / 2c+1 in the
    low / high nibbles of 32 bytes). gguf's own Q4_K dequantization is what checks this packing."""
    n, k = w.shape
    sub = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - low) / 15                                  # [N, S, 8]
    d = np.maximum(scale.max(axis=-1), 1e-12) / 63                         # [N, S]
    dmin = np.maximum((-low).max(axis=-1), 1e-12) / 63
    sc = np.clip(np.round(scale / d[..., None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin[..., None]), 0, 63).astype(np.uint8)
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    step = d16.astype(np.float32)[..., None] * sc
    offset = dmin16.astype(np.float32)[..., None] * m
    q = np.clip(np.round((sub + offset[..., None]) / step[..., None]), 0, 15).astype(np.uint8)  # [N, S, 8, 32]
    scales = np.zeros((n, k // 256, 12), np.uint8)
    scales[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    scales[..., 4:8] = m[..., 0:4] | ((m[..., 4:8] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:8] & 0xF) | ((m[..., 4:8] & 0xF) << 4)
    nibbles = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(n, k // 256, 128)
    blocks = np.concatenate([d16[..., None].view(np.uint8), dmin16[..., None].view(np.uint8), scales, nibbles], -1)
    return blocks.reshape(n, -1)


def test_q4_k_encoder_matches_gguf_dequantization():
    w = np.random.default_rng(4).normal(0, 0.05, (8, 512)).astype(np.float32)
    decoded = gguf.quants.dequantize(quantize_q4_k(w), Q.Q4_K)
    assert decoded.shape == w.shape
    # 4 bits with a min per 32 normal weights: ~0.08 relative RMS (a packing error would make it ~1)
    assert np.sqrt(np.mean((decoded - w) ** 2) / np.mean(w ** 2)) < 0.1


@pytest.mark.parametrize("zero_points", [False, True])
def test_q4_k_experts_go_through_float_with_a_measured_kl(zero_points, tmp_path, monkeypatch):
    """Q4_K's per-32 minimum has no exact MatMulNBits form (its zero point d_min m / (d sc) is not an integer):
    dequantized and requantized at 4 bits, block 32; KL against transformers on the float weights, and against
    the file's own meaning, printed and bounded."""
    monkeypatch.setattr(gguf.quants, "quantize", lambda data, qtype: quantize_q4_k(data.reshape(-1, data.shape[-1]))
                        .reshape(*data.shape[:-1], -1) if qtype == Q.Q4_K else _quantize(data, qtype))
    family = "qwen3_moe"
    shape = dict(SHAPES[family], hidden=256, ffn=256, experts=4)
    reference = build_checkpoint(tmp_path / "hf", tiny_config(family, **shape), seed=14)
    exact = reference_logits(reference, IDS)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=Q.Q4_K)
    package = export_checkpoint(path, tmp_path / "pkg", zero_points=zero_points, progress=False)
    assert {e["bits"] for e in json.loads((package / "manifest.json").read_text())["experts"]} == {4}
    ours = edge_moe.load(package).logits(IDS)
    file_means = reference_logits(with_gguf_experts(reference, path), IDS)
    kl, kl_file, kl_requantized = (kl_divergence(exact, ours), kl_divergence(exact, file_means),
                                   kl_divergence(file_means, ours))
    print(f"\nQ4_K experts -> 4-bit{' with zero points' if zero_points else ''}: KL {kl:.2e} nats against float "
          f"weights (the GGUF itself {kl_file:.2e}; ours against the GGUF {kl_requantized:.2e})")
    # Requantizing costs about what the file's own quantization cost (each is within half a step of its grid)
    assert 0 < kl_requantized < 2 * kl_file and kl < 3 * kl_file


def test_cli_exports_a_gguf_file_and_refuses_a_truncated_one(tmp_path):
    from test_cli import assert_user_error, cli

    build_checkpoint(tmp_path / "hf", tiny_config("olmoe", **SHAPES["olmoe"]), seed=15)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", expert_type=Q.Q8_0)
    result = cli("export", path, tmp_path / "pkg", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and (tmp_path / "pkg" / "manifest.json").exists()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-5000])
    assert_user_error(cli("export", truncated, tmp_path / "pkg2", "--quiet"), str(truncated), "GGUF")
    assert not (tmp_path / "pkg2").exists()


def test_sentencepiece_tokenizer_comes_from_gguf_metadata(tmp_path):
    """A SentencePiece BPE model trained here with Llama's settings (byte fallback, no normalization, a dummy prefix),
    written as convert_hf_to_gguf's _set_vocab_sentencepiece writes it; the imported tokenizer must encode and
    decode as sentencepiece itself does."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer

    corpus = ["The experts of a mixture stream from flash; the hot ones stay resident. 12345 tokens, 2048 experts!",
              "Ein Würfel kostet 3,50 € — don't we'll they've I'm   spaces\n\nnew lines\ttabs."] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=420,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, split_digits=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    def token_type(i):
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        return gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL

    def metadata(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        writer.add_token_types([token_type(i) for i in range(sp.get_piece_size())])
        writer.add_add_space_prefix(True)
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())

    shape = {**SHAPES["mixtral"], "vocab": sp.get_piece_size()}
    build_checkpoint(tmp_path / "hf", tiny_config("mixtral", **shape), seed=2)
    path = write_gguf(tmp_path / "hf", tmp_path / "model.gguf", tokenizer=metadata)
    package = export_checkpoint(path, tmp_path / "pkg", progress=False)
    imported = Tokenizer.from_file(str(package / "tokenizer.json"))
    for text in ["The hot experts stay resident.", "Würfel 3,50 € 1234567 don't\n\n  x\ttabs",
                 "quixotic zebra ✓ 9", "  leading spaces", "flash;the"]:
        assert imported.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert imported.encode(text).ids == [sp.bos_id(), *sp.encode(text)], text  # llama.cpp's default for SPM
        assert imported.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
