"""Block-wise weight quantization in numpy, in the layout of onnxruntime's `com.microsoft.MatMulNBits`.

    # N = output features, K = input features, B = block size, nb = ceil(K / B) blocks per row
    w [N, K] float32 (Hugging Face [out, in])  ->  packed [N, nb, B * bits / 8] uint8
                                                    scales [N, nb] float32
                                                    zero_points [N, ceil(nb * bits / 8)] uint8 (asymmetric only)
    dequantized w[n, k] = (q[n, k] - zp[n, k // B]) * scale[n, k // B]; without zero points zp = 2 ** (bits - 1)

Codes of 2 and 4 bits pack 8/bits to a byte, the lowest index in the lowest bits (zero points alike); the format
and `dequantize` live in edge_moe/quant.py, which the runtime needs too. K is padded to whole blocks with zeros;
MatMulNBits ignores the padding. One matrix at a time, so export streams expert by expert.
"""

from __future__ import annotations

import numpy as np

from edge_moe.quant import QuantizedMatrix, dequantize, unpack  # noqa: F401 (re-exported for tests)
from edge_moe.quant_graph import BLOCK_SIZES  # noqa: F401 (the package format's list; re-exported)

BITS = (2, 4, 8)


def _check(bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported by this quantizer; choose one of {BITS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} is not supported by MatMulNBits; choose one of {BLOCK_SIZES}")


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> bytes [..., ceil(n * bits / 8)]."""
    if bits == 8:
        return values.astype(np.uint8)
    per = 8 // bits
    if values.shape[-1] % per:
        pad = np.zeros(values.shape[:-1] + (per - values.shape[-1] % per,), values.dtype)
        values = np.concatenate([values, pad], axis=-1)
    out = np.zeros(values.shape[:-1] + (values.shape[-1] // per,), np.uint8)
    for j in range(per):
        out |= (values[..., j::per] << (bits * j)).astype(np.uint8)
    return out


def quantize(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> QuantizedMatrix:
    """Quantizes w [N, K] block-wise along K.

    Symmetric: scale = absmax / (2^(bits-1) - 1), codes centred on 2^(bits-1) (no zero points stored).
    Asymmetric: scale = (max - min) / (2^bits - 1) and a per-block zero point, better for skewed blocks.

    Raises:
        ValueError: bits or block_size that MatMulNBits does not take.
    """
    _check(bits, block_size)
    w = np.asarray(w, np.float32)
    n, k = w.shape
    nb = -(-k // block_size)
    blocks = np.zeros((n, nb * block_size), np.float32)
    blocks[:, :k] = w
    blocks = blocks.reshape(n, nb, block_size)
    top = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        scales = np.abs(blocks).max(axis=-1) / (half - 1)
        zero = np.full((n, nb), half, np.float32)
    else:
        low, high = np.minimum(blocks.min(axis=-1), 0.0), np.maximum(blocks.max(axis=-1), 0.0)
        scales = (high - low) / top
        zero = np.clip(np.round(-low / np.where(scales > 0, scales, 1.0)), 0, top)
    safe = np.where(scales > 0, scales, 1.0)[..., None]
    codes = np.clip(np.round(blocks / safe) + zero[..., None], 0, top).astype(np.uint8)
    packed = _pack(codes, bits)  # [N, nb, B * bits / 8]
    zero_points = None if symmetric else _pack(zero.astype(np.uint8), bits)
    return QuantizedMatrix(packed, scales.astype(np.float32), zero_points, bits, block_size, k)
