"""The quantized-weight format of MatMulNBits experts, and what a resident quantized expert costs in RAM.

    # N = output features, K = input features, B = block size, nb = ceil(K / B) blocks per row
    packed [N, nb, B * bits / 8] uint8, scales [N, nb] float32, zero_points [N, ceil(nb * bits / 8)] uint8 (optional)
    w[n, k] = (q[n, k] - zp[n, k // B]) * scale[n, k // B]; without zero points zp = 2 ** (bits - 1)

Codes of 2 and 4 bits pack 8/bits to a byte, the lowest index in the lowest bits; zero points pack the same way. The quantizer
is export/quantize.py; the runtime only dequantizes (small experts, below) and sizes sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Measured RSS of one MatMulNBits expert session (onnxruntime 1.32 CPU, accuracy_level 4, 12 sessions averaged,
# malloc_trim'd): 1.05 MB whatever the size, plus the prepacked weights: bits/8 bytes of codes and three float32
# per block (scales, block sums, and scales again) per weight. 2048x1024 SwiGLU: 6.59 MB for 4-bit block 32
# (formula 6.55), 9.74 MB for 8-bit block 32 (9.70), 4.81 MB for 4-bit block 128 (4.79).
SESSION_OVERHEAD = 1_050_000


@dataclass
class QuantizedMatrix:
    """One [N, K] weight in MatMulNBits form."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays to store, named `{prefix}.qweight`, `.scales` and (asymmetric) `.zero_points`."""
        out = {f"{prefix}.qweight": self.packed, f"{prefix}.scales": self.scales}
        if self.zero_points is not None:
            out[f"{prefix}.zero_points"] = self.zero_points
        return out


def unpack(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Bytes [..., m] -> uint8 codes [..., n]."""
    if bits == 8:
        return data[..., :n]
    per, mask = 8 // bits, (1 << bits) - 1
    out = np.empty(data.shape[:-1] + (data.shape[-1] * per,), np.uint8)
    for j in range(per):
        out[..., j::per] = (data >> (bits * j)) & mask
    return out[..., :n]


def dequantize(q: QuantizedMatrix) -> np.ndarray:
    """The float32 [N, K] matrix that MatMulNBits computes with."""
    n, nb = q.scales.shape
    codes = unpack(q.packed, q.bits, q.block_size).astype(np.float32)  # [N, nb, B]
    if q.zero_points is None:
        zero = np.full((n, nb), 1 << (q.bits - 1), np.float32)
    else:
        zero = unpack(q.zero_points, q.bits, nb).astype(np.float32)
    w = (codes - zero[..., None]) * q.scales[..., None]
    return w.reshape(n, nb * q.block_size)[:, :q.k]


def session_bytes(shape) -> int:
    """RSS one MatMulNBits session of this ExpertShape holds (see SESSION_OVERHEAD)."""
    weights = 3 * shape.hidden_size * shape.intermediate_size
    per_weight = shape.bits / 8 + (12 + (4 if shape.zero_points else 0)) / shape.block_size
    return SESSION_OVERHEAD + int(weights * per_weight)


def uses_session(shape) -> bool:
    """Whether a resident quantized expert runs in its own MatMulNBits session (large experts) or is dequantized
    into float32 for the shared kernel: a session's fixed 1 MB costs more than the float32 copy of a small expert
    (below about 340k weights, e.g. 256x88)."""
    return session_bytes(shape) < 12 * shape.hidden_size * shape.intermediate_size


def kernel_reads(shape, built: bool | None = None) -> bool:
    """Whether edge_moe's block kernel (native.py) runs a resident expert of this ExpertShape from its read buffer,
    with no session: a SwiGLU expert large enough for a session of its own (small ones run as float32), in symmetric
    8- / 4-bit blocks of a multiple of 32, where the kernels were built (AVX-512 VNNI, AVX-VNNI or AVX2). built:
    whether they are on the machine in question (the planner's device profile); None: this one."""
    if built is None:
        from . import native

        built = native.unavailable_reason() is None
    return (shape.quantized and uses_session(shape) and shape.kind == "swiglu" and shape.bits in (4, 8)
            and not shape.zero_points and shape.block_size % 32 == 0 and built)


def resident_extra_bytes(shape, kernel: bool = True, built: bool | None = None) -> int:
    """Bytes a resident expert holds beyond its read buffer: the session, or the dequantized float32 weights; none
    where edge_moe's kernel reads the buffer itself (`kernel`: the model may run it, native_kernel not False;
    `built`: see kernel_reads)."""
    if not shape.quantized or (kernel and kernel_reads(shape, built)):
        return 0
    return session_bytes(shape) if uses_session(shape) else 12 * shape.hidden_size * shape.intermediate_size


def dequantized_weights(shape, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A small quantized expert's tensors -> float32 weights for the shared kernel ([in, out], see ExpertShape);
    unquantized tensors (swiglu_oss's biases, alpha and limit) are copied out of the read buffer like the rest."""
    out = {name: array.copy() for name, array in tensors.items()
           if not name.startswith(("gate_up_proj.", "down_proj."))}
    for name, k in (("gate_up_proj", shape.hidden_size), ("down_proj", shape.intermediate_size)):
        q = QuantizedMatrix(tensors[f"{name}.qweight"], tensors[f"{name}.scales"],
                            tensors.get(f"{name}.zero_points"), shape.bits, shape.block_size, k)
        out[name] = np.ascontiguousarray(dequantize(q).T)
    return out
