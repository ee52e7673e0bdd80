"""GPT-OSS's quantized experts ("swiglu_oss" with MatMulNBits): the expert kernel against a numpy oracle on the
dequantized weights, and exported models against transformers whose experts hold the same dequantized weights,
all-resident and at a 25% budget; MXFP4 checkpoints mapped code for code."""

from __future__ import annotations

import numpy as np
import pytest

import edge_moe
from edge_moe.budget import full_budget, minimum_budget
from edge_moe.expert_graph import ExpertShape
from edge_moe.experts import ExpertKernels, ResidentExpert, expert_shape
from edge_moe.manifest import ExpertRecord, Manifest
from edge_moe.quant import dequantized_weights, uses_session
from edge_moe.sessions import OrtClock
from edge_moe_export.exporter import export_checkpoint, kind_tensors
from edge_moe_export.quantize import dequantize, quantize
from edge_moe_export.writer import BlobWriter, ExpertWriter

from conftest import build_checkpoint, mxfp4_gpt_oss_checkpoint, reference_logits, tiny_config

torch = pytest.importorskip("torch")

# MatMulNBits at accuracy_level 4 quantizes activations to int8 per block (tests/test_quant.py): about 1e-2 of the
# output's scale, 4e-2 with room for unlucky blocks.
KERNEL_TOLERANCE = 4e-2


def oss_oracle(x, gate_up, gate_up_bias, down, down_bias, alpha, limit):
    """GPT-OSS's expert written out on [in, out] weights: gate in the even columns, up in the odd ones."""
    h = x @ gate_up + gate_up_bias
    gate, up = np.minimum(h[:, 0::2], limit), np.clip(h[:, 1::2], -limit, limit)
    return ((up + 1) * gate / (1 + np.exp(-alpha * gate))) @ down + down_bias


def requantized(w_in_out, bits, block, zero_points):
    """What MatMulNBits computes with for an [in, out] weight quantized along `in`, back in [in, out]."""
    return dequantize(quantize(w_in_out.T, bits, block, not zero_points)).T


@pytest.mark.parametrize("h,f,dtype,zero_points", [(512, 384, "q4", False), (512, 384, "q8", True),
                                                   (64, 48, "q4", True), (64, 48, "q2", False)])
def test_quantized_oss_expert_matches_dequantized_oracle(tmp_path, h, f, dtype, zero_points):
    """Both resident forms: its own MatMulNBits session (512x384) and dequantized for the shared kernel (64x48)."""
    shape = ExpertShape("swiglu_oss", h, f, dtype, 32, zero_points)
    rng = np.random.default_rng(h + f)
    parts = {"gate_up_proj": rng.standard_normal((h, 2 * f)).astype(np.float32) * 0.05,
             "gate_up_bias": rng.standard_normal(2 * f).astype(np.float32) * 0.1,
             "down_proj": rng.standard_normal((f, h)).astype(np.float32) * 0.05,
             "down_bias": rng.standard_normal(h).astype(np.float32) * 0.1,
             "alpha": np.array(1.702, np.float32), "limit": np.array(0.3, np.float32)}  # a limit that clamps
    blob = BlobWriter(tmp_path / "blob.bin")
    writer = ExpertWriter(blob)
    for name, array in kind_tensors(shape, parts).items():
        writer.write(name, array, str(array.dtype))
    offset, length, checksum = writer.finish()
    blob.close()
    buffer = np.fromfile(tmp_path / "blob.bin", np.uint8)[offset:offset + length].copy()
    record = ExpertRecord(0, 0, tmp_path / "g.onnx", tmp_path / "blob.bin", offset, length, dtype, checksum,
                          "swiglu_oss", h, f, tuple(writer.tensors), 32, zero_points)
    expert = ResidentExpert.from_bytes(record, buffer)
    assert (expert.session is not None) == uses_session(shape) == (h == 512)
    x = rng.standard_normal((4, h)).astype(np.float32)
    bits = shape.bits
    want = oss_oracle(x, requantized(parts["gate_up_proj"], bits, 32, zero_points), parts["gate_up_bias"],
                      requantized(parts["down_proj"], bits, 32, zero_points), parts["down_bias"], 1.702, 0.3)
    buffer[:] = 0  # neither form reads the buffer after admission
    got = ExpertKernels(OrtClock()).run(expert, x)
    assert np.abs(got - want).max() <= KERNEL_TOLERANCE * np.abs(want).max()


def _set_experts(reference, weights):
    """Puts weights[layer][proj] ([E, in, out]) into transformers' GPT-OSS experts."""
    with torch.no_grad():
        for layer, block in enumerate(reference.model.layers):
            for proj, value in weights[layer].items():
                getattr(block.mlp.experts, proj).copy_(torch.from_numpy(value))


# Logits against the reference on the dequantized weights, relative to their largest magnitude (measured on this
# model: 1.1e-6 at 8 bits, 1.8e-2 at 4 bits; against the float weights 1.7e-2 and 0.25, so these tell them apart).
LOGIT_TOLERANCE = {8: 8e-3, 4: KERNEL_TOLERANCE}


