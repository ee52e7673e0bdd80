"""Serving benchmarks: `python -m edge_moe.bench.serving [--model DIR] [--budgets 100%,25%] [--streams 1,2,4,8]`.

Prints: concurrent streams decoded together (continuous batching) against the same streams one at a time
(aggregate tokens/s, flash MiB read per generated token), the time to the first token of a chat's second turn with
and without the prompt cache, and `edge-moe serve`'s start-up to first streamed token and idle RSS.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import numpy as np

from .report import print_table

PROMPTS = ["import os\n", "def main():", "class Foo:", "The json module", "x = [", "# A comment", "for i in",
           "Return the"]


def prompt(model, i: int):
    """The i-th benchmark prompt: text, or for a package without a tokenizer 8 seeded random token ids."""
    if model.tokenizer is not None:
        return PROMPTS[i % len(PROMPTS)]
    return np.random.default_rng(i).integers(0, model.config["vocab_size"], 8).tolist()


def streams_row(model, streams: int, tokens: int, batched: bool) -> dict:
    """`streams` greedy generations started together (threads); aggregate tokens/s and MiB read per token."""
    before = model.expert_stats()["bytes_read"]
    counts = [0] * streams
    barrier = threading.Barrier(streams)

    def worker(i):
        barrier.wait()
        counts[i] = sum(1 for _ in model.stream_generate(prompt(model, i), tokens))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    read = model.expert_stats()["bytes_read"] - before
    return {"streams": streams, "batched": batched, "tok_s": sum(counts) / seconds,
            "MiB_read_per_token": read / 2**20 / max(sum(counts), 1)}


def chat_ttft(model, rounds: int) -> dict:
    """Time to the first token of a second chat turn, re-prefilling the conversation or with the prompt cache."""
    first = [{"role": "user", "content": "Explain what the os module offers for paths, files and processes, "
                                         "with examples of os.path.join and os.listdir."}]
    times = {"without_cache_ms": [], "with_cache_ms": []}
    for _ in range(rounds):
        cache = model.prompt_cache()
        answer = model.generate(model.encode_chat(first), 64, prompt_cache=cache).text
        second = model.encode_chat(first + [{"role": "assistant", "content": answer.strip()},
                                            {"role": "user", "content": "And os.walk?"}])
        for key, use in (("without_cache_ms", None), ("with_cache_ms", cache)):
            start = time.perf_counter()
            next(iter(model.stream_generate(second, 1, prompt_cache=use)))
            times[key].append((time.perf_counter() - start) * 1e3)
    return {"turn2_prompt_tokens": len(second), **{k: float(np.median(v)) for k, v in times.items()}}


def server_startup(model_arg: str | None, budget: str | None) -> dict:
    """`edge-moe serve` from process start to the first streamed token of a completion, and its RSS idle."""
    import psutil
    from openai import APIConnectionError, OpenAI

    port = 18000 + os.getpid() % 1000
    command = [sys.executable, "-m", "edge_moe.cli", "serve", "--port", str(port)]
    command += (["--model", model_arg] if model_arg else []) + (["--budget", budget] if budget else [])
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except APIConnectionError:
                time.sleep(0.02)
        ready = time.perf_counter() - start
        stream = client.completions.create(model=name, prompt="import os", max_tokens=4, temperature=0, stream=True)
        next(iter(stream))
        first_token = time.perf_counter() - start
        for _ in stream:
            pass
        time.sleep(1.0)
        rss = psutil.Process(process.pid).memory_info().rss
    finally:
        process.terminate()
        process.wait(20)
    return {"ready_s": ready, "first_token_s": first_token, "idle_rss_MiB": rss / 2**20}


def main(argv=None) -> int:
    import edge_moe

    p = argparse.ArgumentParser(prog="python -m edge_moe.bench.serving", description=__doc__)
    p.add_argument("--model", help="package directory (default: the shipped model)")
    p.add_argument("--budgets", default="100%,25%")
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    p.add_argument("--threads", type=int)
    p.add_argument("--prefetch", type=int, default=2, help="prefetch depth under a budget (0: off)")
    p.add_argument("--modes", default="solo,batched", help="solo (one step per stream, interleaved), batched")
    p.add_argument("--rounds", type=int, default=3, help="medians of this many rounds (and chat conversations)")
    p.add_argument("--skip-server", action="store_true")
    args = p.parse_args(argv)
    models = {}
    for budget in args.budgets.split(","):
        for batched in [mode == "batched" for mode in args.modes.split(",")]:
            model = models[budget, batched] = edge_moe.load(args.model, budget=budget, threads=args.threads,
                                                            prefetch=args.prefetch, progress=False)
            if batched:
                model.enable_batching(max_batch=16)
            model.generate(prompt(model, 99), 8)
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):  # round after round, so a machine's drift spreads over every configuration
        for (budget, batched), model in models.items():
            for streams in map(int, args.streams.split(",")):
                runs.setdefault((budget, streams, batched), []).append(
                    streams_row(model, streams, args.tokens, batched))
    rows = [{"budget": budget, "streams": streams, "batched": batched,
             **{k: float(np.median([r[k] for r in rs])) for k in ("tok_s", "MiB_read_per_token")}}
            for (budget, streams, batched), rs in runs.items()]
    for model in models.values():
        model.close()
    print_table(f"concurrent greedy streams, {args.tokens} tokens each, median of {args.rounds} rounds (tok_s: all "
                "streams together)", rows)
    model = edge_moe.load(args.model, threads=args.threads, progress=False)
    if model.tokenizer is not None:
        print_table("chat: time to the first token of turn 2 (median)", [chat_ttft(model, args.rounds)])
    if not args.skip_server:
        print_table("edge-moe serve: start-up (process start to ready / to first streamed token), RSS idle",
                    [server_startup(args.model, None)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
