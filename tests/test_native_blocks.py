"""edge_moe's block-code kernels (csrc/matrix.c, moe.c): MatMulNBits' symmetric 8- and 4-bit blocks read in place,
with int8 activations quantized per block as MatMulNBits does at accuracy_level 4, on AVX-512 VNNI and on AVX2.
Against a float64 oracle of that arithmetic (edge_moe.quant.dequantize for the weights, the activations quantized
in numpy) and against onnxruntime's own MatMulNBits over the same bytes; the stacked MoE layer and a streamed expert
against the same oracle."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_moe import native
from edge_moe.quant import dequantize
from edge_moe_export.quantize import quantize

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None,
                                reason=str(native.unavailable_reason()))


def int8_activations(x: np.ndarray, block: int) -> np.ndarray:
    """x as the kernels see it: per block of `block` values, round-half-even(x * 127 / max|x|) * max|x| / 127."""
    tokens, k = x.shape
    blocks = -(-k // block)
    padded = np.zeros((tokens, blocks * block), np.float32)
    padded[:, :k] = x
    grouped = padded.reshape(tokens, blocks, block)
    amax = np.abs(grouped).max(-1, keepdims=True)
    inverse = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    codes = np.rint((grouped * inverse).astype(np.float32))
    return (codes.astype(np.float64) * (amax.astype(np.float64) / 127)).reshape(tokens, -1)[:, :k]


def oracle(q, x: np.ndarray) -> np.ndarray:
    return int8_activations(x, q.block_size) @ dequantize(q).astype(np.float64).T


def matmul_nbits(q, x: np.ndarray) -> np.ndarray:
    """onnxruntime's MatMulNBits (accuracy_level 4) over the same blocks."""
    n = q.scales.shape[0]
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=q.k, N=n, bits=q.bits,
                            block_size=q.block_size, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", q.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])],
                              [numpy_helper.from_array(q.packed, "B"),
                               numpy_helper.from_array(q.scales.reshape(-1), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def blocks(q) -> native.Matrix:
    return native.Matrix.of_blocks(q.packed.reshape(q.packed.shape[0], -1), q.scales, q.bits, q.block_size, q.k)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("rows,k", [(512, 512), (37, 96), (64, 160), (16, 40)])
def test_blocks_times_activations_equal_the_oracle_and_matmul_nbits(bits, block, rows, k, instructions):
    """Rows of 1 to 5 blocks (a 64-, 32- and 16-byte step each, a block wider than the row), a last group of fewer
    than four rows, K not a multiple of the block (MatMulNBits pads with zeros), 1 to 9 tokens."""
    rng = np.random.default_rng(bits * 1000 + block + rows + k)
    q = quantize(rng.standard_normal((rows, k)).astype(np.float32), bits, block)
    for tokens in (1, 3, 9, 20):  # AVX-512: 3 in tiles of two rows, 9 and 20 of four
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        got = native.matmul(blocks(q), x, threads=2)
        expected = oracle(q, x)
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 2e-6 * scale
        assert np.abs(got - matmul_nbits(q, x)).max() <= 2e-6 * scale
        assert np.array_equal(got, native.matmul(blocks(q), x, threads=1))  # the thread count changes no bit


@pytest.mark.parametrize("bits,block", [(8, 32), (4, 32), (4, 128)])
def test_a_layer_of_block_experts_and_one_streamed_expert_equal_the_oracle(bits, block, instructions):
    """moe.c over stacks in fused_moe.quantized_stacks' layout (gate and up rows interleaved), and one expert in the
    package's layout (gate rows, then up rows): h = silu(gate) * up is quantized again before the down product."""
    from edge_moe.fused_moe import FC1, FC1_SCALES, FC2, FC2_SCALES, quantized_stacks

    rng = np.random.default_rng(bits + block)
    hidden, ffn, experts, top_k, tokens = 128, 96, 5, 2, 6
    tensors, dense = [], []
    for _ in range(experts):
        gate_up = quantize(rng.standard_normal((2 * ffn, hidden)).astype(np.float32) / 8, bits, block)
        down = quantize(rng.standard_normal((hidden, ffn)).astype(np.float32) / 8, bits, block)
        tensors.append({**gate_up.tensors("gate_up_proj"), **down.tensors("down_proj")})
        dense.append((gate_up, down))

    def expert(e, x):
        gate_up, down = dense[e]
        g = oracle(gate_up, x)
        h = (g[:, :ffn] / (1 + np.exp(-g[:, :ffn])) * g[:, ffn:]).astype(np.float32)
        return oracle(down, h)

    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    indices = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, top_k)).astype(np.float32)
    stacks = quantized_stacks(tensors)
    fc1 = native.Matrix.of_blocks(stacks[FC1].reshape(experts * 2 * ffn, -1),
                                  stacks[FC1_SCALES].reshape(experts * 2 * ffn, -1), bits, block, hidden)
    fc2 = native.Matrix.of_blocks(stacks[FC2].reshape(experts * hidden, -1),
                                  stacks[FC2_SCALES].reshape(experts * hidden, -1), bits, block, ffn)
    y = native.moe(fc1, fc2, x, indices, weights, threads=2)
    expected = np.zeros((tokens, hidden))
    for t in range(tokens):
        for s in range(top_k):
            expected[t] += weights[t, s] * expert(indices[t, s], x[t:t + 1])[0]
    # an activation within float32 rounding of an int8 step may round the other way here: a step of 1/127 of its
    # block's largest value, whose effect on the output stays far below 1e-3 of it
    assert np.abs(y - expected).max() <= 1e-3 * np.abs(expected).max()
    gate_up, down = dense[3]
    one = native.expert_blocks(blocks(gate_up), blocks(down), x, threads=2)
    assert np.abs(one - expert(3, x)).max() <= 1e-3 * np.abs(one).max()
    assert np.array_equal(one, native.expert_blocks(blocks(gate_up), blocks(down), x, threads=1))


def test_blocks_the_kernel_cannot_read_are_refused():
    q = quantize(np.ones((4, 64), np.float32), 4, 32)
    codes = q.packed.reshape(4, -1)
    with pytest.raises(ValueError, match="blocks of 32, 64"):
        native.Matrix.of_blocks(codes, q.scales, 4, 16, 64)
    with pytest.raises(ValueError, match="are not 4-bit blocks of 32 for k = 96"):
        native.Matrix.of_blocks(codes, q.scales, 4, 32, 96)
    with pytest.raises(ValueError, match="are not 8-bit blocks"):
        native.Matrix.of_blocks(codes, q.scales, 8, 32, 64)
    with pytest.raises(ValueError, match=r"x \(1, 63\) is not \[T, 64\]"):
        native.matmul(native.Matrix.of_blocks(codes, q.scales, 4, 32, 64), np.zeros((1, 63), np.float32))


def test_kept_scratch_changes_no_result():
    """Kernel calls keep their scratch blocks for the calling thread's next calls (csrc/scratch.c): a block that held
    another call's values leaves no trace in a result, and release_scratch gives them back."""
    rng = np.random.default_rng(7)
    q = quantize(rng.standard_normal((512, 512)).astype(np.float32), 4, 32)
    x = rng.standard_normal((96, 512)).astype(np.float32)
    native.release_scratch()
    first = native.matmul(blocks(q), x, threads=2)
    native.matmul(blocks(q), rng.standard_normal((160, 512)).astype(np.float32) * 1e3, threads=2)
    assert np.array_equal(native.matmul(blocks(q), x, threads=2), first)
    assert native.release_scratch() >= 96 * 512  # at least the quantized activations' codes were kept
    assert native.release_scratch() == 0
