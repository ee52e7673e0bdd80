"""FP8 block-scaled and MXFP4 checkpoints read without torch, against torch's float8 decoding and transformers' own
dequantization; FP8 checkpoints exported end to end against transformers on the dequantized weights."""

import json

import numpy as np
import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe_export.checkpoint import Checkpoint
from edge_moe_export.encodings import decode_e4m3fn, dequantize_fp8_blocks
from edge_moe_export.exporter import export_checkpoint

from conftest import build_checkpoint, mxfp4_gpt_oss_checkpoint, reference_logits, tiny_config

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")


def test_e4m3fn_table_equals_torch_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(decode_e4m3fn(codes.numpy()), expected)  # NaN == NaN here, as it should


def test_e8m0_table_equals_torch_for_every_code():
    from edge_moe_export.encodings import decode_e8m0

    codes = torch.arange(256, dtype=torch.uint8)
    np.testing.assert_array_equal(decode_e8m0(codes.numpy()), codes.view(torch.float8_e8m0fnu).float().numpy())


def test_fp8_with_power_of_two_scales_stored_as_e8m0(tmp_path):
    """UE8M0 scales (DeepSeek-V3.1-style): weight_scale_inv as float8_e8m0fnu, read through the same path."""
    q, scale = fp8_block_quantize(torch.randn(200, 136) * 0.05, (128, 128), power_of_two=True)
    scale = scale.to(torch.float8_e8m0fnu)  # exact: every scale is a power of two
    (tmp_path / "ckpt").mkdir()
    config = {"quantization_config": {"weight_block_size": [128, 128]}}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    safetensors_torch.save_file({"w.weight": q, "w.weight_scale_inv": scale}, tmp_path / "ckpt" / "model.safetensors")
    expected = fp8._dequantize_fp8_weight(q, scale, [128, 128], torch.float32).numpy()
    np.testing.assert_array_equal(Checkpoint(tmp_path / "ckpt").read("w.weight"), expected)


def fp8_block_quantize(w, block, power_of_two=False):
    """float32 [N, K] -> (float8_e4m3fn [N, K], scale_inv float32 [ceil(N/bn), ceil(K/bk)]): DeepSeek-V3's recipe,
    each block scaled so that its absmax lands on 448 (or below, the scale rounded up to a power of two), torch doing
    the rounding."""
    (n, k), (bn, bk) = w.shape, block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk)
    padded[:n, :k] = w
    scale = padded.reshape(nb, bn, kb, bk).abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (padded.reshape(nb, bn, kb, bk) / scale[:, None, :, None]).reshape(nb * bn, kb * bk)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("shape,block", [((300, 260), (128, 128)), ((40, 48), (16, 16)), ((7, 33), (4, 8))])
def test_fp8_blocks_equal_transformers_dequantization(shape, block):
    w = torch.randn(*shape) * 0.05
    q, scale = fp8_block_quantize(w, block)
    expected = fp8._dequantize_fp8_weight(q, scale, list(block), torch.float32).numpy()
    ours = dequantize_fp8_blocks(q.view(torch.uint8).numpy(), scale.numpy(), block)
    np.testing.assert_array_equal(ours, expected)
    assert np.abs(ours - w.numpy()).max() <= 0.07 * np.abs(w.numpy()).max()  # e4m3 keeps 3 mantissa bits


def test_fp8_scale_grid_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="expected"):
        dequantize_fp8_blocks(np.zeros((256, 256), np.uint8), np.ones((1, 2), np.float32), (128, 128))


