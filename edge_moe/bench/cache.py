"""`edge-moe bench --budgets ... --policies ...`: the budgeted cache against OPT, the flash and the baselines.

Every configuration runs in its own process (bench/worker.py) on the same prompt and sampling seed, so every
configuration generates the same tokens and routes the same way; OPT (Belady) is computed on that recorded trace.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from ..budget import full_budget, parse_budget, record_footprint
from ..errors import EdgeMoeError
from ..manifest import Manifest
from ..opt import belady
from ..store import ExpertStore


def run_worker(model: str, load: dict, prompt: list[int], tokens: int, seed: int, temperature: float,
               emulate: str | None = None, memory_limit: bool = False) -> dict:
    config = {"model": model, "load": load, "prompt": prompt, "tokens": tokens, "seed": seed,
              "temperature": temperature, "emulate": emulate, "memory_limit": memory_limit}
    done = subprocess.run([sys.executable, "-m", "edge_moe.bench.worker", json.dumps(config)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeMoeError(f"benchmark configuration {load} failed: {tail}")
    return json.loads(done.stdout)


def opt_steps(trace: list[dict], sizes: dict, capacity: int) -> tuple[list[list], list[bool]]:
    """The trace as OPT's steps; a prefill layer needing more than the budget is split into single experts, as
    the runtime reads it. Returns (steps, decode flag per access)."""
    steps, decode = [], []
    for entry in trace:
        keys = [(entry["layer"], e) for e in entry["experts"]]
        groups = [keys] if sum(sizes[k] for k in keys) <= capacity else [[k] for k in keys]
        for group in groups:
            steps.append(group)
            decode += [entry["step"] > 1] * len(group)
    return steps, decode


def decode_hit_rate(flags, decode_mask) -> float:
    picked = [f for f, d in zip(flags, decode_mask) if d]
    return sum(picked) / len(picked) if picked else 0.0


def cache_rows(args, manifest: Manifest, prompt: list[int]) -> dict:
    model = str(manifest.root)
    sizes = {key: record_footprint(r) for key, r in manifest.experts.items()}
    largest_blob = max({r.blob for r in manifest.experts.values()}, key=lambda p: p.stat().st_size)
    raw_bandwidth = ExpertStore.sequential_bandwidth(str(largest_blob))
    emulate = getattr(args, "emulate", None)
    if emulate:  # the emulated device's flash is the bandwidth that bounds it (the throttle cannot go faster)
        from ..profiles import load_profile

        raw_bandwidth = min(raw_bandwidth, load_profile(emulate).flash_seq_read)
    common = dict(threads=args.threads)

    def measure(name: str, load: dict) -> dict:
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        # Under --emulate every configuration but the all-resident reference runs under the profile's RAM.
        limited = bool(emulate) and name != "all-resident"
        out = run_worker(model, {**common, **load}, prompt, args.tokens, args.seed, args.temperature, emulate,
                         memory_limit=limited)
        if limited:
            results["emulation"] = out["emulation"]
        return out

    results = {"raw_sequential_bandwidth": raw_bandwidth, "configs": []}
    resident = measure("all-resident", {})
    trace = resident["trace"]
    decode_mask_all = [e["step"] > 1 for e in trace for _ in e["experts"]]
    decode_tokens = max(args.tokens - 1, 1)
    rows = []

    def add(name: str, budget: int | None, out: dict, opt_flags=None, opt_mask=None) -> None:
        s = out["stats"]
        if out["token_ids"] != resident["token_ids"]:
            raise EdgeMoeError(f"{name}: generated different tokens than all-resident; this is a bug, please report")
        hit = decode_hit_rate([h for e in out["trace"] for h in e["hit"]], decode_mask_all)
        opt_hit = decode_hit_rate(opt_flags, opt_mask) if opt_flags is not None else None
        busy = s.get("read_busy_seconds") or 0.0
        throughput = s["bytes_read"] / busy if busy else 0.0
        rss_over = s["peak_rss_bytes"] - s["rss_baseline_bytes"]
        limit = budget + s["kv_cache_bytes"] + 64 * 2**20 if budget is not None else None
        row = {"config": name, "budget_MiB": budget / 2**20 if budget else "",
               "decode_tok_s": s["decode_tokens_per_second"], "prefill_tok_s": s["prefill_tokens_per_second"],
               "hit": hit, "opt_hit": opt_hit if opt_hit is not None else "",
               "hit/opt": hit / opt_hit if opt_hit else "",
               "read_MiB_per_tok": s["bytes_read"] / 2**20 / (args.tokens + len(prompt)),
               "disk_MiB_per_tok": s["disk_read_bytes"] / 2**20 / (args.tokens + len(prompt)),
               "read_GB_s": throughput / 1e9, "of_raw": throughput / raw_bandwidth,
               "stall_s": s.get("stall_seconds", 0.0), "rss_over_base_MiB": rss_over / 2**20,
               "rss_ok": "" if limit is None else ("yes" if rss_over <= limit else "NO")}
        rows.append(row)
        results["configs"].append({"name": name, "budget_bytes": budget, **row, "stats": s})

    add("all-resident", None, resident)
    add("no-cache", None, measure("no-cache", {"baseline": "no-cache"}))
    mmap = measure("mmap", {"baseline": "mmap"})
    limited = any(line.strip().startswith("process memory real") for line in mmap.get("emulation", []))
    add("mmap" + (" (page cache limited)" if limited else " (page cache unlimited)"), None, mmap)
    for text in args.budgets.split(","):
        budget = parse_budget(text.strip(), manifest)
        steps, mask = opt_steps(trace, sizes, budget)
        opt = belady(steps, sizes, budget)
        opt_misses = sum(1 for f, d in zip(opt.hit_flags, mask) if d and not f)
        floor_seconds = max(1 / resident["stats"]["decode_tokens_per_second"],
                            opt_misses / decode_tokens * np.mean(list(sizes.values())) / raw_bandwidth)
        results.setdefault("floors", []).append({
            "budget": text, "opt_decode_hit": decode_hit_rate(opt.hit_flags, mask),
            "opt_MiB_per_tok": opt_misses / decode_tokens * np.mean(list(sizes.values())) / 2**20,
            "floor_tok_s": 1 / floor_seconds})
        configs = [(f"lru no-prefetch @{text}", {"budget": budget, "policy": "lru", "prefetch": 0})]
        configs += [(f"{p} @{text}", {"budget": budget, "policy": p, "prefetch": args.prefetch})
                    for p in args.policies.split(",")]
        for name, load in configs:
            add(name, budget, measure(name, load), opt.hit_flags, mask)
            results["floors"][-1][f"{name.split(' @')[0]}_of_floor"] = rows[-1]["decode_tok_s"] * floor_seconds
    results["rows"] = rows
    results["expert_bytes"] = full_budget(manifest)
    return results
