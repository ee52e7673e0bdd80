"""The model that ships inside the package, exported on first use into a per-user cache directory.

The wheel carries a small Hugging Face checkpoint (edge_moe/default_model/: config.json, model.safetensors,
tokenizer.json). `default_model_path()` exports it once, atomically (the exporter writes aside and renames), into
$EDGE_MOE_CACHE or $XDG_CACHE_HOME/edge_moe or ~/.cache/edge_moe, keyed by the edge_moe version, the package
format, the exporter's revision and a digest of the shipped files, so an upgrade rebuilds it and a killed export is
simply redone. A read-only or missing home falls back to a temporary directory with a notice.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from . import __version__
from .errors import EdgeMoeError
from .manifest import FORMAT_VERSION

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
    import hashlib  # here: its libcrypto is 3.5 MiB of resident memory that only this check uses

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
    """Staging folders of exports that were killed: only those with edge_moe's marker naming a dead pid."""
    from .files import stale_pid

    for partial in root.glob("*.partial-*"):
        if stale_pid(partial) is not None:
            shutil.rmtree(partial, ignore_errors=True)


def private_directory(path: Path) -> Path:
    """`path` as a directory only this user can write (created 0700; an existing one must be ours and private):
    in a shared /tmp another user could otherwise plant a package that we would load.

    Raises:
        EdgeMoeError: the path exists and is a link, not a directory, another user's, or open to others.
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise EdgeMoeError(f"{path}: cannot create ({exc.strerror}); set EDGE_MOE_CACHE to a writable "
                           "directory") from None
    st = os.lstat(path)
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise EdgeMoeError(f"{path}: exists but is not a private directory of this user (mode "
                           f"{stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}); remove it or set EDGE_MOE_CACHE")
    return path


def default_model_path(progress: bool = True) -> Path:
    """The exported default model, exporting it first if this version has not yet.

    Returns:
        The package directory.
    Raises:
        EdgeMoeError: the shipped checkpoint is missing, or no directory (cache or temporary) is writable.
    """
    from edge_moe_export.exporter import REVISION, export_checkpoint

    checkpoint = shipped_checkpoint()
    # the exporter's revision too: an export cached by an older exporter of the same version lacks its graph changes
    # (routing inside the layer graphs and in-place attention made the default model decode ~1.4x faster)
    name = f"default-{__version__}-v{FORMAT_VERSION}-x{REVISION}-{_digest(checkpoint)}"
    root = cache_root()
    if (root / name / "manifest.json").exists():
        return root / name
    if not _writable(root):
        fallback = Path(tempfile.gettempdir()) / f"edge_moe-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        print(f"edge-moe: {root} is not writable; using {fallback} for the default model "
              "(set EDGE_MOE_CACHE to choose)", file=sys.stderr)
        root = private_directory(fallback)
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
