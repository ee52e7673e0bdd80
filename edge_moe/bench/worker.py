"""One benchmark configuration in a fresh process, so that peak RSS and page-cache state belong to it alone.

    python -m edge_moe.bench.worker '{"model": DIR, "load": {...}, "prompt": [...], "tokens": N, "seed": S}'
prints one JSON object: the generation stats, the trace, RSS figures and the bytes the process read from disk.
"""

from __future__ import annotations

import json
import os
import sys

import psutil


def drop_page_cache(paths) -> None:
    """Evicts the files from the page cache so every configuration starts cold."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


def main(argv=None) -> int:
    import edge_moe
    from edge_moe.manifest import Manifest
    from edge_moe.telemetry import peak_rss_bytes, reset_peak_rss

    config = json.loads((argv or sys.argv[1:])[0])
    manifest = Manifest.load(config["model"])
    drop_page_cache({str(r.blob) for r in manifest.experts.values()})
    model = edge_moe.load(config["model"], trace=True, **config["load"])
    loaded_rss = psutil.Process().memory_info().rss
    reset_peak_rss()
    io_before = psutil.Process().io_counters().read_bytes
    result = model.generate(config["prompt"], max_new_tokens=config["tokens"], temperature=config["temperature"],
                            seed=config["seed"])
    stats = dict(result.stats)
    stats.update(peak_rss_bytes=peak_rss_bytes(), loaded_rss_bytes=loaded_rss,
                 disk_read_bytes=psutil.Process().io_counters().read_bytes - io_before,
                 kv_cache_bytes=model.forward.new_cache().nbytes)
    print(json.dumps({"stats": stats, "token_ids": result.token_ids, "trace": model.trace}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
