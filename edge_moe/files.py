"""Writing a file so that a crash or a concurrent reader never sees half of it, and a planted file cannot redirect it.

The temporary file is created with O_CREAT | O_EXCL under an unpredictable name in the target's directory
(tempfile.mkstemp: a symlink planted there is never followed), fsynced, renamed over the target, and the directory
is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import EdgeMoeError


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically and durably (see the module docstring); returns the path.

    Raises:
        EdgeMoeError: the directory is missing or not writable, or the disk is full (the message names the path).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise EdgeMoeError(f"{path}: cannot write it ({exc.strerror}); choose a writable path") from None
    try:
        try:  # mkstemp makes 0600; keep the mode of the file replaced, else the usual 0644
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            mode = 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise EdgeMoeError(f"{path}: cannot write it ({exc.strerror}); choose a writable path") from None
        raise
    fsync_directory(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes_atomic` of the UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_writable_path(path: str | os.PathLike, option: str) -> None:
    """Refuses an output file whose directory is missing, before the work that produces it. Raises EdgeMoeError."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise EdgeMoeError(f"{option} {path}: directory {parent} does not exist; create it or write elsewhere")


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes renames and creations inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; nothing more can be done there
    finally:
        os.close(fd)


# Staging directories ---------------------------------------------------------------------------------------------
# An export builds NAME.partial-<pid> and swaps it into NAME. A folder is edge_moe's own leftover only when its name
# ends in .partial-<pid> or .old-<pid> AND it holds a marker file edge_moe wrote naming that same pid, and that pid
# no longer runs: a user's folder that merely looks alike is never touched.

MARKER = ".edge_moe_staging"


def write_marker(directory: Path, pid: int) -> None:
    write_text_atomic(directory / MARKER, f"{pid}\n")


def stale_pid(directory: Path) -> int | None:
    """The pid of a dead export that left `directory`, else None (not ours, or its export still runs)."""
    suffix = directory.name.rsplit("-", 1)[-1]
    if not (suffix.isdigit() and (".partial-" in directory.name or ".old-" in directory.name)):
        return None
    try:
        marker = (directory / MARKER).read_text().strip() if not directory.is_symlink() else ""
    except OSError:
        return None
    if marker != suffix or alive(int(suffix)):
        return None
    return int(suffix)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True


def exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (bottom-up), so that a rename of root publishes durable data."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(directory)


def drop_page_cache(paths) -> None:
    """Best effort: asks the kernel to drop these files' cached pages (pages mapped somewhere stay); links are not
    followed. Used where a file's pages are read once and would otherwise be charged as used (a memory cgroup) or
    would make the next benchmark run start warm."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except (OSError, TypeError):
            continue
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
