"""`edge-moe plan`: predicts speed and memory of a model on a device profile from a cost model, and recommends
budget, policy, prefetch depth, bitwidth and device tier. Never runs the model at plan time.

Inputs: the manifest (expert and backbone bytes, shapes), the profile (flash, RAM, cores, memory bandwidth, and
what `edge-moe profile` measured) and routing statistics recorded once per model by `edge-moe plan --record`
(routing_stats.json next to the package: one decode's expert trace plus the next-layer predictor's precision and
recall). The residency policy is replayed on that trace (edge_moe.opt.simulate) to get the misses of every step.

Cost of one decode step (L = MoE layers, S = bytes per expert, k = experts per token):
    IO  = sum over misses (read latency + S / flash bandwidth) + wasted prefetch reads
    C   = resident per-token compute (measured for this model on this profile, else weight bytes / (0.6 x DRAM bw))
          + (misses + wasted prefetches) x the CPU cost of a miss (measured by `edge-moe profile` on this model's
            shapes: admission, policy, checksum, I/O threads contending with onnxruntime; else S / hash bandwidth)
    per MoE layer visit: stall = read time - min(recall x read time, prefetch depth x C / L)
    t = max(IO, C + stalls)    (a prefetched read hides behind at most the compute of the layers it was issued ahead)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .budget import expert_footprint, full_budget, minimum_budget, record_footprint
from .emulate import RUNTIME_OVERHEAD, profile_budget
from .errors import EdgeMoeError
from .experts import expert_shape
from .files import write_text_atomic
from .manifest import Manifest
from .opt import simulate
from .profiles import DeviceProfile, load_profile
from .quant import resident_extra_bytes

STATS_FILE = "routing_stats.json"
BITS_SCALE = {32: 1.0, 16: 0.5, 8: 0.28, 4: 0.156, 2: 0.094}  # expert bytes against fp32 (MatMulNBits block 32)
STREAM_EFFICIENCY = 0.6  # share of DRAM bandwidth a 1-row product streams weights at (used without a measurement)
HASH_BANDWIDTH = 10e9  # xxh3 bytes/s without a measurement
# Per MoE layer, what decode spends outside streaming weights (Python, routing, session calls) without a measurement:
# the default model's resident decode on our 2-core x86 VM (46.6 GFLOPS a core in `edge-moe profile`) is 6.3 ms a
# token against 0.6 ms of weight streaming over 8 layers. Scaled by a core's speed on other devices.
LAYER_GLUE_S, GLUE_REF_GFLOPS_PER_CORE = 0.7e-3, 46.6


def record_routing(model_dir, prompt_tokens: int = 16, tokens: int = 128, seed: int = 1, out=None,
                   progress: bool = False) -> Path:
    """Runs the model once (all experts fit) and writes its routing statistics for the planner.

    Returns:
        The path written (default: routing_stats.json in the package directory).
    """
    import edge_moe

    model = edge_moe.load(model_dir, budget="100%", trace=True, prefetch=1)
    prompt = np.random.default_rng(seed).integers(0, model.config["vocab_size"], prompt_tokens).tolist()
    from tqdm import tqdm

    for _ in tqdm(model.stream_generate(prompt, max_new_tokens=tokens), total=tokens, unit="tok",
                  desc="record routing", disable=not progress):
        pass
    steps: dict[int, list] = {}
    for t in model.trace:
        steps.setdefault(t["step"], []).append([t["layer"], t["experts"]])
    stats = {"format_version": 1, "prompt_tokens": prompt_tokens, "tokens": tokens, "seed": seed,
             "prefetch_precision": model.predictor.precision, "prefetch_recall": model.predictor.recall,
             "steps": [steps[s] for s in sorted(steps)]}
    path = Path(out) if out else Path(model_dir) / STATS_FILE
    return write_text_atomic(path, json.dumps(stats))


def load_routing(model_dir, path=None) -> dict:
    """routing_stats.json (written by `edge-moe plan --record`). Raises EdgeMoeError naming the fix."""
    path = Path(path) if path else Path(model_dir) / STATS_FILE
    if not path.is_file():
        raise EdgeMoeError(f"{path}: no routing statistics; record them once with "
                           f"`edge-moe plan --model {model_dir} --record` (runs the model for about a minute)")
    try:
        stats = json.loads(path.read_text())
        if stats.get("format_version") != 1 or not stats["steps"]:
            raise ValueError("format_version must be 1 and steps non-empty")
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgeMoeError(f"{path}: unreadable routing statistics ({exc}); record them again with --record") from None
    return stats


def compute_costs(manifest: Manifest, profile: DeviceProfile) -> dict:
    """Per-token resident compute (s), per-expert compute (s), prefill (s/token) and hash bandwidth for this model on
    this profile: measured figures when the profile has them for this model's shapes, else the roofline."""
    c = manifest.config
    m = profile.measured or {}
    mean_expert = manifest.expert_bytes / max(len(manifest.experts), 1)
    embed = c["vocab_size"] * c["hidden_size"] * (2 if manifest.dtype == "float16" else 4)
    backbone = manifest.backbone_bytes - (0 if c.get("tie_word_embeddings") else embed)
    per_token_bytes = backbone + c["top_k"] * len(c["moe_layers"]) * mean_expert
    model = m.get("model", {})
    shape = f"{c['hidden_size']}x{c['moe_intermediate_size']}"
    same_shape = model.get("shape") == shape and model.get("moe_layers") and model.get("dtype") == manifest.dtype
    stream = m.get("weight_stream_gb_s", 0) * 1e9 or profile.memory_bandwidth * STREAM_EFFICIENCY
    if same_shape:  # per MoE layer costs measured on a model of the same layer shapes: scale to this depth
        per_layer = model["decode_ms_per_token"] / 1e3 / model["moe_layers"]
        decode = per_layer * len(c["moe_layers"])
        prefill = model["prefill_ms_per_token"] / 1e3 / model["moe_layers"] * len(c["moe_layers"])
        source = f"measured on this model's shapes ({m.get('host', 'profiled machine')})"
    else:
        # the weights a token streams, plus the runtime's per-layer glue (Python, routing, small session calls),
        # which scales with one core's speed rather than with bandwidth
        glue = len(c["moe_layers"]) * LAYER_GLUE_S * GLUE_REF_GFLOPS_PER_CORE / (profile.cpu_flops / 1e9 / profile.cores)
        decode = per_token_bytes / stream + glue
        flops = 2 * per_token_bytes / (2 if manifest.dtype == "float16" else 4)
        prefill = max(flops / profile.cpu_flops, decode / 16)  # big batches: compute, not bandwidth, bound
        source = (f"roofline: {per_token_bytes / 1e6:.0f} MB/token at {stream / 1e9:.1f} GB/s + "
                  f"{glue * 1e3:.1f} ms of per-layer glue")
    expert_ms = (m.get("expert_ms", {}).get("cpu", {}).get("m1") if m.get("expert_shape") == shape else None)
    expert_s = expert_ms / 1e3 if expert_ms else mean_expert / stream
    hashing = m.get("hash_gb_s", 0) * 1e9 or HASH_BANDWIDTH
    # what a miss costs the compute side: measured on this model's shapes, else its checksum
    miss_s = model["miss_overhead_ms"] / 1e3 if same_shape and "miss_overhead_ms" in model else mean_expert / hashing
    return {"decode_s": decode, "prefill_s_per_token": prefill, "expert_bytes": mean_expert,
            "expert_compute_s": min(c["top_k"] * len(c["moe_layers"]) * expert_s, decode),
            "hash_bandwidth": hashing, "miss_compute_s": miss_s, "source": source,
            "weight_bytes_per_token": per_token_bytes}


