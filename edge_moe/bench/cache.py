"""`edge-moe bench --budgets ... --policies ...`: the budgeted cache against OPT, the flash and the baselines.

Every configuration runs in its own process (bench/worker.py) on the same prompt and sampling seed, so every
configuration generates the same tokens and routes the same way; OPT (Belady) is computed on that recorded trace.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np

from ..budget import full_budget, parse_budget, record_footprint
from ..errors import EdgeMoeError
from ..manifest import Manifest
from ..opt import KnownFrequencyLFU, belady, simulate
from ..policies import POLICIES
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


def _raw_bandwidth_probe(manifest: Manifest, emulate: str | None):
    """A callable measuring the raw O_DIRECT sequential bandwidth now, on the next blob in turn: the disk of a VM or
    a phone changes speed within minutes (burst credits, thermal), so every run is set against a measurement
    taken just before it, and cycling through the blobs keeps a host-side cache of one file from flattering it."""
    blobs = sorted({r.blob for r in manifest.experts.values()}, key=lambda p: (-p.stat().st_size, str(p)))
    large = [b for b in blobs if b.stat().st_size >= 8 << 20] or blobs[:1]
    turn = itertools.cycle(large)
    cap = None
    if emulate:  # the emulated device's flash is the bandwidth that bounds it (the throttle cannot go faster)
        from ..profiles import load_profile

        cap = load_profile(emulate).flash_seq_read
    return lambda: min(ExpertStore.sequential_bandwidth(str(next(turn))), cap or float("inf"))


def _configs(args, manifest: Manifest) -> list[tuple[str, int | None, dict]]:
    configs = [("all-resident", None, {}), ("no-cache", None, {"baseline": "no-cache"}),
               ("mmap", None, {"baseline": "mmap"})]
    policies = args.policies.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise EdgeMoeError(f"--policies: {unknown[0]!r} is not a policy; choose from {', '.join(POLICIES)}")
    for text in args.budgets.split(","):
        budget = parse_budget(text.strip(), manifest)
        configs.append((f"lru no-prefetch @{text}", budget, {"budget": budget, "policy": "lru", "prefetch": 0}))
        configs += [(f"{p} @{text}", budget, {"budget": budget, "policy": p, "prefetch": args.prefetch})
                    for p in policies]
    return configs


def _median(values):
    return float(np.median(values))


def cache_rows(args, manifest: Manifest, prompt: list[int]) -> dict:
    """Runs every configuration `args.rounds` times, round after round (so the machine's drift spreads over all of
    them), and reports medians; ratios (against LRU without prefetch, no cache, the floor) are taken within a
    round before the median."""
    model = str(manifest.root)
    sizes = {key: record_footprint(r) for key, r in manifest.experts.items()}
    mean_size = float(np.mean(list(sizes.values())))
    emulate = getattr(args, "emulate", None)
    rounds = max(1, getattr(args, "rounds", 1))
    raw_probe = _raw_bandwidth_probe(manifest, emulate)
    configs = _configs(args, manifest)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    results = {"rounds": rounds, "configs": []}
    for r in range(rounds):
        for name, _, load in configs:
            print(f"  round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            raw = raw_probe()
            # Under --emulate every configuration but the all-resident reference runs under the profile's RAM.
            limited = bool(emulate) and name != "all-resident"
            out = run_worker(model, {"threads": args.threads, **load}, prompt, args.tokens, args.seed,
                             args.temperature, emulate, memory_limit=limited)
            if limited:
                results["emulation"] = out["emulation"]
            out["raw_bandwidth"] = raw
            runs[name].append(out)
    resident = runs["all-resident"][0]
    trace = resident["trace"]
    decode_mask_all = [e["step"] > 1 for e in trace for _ in e["experts"]]
    decode_tokens = max(args.tokens - 1, 1)
    # budget text -> bytes, and per budget bytes the trace as OPT's steps, OPT's hit flags, decode mask and bytes
    budgets = {name.split(" @")[1]: b for name, b, _ in configs if b is not None}
    opt_by_budget = {}
    for budget in set(budgets.values()):
        steps, mask = opt_steps(trace, sizes, budget)
        opt = belady(steps, sizes, budget)
        opt_by_budget[budget] = (steps, opt.hit_flags, mask, _decode_misses(opt.hit_flags, mask) * mean_size
                                 / decode_tokens)

    def run_row(name: str, budget: int | None, out: dict) -> dict:
        s = out["stats"]
        if out["token_ids"] != resident["token_ids"]:
            raise EdgeMoeError(f"{name}: generated different tokens than all-resident; this is a bug, please report")
        hit = decode_hit_rate([h for e in out["trace"] for h in e["hit"]], decode_mask_all)
        opt_hit = decode_hit_rate(*opt_by_budget[budget][1:3]) if budget is not None else None
        busy = s.get("read_busy_seconds") or 0.0
        throughput = s["bytes_read"] / busy if busy else 0.0
        rss_over = s["peak_rss_bytes"] - s["rss_baseline_bytes"]
        limit = budget + s["kv_cache_bytes"] + 64 * 2**20 if budget is not None else None
        return {"config": name, "budget_MiB": budget / 2**20 if budget else "",
                "decode_tok_s": s["decode_tokens_per_second"], "prefill_tok_s": s["prefill_tokens_per_second"],
                "hit": hit, "opt_hit": opt_hit if opt_hit is not None else "",
                "hit/opt": hit / opt_hit if opt_hit else "",
                "read_MiB_per_tok": s["bytes_read"] / 2**20 / (args.tokens + len(prompt)),
                "disk_MiB_per_tok": s["disk_read_bytes"] / 2**20 / (args.tokens + len(prompt)),
                "read_GB_s": throughput / 1e9, "raw_GB_s": out["raw_bandwidth"] / 1e9,
                "of_raw": throughput / out["raw_bandwidth"],
                "stall_s": s.get("stall_seconds", 0.0), "rss_over_base_MiB": rss_over / 2**20,
                "rss_ok": "" if limit is None else ("yes" if rss_over <= limit else "NO")}

    rows = []
    for name, budget, _ in configs:
        per_run = [run_row(name, budget, out) for out in runs[name]]
        row = {k: (_median([p[k] for p in per_run]) if isinstance(v, float) else v)
               for k, v in per_run[0].items()}
        if budget is not None:
            row["rss_ok"] = "yes" if all(p["rss_ok"] == "yes" for p in per_run) else "NO"
        if name == "mmap":
            limited = any(line.strip().startswith("process memory real") for line in runs[name][0].get("emulation", []))
            row["config"] = "mmap" + (" (page cache limited)" if limited else " (page cache unlimited)")
        rows.append(row)
        results["configs"].append({"name": row["config"], "budget_bytes": budget, **row, "runs": per_run,
                                   "stats": [out["stats"] for out in runs[name]]})
    results["rows"] = rows
    results["floors"], results["targets"] = _floors_and_targets(budgets, configs, runs, opt_by_budget)
    results["replay"] = _demand_replay(args.policies, budgets, sizes, mean_size / decode_tokens, opt_by_budget)
    results["raw_sequential_bandwidth"] = _median([out["raw_bandwidth"] for rs in runs.values() for out in rs])
    results["expert_bytes"] = full_budget(manifest)
    return results


def _floors_and_targets(budgets, configs, runs, opt_by_budget) -> tuple[list[dict], list[dict]]:
    """Per budget, the floor max(all-resident decode time, OPT's decode reads / raw bandwidth) per token, each
    round's own (its all-resident run, the raw bandwidth measured before the run in question); and per policy the
    issue's speed ratios, each taken within a round, medians over rounds."""
    tok_s = {name: [out["stats"]["decode_tokens_per_second"] for out in rs] for name, rs in runs.items()}
    floors, targets = [], []
    for text, budget in budgets.items():
        names = [name for name, _, _ in configs if name.endswith(f" @{text}")]
        _, flags, mask, opt_bytes = opt_by_budget[budget]

        def floor_seconds(name, r):
            return max(1 / tok_s["all-resident"][r], opt_bytes / runs[name][r]["raw_bandwidth"])

        row = {"budget": text, "opt_decode_hit": decode_hit_rate(flags, mask), "opt_MiB_per_tok": opt_bytes / 2**20,
               "floor_tok_s": _median([1 / floor_seconds(n, r) for n in names for r in range(len(runs[n]))])}
        for name in names:
            row[f"{name.split(' @')[0]}_of_floor"] = _median(
                [tok_s[name][r] * floor_seconds(name, r) for r in range(len(runs[name]))])
        floors.append(row)
        baseline = f"lru no-prefetch @{text}"
        for name in names[1:]:
            rounds = range(len(runs[name]))
            targets.append({
                "config": name,
                "vs_lru_no_prefetch": _median([tok_s[name][r] / tok_s[baseline][r] for r in rounds]),
                "vs_no_cache": _median([tok_s[name][r] / tok_s["no-cache"][r] for r in rounds]),
                "of_floor": row[f"{name.split(' @')[0]}_of_floor"],
                "per_round_vs_lru": " ".join(f"{tok_s[name][r] / tok_s[baseline][r]:.2f}" for r in rounds)})
    return floors, targets


def _demand_replay(policy_names: str, budgets, sizes, bytes_per_decode_miss, opt_by_budget) -> list[dict]:
    """The recorded trace replayed offline without prefetch: MiB a decoded token must read under each policy, under
    LFU knowing every expert's frequency over the whole trace in advance, and under OPT. What no online policy can
    read less than, roughly, is between the best policy and the known-frequency LFU; OPT also knows the order."""
    rows = []
    for text, budget in budgets.items():
        steps, _, mask, opt_bytes = opt_by_budget[budget]
        policies = {p: p for p in dict.fromkeys(["lru"] + policy_names.split(","))}
        policies["lfu-known-frequencies"] = KnownFrequencyLFU(steps)
        row = {"budget": text}
        for name, policy in policies.items():
            flags = simulate(policy, steps, sizes, budget).hit_flags
            row[f"{name}_MiB_per_tok"] = _decode_misses(flags, mask) * bytes_per_decode_miss / 2**20
        row["opt_MiB_per_tok"] = opt_bytes / 2**20
        rows.append(row)
    return rows


def _decode_misses(flags, mask) -> int:
    return sum(1 for f, d in zip(flags, mask) if d and not f)
