"""Quantized experts fused: a layer's q4 / q8 experts in edge_moe's own kernel (native.py, the default where the CPU
has AVX-512 VNNI) or in onnxruntime's QMoE (fused_moe.py) against their MatMulNBits sessions one by one, the
per-expert path that stays the reference. All three quantize the activations to int8 per block (accuracy_level 4),
so a token's layer output agrees to float32 rounding given the same input (batches of tokens to an int8 step); over
a whole prompt a rounding difference can move an activation across an int8 step, so there the test bounds the
distance to the float model instead: a fused path may not be further from it than the per-expert path is, by more
than a margin."""

import numpy as np
import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError
from edge_moe.fused_moe import unfusable_reason

from conftest import build_checkpoint, reference_logits, tiny_config

IDS = [5, 6, 7, 8, 30, 31, 2, 40, 41, 11]
# experts large enough to run in their own MatMulNBits session (quant.uses_session), rows of whole 128-blocks
SHAPE = dict(hidden=256, ffn=640, heads=4, kv_heads=2, experts=8, top_k=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_quantized")
    return root, build_checkpoint(root / "hf", tiny_config("qwen3_moe", **SHAPE), seed=21)


def export(checkpoint, name, **options):
    from edge_moe_export.exporter import export_checkpoint

    root, _ = checkpoint
    return export_checkpoint(root / "hf", root / name, progress=False, **options)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32), (8, 128)])
def test_fused_quantized_layers_compute_what_their_experts_do(checkpoint, bits, block):
    from edge_moe import native

    package = export(checkpoint, f"q{bits}b{block}", bits=bits, block_size=block)
    kernel = edge_moe.load(package)  # fused by default: quantized, every expert resident, a CPU
    qmoe = edge_moe.load(package, native_kernel=False, step_graph=False)
    stepped = edge_moe.load(package, native_kernel=False)
    per_expert = edge_moe.load(package, fused_moe=False)
    if native.blocks_fused_reason() is None:  # edge_moe's kernel reads the blocks: no step graph then
        assert kernel.fused.native and kernel.fused.quantized and kernel.step_graph is None
    assert qmoe.fused is not None and qmoe.fused.quantized and not qmoe.fused.native
    assert stepped.step_graph is not None and per_expert.fused is None
    # quantized experts attend in float16 by default (GroupQueryAttention graphs), fused or not
    assert stepped.config["attention_kernel"] == "gqa"
    assert qmoe.backbone.half_attention and per_expert.backbone.half_attention
    assert not edge_moe.load(package, half_attention=False).backbone.half_attention
    rng = np.random.default_rng(bits + block)
    hidden, experts, k = SHAPE["hidden"], SHAPE["experts"], SHAPE["top_k"]
    for layer in range(2):
        # one token: the same int8 activations, float32 rounding apart. Several: each runs an expert's tokens as one
        # batch, but from some batch size on (block 32) MatMulNBits quantizes activations differently: an int8 step
        for tokens, tolerance in ((1, 1e-5), (7, 1e-3), (32, 1e-3)):
            x = rng.standard_normal((tokens, hidden)).astype(np.float32)
            indices = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
            weights = rng.random((tokens, k)).astype(np.float32)
            b = per_expert.forward.moe(layer, x, None, x, (indices, weights))
            for model in (kernel, qmoe):
                a = model.fused.run(layer, x, indices, weights)
                assert np.abs(a - b).max() <= tolerance * np.abs(b).max()
    # a first token, whole model: the same int8 steps on every path, one graph or one call a layer
    one = per_expert.logits(IDS[:1])
    for model in (kernel, qmoe, stepped):
        assert np.abs(model.logits(IDS[:1]) - one).max() <= 1e-5 * np.abs(one).max()
    # a whole prompt: no further from the float model than the per-expert path, give or take an int8 step
    _, hf = checkpoint
    exact = reference_logits(hf, IDS)
    scale = np.abs(exact).max()
    reference_error = np.abs(per_expert.logits(IDS) - exact).max()
    for model in (kernel, qmoe, stepped):
        assert np.abs(model.logits(IDS) - exact).max() <= 1.5 * reference_error + 0.01 * scale
    # calls a token: QMoE one a layer beside the layer graphs, a step graph one a token and the head's; edge_moe's
    # kernel one a layer too, outside onnxruntime (beside the backbone's graphs, or the layer kernel's own calls)
    for model, calls_per_token, native_calls in ((qmoe, 2 + 2 * 2, 0), (stepped, 2, 0), (kernel, 2 + 2 * 2, 2)):
        before, native_before = model.clock.calls, model.clock.native_calls
        model.generate(IDS[:3], 2)
        assert model.clock.calls - before == 2 * calls_per_token
        if model is kernel and kernel.fused.native:
            native_calls += 2 + 2 if kernel.backbone.native_layers else 0
            assert model.clock.native_calls - native_before == 2 * native_calls


