"""How much memory this process may still take: its memory cgroup's limit (v2 or v1, page cache counted, as the
kernel counts it) or else the RAM the OS reports available; and `--budget auto`, the expert budget that fits.

    headroom = min(cgroup limit - (cgroup usage - file cache not mapped by anyone), available RAM)
    auto budget = headroom - (KV cache of min(context, 512) tokens + 24 MiB of activations and allocator slack)

File cache that no process maps is what the kernel reclaims under the limit before anything else, so it does not
count as used: how much of it a freshly started process is charged for (shared libraries, the package's files)
depends on what other groups read first, and counting it made the auto budget swing between 0 and 70 MiB under
the same 166 MiB limit.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import psutil

AUTO_KV_TOKENS = 512
AUTO_SLACK_BYTES = 24 * 2**20
_NO_LIMIT = 1 << 60  # cgroup v1 writes ~2^63 for "no limit"


def return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 256 KiB: large buffers (expert buffers, fused stacks) then come from mmap and
    go back to the OS on free. By default the threshold grows after each large free and freed buffers stay in the
    heap: building the step graph of a 4-bit model (every layer's stacks at once, then freed) left 190 MiB of RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


@dataclass
class Headroom:
    nbytes: int
    source: str  # "cgroup v2 /sys/fs/cgroup/...": where the figure came from


def cgroup_dirs() -> list[tuple[str, Path]]:
    """(version, directory of this process's memory cgroup) candidates, v2 first."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                controllers_file = mount / path.lstrip("/") / "cgroup.controllers"
                if controllers_file.is_file() and "memory" in controllers_file.read_text().split():
                    found.append(("v2", mount / path.lstrip("/")))
        elif "memory" in controllers.split(","):
            found.append(("v1", Path("/sys/fs/cgroup/memory") / path.lstrip("/")))
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.isdigit() else int(text)


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_headroom(version: str, directory: Path) -> int | None:
    """The smallest headroom of the group and its ancestors that set a limit, or None without one."""
    names = (("memory.max", "memory.current", "file", "file_mapped") if version == "v2" else
             ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_mapped_file"))
    best = None
    for group in [directory, *directory.parents]:
        if not (group / names[0]).exists():
            break
        limit = _read_int(group / names[0])
        if limit is None or limit >= _NO_LIMIT:
            continue
        stat = group / "memory.stat"
        reclaimable = max(0, _stat(stat, names[2]) - _stat(stat, names[3]))  # file cache nobody maps
        used = (_read_int(group / names[1]) or 0) - reclaimable
        room = max(0, limit - used)
        best = room if best is None else min(best, room)
    return best


def memory_headroom() -> Headroom:
    """What this process may still allocate before its cgroup limit or the machine's available RAM."""
    available = psutil.virtual_memory().available
    for version, directory in cgroup_dirs():
        room = _cgroup_headroom(version, directory)
        if room is not None and room < available:
            return Headroom(room, f"cgroup {version} limit at {directory}")
    return Headroom(available, "available RAM")


def auto_budget_bytes(kv_bytes_per_token: int, context: int, headroom: Headroom | None = None) -> tuple[int, str]:
    """The expert budget that fits the headroom after the KV cache and slack; returns (bytes, one-line note)."""
    headroom = headroom or memory_headroom()
    tokens = min(int(context), AUTO_KV_TOKENS)
    reserve = kv_bytes_per_token * tokens + AUTO_SLACK_BYTES
    budget = headroom.nbytes - reserve
    note = (f"budget auto: {max(budget, 0) / 2**20:,.1f} MiB for experts = {headroom.nbytes / 2**20:,.1f} MiB free "
            f"({headroom.source}) - KV cache of {tokens} tokens and {AUTO_SLACK_BYTES >> 20} MiB of slack")
    return budget, note
