"""Low-precision checkpoint encodings decoded in numpy (no torch): FP8 with block scales and MXFP4.

    # N = output features, K = input features (Hugging Face [out, in]), E = experts, G = K / 32 MXFP4 groups
    FP8 (DeepSeek-V3):  weight [N, K] float8_e4m3fn, weight_scale_inv [ceil(N/bn), ceil(K/bk)] float32
                        w[n, k] = fp8(weight[n, k]) * weight_scale_inv[n // bn, k // bk]   (bn = bk = 128)
    MXFP4 (GPT-OSS):    X_blocks [E, N, G, 16] uint8 (two e2m1 codes a byte, low nibble first),
                        X_scales [E, N, G] uint8 (e8m0: 2 ** (s - 127)); w[e, n, 32 g + j] = e2m1(code) * scale

MXFP4 blocks have the same layout as MatMulNBits' 4-bit codes (32 along K, low nibble first), so an expert can go
to our 4-bit format without going through float (`mxfp4_to_matmulnbits`). e2m1 is not uniform, though
(0, 0.5, 1, 1.5, 2, 3, 4, 6): a uniform 16-level grid holds every value of a block only when it needs no +4 or 6;
other blocks use a grid twice as coarse, where +-0.5 and +-1.5 round. 8 bits hold every e2m1 value exactly.
"""

from __future__ import annotations

import numpy as np

from edge_moe.quant import QuantizedMatrix

E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
MXFP4_GROUP = 32


