"""CPU/GPU cooperative execution on an accelerator machine: logits match, speed per configuration, and how often
the cost model's choice was the faster one.

    python -m edge_moe.bench.cooperative PACKAGE [--prompt 256] [--decode 32] [--json FILE] [--skip-match]

Configurations (RAM budget, GPU budget): CPU-only all in RAM and at 50% RAM; GPU all-resident; cooperative with the
GPU holding 10%, 25%, 50% of the expert bytes and RAM 50%. Each is warmed up with a short generation first (session
creation, cuBLAS handles, the GPU tier's first promotions), then timed on a fresh prompt.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback

import numpy as np

from .. import load
from ..experts import ResidentExpert

# --device cuda against --device cpu: float16 experts compute in float16 on the GPU (float32 on the CPU) and the
# CUDA backbone may use TF32, so logits differ by rounding; measured on the H200: 3.1e-4 (Qwen3-30B-A3B shapes) and
# 3.6e-4 (Mixtral shapes) of the largest |logit|, with every argmax equal. The check allows 1e-3.
TOLERANCE = 1e-3
ACCEL = "cuda"  # the accelerator's device name (a local smoke run swaps in a CPU stand-in Device)
CONFIGS = [  # name, device (None: ACCEL), RAM budget, GPU budget, other load options
    ("cpu-only, RAM all", "cpu", None, None, {}),
    ("cpu-only, RAM 50%", "cpu", "50%", None, {}),
    ("gpu all-resident", None, None, None, {}),  # fused MoE layers (fused_moe.py) where the family allows
    ("gpu all-resident, no CUDA graph", None, None, None, {"cuda_graph": False}),  # one graph, never captured
    ("gpu all-resident per-layer", None, None, None, {"step_graph": False}),  # fused, one call a graph
    ("gpu all-resident per-expert", None, None, None, {"fused_moe": False}),
    ("coop gpu 10%, RAM 50%", None, "50%", "10%", {}),
    ("coop gpu 25%, RAM 50%", None, "50%", "25%", {}),
    ("coop gpu 50%, RAM 50%", None, "50%", "50%", {}),
]


def logits_match(package, prompt: list[int], steps: int = 16, gpu_budget=None, **options) -> dict:
    """Prefill `prompt` then `steps` greedy decode steps (tokens chosen by the CPU model) on both devices; compares
    logits per position: max |difference| relative to the CPU logits' largest magnitude, and argmax agreement."""
    cpu, gpu = load(package, device="cpu"), load(package, device=ACCEL, gpu_budget=gpu_budget, **options)
    cpu.settle()
    gpu.settle()
    caches = [m.forward.new_cache() for m in (cpu, gpu)]
    rel, agree, total = 0.0, 0, 0
    ids = np.asarray(prompt, dtype=np.int64)
    for step in range(steps + 1):
        a, b = (m.forward.logits(m.forward.hidden(ids, c)) for m, c in zip((cpu, gpu), caches))
        rel = max(rel, float(np.max(np.abs(a - b) / np.max(np.abs(a), axis=-1, keepdims=True))))
        agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        total += a.shape[0]
        ids = np.asarray([int(a[-1].argmax())], dtype=np.int64)
    return {"gpu_budget": gpu_budget or "100%", "fused": gpu.fused is not None, "max_rel_diff": rel,
            "argmax_agree": agree, "positions": total, "ok": rel <= TOLERANCE and agree == total,
            "tiers": gpu.expert_stats().get("tiers")}


def speed(package, device, budget, gpu_budget, prompt: list[int], decode: int, runs: int = 2, **options) -> dict:
    """Load, a warm-up generation of the full prompt, then `runs` timed generations on rotated prompts; tier
    counters are those of the timed runs only."""
    start = time.perf_counter()
    model = load(package, device=device or ACCEL, budget=budget, gpu_budget=gpu_budget, **options)
    model.settle()
    load_s = time.perf_counter() - start
    # warm-up at the timed length: a GPU tier's first prefills pay its promotions and the CUDA kernels' first calls
    # at new token counts (H200, stop 16: cooperative prefill at GPU 25 % / RAM 50 % 98 then 146 then 175 tok/s
    # against CPU-only's 153-160 at RAM 50 %); both configurations get the same
    model.generate(prompt, max_new_tokens=4)
    tier = model.accelerator
    before = dict(vars(tier.stats)) if tier else {}
    timed = [model.generate(prompt[i:] + prompt[:i], max_new_tokens=decode).stats for i in range(runs)]
    out = {"load_s": load_s, "prefill_tps": max(r["prefill_tokens_per_second"] for r in timed),
           "decode_tps": max(r["decode_tokens_per_second"] for r in timed),
           "prefill_tps_runs": [r["prefill_tokens_per_second"] for r in timed],
           "decode_tps_runs": [r["decode_tokens_per_second"] for r in timed],
           "ram_hits": timed[-1].get("hits"), "ram_misses": timed[-1].get("misses"),
           "fused": model.fused is not None}
    if tier:
        out.update({k: v - before[k] for k, v in vars(tier.stats).items() if k != "peak_resident_bytes"})
    calls = model.clock.calls
    model.generate(prompt[:1], max_new_tokens=9)  # a one-token prompt: 9 forward steps of one token each
    out["ort_calls_per_token"] = (model.clock.calls - calls) / 9
    model.store.close()  # its I/O threads, and the sessions below, must not linger into the next configuration
    del model, tier
    gc.collect()
    return out


