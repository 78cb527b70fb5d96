"""Small builders shared by the unit and integration tests.

Anything that more than one test file needs to make (ports, tarballs, layers, images)
lives here instead of being copied into each test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # from Debian's busybox-static: no libraries needed
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "env", "true", "false", "sleep")

# A fixed mtime keeps built tarballs, and so their digests, reproducible.
_MTIME = 1_700_000_000


SYSTEM_PYTHON = Path("/usr/bin/python3")
REPO = Path(__file__).resolve().parents[1]


def make_user_venv(directory: Path) -> str:
    """A python that another user can run: a venv of the system's /usr/bin/python3 in
    ``directory``, seeing this checkout and the packages of the .venv the tests run from.

    (Root's own interpreter may live where that user cannot go: /root is 0700.) The
    caller makes ``directory`` reachable; returns the venv's python.
    """
    import sysconfig

    venv = directory / "venv"
    subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)],
        check=True,
        capture_output=True,
    )
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", where], check=True, capture_output=True, text=True
    ).stdout.strip()
    # This checkout first, then the packages of the .venv the tests run from.
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "layerfs-checkout.pth").write_text(f"{REPO}\n{ours}\n")
    return python


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


# -- layer tars, layers and graph nodes for the store unit tests -------------------------------


def tar_member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    data: bytes = b"",
    mode: int | None = None,
    linkname: str = "",
    mtime: float = _MTIME,
    uid: int = 0,
    gid: int = 0,
    devmajor: int = 0,
    devminor: int = 0,
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    """One tar member (header info and data) for :func:`build_tar`.

    Directories default to 0755 and everything else to 0644; only regular files carry
    ``data``.
    """
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.linkname = linkname
    info.mtime = mtime
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.devmajor, info.devminor = devmajor, devminor
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def tar_dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    return tar_member(name, tarfile.DIRTYPE, mode=mode)


def tar_file(name: str, data: bytes = b"", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    return tar_member(name, tarfile.REGTYPE, data=data, mode=mode)


def tar_symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return tar_member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def tar_hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return tar_member(name, tarfile.LNKTYPE, linkname=target)


def build_tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """The bytes of a tar holding ``members`` in order (tarfile pads it to 10 KiB)."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def fake_image_id(seed: str) -> str:
    """A valid, reproducible 64-hex image ID."""
    return hashlib.sha256(seed.encode()).hexdigest()


def legacy_image_json(image_id: str, parent: str = "", **fields: object) -> bytes:
    """A minimal legacy v1 image JSON whose ``id`` is ``image_id``."""
    doc: dict[str, object] = {"id": image_id, "created": "2015-01-01T00:00:00Z", **fields}
    if parent:
        doc["parent"] = parent
    return json.dumps(doc).encode()


REPO_ROOT = Path(__file__).resolve().parent.parent


def spawn_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Run ``code`` in a fresh Python (this interpreter, this checkout) with ``args``.

    stdin and stdout are text pipes, so a test can hand a child steps one line at a
    time (``proc.stdin.write("go\\n")``) and wait for its answers (``readline()``)
    instead of sleeping.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )


def read_fifo_while(fifo: Path, run: Callable[[], int]) -> tuple[int, bytes]:
    """``run()``'s result and what it wrote into the named pipe ``fifo``, which a thread
    reads meanwhile. A reader left waiting for a writer (``run`` never opened the pipe) is
    woken by an empty write end, so that a failing ``run`` fails the test, not hangs it."""
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        result = run()
    finally:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waits any more
        reader.join(10)
    return result, b"".join(received)
