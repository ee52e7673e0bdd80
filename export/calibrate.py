"""Mixed bitwidth (EdgeMoE-style): a bitwidth per expert from calibration on a text, to fit a total size.

    1. export the checkpoint in float32 aside and run it on the calibration text, recording each expert's inputs
       (up to SAMPLES rows) and how many tokens were routed to it;
    2. cost[e, b] = routed tokens x mean ||swiglu_b(x) - swiglu_f32(x)||^2 over its recorded inputs: the squared
       error bitwidth b adds to the layer output (weights dequantized in numpy, exactly what MatMulNBits uses);
    3. start every expert at 2-bit and upgrade (2 -> 4 -> 8 -> 16) whichever step buys the most cost per byte while the
       total of the experts' stored lengths stays within the target (greedy knapsack).

Experts never routed on the text cost nothing and stay 2-bit: the text should resemble what the model will see.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np

from edge_moe.budget import _UNITS
from edge_moe.errors import EdgeMoeError

CANDIDATES = (2, 4, 8, 16)
SAMPLES = 256  # recorded input rows per expert: enough for a stable mean error


def parse_bytes(value) -> int:
    """`--expert-bytes` as bytes: an int, 300MB, 1.5GiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?i?b?)", str(value).strip().lower().replace(" ", ""))
    if not match or match.group(2) not in _UNITS:
        raise EdgeMoeError(f"--expert-bytes {value!r} is not understood; write bytes like 300MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def expert_length(shape) -> int:
    """Stored bytes of one expert of this shape (tensors 64-byte aligned, as ExpertWriter lays them out)."""
    if shape.quantized:
        from edge_moe.quant_graph import quantized_tensor_shapes

        sizes = [int(np.prod(dims)) * np.dtype(dt).itemsize for dt, dims in quantized_tensor_shapes(shape).values()]
    else:
        sizes = [int(np.prod(dims)) * np.dtype(shape.dtype).itemsize for dims in shape.tensor_shapes().values()]
    end = 0
    for size in sizes:
        end += -end % 64 + size
    return end


def _swiglu(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """x [T, H], gate_up [2F, H], down [H, F] (Hugging Face [out, in])."""
    y = x @ gate_up.T
    f = y.shape[1] // 2
    gate, up = y[:, :f], y[:, f:]
    return (gate / (1.0 + np.exp(-gate)) * up) @ down.T


def _weights_at(bits: int, gate_up: np.ndarray, down: np.ndarray, block_size: int, zero_points: bool):
    from .quantize import dequantize, quantize

    if bits == 16:
        return gate_up.astype(np.float16).astype(np.float32), down.astype(np.float16).astype(np.float32)
    return tuple(dequantize(quantize(w, bits, block_size, not zero_points)) for w in (gate_up, down))


def record_routing(package: Path, text_path, window: int | None = None, progress: bool = False):
    """Runs the float32 package on the text; returns ({key: routed tokens}, {key: inputs [<=SAMPLES, H]})."""
    from tqdm import tqdm

    import edge_moe
    from edge_moe.evaluate import read_text_ids, windows

    model = edge_moe.load(package)
    ids = read_text_ids(model, text_path)
    counts: dict[tuple, int] = {}
    inputs: dict[tuple, list] = {}
    kernels = model.forward.kernels
    run = kernels.run

    lock = threading.Lock()  # with --threads above 1 a layer's experts run on several threads

    def recording_run(expert, x, **timed):
        key = expert.record.key
        with lock:
            counts[key] = counts.get(key, 0) + x.shape[0]
            held = sum(len(a) for a in inputs.get(key, []))
            if held < SAMPLES:
                inputs.setdefault(key, []).append(np.array(x[:SAMPLES - held]))
        return run(expert, x, **timed)

    kernels.run = recording_run
    limit = int(model.config.get("max_position_embeddings") or 512)
    with tqdm(total=len(ids) - 1, desc="calibrate: routing", unit="tok", disable=not progress) as bar:
        for chunk in windows(ids, min(window or limit, limit)):
            model.logits(chunk)
            bar.update(len(chunk) - 1)  # windows overlap by one token
    weights = {key: model.forward.experts.experts[key].weights for key in model.forward.experts.experts}
    return counts, {k: np.concatenate(v) for k, v in inputs.items()}, weights


def choose_bits(hf_dir, out_dir, expert_bytes, calibration, block_size: int, zero_points: bool,
                progress: bool = True) -> dict[tuple[int, int], int]:
    """Per-expert bitwidths (2, 4, 8 or 16) that fit `expert_bytes` (summed stored lengths) and minimize the
    calibration cost. Raises EdgeMoeError without a text or a target, or when the target is below all-2-bit."""
    from edge_moe.expert_graph import ExpertShape

    from .exporter import export_checkpoint

    if not calibration or expert_bytes is None:
        raise EdgeMoeError("--bits mixed needs --calibration FILE (a text like the model's use) and "
                           "--expert-bytes SIZE (the experts' total size, e.g. 300MB)")
    target = parse_bytes(expert_bytes)
    aside = Path(f"{out_dir}.calibrate-{os.getpid()}")
    try:
        package = export_checkpoint(hf_dir, aside, overwrite=True, progress=progress, source_bits=False)
        counts, inputs, weights = record_routing(package, calibration, progress=progress)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    shapes = {}
    cost: dict[tuple, dict[int, float]] = {}
    from tqdm import tqdm

    for key, w in tqdm(weights.items(), total=len(weights), desc="calibrate: error per bitwidth", unit="expert",
                       disable=not progress):
        h, two_f = w["gate_up_proj"].shape
        shapes[key] = {b: ExpertShape("swiglu", h, two_f // 2, "float16" if b == 16 else f"q{b}", block_size,
                                      zero_points) for b in CANDIDATES}
        x = inputs.get(key)
        if x is None:
            cost[key] = {b: 0.0 for b in CANDIDATES}
            continue
        gate_up, down = w["gate_up_proj"].T.astype(np.float32), w["down_proj"].T.astype(np.float32)
        exact = _swiglu(x, gate_up, down)
        cost[key] = {b: counts[key] * float(((_swiglu(x, *_weights_at(b, gate_up, down, block_size, zero_points))
                                              - exact) ** 2).sum(axis=1).mean()) for b in CANDIDATES}
    size = {key: {b: expert_length(s) for b, s in shapes[key].items()} for key in shapes}
    chosen = {key: CANDIDATES[0] for key in shapes}
    total = sum(size[key][chosen[key]] for key in shapes)
    if total > target:
        raise EdgeMoeError(f"--expert-bytes {expert_bytes!r} ({target:,} bytes) is below the all-2-bit size of "
                           f"{total:,} bytes; raise it")
    while True:
        best, best_gain = None, 0.0
        for key, b in chosen.items():
            if b == CANDIDATES[-1]:
                continue
            nxt = CANDIDATES[CANDIDATES.index(b) + 1]
            extra = size[key][nxt] - size[key][b]
            gain = (cost[key][b] - cost[key][nxt]) / max(extra, 1)
            if total + extra <= target and gain > best_gain:
                best, best_gain = key, gain
        if best is None:
            return chosen
        b = chosen[best]
        chosen[best] = CANDIDATES[CANDIDATES.index(b) + 1]
        total += size[best][chosen[best]] - size[best][b]
