"""`edge-moe profile [--model DIR] [--out FILE]`: measures this machine and writes a device profile.

Measured: O_DIRECT sequential and 4 KiB random read bandwidth of the disk holding the model, DRAM copy bandwidth,
onnxruntime's weight streaming rate at one token (decode's access pattern), XXH3 rate, expert compute time at the
model's shapes for a few token counts on each execution provider present, core counts, and, with --model, the
model's all-resident decode and prefill time per token (the planner scales these to other depths). About a minute.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil

from .errors import EdgeMoeError
from .lazy_imports import ort
from .profiles import FORMAT_VERSION, write_profile
from .store import ExpertStore, aligned_empty, hash_bandwidth

TOKEN_COUNTS = (1, 4, 16, 64)


def this_isa() -> str:
    """This machine as a profile's cpu.isa: x86-64-v3 where edge_moe's kernels run here, else its architecture."""
    from . import native

    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86-64-v3" if native.unavailable_reason() is None else "x86-64"
    return "arm64" if machine in ("arm64", "aarch64") else "other"


def _step(message: str) -> None:
    print(f"[profile] {message}", flush=True)


def random_read_bandwidth(path: str, seconds: float = 2.0, block: int = 4096) -> float:
    """O_DIRECT 4 KiB reads at random aligned offsets, one at a time (queue depth 1), for `seconds`; bytes/s."""
    size = os.path.getsize(path) // block
    if size < 2:
        raise EdgeMoeError(f"{path}: too small to measure random reads; give a model of at least a few MB")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buf = memoryview(aligned_empty(block))
    offsets = np.random.default_rng(0).integers(0, size, 1 << 20) * block
    done, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            os.preadv(fd, [buf], int(offsets[done % len(offsets)]))
            done += 1
    finally:
        os.close(fd)
    return done * block / (time.perf_counter() - t0)


def memory_bandwidth(nbytes: int = 256 << 20) -> float:
    """DRAM bandwidth in bytes/s from a numpy copy (read + write counted), best of 5."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def expert_times(hidden: int, ffn: int, dtype: str = "float32") -> dict[str, dict[str, float]]:
    """Median ms of one expert (weights as inputs, as the runtime runs it) per provider and token count."""
    from .expert_graph import INPUT, ExpertShape, build_expert_graph
    from .sessions import open_session

    shape = ExpertShape("swiglu", hidden, ffn, dtype)
    model = build_expert_graph(shape).SerializeToString()
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s).astype(dtype) for n, s in shape.tensor_shapes().items()}
    out = {}
    for provider in [p for p in ort.get_available_providers() if p in ("CPUExecutionProvider", "CUDAExecutionProvider")]:
        try:
            session = open_session(model, providers=(provider,))
        except Exception as exc:  # a provider listed but unusable (no driver): report and go on
            _step(f"  {provider}: unusable ({str(exc).splitlines()[0][:80]})")
            continue
        times = {}
        for m in TOKEN_COUNTS:
            feeds = {INPUT: rng.standard_normal((m, hidden)).astype(np.float32), **weights}
            session.run(None, feeds)
            runs = []
            for _ in range(20 if m < 64 else 8):
                t0 = time.perf_counter()
                session.run(None, feeds)
                runs.append(time.perf_counter() - t0)
            times[f"m{m}"] = round(float(np.median(runs)) * 1e3, 4)
        out[provider.replace("ExecutionProvider", "").lower()] = times
    return out


def _repeat(run, seconds: float, least: int, most: int = 40) -> list:
    """`run()` until `seconds` have passed and it ran at least `least` times: a tiny model's 16 tokens take a tenth of
    a second, and a few such runs on a shared machine swung the planner's compute figure by 1.6x."""
    out, start = [], time.perf_counter()
    while len(out) < least or (time.perf_counter() - start < seconds and len(out) < most):
        out.append(run())
    return out


