"""Decode under a real memory cgroup (page cache counted) with budget="auto": what the auto budget came to and the
speed. `python docs/bench/cgroup_auto.py PACKAGE LIMIT_MiB [TOKENS]` (needs permission to create a cgroup)."""
import sys

import numpy as np

from edge_moe.emulate import memory_limit
from edge_moe.telemetry import peak_rss_bytes

path, limit_mib = sys.argv[1], int(sys.argv[2])
tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 48
with memory_limit(limit_mib * 2**20) as limit:
    if not limit.real:
        sys.exit(f"no cgroup: {limit.reason}")
    import edge_moe

    try:
        model = edge_moe.load(path, budget="auto", threads=1)
    except edge_moe.EdgeMoeError as exc:
        sys.exit(f"{path} at {limit_mib} MiB: {exc}")
    prompt = np.random.default_rng(0).integers(2, model.config["vocab_size"], 16).tolist()
    stats = model.generate(prompt, max_new_tokens=tokens, temperature=0.8, seed=0).stats
    print(f"{path} under {limit_mib} MiB: budget {model.budget / 2**20:.1f} MiB ({model.budget_note}); "
          f"baseline {stats['rss_baseline_bytes'] / 2**20:.0f} MiB, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB; "
          f"decode {stats['decode_tokens_per_second']:.2f} tok/s, prefill {stats['prefill_tokens_per_second']:.1f}")
    model.close()
