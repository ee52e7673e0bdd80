"""Memory budgets: parsing `512MB`, `2GiB`, `25%` (of the model's expert bytes), and the minimum that can run."""

from __future__ import annotations

import re

from .errors import EdgeMoeError
from .manifest import ExpertRecord, Manifest
from .experts import expert_shape
from .quant import resident_extra_bytes

PAGE = 4096
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def expert_footprint(length: int) -> int:
    """Bytes one resident expert costs: its page-rounded read buffer plus the alignment slack (store.py)."""
    return -(-length // PAGE) * PAGE + PAGE


def record_footprint(record: ExpertRecord) -> int:
    """Bytes one resident expert of this record costs: its read buffer plus what a quantized expert holds beside it
    (its MatMulNBits session's prepacked weights, or its dequantized float32 copy; edge_moe.quant)."""
    return expert_footprint(record.length) + resident_extra_bytes(expert_shape(record))


def minimum_budget(manifest: Manifest) -> int:
    """The largest layer's top-k experts: a layer's experts must all be resident while it runs."""
    k = int(manifest.config["top_k"])
    by_layer: dict[int, list[int]] = {}
    for record in manifest.experts.values():
        by_layer.setdefault(record.layer, []).append(record_footprint(record))
    return max((sum(sorted(sizes)[-k:]) for sizes in by_layer.values()), default=0)


def full_budget(manifest: Manifest) -> int:
    return sum(record_footprint(r) for r in manifest.experts.values())


def parse_bytes(value, total: int, what: str = "budget") -> int:
    """Bytes from an int, '512MB', '2GiB', '1.5G' or '25%' (a share of `total`).

    Raises:
        EdgeMoeError: malformed (the message names `what` and the accepted forms).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(%|[kmgt]?i?b?)", text)
    if not match or (match.group(2) != "%" and match.group(2) not in _UNITS):
        raise EdgeMoeError(f"{what} {value!r} is not understood; write bytes like 512MB or 2GiB, or a share "
                           "of the expert bytes like 25%")
    number, unit = float(match.group(1)), match.group(2)
    return int(number / 100 * total) if unit == "%" else int(number * _UNITS[unit])


def parse_budget(value, manifest: Manifest) -> int:
    """Bytes of the RAM expert budget from an int, '512MB', '2GiB', '1.5G' or '25%' (of the model's expert bytes).

    Raises:
        EdgeMoeError: malformed, or below the minimum that can run (the message names the minimum).
    """
    nbytes = parse_bytes(value, full_budget(manifest))
    minimum = minimum_budget(manifest)
    if nbytes < minimum:
        raise EdgeMoeError(f"budget {value!r} ({nbytes:,} bytes) is below the minimum of {minimum:,} bytes "
                           f"({minimum / 2**20:.1f} MiB: the largest layer's top-{manifest.config['top_k']} "
                           "experts); raise the budget")
    return nbytes


def kv_bytes_per_token(config: dict) -> int:
    """float32 cache of every layer for one token, in the family's cache layout (MLA: the latent, not K/V)."""
    from .family_spec import attention_spec

    return int(config["num_layers"]) * attention_spec(config).cache_floats_per_token * 4


def auto_budget(manifest: Manifest) -> tuple[int, str]:
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
    minimum, full = minimum_budget(manifest), full_budget(manifest)
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