def model_times(model_dir: str, threads: int, seconds: float = 2.0) -> dict:
    """Resident decode and prefill ms per token of the model through the budgeted cache (the path an emulated or
    memory-limited run takes), every expert the measured tokens need already loaded by a longer warm-up; and what
    one cache miss costs the generation loop beyond waiting for its read (miss_overhead_ms: admission, policy,
    checksum and I/O threads competing with onnxruntime for the cores), from the same tokens under a small budget
    without prefetch: (time - read stalls - resident time) / misses. Each figure is the median of repeated runs over
    about `seconds`: the planner predicts a typical run, and shared machines drift between runs."""
    import edge_moe
    from .bench.decode import decode_run
    from .budget import full_budget, minimum_budget

    model = edge_moe.load(model_dir, threads=threads, budget="100%", prefetch=1)
    c = model.config
    prompt = np.random.default_rng(0).integers(0, c["vocab_size"], 16).tolist()
    decode_run(model, prompt, 24)  # same greedy prompt: the measured runs then hit on every expert
    runs = _repeat(lambda: decode_run(model, prompt, 16), seconds, least=2)
    rates = {k: float(np.median([r[k] for r in runs]))
             for k in ("decode_tokens_per_second", "prefill_tokens_per_second", "total_seconds")}
    resident = rates["total_seconds"]  # the same 16 tokens the small-budget runs below make
    manifest = model.manifest
    model = None  # frees the resident experts before the small-budget model loads
    small = edge_moe.load(model_dir, threads=threads, prefetch=0,
                          budget=max(full_budget(manifest) // 4, 2 * minimum_budget(manifest)))
    small.generate(prompt, max_new_tokens=16)  # the cold start
    runs = _repeat(lambda: small.generate(prompt, max_new_tokens=16).stats, seconds / 2, least=3)
    overheads = []
    for before, s in zip(runs, runs[1:]):  # cache counters add up over the model's life: take deltas
        stall, misses = s["stall_seconds"] - before["stall_seconds"], s["misses"] - before["misses"]
        overheads.append((s["total_seconds"] - stall - resident) / max(1, misses))
    overhead = max(0.0, float(np.median(overheads)))
    return {"path": str(Path(model_dir).resolve()), "shape": f"{c['hidden_size']}x{c['moe_intermediate_size']}",
            "dtype": manifest.dtype, "moe_layers": len(c["moe_layers"]), "top_k": c["top_k"],
            "backbone_bytes": manifest.backbone_bytes,
            "decode_ms_per_token": round(1e3 / rates["decode_tokens_per_second"], 3),
            "prefill_ms_per_token": round(1e3 / rates["prefill_tokens_per_second"], 3),
            "miss_overhead_ms": round(overhead * 1e3, 4)}


def measure(model_dir: str | None = None, disk_dir: str | None = None) -> dict:
    """Measures this machine; returns a profile dict (validated by the caller's write_profile)."""
    from .manifest import Manifest
    from .sessions import configure_threads, default_threads

    cores = default_threads()
    threads = configure_threads(cores)
    manifest = Manifest.load(model_dir) if model_dir else None
    tmp = None
    if manifest is not None:
        target = str(max({r.blob for r in manifest.experts.values()}, key=lambda p: os.path.getsize(p)))
    else:  # no model: a scratch file on the disk to be measured
        tmp = tempfile.NamedTemporaryFile(dir=disk_dir or ".", delete=False)
        tmp.write(np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8).tobytes())
        tmp.close()
        target = tmp.name
    try:
        _step(f"disk: O_DIRECT sequential read of {target}")
        seq = ExpertStore.sequential_bandwidth(target, nbytes=512 << 20)
        _step(f"  {seq / 1e6:.0f} MB/s; 4 KiB random reads (QD1, 2 s)")
        rand = random_read_bandwidth(target)
        _step(f"  {rand / 1e6:.1f} MB/s")
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    _step("memory: numpy copy, onnxruntime weight streaming at one token, xxh3")
    from .bench.decode import weight_read_bandwidth

    dram, stream, hashing = memory_bandwidth(), weight_read_bandwidth(), hash_bandwidth()
    _step(f"  DRAM {dram / 1e9:.1f} GB/s, ORT weights {stream / 1e9:.1f} GB/s, xxh3 {hashing / 1e9:.1f} GB/s")
    c = manifest.config if manifest else {"hidden_size": 512, "moe_intermediate_size": 512}
    h, f = c["hidden_size"], c["moe_intermediate_size"]
    _step(f"experts {h}x{f}: token counts {TOKEN_COUNTS} per execution provider")
    experts = expert_times(h, f)
    _step(f"  {experts}")
    cpu_ms = experts.get("cpu", {}).get("m64")
    gflops = 2 * 64 * 3 * h * f / (cpu_ms / 1e3) / 1e9 if cpu_ms else 1.0
    measured = {"host": socket.gethostname(), "date": date.today().isoformat(), "threads": threads,
                "logical_cpus": os.cpu_count() or 1, "dram_copy_gb_s": round(dram / 1e9, 3),
                "weight_stream_gb_s": round(stream / 1e9, 3), "hash_gb_s": round(hashing / 1e9, 3),
                "expert_shape": f"{h}x{f}", "expert_ms": experts}
    if manifest is not None:
        _step("model: all-resident decode and prefill per token (loads every expert once)")
        measured["model"] = model_times(model_dir, threads)
        _step(f"  {measured['model']['decode_ms_per_token']} ms/token decode")
    vm = psutil.virtual_memory()
    accelerator = "cuda" if "cuda" in experts else "none"
    how = f"measured by edge-moe profile on {measured['host']}, {measured['date']}"
    return {
        "format_version": FORMAT_VERSION, "name": f"measured-{measured['host']}",
        "description": f"{platform.machine()} {platform.processor() or ''} {cores} cores (measured)".replace("  ", " "),
        "notes": "memory.usable_fraction is the share available when measured; the [measured] table feeds the planner",
        "memory": {"ram_gb": round(vm.total / 1e9, 3), "usable_fraction": round(vm.available / vm.total, 3),
                   "bandwidth_gb_s": round(dram / 1e9, 3)},
        "flash": {"kind": f"disk holding {target}", "seq_read_mb_s": round(seq / 1e6, 1),
                  "rand4k_read_mb_s": round(rand / 1e6, 2)},
        "cpu": {"name": platform.processor() or platform.machine(), "cores": cores, "gflops_fp32": round(gflops, 2),
                "isa": this_isa()},
        "accelerator": {"kind": accelerator, "memory_gb": 0.0},
        "sources": {"memory.ram_gb": f"psutil total, {how}", "memory.usable_fraction": f"psutil available/total, {how}",
                    "memory.bandwidth_gb_s": f"numpy copy of 256 MiB (read+write), {how}",
                    "flash.seq_read_mb_s": f"O_DIRECT 8 MiB reads, {how}",
                    "flash.rand4k_read_mb_s": f"O_DIRECT 4 KiB random reads at QD1 for 2 s, {how}",
                    "cpu.cores": f"physical cores (psutil), {how}",
                    "cpu.gflops_fp32": f"expert {h}x{f} at 64 tokens on the CPU EP, {how}",
                    "accelerator.memory_gb": "not measured (0: none or unknown)"},
        "measured": measured,
    }


def add_arguments(p) -> None:
    p.add_argument("--model", help="package directory: measure its disk, its expert shapes and its resident decode")
    p.add_argument("--dir", help="without --model: directory on the disk to measure (a 256 MiB scratch file)")
    p.add_argument("--out", help="write the profile here (.toml or .json, by extension); default: print it as TOML")


def run(args) -> int:
    from .profiles import check_profile_path, dumps

    if args.out:
        check_profile_path(args.out)  # before a minute of measuring
    start = time.perf_counter()
    data = measure(args.model, args.dir)
    if args.out:
        write_profile(data, args.out)
        _step(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    else:
        print(dumps(data))
    return 0
