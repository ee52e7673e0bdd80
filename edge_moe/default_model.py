"""The model that ships inside the package, exported on first use into a per-user cache directory.

The wheel carries a small Hugging Face checkpoint (edge_moe/default_model/: config.json, model.safetensors,
tokenizer.json). `default_model_path()` exports it once, atomically (the exporter writes aside and renames), into
$EDGE_MOE_CACHE or $XDG_CACHE_HOME/edge_moe or ~/.cache/edge_moe, keyed by the edge_moe version and a digest of
the shipped files, so an upgrade rebuilds it and a killed export is simply redone. A read-only or missing home
falls back to a temporary directory with a notice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import __version__
from .errors import EdgeMoeError

SHIPPED = Path(__file__).with_name("default_model")


def shipped_checkpoint() -> Path:
    if not (SHIPPED / "config.json").exists():
        raise EdgeMoeError(f"{SHIPPED}: the default model is not installed with this copy of edge_moe; "
                           "reinstall the package or pass --model DIR")
    return SHIPPED


def cache_root() -> Path:
    if os.environ.get("EDGE_MOE_CACHE"):
        return Path(os.environ["EDGE_MOE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge_moe"


def _digest(checkpoint: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as f:  # the head is enough to tell two trainings apart, and is cheap
                h.update(f.read(1 << 16))
    return h.hexdigest()[:12]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def _remove_stale_partials(root: Path) -> None:
    """Staging directories of exports that were killed: their pid no longer runs."""
    for partial in root.glob("*.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def default_model_path(progress: bool = True) -> Path:
    """The exported default model, exporting it first if this version has not yet.

    Returns:
        The package directory.
    Raises:
        EdgeMoeError: the shipped checkpoint is missing, or no directory (cache or temporary) is writable.
    """
    from edge_moe_export.exporter import export_checkpoint

    checkpoint = shipped_checkpoint()
    name = f"default-{__version__}-{_digest(checkpoint)}"
    root = cache_root()
    if (root / name / "manifest.json").exists():
        return root / name
    if not _writable(root):
        fallback = Path(tempfile.gettempdir()) / f"edge_moe-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        print(f"edge-moe: {root} is not writable; using {fallback} for the default model "
              "(set EDGE_MOE_CACHE to choose)", file=sys.stderr)
        root = fallback
        if (root / name / "manifest.json").exists():
            return root / name
        if not _writable(root):
            raise EdgeMoeError(f"neither {cache_root()} nor {root} is writable; set EDGE_MOE_CACHE to a "
                               "writable directory")
    _remove_stale_partials(root)
    if progress:
        print(f"edge-moe: first use: exporting the default model to {root / name}", file=sys.stderr)
    return export_checkpoint(checkpoint, root / name, overwrite=True, progress=progress)


DEFAULT_NAME = "default"


def resolve_model(path, progress: bool = True) -> Path:
    """A package path from what a user gave: None or "default" is the default model (unless a directory named
    "default" exists here), anything else the directory itself."""
    if path is None or (str(path) == DEFAULT_NAME and not Path(DEFAULT_NAME).is_dir()):
        return default_model_path(progress=progress)
    return Path(path)
