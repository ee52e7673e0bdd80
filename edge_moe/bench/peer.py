"""`edge-moe bench --peer llama.cpp`: the same checkpoint through llama.cpp and edge_moe, side by side.

llama.cpp's converter turns the Hugging Face checkpoint into GGUF (patched to accept any BPE pre-tokenizer: it
refuses tokenizers whose hash it does not know, and the tokenizer does not change the speed), `llama-quantize`
makes the quantized types, and `llama-bench` and our decode run interleaved round after round at the same thread
count, so a machine that slows down mid-run slows both; the table gives medians and ratios of medians.

Pairs: `--model A,B,C` with `--peer-types f16,q8_0,q4_k_m` (package i against GGUF type i). Per pair and round:
prefill of `--prompt-tokens` random tokens and decode of `--tokens`, at each `--depths` context depth (decode
after that many tokens already in the KV cache; llama-bench's -d).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeMoeError
from ..files import drop_page_cache
from .report import print_table, write_json

_CONVERT = """
import sys
sys.path[:0] = [{src!r}, {gguf!r}]
import conversion.base
import convert_hf_to_gguf as c
# any BPE pre-tokenizer: the converter refuses hashes it does not know, and speed does not depend on it
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", {hf!r}, "--outfile", {out!r}, "--outtype", "f16"]
c.main()
"""


def add_arguments(p) -> None:
    p.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench binary (with --peer llama.cpp)")
    p.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py); "
                                                      "default: two levels above --llama-bench's build folder")
    p.add_argument("--peer-types", default="f16", help="GGUF types paired with --model's packages, in order: "
                                                       "f16, q8_0, q4_0, q4_k_m ... (default f16)")
    p.add_argument("--depths", default="0", help="context depths to decode at, e.g. 0,1024,2048 (default 0)")
    p.add_argument("--work-dir", metavar="DIR", help="where GGUF files go (default: next to --reference)")
    p.add_argument("--memory-limit", metavar="SIZE", help="run both engines under a memory cgroup of SIZE (page "
                   "cache counted; 166MiB, 25%% of the first GGUF) where the machine allows it, each run in a fresh "
                   "process started inside it; ours with budget auto")
    p.add_argument("--fused-moe", action="store_true", help="packages of float experts run fused MoE layers too "
                   "(edge_moe.fused_moe: float32 stacks, twice a float16 model's expert memory); quantized experts "
                   "run fused without it")


def run_peer(args) -> dict:
    bench = Path(args.llama_bench or "")
    if not args.llama_bench or not bench.is_file() or not os.access(bench, os.X_OK):
        raise EdgeMoeError(f"--llama-bench {args.llama_bench!r} is not an executable file; build llama.cpp's "
                           "llama-bench and pass its path")
    if not args.reference or not (Path(args.reference) / "config.json").is_file():
        raise EdgeMoeError(f"--reference {args.reference!r}: --peer needs the Hugging Face checkpoint the packages "
                           "were exported from (a directory with config.json and tokenizer files)")
    packages = args.model.split(",")
    types = [t.strip().lower() for t in args.peer_types.split(",")]
    if len(types) != len(packages):
        raise EdgeMoeError(f"--model lists {len(packages)} packages and --peer-types {len(types)} types; pair "
                           "them one to one")
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        raise EdgeMoeError(f"--depths {args.depths!r}: give token counts separated by commas, e.g. 0,1024,2048") from None
    ggufs = convert(args, bench, types)
    threads = args.threads or 1
    limit = None
    if args.memory_limit:
        from ..budget import parse_bytes

        limit = parse_bytes(args.memory_limit, ggufs[types[0]].stat().st_size, "--memory-limit")
        models = [None] * len(packages)
    else:
        import edge_moe

        from ..fused_moe import unfusable_reason
        from ..manifest import Manifest

        # --fused-moe applies to the packages the fused kernel can run; the others run as load decides
        fused = [args.fused_moe and unfusable_reason(Manifest.load(p, verify_backbone=False)) is None
                 for p in packages]
        models = [edge_moe.load(p, threads=threads, fused_moe=f or None) for p, f in zip(packages, fused)]
        for package, model in zip(packages, models):
            model.settle()
            if model.fused is not None:
                stacks = "quantized" if model.fused.quantized else model.fused.dtype
                print(f"edge-moe: {package}: fused MoE layers ({stacks} stacks"
                      f"{', one graph a token' if model.step_graph is not None else ''})", file=sys.stderr)
    rows: dict[tuple, list[dict]] = {}
    for round_index in range(args.rounds):
        for package, model, kind in zip(packages, models, types):
            for depth in depths:
                if limit is None:
                    peer = llama_bench(bench, ggufs[kind], threads, args.prompt_tokens, args.tokens, depth)
                    ours = our_bench(model, args.prompt_tokens, args.tokens, depth, seed=round_index)
                else:
                    peer, ours = limited_runs(limit, bench, ggufs[kind], package, threads, args, depth, round_index)
                rows.setdefault((Path(package).name, kind, depth), []).append({**peer, **ours})
                print(f"round {round_index + 1}/{args.rounds} {Path(package).name} vs {kind} depth {depth}: "
                      f"decode {ours['decode']:.1f} vs {peer['peer_decode']:.1f} tok/s", file=sys.stderr)
    table = []
    for (name, kind, depth), runs in rows.items():
        med = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        table.append({"package": name, "gguf": kind, "depth": depth, "threads": threads,
                      "prefill": med["prefill"], "peer_prefill": med["peer_prefill"],
                      "prefill_ratio": med["prefill"] / med["peer_prefill"],
                      "decode": med["decode"], "peer_decode": med["peer_decode"],
                      "decode_ratio": med["decode"] / med["peer_decode"],
                      "outside_ort": med["outside_ort"], "calls_per_token": med["calls_per_token"],
                      **({"budget_MiB": med["budget_bytes"] / 2**20} if "budget_bytes" in med else {})})
    where = f"; under a {limit / 2**20:.0f} MiB memory cgroup, ours at budget auto" if limit else ""
    print_table(f"edge_moe vs llama.cpp, tok/s (medians of {args.rounds} interleaved rounds; prefill "
                f"{args.prompt_tokens} tokens, decode {args.tokens} after depth tokens{where})", table)
    return {"rows": table, "raw": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in rows.items()}}


def convert(args, bench: Path, types: list[str]) -> dict[str, Path]:
    """GGUF files of the reference checkpoint, one per type (made once, reused while the checkpoint is older)."""
    src = Path(args.llama_cpp) if args.llama_cpp else bench.resolve().parent.parent.parent
    converter = src / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise EdgeMoeError(f"{converter}: not found; pass --llama-cpp with llama.cpp's source tree")
    work = Path(args.work_dir or Path(args.reference).resolve().parent / "gguf")
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "model-f16.gguf"
    if not f16.exists():
        script = _CONVERT.format(src=str(src), gguf=str(src / "gguf-py"), hf=str(args.reference), out=str(f16))
        _check(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True), "convert_hf_to_gguf")
    out = {"f16": f16}
    quantize = bench.parent / "llama-quantize"
    for kind in types:
        if kind == "f16":
            continue
        path = out[kind] = work / f"model-{kind}.gguf"
        if not path.exists():
            if not quantize.is_file():
                raise EdgeMoeError(f"{quantize}: not found beside llama-bench; build llama-quantize for {kind}")
            _check(subprocess.run([str(quantize), str(f16), str(path), kind.upper()], capture_output=True,
                                  text=True), "llama-quantize")
    return out


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise EdgeMoeError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def llama_bench(bench: Path, gguf: Path, threads: int, prompt: int, tokens: int, depth: int) -> dict:
    cmd = [str(bench), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(tokens), "-r", "1",
           "-o", "json"] + (["-d", str(depth)] if depth else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    _check(proc, "llama-bench")
    results = json.loads(proc.stdout)
    speed = {("prefill" if r["n_prompt"] else "decode"): float(r["avg_ts"]) for r in results}
    return {"peer_prefill": speed["prefill"], "peer_decode": speed["decode"]}


def limited_runs(limit: int, bench: Path, gguf: Path, package: str, threads: int, args, depth: int,
                 seed: int) -> tuple[dict, dict]:
    """Both engines under a memory cgroup, each in a process started inside it (so all it allocates is charged
    there; a process that moves in keeps its earlier pages charged to the old group)."""
    from ..emulate import memory_limit

    with memory_limit(limit) as cgroup:
        if not cgroup.real:
            raise EdgeMoeError(f"--memory-limit: {cgroup.reason}; run where a memory cgroup can be created")
        # both start cold: pages another group read stay charged there and would not count against this limit
        drop_page_cache([gguf, *(p for p in Path(package).rglob("*") if p.is_file())])
        peer = llama_bench(bench, gguf, threads, args.prompt_tokens, args.tokens, depth)
        # and ours starts as llama-bench did, in a group without the other's pages: llama-bench's page cache stays
        # charged to the group after it exits, filling it to the limit, and every page ours then takes must first
        # be reclaimed from it (2 threads at 317 MiB: 25.8-27.0 tok/s after it, 28.0-32.7 with it dropped)
        drop_page_cache([gguf])
        worker = [sys.executable, "-m", "edge_moe.bench.peer", package, str(threads), str(args.prompt_tokens),
                  str(args.tokens), str(depth), str(seed)]
        proc = subprocess.run(worker, capture_output=True, text=True)
    _check(proc, "edge_moe under the memory limit")
    return peer, json.loads(proc.stdout.strip().splitlines()[-1])


def our_bench(model, prompt: int, tokens: int, depth: int, seed: int) -> dict:
    """With `depth` random tokens in the cache (untimed), prefill `prompt` more (timed, after an untimed prefill of
    as many), then decode `tokens` one at a time (timed) from position `depth` on: what llama-bench times with
    `-d DEPTH -p PROMPT` and `-d DEPTH -n TOKENS`. Decode feeds random tokens, as llama-bench's does (`std::rand() %
    n_vocab`), computing each step's logits and argmax as a generation would: feeding back the argmax of a
    random-weight model can fall into a short cycle of tokens whose experts stay cached, which under a memory limit
    decoded 53 tok/s in two rounds of three and 17 in the third (stop 25).

    The timed steps pay no one-off cost llama-bench does not: llama-bench sizes its KV cache when it makes the
    context and warms up before timing, so the cache is reserved for every timed token first (a cache that grows
    copies every layer's rows into new memory: 140-160 ms at 2048 -> 4096 on the 2-core VM, which once landed on the
    first timed token and made most of the "outside onnxruntime" share), and the decode bindings are built by an
    untimed one-token step at position depth - 1 (the cache rewound there after the prefill; rows past the offset
    are written over)."""
    rng = np.random.default_rng(seed)
    vocab = model.config["vocab_size"]
    forward = model.forward
    cache = forward.new_cache()
    cache.reserve(depth + max(prompt, tokens + 1))
    context = rng.integers(2, vocab, max(depth, 1)).astype(np.int64)
    for chunk in range(0, depth, 512):
        forward.hidden(context[chunk:min(chunk + 512, depth)], cache)
    # an untimed prefill of as many tokens first, the cache rewound after it: llama-bench warms up each test with a
    # run of its own, and ours would otherwise time the first call's wake of the kernels' threads and its scratch
    # memory's page faults after llama-bench's run (2 threads, q3-q4b8r: 977 tok/s timed cold, 1,446 warm)
    forward.hidden(rng.integers(2, vocab, prompt).astype(np.int64), cache)
    cache.offset = depth
    ids = rng.integers(2, vocab, prompt).astype(np.int64)
    start = time.perf_counter()
    forward.logits(forward.hidden(ids, cache)[-1:])
    prefill = prompt / (time.perf_counter() - start)
    warm = max(depth, 1) - 1
    cache.offset = warm
    forward.logits(forward.hidden(context[warm:warm + 1], cache))
    feed = rng.integers(2, vocab, tokens).astype(np.int64)
    ort_seconds, calls = model.clock.seconds, model.clock.calls
    start = time.perf_counter()
    for i in range(tokens):
        int(np.argmax(forward.logits(forward.hidden(feed[i:i + 1], cache))[0]))  # the argmax a generation pays
    seconds = time.perf_counter() - start
    return {"prefill": prefill, "decode": tokens / seconds,
            "outside_ort": 1.0 - (model.clock.seconds - ort_seconds) / seconds,
            "calls_per_token": (model.clock.calls - calls) / tokens}


def _worker(argv: list[str]) -> None:
    """`python -m edge_moe.bench.peer PKG THREADS PROMPT TOKENS DEPTH SEED`: one budget-auto run, JSON on stdout."""
    import edge_moe

    package, threads, prompt, tokens, depth, seed = argv[0], *map(int, argv[1:6])
    try:
        model = edge_moe.load(package, threads=threads, budget="auto")
    except edge_moe.EdgeMoeError as exc:
        sys.exit(str(exc))
    model.settle()
    stats = our_bench(model, prompt, tokens, depth, seed)
    stats["budget_bytes"] = model.budget
    print(json.dumps(stats))


if __name__ == "__main__":
    _worker(sys.argv[1:])
