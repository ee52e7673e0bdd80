"""`edge-moe soak`: a long generation under a budget with RSS sampled, to show memory stays flat.

Tokens are generated in windows that fit the model's context (a fresh prompt and KV cache per window, sampled
with a seed per window, so the experts used keep changing); RSS is sampled every --every tokens. The goal is RSS
flat within 2 % after warm-up (the first sample): a leak in the cache, the store's buffers or the sessions would
grow it step by step.
"""

from __future__ import annotations

import time

import numpy as np

from ..telemetry import peak_rss_bytes, rss_bytes
from .report import print_table, write_json


def add_arguments(p) -> None:
    p.add_argument("--model", help="package directory (default: the model that ships with edge_moe)")
    p.add_argument("--budget", default="25%", help="expert memory budget (default 25%%)")
    p.add_argument("--tokens", type=int, default=10_000, help="tokens to generate in all (default 10000)")
    p.add_argument("--every", type=int, default=1000, help="sample RSS every this many tokens")
    p.add_argument("--window", type=int, default=256, help="tokens generated per prompt (within the context)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="OUT", help="write the samples as JSON")


def run(args) -> int:
    import edge_moe
    from ..errors import EdgeMoeError

    if args.tokens < 1 or args.every < 1 or args.window < 1:
        raise EdgeMoeError("--tokens, --every and --window must be at least 1")
    model = edge_moe.load(args.model, budget=args.budget, threads=args.threads)
    context = int(model.config.get("max_position_embeddings") or 512)
    window = min(args.window, context - 16)
    vocab = model.config["vocab_size"]
    rows, done, start, seed = [], 0, time.perf_counter(), 0
    next_sample = args.every
    while done < args.tokens:
        prompt = np.random.default_rng(seed).integers(0, vocab, 16).tolist()
        for _ in model.stream_generate(prompt, max_new_tokens=min(window, args.tokens - done), temperature=0.8,
                                       seed=seed):
            done += 1
            if done >= next_sample:
                rows.append({"tokens": done, "rss_MiB": rss_bytes() / 2**20, "seconds": time.perf_counter() - start})
                next_sample += args.every
        seed += 1
    base = rows[0]["rss_MiB"]
    for row in rows:
        row["vs_first_pct"] = 100 * (row["rss_MiB"] - base) / base
    stats = model.expert_stats()
    print_table(f"soak: {done} tokens at budget {args.budget} ({model.budget / 2**20:.1f} MiB of experts), "
                f"windows of {window}; peak RSS {peak_rss_bytes() / 2**20:.1f} MiB, hits {stats['hits']}, "
                f"misses {stats['misses']}", [{**row, "tokens": str(row["tokens"])} for row in rows])
    if args.json:
        write_json(args.json, {"budget": args.budget, "tokens": done, "samples": rows, "stats": stats})
    return 0
