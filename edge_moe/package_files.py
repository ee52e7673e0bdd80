"""The files of a package, opened as untrusted input.

A package is something people download and share: every path its manifest names must stay inside the package
directory (no absolute path, no `..`, no symlink that leads out), name a regular file (a FIFO would block a read
forever, a device file would never end), and the files edge_moe reads whole (manifest, tokenizer) have a size
cap. What the runtime opens itself it opens with O_NOFOLLOW | O_NONBLOCK and checks with fstat after the open, so
a file swapped for a FIFO or a link between the check and the open is refused too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import xxhash

from .errors import EdgeMoeError

MANIFEST_MAX_BYTES = 64 << 20  # a 64-layer, 256-expert model's manifest is about 10 MB
TOKENIZER_MAX_BYTES = 256 << 20  # the largest tokenizer.json files on the Hub are a few tens of MB
REEXPORT = "re-export the model with `edge-moe export HF_DIR OUT_DIR`"
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 8 << 20


def package_root(root: str | os.PathLike) -> Path:
    """The package directory, resolved (its own path may go through links: the user chose it)."""
    path = Path(root)
    if not path.is_dir():
        raise EdgeMoeError(f"{shown(path)}: no such model directory; pass a package made by `edge-moe export`")
    return Path(os.path.realpath(path))


def confine(root: Path, relative, field: str) -> Path:
    """The file that manifest field `field` names, checked to be a regular file inside `root` (resolved).

    Raises:
        EdgeMoeError: not a relative path inside the package, a link leading out of it, missing, not a regular file.
    """
    return Confined(root).file(relative, field)


class Confined:
    """Confinement for many paths of one package: each directory is resolved once (a manifest names thousands of
    files in a handful of directories), each file is lstat-ed once."""

    def __init__(self, root: Path):
        self.root = str(root)
        self._dirs: dict[tuple, str] = {(): self.root}
        self._manifest = os.path.join(self.root, "manifest.json")  # for messages

    def file(self, relative, field: str) -> Path:
        """See `confine`."""
        manifest = self._manifest
        if not isinstance(relative, str) or not relative or "\0" in relative or "\\" in relative:
            raise EdgeMoeError(f"{shown(manifest)}: {field} is {str(relative)[:80]!r}, not a relative path; "
                               f"{REEXPORT}")
        parts = tuple(p for p in relative.split("/") if p not in ("", "."))
        if relative.startswith("/") or ".." in parts or not parts:
            raise EdgeMoeError(f"{shown(manifest)}: {field} {relative[:200]!r} points outside the package; "
                               f"paths must be relative and inside it; {REEXPORT}")
        path = os.path.join(self._directory(parts[:-1], field), parts[-1])
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = 0  # require_regular names what is wrong
        if not stat.S_ISREG(mode):
            if stat.S_ISLNK(mode):
                path = self._inside(os.path.realpath(path), path)
            require_regular(path, field)
        return Path(path)

    def _directory(self, parts: tuple, field: str) -> str:
        if parts not in self._dirs:
            path = os.path.join(self.root, *parts)
            self._dirs[parts] = self._inside(os.path.realpath(path), path)
        return self._dirs[parts]

    def _inside(self, real: str, path: str) -> str:
        if real != self.root and not real.startswith(self.root.rstrip(os.sep) + os.sep):
            raise EdgeMoeError(f"{shown(path)}: a symbolic link that leads outside the package (to {shown(real)}); "
                               f"replace it with the file itself, or {REEXPORT}")
        return real


def require_regular(path: Path, field: str = "file") -> os.stat_result:
    """lstat: the path exists and is a regular file (checked before any open, so a FIFO never blocks)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise EdgeMoeError(f"{shown(path)}: {field} is missing from the package; {REEXPORT}") from None
    except OSError as exc:
        raise EdgeMoeError(f"{shown(path)}: {field} cannot be read ({exc.strerror}); check the package's permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise EdgeMoeError(f"{shown(path)}: {field} is a {_kind(st.st_mode)}, not a regular file; {REEXPORT}")
    return st


def open_regular(path: str | os.PathLike, field: str = "file", flags: int = 0) -> int:
    """An fd of a regular file, opened without following a final link and without blocking on a FIFO.

    Raises:
        EdgeMoeError: the path is a link, FIFO, device or directory, or cannot be opened.
    """
    try:
        fd = os.open(path, OPEN_FLAGS | flags)
    except OSError as exc:
        raise EdgeMoeError(f"{shown(path)}: {field} cannot be opened ({exc.strerror}; links are not followed); "
                           f"{REEXPORT}") from exc
    return check_regular_fd(fd, path, field)


def check_regular_fd(fd: int, path, field: str = "file") -> int:
    """fstat after the open: returns fd if it is a regular file, else closes it and raises EdgeMoeError."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise EdgeMoeError(f"{shown(path)}: {field} is a {_kind(st.st_mode)}, not a regular file; {REEXPORT}")
    return fd


def read_capped(path: Path, limit: int, field: str) -> bytes:
    """The whole file, refused before reading when it is larger than `limit` bytes."""
    fd = open_regular(path, field)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise EdgeMoeError(f"{shown(path)}: {field} is {size:,} bytes, over the {limit:,}-byte limit; this is not "
                               f"a file edge_moe wrote ({REEXPORT})")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def file_checksum(path: str | os.PathLike, field: str = "file") -> tuple[int, str]:
    """(size, "xxh3_64:<hex>") of a regular file, read in chunks."""
    fd = open_regular(path, field)
    hasher = xxhash.xxh3_64()
    size = 0
    # one buffer refilled (readinto): half the time of a fresh bytes object per chunk; no larger than the file, as
    # zeroing 8 MiB for a 20 kB graph costs more than hashing it (mmap would be faster still, but a file truncated
    # meanwhile kills the process with SIGBUS)
    buffer = bytearray(max(1, min(_CHUNK, os.fstat(fd).st_size + 1)))
    view = memoryview(buffer)
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                hasher.update(view[:n])
                size += n
    except OSError as exc:
        raise EdgeMoeError(f"{shown(path)}: {field} cannot be read ({exc.strerror}); check the disk and the package") from None
    finally:
        os.close(fd)
    return size, f"xxh3_64:{hasher.hexdigest()}"


def shown(path) -> str:
    """A path for a one-line message: as is when printable, else its repr (a name may hold a newline)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"
