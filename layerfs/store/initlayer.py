"""The init layer: the mountpoints and files a container runtime binds over.

These are the entries of Docker's SetupInitLayer (graph/graph_unix.go, 1.8):
directories for /dev/pts, /dev/shm, /proc and /sys; empty 0755 files for
/.dockerinit, /.dockerenv, /etc/resolv.conf, /etc/hosts, /etc/hostname and
/dev/console (a regular file, the bind target of the console); and the
/etc/mtab symlink to /proc/mounts. Parents (/dev, /etc) are 0755 directories.

The mount lays :data:`INIT_ENTRIES` on top of an image (an existing directory
is left as it is; a file or symlink at a listed path is replaced);
:func:`setup_init_layer` writes the same entries into a real directory.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InitEntry:
    path: str  # relative to the root
    type: str  # "d" directory, "f" empty file, "l" symlink
    mode: int
    target: str = ""


INIT_ENTRIES: tuple[InitEntry, ...] = (
    InitEntry("dev/pts", "d", 0o755),
    InitEntry("dev/shm", "d", 0o755),
    InitEntry("proc", "d", 0o755),
    InitEntry("sys", "d", 0o755),
    InitEntry(".dockerinit", "f", 0o755),
    InitEntry(".dockerenv", "f", 0o755),
    InitEntry("etc/resolv.conf", "f", 0o755),
    InitEntry("etc/hosts", "f", 0o755),
    InitEntry("etc/hostname", "f", 0o755),
    InitEntry("dev/console", "f", 0o755),
    InitEntry("etc/mtab", "l", 0o777, "/proc/mounts"),
)

INIT_PARENT_MODE = 0o755
"""Mode of the parent directories (/dev, /etc) created implicitly."""


def init_parents() -> list[str]:
    """Parent directories the init entries need, shallowest first."""
    parents: set[str] = set()
    for entry in INIT_ENTRIES:
        parts = entry.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parents.add("/".join(parts[:i]))
    return sorted(parents, key=lambda p: (p.count("/"), p))


def setup_init_layer(root: Path) -> None:
    """Populate a directory like Docker's SetupInitLayer (modes subject to the umask)."""
    for entry in INIT_ENTRIES:
        parts = entry.path.split("/")
        # Unlink every prefix component first: files and symlinks go, directories stay.
        for i in range(1, len(parts) + 1):
            try:
                os.unlink(root.joinpath(*parts[:i]))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EISDIR, errno.EPERM, errno.ENOTDIR):
                    raise
        target = root / entry.path
        try:
            os.stat(target)
            continue
        except FileNotFoundError:
            pass
        target.parent.mkdir(mode=INIT_PARENT_MODE, parents=True, exist_ok=True)
        if entry.type == "d":
            target.mkdir(mode=entry.mode, exist_ok=True)
        elif entry.type == "f":
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, entry.mode))
        else:
            os.symlink(entry.target, target)