def write_fp8_checkpoint(hf_dir, out_dir, block):
    """The float32 checkpoint hf_dir re-encoded as DeepSeek-V3 ships weights: every projection (not embeddings, the
    head or the router) in float8_e4m3fn with `weight_scale_inv`. Returns {name: transformers' dequantization}."""
    state = safetensors_torch.load_file(hf_dir / "model.safetensors")
    stored, dequantized = {}, {}
    for name, w in state.items():
        if w.ndim == 2 and "embed" not in name and "lm_head" not in name and not name.endswith("mlp.gate.weight"):
            q, scale = fp8_block_quantize(w, block)
            stored[name], stored[name + "_scale_inv"] = q, scale
            dequantized[name] = fp8._dequantize_fp8_weight(q, scale, list(block), torch.float32)
        else:
            stored[name] = w
    out_dir.mkdir()
    safetensors_torch.save_file(stored, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (out_dir / "config.json").write_text(json.dumps(config))
    return dequantized


def test_fp8_checkpoint_exports_to_the_logits_of_its_dequantized_weights(tmp_path):
    """Blocks of 16 over hidden 48 / ffn 40: whole and partial blocks. The reference is the float32 model with every
    FP8 weight replaced by transformers' dequantization of it."""
    config = tiny_config("qwen3_moe", hidden=48, ffn=40, experts=4)
    reference = build_checkpoint(tmp_path / "hf", config, seed=5)
    dequantized = write_fp8_checkpoint(tmp_path / "hf", tmp_path / "fp8", (16, 16))

    checkpoint = Checkpoint(tmp_path / "fp8")
    assert not any(name.endswith("_scale_inv") for name in checkpoint.names())
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    np.testing.assert_array_equal(checkpoint.read(key), dequantized[key].numpy())

    with torch.no_grad():
        parameters = dict(reference.named_parameters())
        for name, w in dequantized.items():
            if name in parameters:
                parameters[name].copy_(w)
            else:  # transformers 5 holds experts fused: experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F]
                layer, expert, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
                experts = reference.model.layers[int(layer)].mlp.experts
                if proj == "down_proj":
                    experts.down_proj[expert].copy_(w)
                else:
                    ffn = w.shape[0]
                    rows = slice(0, ffn) if proj == "gate_proj" else slice(ffn, 2 * ffn)
                    experts.gate_up_proj[expert][rows].copy_(w)
    package = export_checkpoint(tmp_path / "fp8", tmp_path / "pkg", progress=False)
    ids = list(range(3, 19))
    np.testing.assert_allclose(edge_moe.load(package).logits(ids), reference_logits(reference, ids), atol=1e-4,
                               rtol=0)


def test_fp8_bad_block_size_is_a_one_line_error(tmp_path):
    build_checkpoint(tmp_path / "hf", tiny_config("qwen3_moe", experts=2), seed=1)
    write_fp8_checkpoint(tmp_path / "hf", tmp_path / "fp8", (16, 16))
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeMoeError, match="weight_block_size"):
        Checkpoint(tmp_path / "fp8").read("model.layers.0.self_attn.q_proj.weight")


# MXFP4 --------------------------------------------------------------------------------------------------------

mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")


def write_mxfp4_tensor(directory, name, blocks, scales):
    from safetensors.numpy import save_file

    directory.mkdir()
    (directory / "config.json").write_text("{}")
    save_file({f"{name}_blocks": blocks, f"{name}_scales": scales}, directory / "model.safetensors")
    return Checkpoint(directory)


def test_mxfp4_reads_as_transformers_dequantizes_it(tmp_path):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)   # 3 experts, 10 outputs, 128 inputs
    scales = rng.integers(110, 135, (3, 10, 4), dtype=np.uint8)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    checkpoint = write_mxfp4_tensor(tmp_path / "ckpt", name, blocks, scales)
    expected = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                dtype=torch.float32).numpy()        # [E, in, out]
    assert checkpoint.names() == [name] and checkpoint.shape(name) == [3, 128, 10] == list(expected.shape)
    np.testing.assert_array_equal(checkpoint.read(name), expected)
    np.testing.assert_array_equal(checkpoint.read(name, index=2), expected[2])
    with pytest.raises(EdgeMoeError, match="no slice 3"):
        checkpoint.read(name, index=3)


def test_mxfp4_maps_to_matmulnbits_without_float():
    """8 bits hold every e2m1 value; 4 bits hold a block exactly on the fine grid, else round only +-0.5 and +-1.5
    (by half a step of the coarse grid). Checked against transformers' dequantization of the same codes."""
    from edge_moe.quant import dequantize
    from edge_moe_export.encodings import mxfp4_to_matmulnbits

    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (40, 6, 16), dtype=np.uint8)
    blocks[:20] &= 0x55  # codes 0, 1, 4, 5 (0, 0.5, 2, 3): these rows fit the fine grid
    scales = rng.integers(115, 130, (40, 6), dtype=np.uint8)
    reference = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks[None]), torch.from_numpy(scales[None]),
                                                 dtype=torch.float32).numpy()[0].T  # [out, in]
    q8, exact8 = mxfp4_to_matmulnbits(blocks, scales, bits=8)
    np.testing.assert_array_equal(dequantize(q8), reference)
    assert exact8 == 1.0
    q4, exact4 = mxfp4_to_matmulnbits(blocks, scales, bits=4)
    error = dequantize(q4) - reference
    np.testing.assert_array_equal(error[:20], 0)
    step = np.repeat(np.exp2(scales.astype(np.float32) - 127), 32, axis=1)
    rounded = np.isin(np.abs(reference / step), [0.5, 1.5])
    coarse_rows = (np.arange(40) >= 20)[:, None]
    np.testing.assert_array_equal(np.abs(error), np.where(rounded & coarse_rows, 0.5 * step, 0))
    exact_blocks = (np.abs(error).reshape(40, 6, 32).max(axis=-1) == 0).mean()
    assert exact4 == pytest.approx(exact_blocks)


