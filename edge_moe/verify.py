"""`edge-moe verify PKG`: checks a whole package and prints everything that is wrong.

Load already validates the manifest and verifies the backbone; verify goes further and reads every byte: every
file in the manifest's files table (the exported expert graphs too, which the runtime never opens) and every
expert's range in its blob, listing each mismatch instead of stopping at the first.
"""

from __future__ import annotations

import os
import time

import xxhash

from .errors import EdgeMoeError
from .manifest import Manifest, expert_seed
from .package_files import open_regular


def verify_package(root) -> tuple[list[str], dict]:
    """Returns (problems, counts). A manifest that does not load is one problem (its error); else one line per
    damaged file or expert.

    Raises:
        EdgeMoeError: only for a path that is not a package directory at all.
    """
    start = time.perf_counter()
    try:
        manifest = Manifest.load(root, verify_backbone=False)
    except EdgeMoeError as exc:
        if "no such model directory" in str(exc):
            raise
        return [str(exc)], {}
    problems = []
    listed = {manifest.relative(p) for p in manifest.backbone_files}
    for name in sorted(listed - set(manifest.files)):
        problems.append(f"{manifest.root / name}: not in the manifest's files table, so unverified")
    checked_bytes = 0
    for name, (size, _) in sorted(manifest.files.items()):
        try:
            manifest.verify_files([manifest.root / name])
            checked_bytes += size
        except EdgeMoeError as exc:
            problems.append(str(exc))
    experts_bad = 0
    for record in sorted(manifest.experts.values(), key=lambda r: r.key):
        problem = _check_expert(record)
        if problem:
            problems.append(problem)
            experts_bad += 1
        checked_bytes += record.length
    counts = {"files": len(manifest.files), "experts": len(manifest.experts), "experts_bad": experts_bad,
              "bytes": checked_bytes, "seconds": time.perf_counter() - start}
    return problems, counts


def _check_expert(record) -> str | None:
    try:
        fd = open_regular(record.blob, "expert blob")
    except EdgeMoeError as exc:
        return str(exc)
    try:
        data = os.pread(fd, record.length, record.offset)
    except OSError as exc:
        return f"{record.blob}: expert {record.key} cannot be read ({exc.strerror})"
    finally:
        os.close(fd)
    if len(data) != record.length:
        return f"{record.blob}: expert {record.key} is truncated ({len(data)} of {record.length} bytes)"
    actual = f"xxh3_64:{xxhash.xxh3_64_hexdigest(data, seed=expert_seed(record.key))}"
    if actual != record.checksum:
        return (f"{record.blob}: expert {record.key} at offset {record.offset}: checksum {actual} where the "
                f"manifest says {record.checksum}")
    return None


def load_cost(root, runs: int = 5) -> list[dict]:
    """What load's checks cost: medians over `runs` of the manifest's parse and validation, and of the backbone
    checksum, in wall and main-thread CPU seconds (CPU time is what a busy machine cannot inflate)."""
    import statistics

    samples: dict[str, list[tuple[float, float]]] = {"parse + validate": [], "backbone checksum": []}
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.thread_time()
        manifest = Manifest.load(root, verify_backbone=False)
        samples["parse + validate"].append((time.perf_counter() - wall, time.thread_time() - cpu))
        wall, cpu = time.perf_counter(), time.thread_time()
        manifest.verify_files(manifest.backbone_files)
        samples["backbone checksum"].append((time.perf_counter() - wall, time.thread_time() - cpu))
    nbytes = sum(p.stat().st_size for p in manifest.backbone_files)
    return [{"step": step, "experts": len(manifest.experts), "MiB": nbytes / 2**20 if "checksum" in step else 0.0,
             "wall_ms": 1e3 * statistics.median(w for w, _ in values),
             "cpu_ms": 1e3 * statistics.median(c for _, c in values)} for step, values in samples.items()]


def add_arguments(p) -> None:
    p.add_argument("model", help="package directory")
    p.add_argument("--load-cost", action="store_true", help="instead: time load's validation and backbone checksum")


def run(args) -> int:
    if args.load_cost:
        from .bench.report import print_table

        print_table(f"load checks of {args.model} (medians of 5; warm page cache)", load_cost(args.model))
        return 0
    problems, counts = verify_package(args.model)
    for line in problems:
        print(line)
    if problems:
        print(f"edge-moe: verify: {len(problems)} problem(s) in {args.model}; re-export or re-download it",
              flush=True)
        return 1
    print(f"{args.model}: OK ({counts['files']} files and {counts['experts']} experts, "
          f"{counts['bytes'] / 2**20:,.1f} MiB checked in {counts['seconds']:.2f} s)")
    return 0