def choice_accuracy(package, token_counts=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), experts: int = 4,
                    reps: int = 5) -> dict:
    """For sample experts and token counts, times both paths of a non-resident expert (CPU from RAM; upload + run
    on the GPU) and checks the cost model's choice against the faster one."""
    model = load(package, device=ACCEL, budget="50%", gpu_budget=0)
    tier = model.accelerator
    rng = np.random.default_rng(1)
    keys = [sorted(model.manifest.experts)[i] for i in rng.choice(len(model.manifest.experts), experts, False)]
    rows, right = [], 0
    for key in keys:
        record = model.manifest.experts[key]
        expert = ResidentExpert.from_bytes(record, model.store.read(key))
        for t in token_counts:
            x = rng.standard_normal((t, record.hidden_size), dtype=np.float32)
            cpu = _median(lambda: model.kernels.run(expert, x), reps)
            up = _median(lambda: tier.device_kernels.run(tier.device_kernels.upload(expert), x), reps)
            choice = tier.cost.choose(expert, t)
            ok = (choice == "cpu") == (cpu <= up)
            right += ok
            p = tier.cost.predict(expert, t)
            rows.append({"expert": list(key), "tokens": t, "cpu_ms": cpu * 1e3, "upload_ms": up * 1e3,
                         "pred_cpu_ms": p["cpu"] * 1e3, "pred_upload_ms": p["upload"] * 1e3, "choice": choice,
                         "right": bool(ok)})
    sample = ResidentExpert.from_bytes(model.manifest.experts[keys[0]], model.store.read(keys[0]))
    return {"right": right, "total": len(rows), "share": right / len(rows), "crossover_tokens":
            tier.cost.crossover(sample), "cost_model": tier.cost.to_json(), "rows": rows}


def _median(call, reps: int) -> float:
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefill)")
    p.add_argument("--decode", type=int, default=32, help="decode tokens")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip-match", action="store_true")
    p.add_argument("--choice-tokens", default="1,2,4,8,16,32,64,128,256,512,1024",
                   help="token counts at which both paths are timed")
    p.add_argument("--choice-experts", type=int, default=4, help="sample experts timed at each token count "
                   "(0: skip the cost model's check)")
    p.add_argument("--only", help="time only the configurations whose name contains one of these comma-separated "
                   "words (e.g. 'RAM 50%%')")
    args = p.parse_args(argv)
    from ..manifest import Manifest

    model_vocab = Manifest.load(args.package, verify_backbone=False).config["vocab_size"]
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(3, model_vocab, args.prompt)]
    results: dict = {"prompt_tokens": args.prompt, "decode_tokens": args.decode}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    def section(name, call):
        """One failing part (a device quirk) must not cost the figures of the others: device time is scarce."""
        try:
            results[name] = call()
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        save()
        return results[name]

    if not args.skip_match:
        checks = [(None, {}), (None, {"fused_moe": False}), ("25%", {})]
        for m in section("match", lambda: [logits_match(args.package, prompt[:64], 16, b, **o) for b, o in checks]):
            print(f"logits {ACCEL} vs cpu (gpu {m['gpu_budget']}{', fused' if m['fused'] else ''}): max rel diff "
                  f"{m['max_rel_diff']:.2e}, argmax {m['argmax_agree']}/{m['positions']} "
                  f"({'ok' if m['ok'] else 'OVER'} at {TOLERANCE:g})", flush=True)
    c = section("choice", lambda: choice_accuracy(args.package, [int(t) for t in args.choice_tokens.split(",")],
                                                    args.choice_experts)) if args.choice_experts else {}
    if "share" in c:
        print(f"cost model right {c['right']}/{c['total']} ({c['share']:.0%}); upload wins from "
              f"T={c['crossover_tokens']}", flush=True)
    speeds = results["speed"] = {}
    wanted = [w.strip() for w in args.only.split(",")] if args.only else None
    for name, device, budget, gpu_budget, options in CONFIGS:
        if wanted and not any(w in name for w in wanted):
            continue
        s = section("last", lambda: speed(args.package, device, budget, gpu_budget, prompt, args.decode, **options))
        speeds[name] = results.pop("last")
        if "decode_tps" in s:
            print(f"{name:<28} prefill {s['prefill_tps']:8.1f} tok/s  decode {s['decode_tps']:7.2f} tok/s  calls/token "
                  f"{s['ort_calls_per_token']:.0f}  gpu "
                  f"hits {s.get('gpu_hits', '-')} cpu runs {s.get('cpu_runs', '-')} uploads {s.get('uploads', '-')}",
                  flush=True)
    tps = {name: s.get("decode_tps") for name, s in speeds.items()}
    coop, base, base_all = tps.get("coop gpu 25%, RAM 50%"), tps.get("cpu-only, RAM 50%"), tps.get("cpu-only, RAM all")
    if coop and base and base_all:
        results["coop25_vs_cpu50_decode"], results["coop25_vs_cpu_all_decode"] = coop / base, coop / base_all
        print(f"cooperative decode at GPU 25% / CPU-only (RAM 50%): {coop / base:.2f}x; "
              f"/ CPU-only (RAM all): {coop / base_all:.2f}x")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
