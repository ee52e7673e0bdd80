"""Running under a device profile's limits on a bigger machine (`--emulate PROFILE`).

What can be made real here and what can only be emulated:
    threads        real: the onnxruntime pool gets min(profile cores, this machine's cores)
    expert budget  real: the runtime's cache budget = the profile's usable RAM minus backbone and overhead
    flash          emulated: a token bucket in the expert store holds reads to the profile's bandwidth and
                   per-read latency (it can slow this disk down, never speed it up)
    process memory real where a memory cgroup can be created (v1 or v2): the limit includes page cache, so an
                   mmap runtime is judged under the same RAM as ours; otherwise not applied, with the reason
    CPU speed, memory bandwidth, accelerator: not emulated (this machine's)

Use from a command:
    load_kwargs, report = emulation_options(profile, manifest)
    with memory_limit(profile.usable_ram_bytes) as limit:
        model = edge_moe.load(path, **load_kwargs)      # caller's own options may override threads etc.
        ...
    print("\n".join(report + [limit.describe()]))
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .budget import full_budget, minimum_budget
from .memory_limits import cgroup_dirs
from .errors import EdgeMoeError
from .profiles import DeviceProfile, load_profile

RUNTIME_OVERHEAD = 150 * 10**6  # Python + onnxruntime + arenas + KV cache beyond backbone and experts (measured ~40-100 MB)


class TokenBucket:
    """A shared flash device of `rate` bytes/s plus `latency` seconds per read, for all I/O threads.

    Tokens refill at `rate` up to `burst`; a read takes nbytes + latency*rate tokens and may drive the bucket into
    debt, which later readers wait out: the aggregate rate holds however many threads read at once.

    Args:
        rate: bytes per second (> 0).
        latency: seconds added to every read (> = 0).
        burst: bytes that may pass at once after an idle spell (default: none, like a busy device).

    Raises:
        EdgeMoeError: rate not positive or latency/burst negative.
    """

    def __init__(self, rate: float, latency: float = 0.0, burst: float = 0.0):
        if not rate > 0:
            raise EdgeMoeError(f"throttle rate {rate!r} bytes/s must be positive")
        if latency < 0 or burst < 0:
            raise EdgeMoeError(f"throttle latency {latency!r} s and burst {burst!r} bytes must not be negative")
        self.rate, self.latency, self.burst = float(rate), float(latency), float(burst)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.waited_seconds = 0.0

    def reserve(self, nbytes: int) -> float:
        """Takes the tokens of one read; returns the monotonic time at which the emulated device finishes it."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes + self.latency * self.rate
            return now + max(0.0, -self._tokens / self.rate)

    def wait(self, deadline: float) -> None:
        """Sleeps until `deadline` (after the real read: a read costs max(real, emulated) time)."""
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
            self.waited_seconds += delay

    def consume(self, nbytes: int) -> None:
        """reserve + wait in one call."""
        self.wait(self.reserve(nbytes))


def profile_budget(profile: DeviceProfile, manifest, built: bool | None = None) -> int:
    """Expert budget on the device: usable RAM less the backbone and the runtime's overhead, capped at all experts.
    built: experts sized as where edge_moe's kernels exist (the planner: the profile's cpu.isa), None: as on this
    machine (the emulator, which runs here).

    Raises:
        EdgeMoeError: the device cannot hold the backbone plus one layer's top-k experts.
    """
    room = profile.usable_ram_bytes - manifest.backbone_bytes - RUNTIME_OVERHEAD
    need = minimum_budget(manifest, True, built)
    if room < need:
        raise EdgeMoeError(f"profile {profile.name}: {profile.usable_ram_bytes / 1e9:.2f} GB usable RAM cannot hold "
                           f"the backbone ({manifest.backbone_bytes / 1e9:.2f} GB), the runtime "
                           f"({RUNTIME_OVERHEAD / 1e9:.2f} GB) and one layer's experts ({need / 1e9:.3f} GB); "
                           "pick a larger device or a smaller model")
    return min(room, full_budget(manifest, True, built))


