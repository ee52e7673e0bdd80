"""`python -m edge_moe_export.encodings_report`: what an MXFP4 expert of GPT-OSS-20B's shape costs in each of our
formats, and the weight error of each route from MXFP4 to our 4-bit experts.

The weights are random (normal, std 0.02, then MXFP4-encoded as the OCP recipe does): GPT-OSS's own weights are not
shipped with this repository. Errors are relative RMS against the MXFP4 weights (what the checkpoint means).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge_moe.quant import dequantize

from .encodings import dequantize_mxfp4, mxfp4_to_matmulnbits, quantize_mxfp4
from .quantize import quantize

GPT_OSS_20B = {"hidden": 2880, "ffn": 2880, "experts": 32, "layers": 24}


def _relative_rms(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact ** 2)))


def expert_bytes(hidden: int, ffn: int) -> dict[str, int]:
    """Bytes of one SwiGLU expert's weights (biases apart) as MXFP4 and in each of our expert formats."""
    weights = 3 * hidden * ffn
    blocks = weights // 32
    return {"MXFP4 as shipped (e2m1 + e8m0 per 32)": weights // 2 + blocks,
            "ours 4-bit, block 32, float32 scales": weights // 2 + 4 * blocks,
            "ours 8-bit, block 32, float32 scales": weights + 4 * blocks,
            "ours float16": 2 * weights,
            "ours 4-bit with zero points (requantized)": weights // 2 + 4 * blocks + -(-blocks // 2)}


def route_errors(rows: int, cols: int, seed: int = 0) -> dict[str, float]:
    """Relative RMS error of each route to our experts, on one [rows, cols] MXFP4 matrix."""
    w = np.random.default_rng(seed).normal(0.0, 0.02, (rows, cols)).astype(np.float32)
    blocks, scales = quantize_mxfp4(w)
    exact = dequantize_mxfp4(blocks, scales)
    direct4, exact_blocks = mxfp4_to_matmulnbits(blocks, scales, bits=4)
    direct8, _ = mxfp4_to_matmulnbits(blocks, scales, bits=8)
    return {
        "MXFP4 itself against the float weights": _relative_rms(exact, w),
        "direct 4-bit (codes remapped, no float)": _relative_rms(dequantize(direct4), exact),
        "  blocks held exactly by the direct 4-bit route": exact_blocks,
        "dequantize -> 4-bit symmetric (absmax/7)": _relative_rms(dequantize(quantize(exact, 4, 32)), exact),
        "dequantize -> 4-bit with zero points": _relative_rms(dequantize(quantize(exact, 4, 32, False)), exact),
        "direct 8-bit (codes remapped, exact)": _relative_rms(dequantize(direct8), exact),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=GPT_OSS_20B["ffn"], help="rows of the matrix measured")
    args = parser.parse_args(argv)
    h, f = GPT_OSS_20B["hidden"], GPT_OSS_20B["ffn"]
    print(f"GPT-OSS-20B expert: hidden {h}, ffn {f} ({3 * h * f:,} weights; biases apart)")
    for name, size in expert_bytes(h, f).items():
        print(f"  {name:45s} {size:>12,} bytes  ({size / 2 ** 20:6.2f} MiB)")
    start = time.perf_counter()
    errors = route_errors(args.rows, h)
    print(f"Routes from MXFP4 to our experts, one [{args.rows}, {h}] matrix "
          f"(relative RMS error against the MXFP4 weights; {time.perf_counter() - start:.1f} s):")
    for name, value in errors.items():
        print(f"  {name:50s} {value:.4f}")


if __name__ == "__main__":
    main()