def _e4m3fn_table() -> np.ndarray:
    """float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * 2.0 ** -6
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(exponent == 15) & (mantissa == 7)] = np.nan
    return values.astype(np.float32)


E4M3FN_VALUES = _e4m3fn_table()


def decode_e4m3fn(bits: np.ndarray) -> np.ndarray:
    """uint8 float8_e4m3fn bit patterns -> float32 (exact: every e4m3 value is a float32)."""
    return E4M3FN_VALUES[bits]


def decode_e8m0(bits: np.ndarray) -> np.ndarray:
    """uint8 e8m0 scales (exponent only, bias 127; 255 is NaN) -> float32 powers of two."""
    # ldexp, not exp2: numpy's float32 exp2 is off by an ulp near 2 ** 127
    values = np.ldexp(np.float32(1.0), np.minimum(bits, 254).astype(np.int32) - 127).astype(np.float32)
    values[bits == 255] = np.nan
    return values


def dequantize_fp8_blocks(bits: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[N, K] float8_e4m3fn codes with per-block scales [ceil(N/bn), ceil(K/bk)] -> float32 [N, K].

    Raises:
        ValueError: the scale grid does not cover the weight with this block size.
    """
    n, k = bits.shape
    bn, bk = block
    if scale_inv.shape != (-(-n // bn), -(-k // bk)):
        raise ValueError(f"weight_scale_inv has shape {list(scale_inv.shape)}, expected "
                         f"{[-(-n // bn), -(-k // bk)]} for a [{n}, {k}] weight in {bn}x{bk} blocks")
    w = decode_e4m3fn(bits)
    w *= np.repeat(np.repeat(scale_inv.astype(np.float32), bn, axis=0), bk, axis=1)[:n, :k]
    return w


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., N, G, 16] e2m1 bytes and [..., N, G] e8m0 exponents -> float32 [..., N, 32 G] (Hugging Face [out, in])."""
    values = np.empty(blocks.shape[:-1] + (2 * blocks.shape[-1],), np.float32)
    values[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    values[..., 1::2] = E2M1_VALUES[blocks >> 4]
    values *= decode_e8m0(scales)[..., None]
    return values.reshape(blocks.shape[:-2] + (-1,))


def _byte_table(codes_of: np.ndarray) -> np.ndarray:
    """A 256-entry table mapping a byte of two e2m1 codes to the byte of two uniform 4-bit codes."""
    byte = np.arange(256)
    return (codes_of[byte & 0x0F] | (codes_of[byte >> 4] << 4)).astype(np.uint8)


# Uniform 4-bit codes (zero point 8) on the fine grid (step 0.5 x scale): code = 8 + 2 v, exact for v in [-4, 3.5].
_FINE = np.clip(8 + 2 * E2M1_VALUES, 0, 15).astype(np.uint8)
# On the coarse grid (step 1 x scale): code = 8 + round(v); +-0.5 and +-1.5 round half to even, as np.round does.
_COARSE = (8 + np.round(E2M1_VALUES)).astype(np.uint8)
_FINE_BYTES, _COARSE_BYTES = _byte_table(_FINE), _byte_table(_COARSE)
# e2m1 codes the fine grid cannot hold: +4 (6), +6 (7) and -6 (15); codes the coarse grid rounds: +-0.5, +-1.5.
_NEEDS_COARSE = np.zeros(16, bool)
_NEEDS_COARSE[[6, 7, 15]] = True
_ROUNDED_ON_COARSE = np.zeros(16, bool)
_ROUNDED_ON_COARSE[[1, 3, 9, 11]] = True


def mxfp4_to_matmulnbits(blocks: np.ndarray, scales: np.ndarray, bits: int = 4) -> tuple[QuantizedMatrix, float]:
    """One [N, G, 16] MXFP4 matrix -> MatMulNBits codes (block 32, no zero points) without going through float.

    4 bits: each block on the fine grid (exact) where it can be, else on the coarse grid (+-0.5, +-1.5 round).
    8 bits: code = 128 + 2 v at step 0.5 x scale, exact for every block.
    Returns:
        (the quantized matrix, the fraction of blocks held exactly).
    """
    n, g, _ = blocks.shape
    step = 0.5 * decode_e8m0(scales)
    if bits == 8:
        codes = np.empty((n, g, 32), np.uint8)
        codes[..., 0::2] = 128 + 2 * E2M1_VALUES[blocks & 0x0F]
        codes[..., 1::2] = 128 + 2 * E2M1_VALUES[blocks >> 4]
        return QuantizedMatrix(codes, step, None, 8, MXFP4_GROUP, 32 * g), 1.0
    if bits != 4:
        raise ValueError(f"bits={bits}: MXFP4 maps to 4- or 8-bit MatMulNBits codes")
    low, high = blocks & 0x0F, blocks >> 4
    coarse = (_NEEDS_COARSE[low] | _NEEDS_COARSE[high]).any(axis=-1)  # [N, G]
    rounded = coarse & (_ROUNDED_ON_COARSE[low] | _ROUNDED_ON_COARSE[high]).any(axis=-1)
    packed = np.where(coarse[..., None], _COARSE_BYTES[blocks], _FINE_BYTES[blocks])
    step = np.where(coarse, 2 * step, step)
    return QuantizedMatrix(packed, step, None, 4, MXFP4_GROUP, 32 * g), float(1.0 - rounded.mean())


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., N, K] (K a multiple of 32) -> MXFP4 (blocks [..., N, K/32, 16], scales [..., N, K/32]).

    The OCP recipe: a block's exponent is floor(log2(absmax)) - 2 (e2m1's largest exponent), so its absmax lands
    in [4, 8) and rounds to 4 or 6; every value rounds to the nearest e2m1 value (ties to the smaller magnitude)."""
    *prefix, n, k = w.shape
    if k % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs the input dimension in whole blocks of 32, got {k}")
    groups = w.reshape(*prefix, n, k // MXFP4_GROUP, MXFP4_GROUP).astype(np.float32)
    absmax = np.abs(groups).max(axis=-1)
    exponent = np.where(absmax > 0, np.floor(np.log2(np.where(absmax > 0, absmax, 1.0))) - 2, -127)
    exponent = np.clip(exponent, -127, 127)
    scaled = groups / np.exp2(exponent)[..., None]
    magnitudes = E2M1_VALUES[:8]
    codes = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(axis=-1).astype(np.uint8)
    codes |= np.where(scaled < 0, 8, 0).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).astype(np.uint8)


def take_rows(q: QuantizedMatrix, rows) -> QuantizedMatrix:
    """Output rows of a quantized matrix (rows are independent in MatMulNBits' layout): GPT-OSS interleaves gate
    and up rows, our experts stack them, and this reorders them without decoding."""
    zero = None if q.zero_points is None else q.zero_points[rows]
    return QuantizedMatrix(q.packed[rows], q.scales[rows], zero, q.bits, q.block_size, q.k)


def concat_rows(first: QuantizedMatrix, second: QuantizedMatrix) -> QuantizedMatrix:
    """Two quantized matrices over the same inputs stacked by output rows (gate over up), still encoded."""
    zero = None if first.zero_points is None else np.concatenate([first.zero_points, second.zero_points])
    return QuantizedMatrix(np.concatenate([first.packed, second.packed]),
                           np.concatenate([first.scales, second.scales]), zero, first.bits, first.block_size, first.k)


def q8_0_to_matmulnbits(raw: np.ndarray) -> QuantizedMatrix:
    """GGUF Q8_0 rows [N, nb * 34] (per 32 weights: float16 d, 32 int8 q; w = d q) -> 8-bit MatMulNBits, exactly:
    code = q + 128 (our zero point), scale = d."""
    blocks = raw.reshape(raw.shape[0], -1, 34)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return QuantizedMatrix(codes, scales, None, 8, 32, 32 * blocks.shape[1])


def q4_0_to_matmulnbits(raw: np.ndarray) -> QuantizedMatrix:
    """GGUF Q4_0 rows [N, nb * 18] (per 32 weights: float16 d, 16 bytes holding q of weights 0-15 in the low nibbles
    and 16-31 in the high ones; w = (q - 8) d) -> 4-bit MatMulNBits (zero point 8), exactly: the same codes, nibbles
    reordered to weight pairs, scale = d (negative where the block's largest magnitude is positive, which
    MatMulNBits computes like any other scale)."""
    blocks = raw.reshape(raw.shape[0], -1, 18)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32] in weight order
    return QuantizedMatrix(codes[..., 0::2] | (codes[..., 1::2] << 4), scales, None, 4, 32, 32 * blocks.shape[1])
