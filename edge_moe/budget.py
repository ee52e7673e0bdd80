"""Memory budgets: the `Budget` value (`512MB`, `2GiB`, `25%`, `auto`) that the RAM and accelerator tiers both take,
what each tier's bytes come to, and the minimum that can run.

One meaning of a percentage everywhere: a share of what every expert costs resident (`share_total`, the same
number for the RAM and the accelerator tier), so `--budget 25%` and `--gpu-budget 25%` are the same bytes and 100%
holds every expert in either tier. That total is the experts' stored bytes (`Manifest.expert_bytes`) plus what RAM
residency adds to each (`record_footprint`: the page-rounded read buffer, and a quantized expert's MatMulNBits
session or float32 copy), because the RAM budget must cover those: for float experts a few pages (1.5% more than the
stored bytes for the default model), for quantized ones up to several times their stored bytes. The accelerator spends
its bytes on weights alone, so it holds a little more of the float experts than the share says (quantized experts
run on the CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import EdgeMoeError
from .manifest import ExpertRecord, Manifest
from .experts import expert_shape
from .quant import resident_extra_bytes

PAGE = 4096
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
_PRINTED_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
                  ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


@dataclass(frozen=True)
class Budget:
    """How many expert bytes a tier may hold, as the user wrote it: bytes, a percentage (of `share_total`), 'auto'
    (sized from this process's memory: `auto_budget`), or no limit (every expert).

    Create with `Budget.parse`; `resolve(total)` gives the bytes; `str()` prints it back as `parse` reads it (no
    limit prints as 'all', which only prints).
    """

    nbytes: int | None = None  # an absolute figure
    percent: float | None = None  # a share: 25.0 for '25%'
    auto: bool = False

    @classmethod
    def parse(cls, value, what: str = "budget", allow_auto: bool = True) -> "Budget":
        """A Budget from None (no limit), an int or float (bytes), '512MB', '2GiB', '1.5G', '25%', or 'auto'.

        Args:
            what: how the error names the value ('budget', 'gpu budget', '--memory-limit').
            allow_auto: whether 'auto' is accepted (the accelerator's budget has no automatic size).
        Raises:
            EdgeMoeError: malformed or negative (one line naming `what`, the value and the accepted forms).
        """
        if isinstance(value, Budget):
            return value
        if value is None:
            return cls()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < 0:
                raise EdgeMoeError(f"{what} {value!r} is negative; give bytes like 512MB, a share like 25%, or 0")
            return cls(nbytes=int(value))
        text = str(value).strip().lower().replace(" ", "")
        if text == "auto" and allow_auto:
            return cls(auto=True)
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(%|[kmgt]?i?b?)", text)
        if not match or (match.group(2) != "%" and match.group(2) not in _UNITS):
            raise EdgeMoeError(f"{what} {value!r} is not understood; write bytes like 512MB or 2GiB, or a share "
                               f"of the expert bytes like 25%{', or auto' if allow_auto else ''}")
        number, unit = float(match.group(1)), match.group(2)
        return cls(percent=number) if unit == "%" else cls(nbytes=int(number * _UNITS[unit]))

    @property
    def unlimited(self) -> bool:
        """No limit: every expert (what None means)."""
        return self.nbytes is None and self.percent is None and not self.auto

    def resolve(self, total_bytes: int) -> int | None:
        """Bytes, a percentage taken of `total_bytes` (`share_total` for a tier's budget); None when unlimited.

        Raises:
            EdgeMoeError: 'auto', which is sized from memory (`auto_budget`), not from a total.
        """
        if self.auto:
            raise EdgeMoeError("budget 'auto' is sized from this process's memory, not from the expert bytes; "
                               "size it with edge_moe.budget.auto_budget")
        if self.percent is not None:
            return int(self.percent / 100 * total_bytes)
        return self.nbytes

    def __str__(self) -> str:
        if self.auto:
            return "auto"
        if self.percent is not None:
            return f"{self.percent:g}%"
        if self.nbytes is None:
            return "all"
        # the shortest exact form ('512MB', not '500000KiB'), so that parse(str(b)) == b
        exact = [(self.nbytes // size, name) for name, size in _PRINTED_UNITS if self.nbytes % size == 0]
        number, unit = min(exact, default=(self.nbytes, ""))
        return f"{number}{unit}" if self.nbytes else "0"


def expert_footprint(length: int) -> int:
    """Bytes one resident expert costs: its page-rounded read buffer plus the alignment slack (store.py)."""
    return -(-length // PAGE) * PAGE + PAGE


def record_footprint(record: ExpertRecord, kernel: bool = True, built: bool | None = None) -> int:
    """Bytes one resident expert of this record costs: its read buffer plus what a quantized expert holds beside it
    (its MatMulNBits session's prepacked weights, or its dequantized float32 copy; nothing where edge_moe's kernel
    reads the buffer: edge_moe.quant). kernel: the model may run edge_moe's kernels (native_kernel not False); built:
    they exist on the machine in question (a device profile's cpu.isa), None: this one."""
    return expert_footprint(record.length) + resident_extra_bytes(expert_shape(record), kernel, built)


def minimum_budget(manifest: Manifest, kernel: bool = True, built: bool | None = None) -> int:
    """The largest layer's top-k experts: a layer's experts must all be resident while it runs."""
    k = int(manifest.config["top_k"])
    by_layer: dict[int, list[int]] = {}
    for record in manifest.experts.values():
        by_layer.setdefault(record.layer, []).append(record_footprint(record, kernel, built))
    return max((sum(sorted(sizes)[-k:]) for sizes in by_layer.values()), default=0)


def full_budget(manifest: Manifest, kernel: bool = True, built: bool | None = None) -> int:
    """What every expert costs resident in RAM (stored bytes, read buffers' rounding, quantized extras): the most
    a RAM budget can use."""
    return sum(record_footprint(r, kernel, built) for r in manifest.experts.values())


def share_total(manifest: Manifest, kernel: bool = True) -> int:
    """What a percentage budget is a share of, in every tier: what every expert costs resident (module docstring)."""
    return full_budget(manifest, kernel)


def parse_bytes(value, total: int, what: str = "budget") -> int:
    """Bytes from an int, '512MB', '2GiB', '1.5G' or '25%' (a share of `total`).

    Raises:
        EdgeMoeError: malformed, negative or missing (the message names `what` and the accepted forms).
    """
    nbytes = Budget.parse(value, what, allow_auto=False).resolve(total)
    if nbytes is None:
        raise EdgeMoeError(f"{what} is missing; write bytes like 512MB or 2GiB, or a share like 25%")
    return nbytes


def parse_budget(value, manifest: Manifest, kernel: bool = True) -> int:
    """Bytes of the RAM expert budget from an int, '512MB', '2GiB', '1.5G' or '25%' (of `share_total`), or a
    Budget. 'auto' is sized by `auto_budget` instead.

    Raises:
        EdgeMoeError: malformed, or below the minimum that can run (the message names the minimum).
    """
    budget = Budget.parse(value, allow_auto=False)
    if budget.unlimited:
        raise EdgeMoeError("budget None is not a limit; leave budget out to keep every expert resident, or write "
                           "bytes like 512MB or a share like 25%")
    nbytes = budget.resolve(share_total(manifest, kernel))
    minimum = minimum_budget(manifest, kernel)
    if nbytes < minimum:
        raise EdgeMoeError(f"budget {value!r} ({nbytes:,} bytes) is below the minimum of {minimum:,} bytes "
                           f"({minimum / 2**20:.1f} MiB: the largest layer's top-{manifest.config['top_k']} "
                           "experts); raise the budget")
    return nbytes


def kv_bytes_per_token(config: dict) -> int:
    """float32 cache of every layer for one token, in the family's cache layout (MLA: the latent, not K/V)."""
    from .family_spec import attention_spec

    return int(config["num_layers"]) * attention_spec(config).cache_floats_per_token * 4


def auto_budget(manifest: Manifest, kernel: bool = True) -> tuple[int, str]:
    """`budget="auto"`: what the process may still use (cgroup limit, else available RAM; memory_limits.py) less
    the KV cache and slack, at most every expert; call after the backbone is loaded so its memory is counted.

    Returns:
        (bytes, a one-line note that says how the figure was reached).
    Raises:
        EdgeMoeError: the memory left is below the minimum budget (the message names both).
    """
    from .memory_limits import auto_budget_bytes

    context = int(manifest.config.get("max_position_embeddings") or 4096)
    nbytes, note = auto_budget_bytes(kv_bytes_per_token(manifest.config), context)
    minimum, full = minimum_budget(manifest, kernel), full_budget(manifest, kernel)
    if nbytes < minimum:
        raise EdgeMoeError(f"{note}; that is below the minimum of {minimum / 2**20:.1f} MiB (the largest layer's "
                           f"top-{manifest.config['top_k']} experts): free memory or raise the limit")
    if nbytes >= full:
        return full, f"{note}; every expert fits ({full / 2**20:,.1f} MiB)"
    return nbytes, note


def check_memory(nbytes: int, purpose: str, fix: str) -> None:
    """Refuses, before allocating, what this process may not take (its cgroup limit or the available RAM,
    memory_limits.py): a manifest's sizes are bounded by the bytes on disk, not by RAM.

    Raises:
        EdgeMoeError: naming the bytes needed and available, and `fix`.
    """
    from .memory_limits import memory_headroom

    headroom = memory_headroom()
    if nbytes > headroom.nbytes:
        raise EdgeMoeError(f"{purpose} needs {nbytes / 2**30:.2f} GiB of memory and this process may take "
                           f"{headroom.nbytes / 2**30:.2f} GiB ({headroom.source}); {fix}")
