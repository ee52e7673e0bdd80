"""Writing a file so that a crash or a concurrent reader never sees half of it."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EdgeMoeError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` beside `path` under a name of this process, then renames it over `path`.

    Raises:
        EdgeMoeError: the directory is missing or not writable (the message names the path).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgeMoeError(f"{path}: cannot write it ({exc.strerror}); choose a writable path") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable_path(path: str | os.PathLike, option: str) -> None:
    """Refuses an output file whose directory is missing, before the work that produces it. Raises EdgeMoeError."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise EdgeMoeError(f"{option} {path}: directory {parent} does not exist; create it or write elsewhere")