def _check_package(package, reference, ids, bits):
    """Logits within the MatMulNBits tolerance of the reference, and streaming at 25% changes nothing."""
    model = edge_moe.load(package)
    ours, want = model.logits(ids), reference_logits(reference, ids)
    assert np.abs(ours - want).max() <= LOGIT_TOLERANCE[bits] * np.abs(want).max()
    manifest = Manifest.load(package)
    budget = max(full_budget(manifest) // 4, minimum_budget(manifest))
    streamed = edge_moe.load(package, budget=budget, prefetch=1)
    np.testing.assert_array_equal(streamed.logits(ids), ours)
    assert streamed.generate(ids, max_new_tokens=8).token_ids == model.generate(ids, max_new_tokens=8).token_ids
    return manifest


# Experts large enough (256 x 512) that each resident expert runs its own MatMulNBits session.
OSS = dict(hidden=256, ffn=512, experts=4, heads=4, kv_heads=2, head_dim=16, sliding_window=4, layers=2)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_gpt_oss_matches_transformers_on_dequantized_weights(tmp_path, bits):
    reference = build_checkpoint(tmp_path / "hf", tiny_config("gpt_oss", **OSS), seed=bits)
    package = export_checkpoint(tmp_path / "hf", tmp_path / "pkg", bits=bits, progress=False)
    weights = [{proj: np.stack([requantized(w, bits, 32, False)
                                for w in getattr(block.mlp.experts, proj).detach().numpy()])
                for proj in ("gate_up_proj", "down_proj")} for block in reference.model.layers]
    _set_experts(reference, weights)
    manifest = _check_package(package, reference, list(range(3, 19)), bits)
    assert {(r.kind, r.dtype) for r in manifest.experts.values()} == {("swiglu_oss", f"q{bits}")}


def test_mixed_bits_for_gpt_oss_is_a_one_line_error(tmp_path):
    from edge_moe.errors import EdgeMoeError

    build_checkpoint(tmp_path / "hf", tiny_config("gpt_oss", head_dim=16), seed=1)
    with pytest.raises(EdgeMoeError, match="--bits mixed: calibration knows SwiGLU experts only"):
        export_checkpoint(tmp_path / "hf", tmp_path / "pkg", bits="mixed", expert_bytes="1MB",
                          calibration=__file__, progress=False)


def _package_weights(manifest, layer, experts):
    """What the package's experts of `layer` compute with: their stored codes decoded, [E, in, out] per projection."""
    per_expert = []
    for index in range(experts):
        record = manifest.experts[(layer, index)]
        data = np.fromfile(record.blob, np.uint8)[record.offset:record.offset + record.length]
        tensors = {t.name: data[t.offset:t.offset + t.nbytes].view(t.dtype).reshape(t.shape) for t in record.tensors}
        per_expert.append(dequantized_weights(expert_shape(record), tensors))
    return {proj: np.stack([w[proj] for w in per_expert]) for proj in ("gate_up_proj", "down_proj")}


@pytest.mark.parametrize("bits,zero_points", [(8, False), (4, False), (4, True)])
def test_mxfp4_gpt_oss_codes_become_quantized_experts(tmp_path, bits, zero_points):
    """GPT-OSS as shipped (MXFP4 experts) exported with --bits 8 keeps every weight transformers dequantizes, code
    for code; --bits 4 keeps them too except +-0.5 and +-1.5 in blocks that also hold +-4 or +-6, which move by half
    a step of the block's scale (export/encodings.py). With zero points the codes cannot carry over and the
    weights go through float. Each package against transformers on the weights it stores."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    from safetensors.numpy import load_file

    reference = build_checkpoint(tmp_path / "hf", tiny_config("gpt_oss", **OSS), seed=7)
    shipped_dir = mxfp4_gpt_oss_checkpoint(tmp_path / "hf", tmp_path / "mx")
    package = export_checkpoint(shipped_dir, tmp_path / "pkg", bits=bits, zero_points=zero_points, progress=False)
    manifest = Manifest.load(package)
    shipped = load_file(shipped_dir / "model.safetensors")
    stored = []
    for layer in range(OSS["layers"]):
        stored.append(_package_weights(manifest, layer, OSS["experts"]))
        for proj, weight in stored[-1].items():
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            blocks, scales = (torch.from_numpy(shipped[f"{name}_{part}"]) for part in ("blocks", "scales"))
            want = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()  # [E, in, out]
            if zero_points:
                assert not np.array_equal(weight, want)
                continue
            scale = np.repeat(np.exp2(scales.numpy().astype(np.float32) - 127), 32, axis=-1).swapaxes(-1, -2)
            values = want / scale                                                    # e2m1 values, [E, in, out]
            e, k, n = values.shape
            coarse = np.isin(values, [4, 6, -6]).reshape(e, k // 32, 32, n).any(axis=2)  # blocks of 32 inputs
            moved = np.isin(np.abs(values), [0.5, 1.5]) & np.repeat(coarse, 32, axis=1) & (bits == 4)
            np.testing.assert_array_equal(np.abs(weight - want), np.where(moved, 0.5 * scale, 0))
    _set_experts(reference, stored)
    _check_package(package, reference, list(range(3, 19)), bits)