def emulation_options(profile, manifest=None, host_cores: int | None = None) -> tuple[dict, list[str]]:
    """Load options and a report for running under `profile` on this machine.

    Args:
        profile: a DeviceProfile, a shipped profile name or a profile file path.
        manifest: the model's Manifest; without it no budget is set (the caller must give one).
        host_cores: this machine's cores (default: physical cores).

    Returns:
        (load_kwargs for edge_moe.load: threads, budget, throttle; report lines saying what is real/emulated).

    Raises:
        EdgeMoeError: unknown or invalid profile; the model cannot fit the profile's RAM.
    """
    from .sessions import default_threads

    profile = load_profile(profile)
    host = host_cores or default_threads()
    threads = min(profile.cores, host)
    kwargs: dict = {"threads": threads,
                    "throttle": TokenBucket(profile.flash_seq_read, profile.read_latency)}
    report = [f"emulating {profile.name}: {profile.description}"]
    capped = "" if profile.cores <= host else f" (profile has {profile.cores}; this machine has {host})"
    report.append(f"  threads        real      {threads}{capped}")
    if manifest is not None:
        kwargs["budget"] = profile_budget(profile, manifest)
        report.append(f"  expert budget  real      {kwargs['budget'] / 1e9:.3f} GB = {profile.usable_ram_bytes / 1e9:.2f} GB "
                      f"usable - backbone {manifest.backbone_bytes / 1e9:.3f} GB - runtime {RUNTIME_OVERHEAD / 1e9:.2f} GB")
    report.append(f"  flash          emulated  {profile.flash_seq_read / 1e6:.0f} MB/s + "
                  f"{profile.read_latency * 1e3:.3f} ms per read (token bucket; cannot exceed this disk's speed)")
    report.append("  CPU speed, memory bandwidth, accelerator: not emulated (this machine's)")
    return kwargs, report


@dataclass
class MemoryLimit:
    """Outcome of `memory_limit`: `real` is True when the kernel enforces `nbytes` on this process."""

    nbytes: int
    real: bool = False
    reason: str = ""
    cgroup: str = ""

    def describe(self) -> str:
        if self.real:
            return (f"  process memory real      {self.nbytes / 1e9:.2f} GB incl. page cache ({self.cgroup})")
        return f"  process memory not applied ({self.reason})"


def _try_cgroup(version: str, parent: Path, nbytes: int) -> Path:
    child = parent / f"edge_moe_{os.getpid()}"
    child.mkdir(exist_ok=True)
    try:
        if version == "v2":
            (child / "memory.max").write_text(str(nbytes))
            if (child / "memory.swap.max").exists():  # swap would let the process exceed the device's RAM
                (child / "memory.swap.max").write_text("0")
        else:
            (child / "memory.limit_in_bytes").write_text(str(nbytes))
        (child / "cgroup.procs").write_text(str(os.getpid()))
    except OSError:
        with contextlib.suppress(OSError):
            child.rmdir()
        raise
    return child


@contextlib.contextmanager
def memory_limit(nbytes: int, enabled: bool = True):
    """Moves this process (and the children it starts) into a new memory cgroup limited to nbytes, page cache
    included, for the duration of the block; on exit moves it back and removes the group.

    Yields:
        MemoryLimit: `.real` says whether the limit is enforced; `.reason` says why not (no cgroup, refused ...).
        Never raises for a refused cgroup: the run goes on without the real limit.
    """
    limit = MemoryLimit(int(nbytes))
    if not enabled:
        limit.reason = "disabled by the caller"
        yield limit
        return
    candidates = cgroup_dirs()
    if not candidates:
        limit.reason = "no memory cgroup (v1 or v2) is mounted for this process"
    child = parent = None
    for version, directory in candidates:
        try:
            child, parent = _try_cgroup(version, directory, limit.nbytes), directory
            limit.real, limit.cgroup = True, f"cgroup {version} {child}"
            break
        except OSError as exc:
            limit.reason += f"{'; ' if limit.reason else ''}cgroup {version} at {directory} refused: {exc.strerror or exc}"
    try:
        yield limit
    finally:
        if child is not None:
            with contextlib.suppress(OSError):
                (parent / "cgroup.procs").write_text(str(os.getpid()))
            for _ in range(20):  # rmdir fails while the kernel still drains the group's charges
                try:
                    child.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def emulated_decode(model_dir, profile, tokens: int = 64, prompt_tokens: int = 16, real_memory: bool = True,
                    **overrides) -> dict:
    """One greedy generation of a random prompt (seed 0, like `edge-moe bench`) under `profile`'s limits.

    Returns:
        The generation stats plus "limits": the report lines (which limits were real, which emulated).
    """
    import numpy as np

    import edge_moe
    from .manifest import Manifest

    profile = load_profile(profile)
    kwargs, report = emulation_options(profile, Manifest.load(model_dir))
    kwargs.update(overrides)
    with memory_limit(profile.usable_ram_bytes, enabled=real_memory) as limit:
        model = edge_moe.load(model_dir, **kwargs)
        prompt = np.random.default_rng(0).integers(0, model.config["vocab_size"], prompt_tokens).tolist()
        stats = model.generate(prompt, max_new_tokens=tokens).stats
        model.store.close()
    stats["limits"] = report + [limit.describe()]
    return stats