def test_mxfp4_encoder_rounds_to_the_nearest_e2m1_value():
    from edge_moe_export.encodings import E2M1_VALUES, dequantize_mxfp4, quantize_mxfp4

    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    blocks, scales = quantize_mxfp4(w)
    decoded = dequantize_mxfp4(blocks, scales)
    scale = np.repeat(np.exp2(scales.astype(np.float32) - 127), 32, axis=1)
    grid = np.unique(np.abs(E2M1_VALUES))
    nearest = np.abs(np.abs(np.clip(w / scale, -6, 6))[..., None] - grid).min(axis=-1) * scale
    np.testing.assert_allclose(np.abs(decoded - w), nearest + np.maximum(np.abs(w) - 6 * scale, 0), rtol=1e-6)
    absmax = np.abs(w).reshape(8, 2, 32).max(axis=-1)
    assert np.all((absmax / scale[:, ::32] >= 4) & (absmax / scale[:, ::32] < 8))


def test_reported_expert_bytes_are_what_the_formats_store():
    """The report's byte counts against the arrays each route really produces, on a small expert."""
    from edge_moe_export.encodings import mxfp4_to_matmulnbits, quantize_mxfp4
    from edge_moe_export.encodings_report import expert_bytes

    hidden, ffn = 64, 96
    gate_up, down = np.ones((2 * ffn, hidden), np.float32), np.ones((hidden, ffn), np.float32)
    encoded = [quantize_mxfp4(gate_up), quantize_mxfp4(down)]
    stored = {4: 0, 8: 0}
    for bits in stored:
        for blocks, scales in encoded:
            q, _ = mxfp4_to_matmulnbits(blocks, scales, bits)
            stored[bits] += sum(a.nbytes for a in q.tensors("w").values())
    sizes = list(expert_bytes(hidden, ffn).values())
    assert sizes[:3] == [sum(b.nbytes + s.nbytes for b, s in encoded), stored[4], stored[8]]


def test_mxfp4_blocks_without_matching_scales_are_a_one_line_error(tmp_path):
    name = "model.layers.0.mlp.experts.down_proj"
    checkpoint = write_mxfp4_tensor(tmp_path / "ckpt", name, np.zeros((2, 4, 3, 16), np.uint8),
                                    np.zeros((2, 4, 2), np.uint8))
    with pytest.raises(EdgeMoeError, match=f"{name}_blocks .* are not MXFP4 blocks of 32 with their scales"):
        checkpoint.names()


def test_gpt_oss_mxfp4_checkpoint_exports_to_the_logits_of_its_dequantized_experts(tmp_path):
    """GPT-OSS ships its experts in MXFP4 (gate_up_proj_blocks [E, 2F, G, 16] over the input, and scales): the
    gpt_oss family reads them through the MXFP4 reader, one expert at a time; the reference is transformers with
    the dequantized experts."""
    reference = build_checkpoint(tmp_path / "hf", tiny_config("gpt_oss", hidden=64, ffn=32, head_dim=16), seed=3)
    mxfp4_gpt_oss_checkpoint(tmp_path / "hf", tmp_path / "mx")

    checkpoint = Checkpoint(tmp_path / "mx")
    with torch.no_grad():
        for layer, block in enumerate(reference.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                dequantized = checkpoint.read(f"model.layers.{layer}.mlp.experts.{proj}")      # [E, in, out]
                getattr(block.mlp.experts, proj).copy_(torch.from_numpy(dequantized))
    package = export_checkpoint(tmp_path / "mx", tmp_path / "pkg", progress=False)
    ids = list(range(3, 19))
    np.testing.assert_allclose(edge_moe.load(package).logits(ids), reference_logits(reference, ids), atol=1e-4,
                               rtol=0)
