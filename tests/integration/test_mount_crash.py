"""A mount server killed with SIGKILL while a program reads from the mount.

What the program sees (ENOTCONN), what ``layerfs mounts`` says (dead), what
``layerfs umount`` does (cleans up), that no hold of the dead server blocks
``rmi``, and that the upper directory of a writable mount survives whole: mounted
again by name, its saved changes are there and can be committed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import LayerfsCli
from tests.integration.mounting import Layer, build_image
from tests.integration.test_mount_ro import mounted

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

BIG = 32 << 20

_READER = """
import errno, os, sys
path, mnt = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
os.pread(fd, 65536, 0)  # the first pages come from the server
print("reading", flush=True)
sys.stdin.readline()  # the server is killed meanwhile
for what, call in (("read", lambda: os.pread(fd, 65536, 24 << 20)),
                   ("open", lambda: os.open(os.path.join(mnt, "data/small"), os.O_RDONLY)),
                   ("list", lambda: os.listdir(mnt))):
    try:
        call()
        print(what, "ok", flush=True)
    except OSError as exc:
        print(what, errno.errorcode[exc.errno], flush=True)
"""


def _server_pid(cli: LayerfsCli) -> int:
    return int(json.loads(cli("mounts", "--format", "json").stdout)["Pid"])


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"the server {pid} outlived SIGKILL")


def _status(cli: LayerfsCli) -> list[tuple[str, str]]:
    lines = cli("mounts", "--format", "json").stdout.decode().splitlines()
    return [(row["Mountpoint"], row["Status"]) for row in map(json.loads, lines)]


def test_a_reader_gets_enotconn_and_umount_cleans_up(layerfs_cli: LayerfsCli, tmp_path: Path):
    layer = Layer(tmp_path / "0.tar").dir("data").file("data/small", b"small")
    layer.file("data/big", os.urandom(BIG)).close()
    build_image(layerfs_cli.root, [layer.path], "crash:1")
    with mounted(layerfs_cli, "crash:1", tmp_path / "mnt") as mnt:
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(mnt / "data/big"), str(mnt)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert reader.stdout is not None and reader.stdin is not None
            assert reader.stdout.readline().strip() == "reading"
            _kill(_server_pid(layerfs_cli))
            reader.stdin.write("go\n")
            reader.stdin.flush()
            out, _ = reader.communicate(timeout=60)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        # Every request to a dead server fails with ENOTCONN (errno 107).
        assert out.split("\n")[:3] == ["read ENOTCONN", "open ENOTCONN", "list ENOTCONN"], out
        assert _status(layerfs_cli) == [(str(mnt), "dead")]
        # The dead server's holds died with it: rmi is not blocked (the record is
        # the only thing left, and umount clears it).
        layerfs_cli("umount", mnt)
        assert _status(layerfs_cli) == []
        assert os.listdir(mnt) == []
        layerfs_cli("rmi", "crash:1")
    assert layerfs_cli("fsck").returncode == 0


def test_rmi_is_not_blocked_by_the_holds_of_a_dead_server(layerfs_cli: LayerfsCli,
                                                          tmp_path: Path):  # fmt: skip
    layer = Layer(tmp_path / "0.tar").file("f", b"x").close()
    build_image(layerfs_cli.root, [layer], "held:1")
    with mounted(layerfs_cli, "held:1", tmp_path / "mnt") as mnt:
        refused = layerfs_cli("rmi", "held:1", check=False)
        assert refused.returncode != 0 and b"held" in refused.stderr
        _kill(_server_pid(layerfs_cli))
        # Still mounted (dead) and not yet unmounted: the image is free all the same.
        assert _status(layerfs_cli) == [(str(mnt), "dead")]
        layerfs_cli("rmi", "held:1")
        layerfs_cli("umount", mnt)
    assert layerfs_cli("fsck").returncode == 0


def test_the_upper_of_a_killed_writable_mount_is_committed_after_a_remount(
    layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    layer = Layer(tmp_path / "0.tar").dir("etc").file("etc/config", b"v1\n").close()
    build_image(layerfs_cli.root, [layer], "app:1")
    mnt = tmp_path / "mnt"
    with mounted(layerfs_cli, "app:1", mnt, "--rw", "--upper", "work") as point:
        (point / "etc/config").write_bytes(b"v2\n")
        (point / "etc/new").write_bytes(b"made in the mount\n")
        os.getxattr(point, "user.layerfs.sync")  # what the server saves within 5 s anyway
        upper = layerfs_cli.root / "upper" / "work"
        before = {p.relative_to(upper): p.read_bytes() for p in upper.rglob("*") if p.is_file()
                  and p.name != "lock"}  # fmt: skip
        _kill(_server_pid(layerfs_cli))
        after = {p.relative_to(upper): p.read_bytes() for p in upper.rglob("*") if p.is_file()
                 and p.name != "lock"}  # fmt: skip
        assert after == before  # nothing of the upper was lost or half-written
        layerfs_cli("umount", point)
    with mounted(layerfs_cli, "app:1", mnt, "--rw", "--upper", "work") as point:
        assert (point / "etc/config").read_bytes() == b"v2\n"
        assert (point / "etc/new").read_bytes() == b"made in the mount\n"
        layerfs_cli("commit", point, "app:2")
    with mounted(layerfs_cli, "app:2", tmp_path / "check") as point:
        assert (point / "etc/config").read_bytes() == b"v2\n"
        assert (point / "etc/new").read_bytes() == b"made in the mount\n"
    assert layerfs_cli("fsck").returncode == 0
