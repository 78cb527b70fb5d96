"""Small builders shared by the unit and integration tests.

Anything that more than one test file needs to make (ports, tarballs, layers, images)
lives here instead of being copied into each test.
"""

from __future__ import annotations

import io
import socket
import tarfile
from collections.abc import Iterable
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # from Debian's busybox-static: no libraries needed
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "env", "true", "false", "sleep")

# A fixed mtime keeps built tarballs, and so their digests, reproducible.
_MTIME = 1_700_000_000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_busybox_rootfs_tar(
    path: Path,
    *,
    busybox: Path = BUSYBOX,
    applets: Iterable[str] = BUSYBOX_APPLETS,
) -> Path:
    """Write a tiny real root filesystem as a flat tar at *path* and return *path*.

    It holds ``/bin/busybox`` (static), a symlink ``/bin/<applet> -> busybox`` for each
    applet, ``/etc/passwd``, ``/etc/group`` and empty ``/root`` and ``/tmp``, all owned
    by root. ``docker import`` and ``layerfs import`` take it as it is.
    """
    with tarfile.open(path, "w") as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777)):
            tar.addfile(_entry(name, tarfile.DIRTYPE, mode))
        with busybox.open("rb") as data:
            tar.addfile(_entry("bin/busybox", tarfile.REGTYPE, 0o755, busybox.stat().st_size), data)
        for applet in applets:
            tar.addfile(_entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="busybox"))
        for name, text in (
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ):
            data_bytes = text.encode()
            entry = _entry(name, tarfile.REGTYPE, 0o644, len(data_bytes))
            tar.addfile(entry, io.BytesIO(data_bytes))
    return path


def _entry(
    name: str, kind: bytes, mode: int, size: int = 0, *, linkname: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