def package_bits(manifest: Manifest) -> int:
    """The experts' width as packaged (the most common among them): what a what-if bitwidth scales from. A quantized
    package's manifest dtype is its float backbone's, not its experts'."""
    widths = [expert_shape(r).bits for r in manifest.experts.values()]
    return max(set(widths), key=widths.count) if widths else (32 if manifest.dtype == "float32" else 16)


def resident_footprint(record, bits: int | None, scale: float, profile: DeviceProfile) -> int:
    """What a resident expert costs on the profile's device: its page-rounded read buffer (its bytes scaled to the
    what-if `bits`), plus what edge_moe.quant says a quantized expert holds beside it where edge_moe's kernels do not
    read it there (a MatMulNBits session, or float32 weights for a small one): on an arm64 board a 4-bit expert
    costs several times its bytes."""
    if bits is None:
        return record_footprint(record, True, profile.has_kernels)
    buffer = expert_footprint(int(record.length * scale))
    if bits >= 16:
        return buffer  # a float expert is its buffer
    shape = replace(expert_shape(record), dtype=f"q{bits}", block_size=record.block_size or 32)  # BITS_SCALE's 32
    return buffer + resident_extra_bytes(shape, True, profile.has_kernels)


def predict(manifest: Manifest, stats: dict, profile: DeviceProfile, *, budget: int | None = None,
            policy: str = "adaptive", prefetch: int = 1, bits: int | None = None, tokens: int | None = None,
            flash_scale: float = 1.0, compute_scale: float = 1.0) -> dict:
    """Predicted prefill and decode tokens/s, peak memory and bytes read per token.

    Args:
        budget: expert budget in bytes (default: what the profile's RAM allows, see emulate.profile_budget).
        policy: residency policy replayed on the recorded trace.
        prefetch: 0 (off) or the depth of speculative reads (how many layers of compute a read can hide behind).
        bits: expert bitwidth to assume (None: as packaged).
        tokens: generated tokens to predict for (default: all recorded); the first comes from prefill.
        flash_scale, compute_scale: what-if multipliers (the bottleneck analysis doubles each resource).

    Raises:
        EdgeMoeError: budget below one layer's top-k experts; no routing steps.
    """
    scale = BITS_SCALE[bits] / BITS_SCALE[package_bits(manifest)] if bits else 1.0
    costs = compute_costs(manifest, profile)
    budget = profile_budget(profile, manifest, profile.has_kernels) if budget is None else int(budget)
    sizes = {k: resident_footprint(r, bits, scale, profile) for k, r in manifest.experts.items()}
    budget = min(budget, sum(sizes.values()))
    steps = stats["steps"][: (tokens or len(stats["steps"]))]
    trace = [[(layer, e) for e in experts] for step in steps for layer, experts in step]
    per_visit = [len(step) for step in steps]
    first = max(sum(sizes[k] for k in set(visit)) for visit in trace[:len(steps[0])])
    if first > budget:  # the runtime, too, must hold all of a layer's prompt experts at once
        raise EdgeMoeError(f"the {stats['prompt_tokens']}-token prompt routes {first / 1e6:.0f} MB of experts through "
                           f"one layer, over the {budget / 1e6:.0f} MB expert budget; give a larger device or budget")
    flags = simulate(policy, trace, sizes, budget).hit_flags
    S = costs["expert_bytes"] * scale
    read_s = profile.read_seconds(int(S)) / flash_scale
    k = manifest.config["top_k"]
    precision, recall = (stats["prefetch_precision"], stats["prefetch_recall"]) if prefetch else (1.0, 0.0)
    not_resident = 1.0 - budget / sum(sizes.values())
    # decode streams expert weights from DRAM: their compute shrinks with their bytes, the backbone's does not
    resident = costs["decode_s"] - costs["expert_compute_s"] * (1 - scale)
    miss_s = costs["miss_compute_s"] if scale == 1.0 else S / costs["hash_bandwidth"]
    # a layer's predicted reads start when the layer `prefetch` ahead of it routes: they can hide behind at most
    # that much compute, and the rest of each read is a stall (slow flash: most of it)
    lead = prefetch * resident / compute_scale / max(1, len(manifest.config["moe_layers"]))
    times, reads, pos, visit = [], [], 0, 0
    for n_layers in per_visit:
        loaded = io = stall = 0.0
        for layer_keys in trace[visit:visit + n_layers]:
            n = len(layer_keys)
            misses = n - sum(flags[pos:pos + n])
            pos += n
            wasted = k * (1 - precision) * not_resident if prefetch else 0.0
            read = (misses + wasted) * read_s
            loaded, io = loaded + misses + wasted, io + read
            stall += read - min(recall * read, lead)
        visit += n_layers
        compute = (resident + loaded * miss_s) / compute_scale
        times.append(max(io, compute + stall))  # the flash cannot deliver faster than io either way
        reads.append(loaded * S)
    prompt = stats["prompt_tokens"]
    prefill = prompt * costs["prefill_s_per_token"] / compute_scale + times[0] - costs["decode_s"] / compute_scale
    decode_t = sum(times[1:]) or 1e-12
    return {"decode_tokens_per_second": (len(times) - 1) / decode_t,
            "prefill_tokens_per_second": prompt / max(prefill, 1e-12),
            "bytes_read_per_token": float(np.mean(reads[1:])) if len(reads) > 1 else 0.0,
            "hit_rate": float(np.mean(flags)) if flags else 1.0, "budget_bytes": budget,
            "peak_memory_bytes": manifest.backbone_bytes + budget + RUNTIME_OVERHEAD,
            "io_seconds_per_token": float(np.mean([(r / S) * read_s for r in reads[1:]])) if len(reads) > 1 else 0.0,
            "compute_seconds_per_token": costs["decode_s"] / compute_scale, "compute_source": costs["source"],
            "policy": policy, "prefetch": prefetch, "bits": bits or package_bits(manifest)}


