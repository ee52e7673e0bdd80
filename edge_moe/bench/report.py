"""Tables on stdout and JSON files for benchmark results."""

from __future__ import annotations

import json
import os

from ..files import write_text_atomic


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value / 2**20:,.1f}Mi"
    return str(value)


def print_table(title: str, rows: list[dict]) -> None:
    """Prints rows (dicts with the same keys) as an aligned table."""
    if not rows:
        return
    columns = list(rows[0])
    cells = [[format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomic: a crash never leaves half a results file."""
    write_text_atomic(path, json.dumps(data, indent=1))
