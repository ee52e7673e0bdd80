"""edge_moe's own CPU kernels (edge_moe/csrc/), loaded with ctypes: a MoE layer's routed experts (moe.c) and a
decoder layer's attention block and router (layer.c, driven by native_layer.py), over float16 rows or MatMulNBits'
8- and 4-bit blocks read in place (matrix.c).

onnxruntime (1.32) has no x86 CPU kernel that reads float16 weights: a float16 MatMul costs what a float32 one
does, so float16 experts ran as float32 stacks and a decoded token read twice the bytes llama.cpp reads. Measured
on the 2-core VM (synthetic Qwen3-MoE, 32 experts 512x512, 12 layers cycled cold, 1 thread): a layer's 4 experts
in 0.61-0.71 ms against 1.16-1.32 ms for onnxruntime's MoE over float32 stacks; 64 tokens in 12.2-12.6 ms against
16.9-17.5 ms. The kernels are C with AVX2/FMA/F16C, AVX-512 and VNNI where the CPU has them (chosen at run time),
OpenMP for more threads, and no Python or onnxruntime headers; pip builds them as the optional extension
`edge_moe._native` (pyproject.toml). Where it is missing (no compiler at install, another CPU) float16 and
quantized weights keep onnxruntime's kernels.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import numpy as np

LIBRARY = "_native"
# libgomp's threads spin ~300,000 pauses after a parallel region before they sleep: beside onnxruntime's own
# threads, the layer graph that runs next, that spin takes a core. A few microseconds of spin is enough between
# the phases of one call. Set before libgomp loads (it reads it once); a user's own setting wins.
SPIN_COUNT = "1000"

_library = None
_reason: str | None = None


class Matrix(ctypes.Structure):
    """matrix.h's edge_moe_matrix: a weight [rows, k] as the kernels read it (float32 / float16 rows, or symmetric
    8- / 4-bit blocks in MatMulNBits' layout, read in place). The arrays must outlive it (`arrays` keeps them)."""

    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p)] + \
               [(name, ctypes.c_int) for name in ("rows", "k", "bits", "block")]

    @classmethod
    def of_rows(cls, weight: np.ndarray) -> "Matrix":
        """A float16 or float32 [rows, k] C-contiguous matrix."""
        if weight.ndim != 2 or weight.dtype not in (np.float16, np.float32) or not weight.flags.c_contiguous:
            raise ValueError(f"a {weight.dtype}{weight.shape} weight is not C-contiguous float16/float32 [rows, k]")
        m = cls(w=weight.ctypes.data, scales=None, rows=weight.shape[0], k=weight.shape[1],
                bits=8 * weight.dtype.itemsize, block=0)
        m.arrays = (weight,)
        return m

    @classmethod
    def of_blocks(cls, codes: np.ndarray, scales: np.ndarray, bits: int, block: int, k: int) -> "Matrix":
        """MatMulNBits' symmetric blocks: codes [rows, ceil(k / block), block * bits / 8] uint8 (any shape with
        those bytes a row), scales [rows, blocks] float32."""
        blocks = -(-k // block)
        rows = scales.shape[0] if scales.ndim else 0
        if bits not in (4, 8) or block % 32 or block <= 0:
            raise ValueError(f"{bits}-bit blocks of {block}: the kernel reads 4 or 8 bits in blocks of 32, 64, ...")
        if codes.dtype != np.uint8 or codes.size != rows * blocks * block * bits // 8 or \
                scales.dtype != np.float32 or scales.shape != (rows, blocks) or \
                not (codes.flags.c_contiguous and scales.flags.c_contiguous):
            raise ValueError(f"codes {codes.dtype}{codes.shape} / scales {scales.dtype}{scales.shape} are not "
                             f"{bits}-bit blocks of {block} for k = {k}")
        m = cls(w=codes.ctypes.data, scales=scales.ctypes.data, rows=rows, k=k, bits=bits, block=block)
        m.arrays = (codes, scales)
        return m


class LayerParams(ctypes.Structure):
    """layer.c's layer_params: one decoder layer's sizes and weights ([out, in] matrices of any storage, float32
    norms). The arrays must outlive it (NativeLayer keeps them)."""

    _fields_ = [(name, ctypes.c_int) for name in ("hidden", "heads", "kv_heads", "head_dim", "experts", "top_k",
                                                   "head_norm", "normalize")] + \
               [(name, ctypes.c_float) for name in ("eps", "scale", "routing_scale")] + \
               [(name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "q_norm", "k_norm")] + \
               [(name, Matrix) for name in ("wq", "wk", "wv", "wo", "router")] + \
               [(name, ctypes.c_void_p) for name in ("bq", "bk", "bv", "bo")] + \
               [("shared_ffn", ctypes.c_int)] + \
               [(name, Matrix) for name in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")]


def _load():
    global _library, _reason
    if _library is not None or _reason is not None:
        return _library
    here = Path(__file__).parent
    found = [here / (LIBRARY + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES
             if (here / (LIBRARY + suffix)).is_file()]
    if not found:
        _reason = ("edge_moe's kernels were not built (they need gcc or clang at `pip install`; the install log "
                   "says why)")
        return None
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    try:
        library = ctypes.CDLL(str(found[0]))
    except OSError as e:
        _reason = f"edge_moe's kernels ({found[0].name}) do not load: {e}"
        return None
    if not library.edge_moe_f16_supported():
        _reason = "this CPU lacks AVX2, FMA or F16C, which edge_moe's kernels need"
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    m = ctypes.POINTER(Matrix)
    library.edge_moe_layer.argtypes = [ctypes.POINTER(LayerParams), p, i, p, p, i, i, p, p, i, p, p, p, p, p, i]
    library.edge_moe_layer.restype = i
    library.edge_moe_head.argtypes = [p, ctypes.c_float, m, p, i, p, i]
    library.edge_moe_head.restype = i
    library.edge_moe_moe.argtypes = [m, m, i, p, i, p, p, i, p, i]
    library.edge_moe_moe.restype = i
    library.edge_moe_expert_blocks.argtypes = [m, m, p, i, p, i]
    library.edge_moe_expert_blocks.restype = i
    library.edge_moe_expert_f16.argtypes = [p, p, i, i, p, i, p, i]
    library.edge_moe_expert_f16.restype = i
    library.edge_moe_blocks_supported.restype = i
    library.edge_moe_blocks_use.argtypes = [i]
    library.edge_moe_blocks_use(0)  # the block kernels this CPU runs best (AVX-512 VNNI, else AVX-VNNI, else AVX2)
    library.edge_moe_matmul.argtypes = [m, p, i, p, i]
    library.edge_moe_matmul.restype = i
    library.edge_moe_scratch_release.restype = ctypes.c_size_t
    _library = library
    return library


def release_scratch() -> int:
    """Gives back the scratch memory the kernels keep for the calling thread's next calls (csrc/scratch.h: up to
    64 MiB, a prompt's buffers, kept because faulting them in again cost a third of a 2-thread prefill); returns
    its bytes (0 without the kernels)."""
    library = _load()
    return int(library.edge_moe_scratch_release()) if library is not None else 0


def blocks_fused_reason() -> str | None:
    """None where the block kernels also run stacked quantized experts and a quantized backbone (AVX-512 VNNI), else
    why onnxruntime keeps those. Measured on the 2-core AMD VM with the weaker kernels forced: edge_moe's AVX2 block
    kernel (a row and a token at a time) decoded q3-q4b8r at 337 tok/s against 420 for onnxruntime's QMoE and step
    graph; its AVX-VNNI kernel (blocks_vnni256.c) decodes 376-405 against 350-398 but prefills 64 tokens at 934-969
    against 1,305-1,397, 8-bit 655-697 against 1,248-1,272 (onnxruntime used that CPU's AVX-512 VNNI: a CPU with
    AVX-VNNI alone was not measured). Streamed quantized experts take the kernels everywhere: no session beside each
    (AVX2: 131 tok/s against 41 at a 50 % budget; AVX-VNNI prefills 570 tok/s there against AVX2's 427)."""
    reason = unavailable_reason()
    if reason is None and blocks_instructions() != "avx512-vnni":
        reason = ("this CPU lacks AVX-512 VNNI: onnxruntime's fused kernels run resident quantized experts and "
                  f"backbones (edge_moe's {blocks_instructions().upper()} block kernel streams experts)")
    return reason


BLOCK_INSTRUCTIONS = {3: "avx512-vnni", 2: "avx-vnni", 1: "avx2"}  # edge_moe_blocks_use's levels


def blocks_instructions() -> str | None:
    """What the block-code kernels run on here: "avx512-vnni", "avx-vnni" (256-bit VNNI), "avx2", or None (the
    kernels are not built)."""
    library = _load()
    return None if library is None else BLOCK_INSTRUCTIONS.get(library.edge_moe_blocks_supported())


def use_block_instructions(name: str | None) -> None:
    """Tests and measurements: the block kernels of `name` (one of BLOCK_INSTRUCTIONS' values) or the best below it
    this CPU has; None: the CPU's best."""
    library = _load()
    if library is not None:
        library.edge_moe_blocks_use({v: k for k, v in BLOCK_INSTRUCTIONS.items()}[name] if name else 0)


def matmul(matrix: Matrix, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """x [T, k] float32 times the matrix's transpose: [T, rows] float32 (block codes with int8 activations, as
    MatMulNBits at accuracy_level 4)."""
    library = _load()
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != matrix.k:
        raise ValueError(f"x {x.shape} is not [T, {matrix.k}]")
    if library is None:
        raise RuntimeError(_reason)
    out = np.empty((x.shape[0], matrix.rows), np.float32)
    if library.edge_moe_matmul(ctypes.byref(matrix), x.ctypes.data, x.shape[0], out.ctypes.data, threads):
        raise MemoryError(f"edge_moe's kernel could not allocate scratch for {x.shape[0]} tokens")
    return out


def unavailable_reason() -> str | None:
    """None where edge_moe's kernels run here (float16 rows, and 8- / 4-bit blocks with AVX-512 VNNI or AVX2), else
    why not (one line)."""
    _load()
    return _reason


def stacked(fc1: np.ndarray, fc2: np.ndarray) -> tuple[Matrix, Matrix]:
    """Float stacks fc1 [E, 2F, H] (gate and up rows interleaved: fused_moe.stack_layer) and fc2 [E, H, F] as the
    kernel's matrices (their rows stacked: E * 2F and E * H)."""
    if fc1.ndim != 3 or fc2.ndim != 3:
        raise ValueError(f"stacks {fc1.shape} / {fc2.shape} are not [E, 2F, H] / [E, H, F]")
    return Matrix.of_rows(fc1.reshape(-1, fc1.shape[2])), Matrix.of_rows(fc2.reshape(-1, fc2.shape[2]))


def moe(fc1: Matrix, fc2: Matrix, x: np.ndarray, indices: np.ndarray, weights: np.ndarray,
        threads: int = 1) -> np.ndarray:
    """A MoE layer's routed SwiGLU experts (moe.c): sum over a token's k experts of w * down(silu(gate x) * up x).

    T = tokens, H = hidden, F = expert intermediate size, E = experts, k = experts per token
    Args:
        fc1: [E * 2F, H], gate and up rows interleaved (fused_moe.stack_layer / quantized_stacks); fc2 [E * H, F]:
            float16 or float32 rows (`stacked`), or 8- / 4-bit blocks (Matrix.of_blocks).
        x: [T, H]; indices: [T, k] in [0, E); weights: [T, k].
        threads: threads for this call (OpenMP).
    Returns:
        [T, H] float32.
    """
    library = _load()
    if library is None:
        raise RuntimeError(_reason)
    hidden, intermediate = fc1.k, fc2.k
    experts = fc2.rows // hidden if hidden else 0
    if fc1.rows != experts * 2 * intermediate or fc2.rows != experts * hidden or (fc1.bits < 16) != (fc2.bits < 16):
        raise ValueError(f"stacks of {fc1.rows} x {fc1.k} / {fc2.rows} x {fc2.k} are not [E * 2F, H] / [E * H, F]")
    x = np.ascontiguousarray(x, np.float32)
    indices = np.ascontiguousarray(indices, np.int64)
    weights = np.ascontiguousarray(weights, np.float32)
    tokens, k = indices.shape
    if x.shape != (tokens, hidden) or weights.shape != (tokens, k):
        raise ValueError(f"x {x.shape}, indices {indices.shape} and weights {weights.shape} do not match")
    if indices.size and (indices.min() < 0 or indices.max() >= experts):
        raise ValueError(f"expert indices outside [0, {experts})")
    y = np.empty((tokens, hidden), np.float32)
    if library.edge_moe_moe(ctypes.byref(fc1), ctypes.byref(fc2), experts, x.ctypes.data, tokens,
                            indices.ctypes.data, weights.ctypes.data, k, y.ctypes.data, threads):
        raise MemoryError(f"edge_moe's MoE kernel could not allocate scratch for {tokens} tokens")
    return y


def expert_blocks(gate_up: Matrix, down: Matrix, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """One routed SwiGLU expert in the package's MatMulNBits layout (moe.c): y [T, H] = (silu(x gate^T) * (x up^T))
    down^T for gate_up [2F, H] (gate rows, then up rows) and down [H, F] in 8- / 4-bit blocks, x [T, H] float32."""
    library = _load()
    x = np.ascontiguousarray(x, np.float32)
    if gate_up.bits >= 16 or down.bits >= 16 or gate_up.rows != 2 * down.k or down.rows != gate_up.k or \
            x.ndim != 2 or x.shape[1] != gate_up.k:
        raise ValueError(f"x {x.shape}, gate_up {gate_up.rows} x {gate_up.k} and down {down.rows} x {down.k} blocks "
                         "do not match")
    y = np.empty((x.shape[0], down.rows), np.float32)
    if library.edge_moe_expert_blocks(ctypes.byref(gate_up), ctypes.byref(down), x.ctypes.data, x.shape[0],
                                      y.ctypes.data, threads):
        raise MemoryError(f"edge_moe's expert kernel could not allocate scratch for {x.shape[0]} tokens")
    return y


def layer(params: LayerParams, x: np.ndarray, keys: np.ndarray, values: np.ndarray, past: int, cos: np.ndarray,
          sin: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """A decoder layer's attention block and router (layer.c) on x [T, H] float32 C-contiguous after `past` cached
    tokens: writes this call's keys and values into `keys`/`values` ([1, kvH, M, D] float32 or float16, the
    GqaKVCache buffers) and returns [residual [T, H], moe_input [T, H], router_logits [T, E], indices [T, k] int64,
    weights [T, k]], what the layer graph returns. cos, sin: [M, D/2] of the cache's type. NativeLayer checks the
    weights' shapes once at load."""
    library = _load()
    tokens = x.shape[0]
    hidden, experts, k = params.hidden, params.experts, params.top_k
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"hidden states {x.shape} are not [T, {hidden}]")
    half = keys.dtype == np.float16
    if {a.dtype for a in (keys, values, cos, sin)} != {keys.dtype} or keys.dtype not in (np.float16, np.float32):
        raise ValueError("the KV cache and RoPE tables are not all float32 or all float16")
    outputs = [np.empty((tokens, hidden), np.float32), np.empty((tokens, hidden), np.float32),
               np.empty((tokens, experts), np.float32), np.empty((tokens, k), np.int64),
               np.empty((tokens, k), np.float32)]
    status = library.edge_moe_layer(ctypes.byref(params), x.ctypes.data, tokens, keys.ctypes.data,
                                    values.ctypes.data, keys.shape[2], past, cos.ctypes.data, sin.ctypes.data,
                                    int(half), *(o.ctypes.data for o in outputs), threads)
    if status == -2:
        raise ValueError(f"{past} cached + {tokens} new tokens exceed the KV cache's {keys.shape[2]}")
    if status == -3:
        raise ValueError(f"head_dim {params.head_dim} / {params.heads} heads over {params.kv_heads}: not the kernel's")
    if status:
        raise MemoryError(f"edge_moe's layer kernel could not allocate scratch for {tokens} tokens")
    return outputs


def head(norm: np.ndarray, eps: float, weight: Matrix, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Logits [T, V] = RMSNorm(x [T, H], norm [H] float32) weight^T for the lm_head [V, H] (any Matrix; NativeHead
    checks the shapes once at load)."""
    library = _load()
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != weight.k or norm.shape != (weight.k,):
        raise ValueError(f"hidden states {x.shape} do not match the head {weight.rows} x {weight.k} / norm "
                         f"{norm.shape}")
    logits = np.empty((x.shape[0], weight.rows), np.float32)
    if library.edge_moe_head(norm.ctypes.data, eps, ctypes.byref(weight), x.ctypes.data, x.shape[0],
                             logits.ctypes.data, threads):
        raise MemoryError(f"edge_moe's head kernel could not allocate scratch for {x.shape[0]} tokens")
    return logits


def expert_f16(gate_up: np.ndarray, down: np.ndarray, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """One routed SwiGLU expert in the package's layout (moe_f16.c): y [T, H] = (silu(x gate) * (x up)) down for
    gate_up [H, 2F] (gate | up) and down [F, H], float16 C-contiguous (an expert cache's views of its read buffer;
    ExpertKernels checks the layout once an expert), x [T, H] float32."""
    library = _load()
    x = np.ascontiguousarray(x, np.float32)
    hidden, intermediate = down.shape[1], down.shape[0]
    if x.ndim != 2 or x.shape[1] != hidden or gate_up.shape != (hidden, 2 * intermediate):
        raise ValueError(f"x {x.shape}, gate_up {gate_up.shape} and down {down.shape} do not match")
    y = np.empty((x.shape[0], hidden), np.float32)
    if library.edge_moe_expert_f16(gate_up.ctypes.data, down.ctypes.data, hidden, intermediate, x.ctypes.data,
                                   x.shape[0], y.ctypes.data, threads):
        raise MemoryError(f"edge_moe's expert kernel could not allocate scratch for {x.shape[0]} tokens")
    return y