def plan(manifest: Manifest, stats: dict, profile: DeviceProfile, tokens: int | None = None) -> dict:
    """Recommendations (budget, policy, prefetch, bits, tier) with the prediction and the bottleneck.

    Raises:
        EdgeMoeError: the model cannot run within the profile's RAM.
    """
    built = profile.has_kernels  # experts cost what they would there (cpu.isa), not what they cost here
    budget = profile_budget(profile, manifest, built)
    runs = {p: predict(manifest, stats, profile, budget=budget, policy=p, tokens=tokens)
            for p in ("lru", "lfu", "adaptive")}
    policy = max(runs, key=lambda p: (runs[p]["decode_tokens_per_second"], p == "adaptive"))
    off = predict(manifest, stats, profile, budget=budget, policy=policy, prefetch=0, tokens=tokens)
    best = runs[policy] if runs[policy]["decode_tokens_per_second"] >= off["decode_tokens_per_second"] else off
    base = best["decode_tokens_per_second"]
    what_if = {
        "flash bandwidth": predict(manifest, stats, profile, budget=budget, policy=policy, prefetch=best["prefetch"],
                                   tokens=tokens, flash_scale=2.0),
        "RAM": predict(manifest, stats, profile, budget=min(2 * budget, full_budget(manifest, True, built)),
                       policy=policy, prefetch=best["prefetch"], tokens=tokens),
        "compute (CPU / memory bandwidth)": predict(manifest, stats, profile, budget=budget, policy=policy,
                                                    prefetch=best["prefetch"], tokens=tokens, compute_scale=2.0),
    }
    gains = {name: r["decode_tokens_per_second"] / base for name, r in what_if.items()}
    bottleneck = max(gains, key=gains.get)
    native = 32 if manifest.dtype == "float32" else 16
    by_bits = {}
    for bits in (b for b in (32, 16, 8, 4) if b <= native):
        room = profile.usable_ram_bytes - manifest.backbone_bytes - RUNTIME_OVERHEAD
        by_bits[bits] = predict(manifest, stats, profile, budget=max(room, minimum_budget(manifest, True, built)),
                                policy=policy, prefetch=best["prefetch"], bits=bits,
                                tokens=tokens)["decode_tokens_per_second"]
    top = max(by_bits.values())
    bits = max(b for b, v in by_bits.items() if v >= 0.9 * top)
    fits = budget >= full_budget(manifest, True, built)
    if profile.accelerator_bytes >= manifest.expert_bytes + manifest.backbone_bytes:
        tier = "accelerator: the whole model fits in its memory"
    elif profile.accelerator_bytes > 0:
        tier = "accelerator for the backbone and hot experts, CPU for cold ones (an upload costs more than a CPU decode)"
    else:
        tier = "CPU" + (" (the accelerator shares RAM: no memory to gain)" if profile.accelerator != "none" else "")
    return {"profile": profile.name, "budget_bytes": budget, "fits_in_ram": fits, "policy": policy,
            "prefetch": best["prefetch"], "bits": bits, "bits_tokens_per_second": by_bits, "tier": tier,
            "prediction": best, "bottleneck": bottleneck, "gain_if_doubled": gains, "policies": {
                p: r["decode_tokens_per_second"] for p, r in runs.items()}}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="package directory, or 'default' (the model that ships with "
                                                   "edge_moe)")
    p.add_argument("--profile", help="shipped profile name or profile file (see profiles/README.md)")
    p.add_argument("--record", action="store_true", help="run the model once to write routing_stats.json, then exit")
    p.add_argument("--routing", metavar="FILE", help="routing statistics (default: MODEL/routing_stats.json)")
    p.add_argument("--tokens", type=int, help="generated tokens to predict for (default: all recorded)")
    p.add_argument("--host", metavar="PROFILE", help="predict `--emulate PROFILE` on this host: compute from this "
                   "(measured) profile, flash/RAM/cores from --profile")
    p.add_argument("--json", metavar="OUT", help="also write the plan as JSON")


