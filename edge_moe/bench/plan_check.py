"""How well `edge-moe plan` predicts `--emulate`: for each (model, profile) case, plan on this machine (its measured
compute, the profile's flash and RAM) and then run the emulated decode, in rounds that go over every case in turn so
that a shared machine's drift spreads over all of them.

    python -m edge_moe.bench.plan_check --case PKG:PROFILE:TOKENS [--case ...] [--rounds 3] [--json OUT]

Before each case the model's resident decode and per-miss cost are measured again (profiler.model_times, on the
`--calibrate` package when given: a smaller model of the same shapes), as `edge-moe profile` would; the emulated
decode runs in its own process (its memory cgroup and thread pools die with it). Prints a table per case (predicted
and measured tok/s per round, the error, the median) and writes every row as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _plan(model: str, profile: str, tokens: int, host_file: str, calibrate: str) -> dict:
    from edge_moe import planner
    from edge_moe.manifest import Manifest
    from edge_moe.profiler import model_times
    from edge_moe.profiles import load_profile

    host = load_profile(host_file)
    host.measured["model"] = model_times(calibrate, host.measured.get("threads") or 2)
    return planner.plan(Manifest.load(model), planner.load_routing(model),
                        planner.emulated_profile(load_profile(profile), host), tokens=tokens)


def _measure(model: str, profile: str, tokens: int, policy: str, prefetch: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "edge_moe.bench.plan_check", "--run-case", model, profile,
                          str(tokens), policy, str(prefetch)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"emulated run of {model} on {profile} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_case(model: str, profile: str, tokens: str, policy: str, prefetch: str) -> None:
    from edge_moe.emulate import emulated_decode

    s = emulated_decode(model, profile, tokens=int(tokens), threads=2, policy=policy, prefetch=int(prefetch))
    print(json.dumps({k: s.get(k) for k in ("decode_tokens_per_second", "hits", "misses", "bytes_read")}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_moe.bench.plan_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", default=[], metavar="PKG:PROFILE:TOKENS")
    p.add_argument("--calibrate", action="append", default=[], metavar="PKG=CALIB_PKG",
                   help="measure compute for PKG on CALIB_PKG (same shapes, fewer layers: faster to load)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--run-case", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_case:
        _run_case(*args.run_case)
        return 0
    from edge_moe.profiler import run as profile_run
    from .report import print_table, write_json

    cases = [(c.rsplit(":", 2)[0], c.rsplit(":", 2)[1], int(c.rsplit(":", 2)[2])) for c in args.case]
    calib = dict(c.split("=", 1) for c in args.calibrate)
    hosts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in sorted({calib.get(m, m) for m, _, _ in cases}):
            hosts[model] = str(Path(tmp) / f"host{len(hosts)}.toml")
            profile_run(argparse.Namespace(model=model, dir=None, out=hosts[model]))
        rows = []
        for rnd in range(args.rounds):
            for model, profile, tokens in cases:
                c = calib.get(model, model)
                plan = _plan(model, profile, tokens, hosts[c], c)
                meas = _measure(model, profile, tokens, plan["policy"], plan["prefetch"])
                pred = plan["prediction"]["decode_tokens_per_second"]
                rows.append({"round": rnd, "model": model, "profile": profile, "tokens": tokens,
                             "bottleneck": plan["bottleneck"], "policy": plan["policy"], "prefetch": plan["prefetch"],
                             "predicted_tok_s": pred, "measured_tok_s": meas["decode_tokens_per_second"],
                             "error": pred / meas["decode_tokens_per_second"] - 1})
                print(json.dumps(rows[-1]), flush=True)
    table = []
    for model, profile, tokens in cases:
        rs = [r for r in rows if (r["model"], r["profile"], r["tokens"]) == (model, profile, tokens)]
        med_p = statistics.median(r["predicted_tok_s"] for r in rs)
        med_m = statistics.median(r["measured_tok_s"] for r in rs)
        table.append({"model": Path(model).name, "profile": profile, "bottleneck": rs[0]["bottleneck"],
                      "errors": " ".join(f"{100 * r['error']:+.0f}%" for r in rs),
                      "median_pred": f"{med_p:.3g}", "median_meas": f"{med_m:.3g}",
                      "median_error": f"{100 * (med_p / med_m - 1):+.0f}%"})
    print_table("plan vs --emulate (decode tok/s; error = predicted / measured - 1, per round)", table)
    if args.json:
        write_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
