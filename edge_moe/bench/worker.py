"""One benchmark configuration in a fresh process, so that peak RSS and page-cache state belong to it alone.

    python -m edge_moe.bench.worker '{"model": DIR, "load": {...}, "prompt": [...], "tokens": N, "seed": S}'
prints one JSON object: the generation stats, the trace, RSS figures and the bytes the process read from disk.
"""

from __future__ import annotations

import contextlib
import json
import sys

import psutil

from ..files import drop_page_cache


def main(argv=None) -> int:
    from edge_moe.manifest import Manifest

    config = json.loads((argv or sys.argv[1:])[0])
    manifest = Manifest.load(config["model"])
    drop_page_cache({str(r.blob) for r in manifest.experts.values()})
    with emulated(config, manifest) as (load, report):
        out = run(config, manifest, load)
    out["emulation"] = report
    print(json.dumps(out))
    return 0


@contextlib.contextmanager
def emulated(config: dict, manifest):
    """Under "emulate": the profile's threads (unless given) and flash throttle; with "memory_limit", the profile's
    RAM as a real limit on this process where a cgroup can be made. Yields (load options, report lines)."""
    load = dict(config["load"])
    if not config.get("emulate"):
        yield load, []
        return
    from edge_moe.emulate import emulation_options, memory_limit
    from edge_moe.profiles import load_profile

    profile = load_profile(config["emulate"])
    options, report = emulation_options(profile)  # no manifest: the benchmark sets the budgets itself
    load["throttle"] = options["throttle"]
    if load.get("threads") is None:
        load["threads"] = options["threads"]
    with memory_limit(profile.usable_ram_bytes, enabled=config.get("memory_limit", False)) as limit:
        yield load, report + [limit.describe()]


def run(config: dict, manifest, load: dict) -> dict:
    import edge_moe
    from edge_moe.telemetry import peak_rss_bytes, reset_peak_rss

    model = edge_moe.load(config["model"], trace=True, **load)
    model.settle()
    loaded_rss = psutil.Process().memory_info().rss
    reset_peak_rss()
    io_before = psutil.Process().io_counters().read_bytes
    result = model.generate(config["prompt"], max_new_tokens=config["tokens"], temperature=config["temperature"],
                            seed=config["seed"])
    stats = dict(result.stats)
    stats.update(peak_rss_bytes=peak_rss_bytes(), loaded_rss_bytes=loaded_rss,
                 disk_read_bytes=psutil.Process().io_counters().read_bytes - io_before,
                 kv_cache_bytes=model.forward.new_cache().nbytes)
    return {"stats": stats, "token_ids": result.token_ids, "trace": model.trace}


if __name__ == "__main__":
    sys.exit(main())
