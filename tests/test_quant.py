"""Quantized experts: the numpy quantizer against a per-block reference, MatMulNBits expert kernels against the
dequantized float reference, and packages with uniform and mixed bitwidths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_moe.expert_graph import INPUT, ExpertShape, build_expert_graph
from edge_moe.experts import ExpertKernels, ResidentExpert
from edge_moe.manifest import ExpertRecord
from edge_moe.quant import uses_session
from edge_moe.sessions import OrtClock, open_session
from edge_moe_export.calibrate import _swiglu, expert_length
from edge_moe_export.exporter import expert_tensors
from edge_moe_export.quantize import dequantize, quantize
from edge_moe_export.writer import BlobWriter, ExpertWriter

# MatMulNBits at accuracy_level 4 quantizes activations to int8 per block: its error against the dequantized
# float32 reference is about 1e-2 of the output's scale (measured); 4e-2 leaves room for unlucky blocks.
KERNEL_TOLERANCE = 4e-2


def reference_dequantize(w, bits, block, symmetric):
    """Block by block, element by element in spirit: what the quantizer must reproduce."""
    n, k = w.shape
    out = np.zeros_like(w)
    top = 2 ** bits - 1
    for r in range(n):
        for start in range(0, k, block):
            b = w[r, start:start + block]
            if symmetric:
                scale, zero = np.abs(b).max() / (2 ** (bits - 1) - 1), 2 ** (bits - 1)
            else:
                lo, hi = min(b.min(), 0.0), max(b.max(), 0.0)
                scale = (hi - lo) / top
                zero = np.clip(np.round(-lo / scale), 0, top) if scale > 0 else 0
            q = np.clip(np.round(b / scale) + zero, 0, top) if scale > 0 else np.full_like(b, zero)
            out[r, start:start + block] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, 16, False), (8, 32, True), (8, 64, False), (2, 32, False)])
def test_quantize_round_trip_matches_reference(bits, block, symmetric):
    w = np.random.default_rng(bits + block).standard_normal((12, 88)).astype(np.float32)  # K not a block multiple
    q = quantize(w, bits, block, symmetric)
    assert q.packed.shape == (12, -(-88 // block), block * bits // 8) and q.packed.dtype == np.uint8
    got = dequantize(q)
    np.testing.assert_allclose(got, reference_dequantize(w, bits, block, symmetric), rtol=1e-6, atol=1e-6)
    # every weight within half a step of its block's scale
    steps = np.repeat(q.scales, block, axis=1)[:, :88]
    assert np.all(np.abs(got - w) <= steps / 2 + 1e-6)


def test_quantize_rejects_unsupported_block():
    with pytest.raises(ValueError, match="block_size=48"):
        quantize(np.zeros((4, 96), np.float32), 4, 48)


def _expert(shape: ExpertShape, tmp_path: Path, seed=0):
    """One expert written as the exporter writes it; returns (record, buffer, float reference weights)."""
    rng = np.random.default_rng(seed)
    h, f = shape.hidden_size, shape.intermediate_size
    gate, up, down = (rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((f, h), (f, h), (h, f)))
    blob = BlobWriter(tmp_path / "blob.bin")
    writer = ExpertWriter(blob)
    for name, array in expert_tensors(shape, gate, up, down).items():
        writer.write(name, array, str(array.dtype))
    offset, length, checksum = writer.finish()
    blob.close()
    buffer = np.fromfile(tmp_path / "blob.bin", np.uint8)[offset:offset + length].copy()
    tensors = tuple(writer.tensors)
    record = ExpertRecord(0, 0, tmp_path / "g.onnx", tmp_path / "blob.bin", offset, length, shape.dtype, checksum,
                          "swiglu", h, f, tensors, shape.block_size, shape.zero_points)
    assert length == expert_length(shape)
    gate_up = np.concatenate([gate, up])
    if shape.quantized:
        ref = tuple(dequantize(quantize(w, shape.bits, shape.block_size, not shape.zero_points))
                    for w in (gate_up, down))
    else:
        ref = (gate_up, down)
    return record, buffer, ref


@pytest.mark.parametrize("dtype,zero_points", [("q4", False), ("q4", True), ("q8", False), ("q2", True)])
def test_quantized_expert_graph_matches_dequantized_reference(tmp_path, dtype, zero_points):
    shape = ExpertShape("swiglu", 64, 48, dtype, 32, zero_points)
    record, buffer, (gate_up, down) = _expert(shape, tmp_path)
    views = {t.name: buffer[t.offset:t.offset + t.nbytes].view(t.dtype).reshape(t.shape) for t in record.tensors}
    external = {t.name: ("unused.bin", 0, t.nbytes) for t in record.tensors}
    session = open_session(build_expert_graph(shape, external).SerializeToString(), initializers=views)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    want = _swiglu(x, gate_up, down)
    got = session.run(None, {INPUT: x})[0]
    assert np.abs(got - want).max() <= KERNEL_TOLERANCE * np.abs(want).max()


# own MatMulNBits session; dequantized shared kernel; edge_moe's block kernel on the read buffer (where the CPU has it)
@pytest.mark.parametrize("h,f,kernel", [(512, 384, False), (64, 48, True), (512, 384, True)])
def test_resident_quantized_expert_runs_through_kernels(tmp_path, h, f, kernel):
    from edge_moe import native

    shape = ExpertShape("swiglu", h, f, "q4", 32)
    record, buffer, (gate_up, down) = _expert(shape, tmp_path)
    expert = ResidentExpert.from_bytes(record, buffer, kernel)
    blocks = kernel and h == 512 and native.unavailable_reason() is None
    assert (expert.blocks is not None) == blocks
    assert (expert.session is not None) == (uses_session(shape) and not blocks) and uses_session(shape) == (h == 512)
    x = np.random.default_rng(2).standard_normal((3, h)).astype(np.float32)
    want = _swiglu(x, gate_up, down)
    if not blocks:
        buffer[:] = 0  # a session holds its own prepacked copy; the dequantized path its float32 copy
    got = ExpertKernels(OrtClock()).run(expert, x)
    assert np.abs(got - want).max() <= KERNEL_TOLERANCE * np.abs(want).max()


@pytest.fixture(scope="module")
def default_checkpoint():
    from edge_moe.default_model import SHIPPED

    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("the default model is not installed")
    return SHIPPED


CALIBRATION = Path(__file__).resolve().parents[1] / "edge_moe" / "model.py"  # Python text, like the model's


def test_mixed_export_fits_target_loads_and_generates(tmp_path, default_checkpoint, capsys):
    import edge_moe
    from edge_moe.manifest import Manifest
    from edge_moe_export.exporter import export_checkpoint

    four = Manifest.load(export_checkpoint(default_checkpoint, tmp_path / "q4", bits=4, progress=False))
    eight = Manifest.load(export_checkpoint(default_checkpoint, tmp_path / "q8", bits=8, progress=False))
    target = (four.expert_bytes + eight.expert_bytes) // 2
    path = export_checkpoint(default_checkpoint, tmp_path / "mixed", bits="mixed", expert_bytes=target,
                             calibration=CALIBRATION, progress=True)
    err = capsys.readouterr().err
    assert "calibrate: routing" in err and "calibrate: error per bitwidth" in err  # not silent while calibrating
    mixed = Manifest.load(path)
    assert mixed.expert_bytes <= target
    assert len({r.dtype for r in mixed.experts.values()}) >= 2  # really mixed
    model = edge_moe.load(path)
    result = model.generate("def fibonacci(n):", max_new_tokens=8)
    assert len(result.token_ids) == 8
    budgeted = edge_moe.load(path, budget="30%")
    assert budgeted.generate("def fibonacci(n):", max_new_tokens=8).token_ids == result.token_ids


def test_mixed_export_refuses_target_below_all_2_bit(tmp_path, default_checkpoint):
    from edge_moe.errors import EdgeMoeError
    from edge_moe_export.exporter import export_checkpoint

    with pytest.raises(EdgeMoeError, match="below the all-2-bit size"):
        export_checkpoint(default_checkpoint, tmp_path / "m", bits="mixed", expert_bytes="1MB",
                          calibration=CALIBRATION, progress=False)