def test_streamed_quantized_experts_run_in_the_kernel_from_their_read_buffers(checkpoint, instructions):
    """Under a budget a quantized expert is its read buffer's views, which edge_moe's block kernel reads (with AVX2
    too): no MatMulNBits session (whose prepacked copy made a 4-bit expert cost about four times its bytes), so the
    budget holds several times as many; the per-expert MatMulNBits sessions stay the reference (native_kernel=False).
    Resident, they fuse in the kernel with AVX-512 VNNI and in QMoE without it."""
    from edge_moe.budget import expert_footprint, record_footprint

    package = export(checkpoint, f"q4stream-{instructions}", bits=4)
    fused = edge_moe.load(package).fused
    assert fused.quantized and fused.native == (instructions == "avx512-vnni")
    model = edge_moe.load(package, budget="50%")
    reference = edge_moe.load(package, budget="50%", native_kernel=False)
    record = next(iter(model.manifest.experts.values()))
    assert record_footprint(record) == expert_footprint(record.length) < record_footprint(record, kernel=False)
    assert model.budget < reference.budget  # 50 % of what every expert costs resident: less without sessions
    one = reference.logits(IDS[:1])
    assert np.abs(model.logits(IDS[:1]) - one).max() <= 1e-5 * np.abs(one).max()
    resident = list(model.experts.resident.values())
    assert resident and all(e.blocks is not None and e.session is None for e in resident)
    assert all(e.blocks is None and e.session is not None for e in reference.experts.resident.values())
    natives = model.clock.native_calls
    model.generate(IDS[:3], 2)
    assert model.clock.native_calls - natives >= 2 * 2 * SHAPE["top_k"]  # every routed expert a kernel call
    _, hf = checkpoint
    exact = reference_logits(hf, IDS)
    reference_error = np.abs(reference.logits(IDS) - exact).max()
    assert np.abs(model.logits(IDS) - exact).max() <= 1.5 * reference_error + 0.01 * np.abs(exact).max()


def test_blocks_the_kernel_does_not_read_stay_on_onnxruntime(checkpoint):
    """Blocks of 16 (MatMulNBits takes them; the kernel reads multiples of 32): fused in QMoE, streamed in their own
    MatMulNBits sessions, as before the kernel."""
    package = export(checkpoint, "q4b16", bits=4, block_size=16)
    fused = edge_moe.load(package)
    assert fused.fused is not None and fused.fused.quantized and not fused.fused.native
    streamed = edge_moe.load(package, budget="50%")
    streamed.logits(IDS[:2])
    assert all(e.blocks is None and e.session is not None for e in streamed.experts.resident.values())
    one = edge_moe.load(package, fused_moe=False).logits(IDS[:1])
    assert np.abs(fused.logits(IDS[:1]) - one).max() <= 1e-5 * np.abs(one).max()


def test_a_budget_or_zero_points_keep_quantized_experts_one_by_one(checkpoint):
    package = export(checkpoint, "q4", bits=4)
    assert edge_moe.load(package, budget="50%").fused is None  # streaming experts: nothing to stack
    with pytest.raises(EdgeMoeError, match="needs every expert resident"):
        edge_moe.load(package, budget="50%", fused_moe=True)
    asymmetric = export(checkpoint, "q4z", bits=4, zero_points=True)
    model = edge_moe.load(asymmetric)
    assert "zero points" in unfusable_reason(model.manifest) and model.fused is None
    with pytest.raises(EdgeMoeError, match="zero points.*fused_moe=False"):
        edge_moe.load(asymmetric, fused_moe=True)
    np.testing.assert_allclose(model.logits(IDS), edge_moe.load(asymmetric, fused_moe=False).logits(IDS))


def test_small_quantized_experts_fuse_as_the_float32_they_run_as(tmp_path):
    """Experts too small for a session of their own are dequantized to float32 on load; fused, they are stacked as
    float32 and give the per-expert path's logits (QMoE would quantize their activations to int8)."""
    from edge_moe_export.exporter import export_checkpoint

    build_checkpoint(tmp_path / "hf", tiny_config("mixtral", hidden=64, ffn=64, experts=4, top_k=2), seed=3)
    package = export_checkpoint(tmp_path / "hf", tmp_path / "q8", bits=8, progress=False)
    assert edge_moe.load(package).fused is None  # not by default: nothing to gain over the float32 kernel
    fused = edge_moe.load(package, fused_moe=True)
    assert fused.fused is not None and not fused.fused.quantized and fused.fused.dtype == "float32"
    assert not fused.backbone.half_attention  # they run as float32: so does their attention
    a, b = fused.logits(IDS), edge_moe.load(package, fused_moe=False).logits(IDS)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_quantized_experts_fuse_only_where_the_memory_allows_loading_them(checkpoint, monkeypatch):
    """Loading fused holds the stacks beside onnxruntime's packed copy (runtime.FUSED_LOAD_PEAK times the experts'
    bytes): with less room the default is one session per expert, and insisting is refused with the fix."""
    from edge_moe import runtime
    from edge_moe.memory_limits import Headroom

    package = export(checkpoint, "q4tight", bits=4)
    expert_bytes = edge_moe.load(package, fused_moe=False).manifest.expert_bytes
    tight = Headroom(int(2 * expert_bytes), "a test's limit")
    monkeypatch.setattr(runtime, "memory_headroom", lambda: tight)  # what the default's choice sees
    assert edge_moe.load(package).fused is None
    monkeypatch.setattr("edge_moe.memory_limits.memory_headroom", lambda: tight)  # and every check
    with pytest.raises(EdgeMoeError, match="quantized experts fused.*--no-fused-moe"):
        edge_moe.load(package, fused_moe=True)