def emulated_profile(profile: DeviceProfile, host: DeviceProfile) -> DeviceProfile:
    """What `--emulate profile` gives on `host`: the profile's RAM and flash, the host's compute measurements."""
    from dataclasses import replace

    return replace(profile, measured=host.measured, memory_bandwidth=host.memory_bandwidth, cpu_flops=host.cpu_flops,
                   flash_seq_read=min(profile.flash_seq_read, host.flash_seq_read))


def run(args) -> int:
    from .bench.report import write_json

    if args.record:
        print(f"wrote {record_routing(args.model)}")
        return 0
    if not args.profile:
        raise EdgeMoeError("give --profile NAME_OR_FILE (or --record to write routing statistics first)")
    manifest = Manifest.load(args.model)
    profile = load_profile(args.profile)
    if args.host:
        profile = emulated_profile(profile, load_profile(args.host))
    if not args.routing and not (Path(args.model) / STATS_FILE).is_file():
        print(f"edge-moe: first plan for {manifest.root.name}: recording its routing once "
              f"({STATS_FILE}, reused afterwards)", file=sys.stderr)
        record_routing(args.model, progress=True)
    result = plan(manifest, load_routing(args.model, args.routing), profile, tokens=args.tokens)
    p = result["prediction"]
    print(f"plan for {manifest.root.name} on {profile.name} ({profile.description})")
    print(f"  predicted decode   {p['decode_tokens_per_second']:.2f} tok/s   prefill {p['prefill_tokens_per_second']:.1f} tok/s")
    print(f"  peak memory        {p['peak_memory_bytes'] / 1e9:.2f} GB of {profile.usable_ram_bytes / 1e9:.2f} GB usable")
    print(f"  flash per token    {p['bytes_read_per_token'] / 1e6:.1f} MB   (hit rate {p['hit_rate']:.1%}, "
          f"I/O {p['io_seconds_per_token'] * 1e3:.1f} ms vs compute {p['compute_seconds_per_token'] * 1e3:.1f} ms/token;"
          f" compute {p['compute_source']})")
    print(f"  recommend          budget {result['budget_bytes'] / 1e9:.2f} GB"
          f"{' (all experts fit)' if result['fits_in_ram'] else ''}, policy {result['policy']}, "
          f"prefetch {result['prefetch']}, {result['bits']}-bit experts, tier: {result['tier']}")
    gains = ", ".join(f"{k} x{v:.2f}" for k, v in result["gain_if_doubled"].items())
    print(f"  bottleneck         {result['bottleneck']} (decode speed if each resource doubled: {gains})")
    bits = ", ".join(f"{b}-bit {v:.2f}" for b, v in result["bits_tokens_per_second"].items())
    print(f"  by bitwidth        {bits} tok/s (4/8-bit assume a quantized export)")
    if args.json:
        write_json(args.json, result)
    return 0
