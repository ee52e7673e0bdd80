"""`edge-moe bench`: the all-resident decode table (against transformers and the bandwidth floor), and with
--budgets the expert-cache table (policies against OPT, flash bandwidth and the baselines)."""

from __future__ import annotations

import numpy as np

from ..telemetry import peak_rss_bytes
from . import decode
from .report import print_table, write_json


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="package directory, or 'default' (the model that ships with "
                                                   "edge_moe); with --peer: comma-separated packages")
    p.add_argument("--peer", choices=["llama.cpp"], help="side by side with another engine (bench/peer.py)")
    p.add_argument("--reference", metavar="HF_DIR", help="also time transformers' eager PyTorch on this checkpoint")
    p.add_argument("--tokens", type=int, default=64, help="tokens to decode per run")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--threads", type=int)
    p.add_argument("--budgets", help="comma-separated budgets for the cache table, e.g. 10%%,25%%,50%%,100%%")
    p.add_argument("--policies", default="lru,lfu,adaptive", help="policies to compare under each budget")
    p.add_argument("--prefetch", type=int, default=2, help="prefetch depth for the policy rows")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature of the cache runs (seeded: every configuration makes the same tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every cache configuration this many times, round after round, and report medians "
                        "(ratios are taken within a round first): for noisy machines")
    p.add_argument("--skip-decode", action="store_true", help="only the cache table")
    p.add_argument("--emulate", metavar="PROFILE", help="cache runs under a device profile: its threads and flash "
                                                        "bandwidth, and its RAM as a real limit where allowed")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    from . import peer

    peer.add_arguments(p)


def run(args) -> int:
    results = {}
    if args.peer:
        from .peer import run_peer

        results["peer"] = run_peer(args)
        if args.json:
            write_json(args.json, results)
        return 0
    if args.budgets:  # a bad budget or policy is refused before the first (minutes-long) run
        from ..manifest import Manifest
        from .cache import _configs

        _configs(args, Manifest.load(args.model))
    if not args.skip_decode:
        results["decode"] = decode_table(args)
    if args.budgets:
        from ..manifest import Manifest
        from .cache import cache_rows

        manifest = Manifest.load(args.model)
        prompt = np.random.default_rng(args.seed).integers(0, manifest.config["vocab_size"],
                                                           args.prompt_tokens).tolist()
        cache = results["cache"] = cache_rows(args, manifest, prompt)
        if cache.get("emulation"):
            print("\n".join(cache["emulation"]) + "\n  (the all-resident reference runs without the RAM limit)")
        flash = "emulated flash" if args.emulate else "raw O_DIRECT sequential read"
        rounds = f"medians of {args.rounds} rounds; " if args.rounds > 1 else ""
        print_table(f"expert cache: {args.tokens} tokens after a {args.prompt_tokens}-token prompt; {rounds}{flash} "
                    f"measured before each run (raw_GB_s; median {cache['raw_sequential_bandwidth'] / 1e9:.2f} GB/s); "
                    "hit rates over decode", cache["rows"])
        print_table("decode floor per budget: max(all-resident decode time, OPT misses x expert bytes / raw "
                    "bandwidth) per token; <config>_of_floor = measured / floor tok/s", cache["floors"])
        print_table("decode speed ratios per budget, each within a round (median over rounds)", cache["targets"])
        print_table("the recorded trace replayed offline without prefetch: MiB read per decoded token",
                    cache["replay"])
    if args.json:
        write_json(args.json, results)
    return 0


def decode_table(args) -> dict:
    import edge_moe

    model = edge_moe.load(args.model, threads=args.threads, progress=True)
    model.settle()
    vocab = model.config["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, args.prompt_tokens).tolist()
    decode.decode_run(model, prompt, 4)  # warm-up: sessions, allocator
    ours = decode.decode_run(model, prompt, args.tokens)
    bandwidth = decode.weight_read_bandwidth()
    per_token = decode.weight_bytes_per_token(model.manifest)
    floor_tps = bandwidth / per_token
    rows = [{"engine": "edge_moe", "threads": model.threads,
             "prefill_tok_s": ours["prefill_tokens_per_second"], "decode_tok_s": ours["decode_tokens_per_second"],
             "outside_ort": ours["decode_share_outside_ort"], "of_floor": ours["decode_tokens_per_second"] / floor_tps}]
    results = {"model": str(args.model), "threads": model.threads, "edge_moe": ours,
               "weight_bytes_per_token": per_token, "weight_read_bandwidth": bandwidth,
               "bandwidth_floor_tokens_per_second": floor_tps}
    if args.reference:
        reference = decode.transformers_decode(args.reference, prompt, args.tokens, model.threads)
        results["transformers"] = reference
        results["speedup_vs_transformers"] = ours["decode_tokens_per_second"] / reference["decode_tokens_per_second"]
        rows.append({"engine": "transformers eager", "threads": model.threads,
                     "prefill_tok_s": reference["prefill_tokens_per_second"],
                     "decode_tok_s": reference["decode_tokens_per_second"], "outside_ort": "",
                     "of_floor": reference["decode_tokens_per_second"] / floor_tps})
    results["peak_rss_bytes"] = peak_rss_bytes()
    print_table(f"decode, all experts resident ({per_token / 2**20:.1f} MiB of weights per token, "
                f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> floor {floor_tps:.1f} tok/s)", rows)
    if args.reference:
        print(f"speedup vs transformers: {results['speedup_vs_transformers']:.2f}x")
    return results
