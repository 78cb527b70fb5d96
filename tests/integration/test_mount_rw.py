"""Writable mounts through the kernel: every operation, copy-up, commit, upper reuse."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tests.integration.conftest import LayerfsCli
from tests.integration.mounting import Layer, build_image, diff_listings, listing
from tests.integration.test_mount_ro import mounted

pytestmark = [pytest.mark.fuse, pytest.mark.integration, pytest.mark.usefixtures("engine")]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown)")
# A user's mount checks permissions (default_permissions): these write into root-owned
# directories of their test images.
ROOT_OWNED = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="writes into root-owned directories of its image, which a user's mount refuses",
)
RENAME_EXCHANGE = 2


def base_image(cli: LayerfsCli, tmp_path: Path) -> str:
    layers = tmp_path / "layers"
    layers.mkdir()
    base = Layer(layers / "0.tar")
    for name in ("etc", "usr", "usr/lib", "usr/lib/deep", "var"):
        base.dir(name)
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    base.file("etc/motd", b"hello\n" * 1000, mode=0o644)
    base.file("usr/lib/deep/libx.so", b"\x7fELF" + bytes(100_000), mode=0o755)
    base.file("usr/lib/a", b"a")
    base.hardlink("usr/lib/a-link", "usr/lib/a")
    base.file("var/big", bytes(range(256)) * 20_000)  # 5 MB: copied up in a thread
    base.close()
    top = Layer(layers / "1.tar").dir("etc").file("etc/hostname.orig", b"image\n").close()
    return build_image(
        cli.root,
        [layers / "0.tar", top],
        "base:1",
        config={"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
    )


def upper_of(cli: LayerfsCli) -> Path:
    row = json.loads(cli("mounts", "--format", "json").stdout)
    return cli.root / "upper" / row["Upper"]


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@ROOT_ONLY
def test_every_write_operation(layerfs_cli: LayerfsCli, tmp_path: Path):
    base_image(layerfs_cli, tmp_path)
    with mounted(layerfs_cli, "base:1", tmp_path / "mnt", "--rw") as mnt:
        (mnt / "etc/new").write_bytes(b"created\n")
        with open(mnt / "etc/motd", "r+b") as handle:
            handle.seek(6)
            handle.write(b"WORLD\n")
            handle.flush()
            os.fsync(handle.fileno())
        assert (mnt / "etc/motd").read_bytes()[:12] == b"hello\nWORLD\n"
        (mnt / "dir").mkdir(mode=0o750)
        assert stat.S_IMODE((mnt / "dir").stat().st_mode) == 0o750
        (mnt / "dir/sub").mkdir()
        (mnt / "dir/sub").rmdir()
        with pytest.raises(OSError) as err:
            (mnt / "usr").rmdir()
        assert err.value.errno == errno.ENOTEMPTY
        os.symlink("../etc/passwd", mnt / "dir/sym")
        assert (mnt / "dir/sym").read_bytes().startswith(b"root:")
        os.link(mnt / "etc/new", mnt / "dir/hard")
        assert os.stat(mnt / "etc/new").st_nlink == 2
        os.mknod(mnt / "dir/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert os.stat(mnt / "dir/null").st_rdev == os.makedev(1, 3)
        import socket

        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(mnt / "dir/sock"))  # a program's socket in its root file system
            server.listen()
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(mnt / "dir/sock"))
        os.mkfifo(mnt / "dir/fifo")
        assert stat.S_ISFIFO(os.lstat(mnt / "dir/fifo").st_mode)
        os.chmod(mnt / "etc/passwd", 0o600)
        os.chown(mnt / "etc/passwd", 1000, 2000)
        os.utime(mnt / "etc/passwd", (1_600_000_000, 1_600_000_000))
        st = os.stat(mnt / "etc/passwd")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1000, 2000)
        assert int(st.st_mtime) == 1_600_000_000
        os.truncate(mnt / "var/big", 10)
        assert (mnt / "var/big").read_bytes() == bytes(range(10))
        os.setxattr(mnt / "etc/passwd", "user.k", b"v")
        assert os.getxattr(mnt / "etc/passwd", "user.k") == b"v"
        os.removexattr(mnt / "etc/passwd", "user.k")
        assert os.listxattr(mnt / "etc/passwd") == []
        os.unlink(mnt / "usr/lib/a")
        assert os.stat(mnt / "usr/lib/a-link").st_nlink == 1
        os.rename(mnt / "etc/new", mnt / "etc/renamed")
        renameat2(mnt / "etc/renamed", mnt / "etc/motd", RENAME_EXCHANGE)
        assert (mnt / "etc/renamed").read_bytes()[:5] == b"hello"
        assert (mnt / "etc/motd").read_bytes() == b"created\n"
        with pytest.raises(OSError) as err:
            (mnt / ".wh.sneaky").write_bytes(b"")
        assert err.value.errno == errno.EPERM
        vfs = os.statvfs(mnt)
        assert vfs.f_bavail > 0


@ROOT_OWNED
def test_copy_up_while_a_reader_holds_the_file(layerfs_cli: LayerfsCli, tmp_path: Path):
    base_image(layerfs_cli, tmp_path)
    with mounted(layerfs_cli, "base:1", tmp_path / "mnt", "--rw") as mnt:
        with open(mnt / "var/big", "rb", buffering=0) as reader:
            assert reader.read(4) == bytes(range(4))
            with open(mnt / "var/big", "r+b") as writer:
                writer.write(b"WXYZ")
            reader.seek(0)
            assert reader.read(6) == b"WXYZ\x04\x05"
        assert (mnt / "var/big").stat().st_size == 256 * 20_000


@ROOT_OWNED
def test_rename_of_a_lower_directory_delete_and_recreate_chmod_without_copy(
    layerfs_cli: LayerfsCli, tmp_path: Path
):
    base_image(layerfs_cli, tmp_path)
    with mounted(layerfs_cli, "base:1", tmp_path / "mnt", "--rw", "--upper", "work") as mnt:
        os.rename(mnt / "usr/lib", mnt / "usr/lib64")  # a lower directory: no EXDEV
        assert (mnt / "usr/lib64/deep/libx.so").read_bytes()[:4] == b"\x7fELF"
        assert not (mnt / "usr/lib").exists()
        os.unlink(mnt / "etc/passwd")
        (mnt / "etc/passwd").write_bytes(b"recreated\n")
        os.chmod(mnt / "var/big", 0o600)
        os.chown(mnt / "usr/lib64/deep/libx.so", 7, 7)
        data = upper_of(layerfs_cli) / "data"
        assert len(os.listdir(data)) == 1  # only the recreated passwd holds data
    # The upper is kept and taken again by name.
    with mounted(layerfs_cli, "base:1", tmp_path / "mnt", "--upper", "work") as mnt:
        assert (mnt / "etc/passwd").read_bytes() == b"recreated\n"
        assert stat.S_IMODE((mnt / "var/big").stat().st_mode) == 0o600
        assert (mnt / "usr/lib64/deep/libx.so").stat().st_uid == 7
        assert not (mnt / "usr/lib").exists()


@ROOT_ONLY
def test_commit_then_mount_the_new_image(layerfs_cli: LayerfsCli, tmp_path: Path):
    base = base_image(layerfs_cli, tmp_path)
    with mounted(layerfs_cli, "base:1", tmp_path / "mnt", "--rw") as mnt:
        (mnt / "etc/added").write_bytes(b"added\n")
        os.rename(mnt / "usr/lib", mnt / "usr/lib64")
        (mnt / "usr/lib").mkdir()
        (mnt / "usr/lib/only").write_bytes(b"new lib dir")
        os.unlink(mnt / "etc/hostname.orig")
        os.chmod(mnt / "etc/motd", 0o4755)
        os.setxattr(mnt / "etc/motd", "trusted.note", b"\x00\xff")
        os.mknod(mnt / "etc/blk", stat.S_IFBLK | 0o600, os.makedev(8, 1))
        os.link(mnt / "etc/added", mnt / "var/added-link")
        with open(mnt / "var/big", "r+b") as handle:
            handle.seek(1_000_000)
            handle.write(b"changed")
        want = listing(mnt)
        result = layerfs_cli(
            "commit",
            mnt,
            "base:2",
            "-m",
            "my change",
            "-c",
            "ENV FOO=bar",
            "-c",
            'CMD ["/bin/true"]',
        )
        new_id = result.stdout.decode().strip().removeprefix("sha256:")
    history = layerfs_cli("history", "--no-trunc", "--format", "json", "base:2").stdout.decode()
    rows = [json.loads(line) for line in history.splitlines()]
    assert rows[0]["ID"] == "sha256:" + new_id and rows[0]["Comment"] == "my change"
    assert rows[1]["ID"] == "sha256:" + base
    inspect = json.loads(layerfs_cli("inspect", "base:2").stdout)[0]
    assert "FOO=bar" in inspect["Config"]["Env"] and inspect["Config"]["Cmd"] == ["/bin/true"]
    with mounted(layerfs_cli, "base:2", tmp_path / "mnt2") as mnt2:
        assert diff_listings(listing(mnt2), want) == []
    exported = tmp_path / "export.tar"
    layerfs_cli("export", "-o", exported, "base:2")
    with tarfile.open(exported) as tar:
        names = tar.getnames()
    assert "etc/added" in names and "etc/hostname.orig" not in names
    assert "usr/lib/only" in names and "usr/lib/deep" not in names


@ROOT_ONLY
def test_extracting_a_distribution_into_a_writable_mount(layerfs_cli: LayerfsCli, tmp_path: Path):
    import shutil
    import subprocess

    from tests.integration.mounting import debian_rootfs_tar

    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    rootfs = debian_rootfs_tar()
    tar = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(rootfs)]
    plain = tmp_path / "plain"
    plain.mkdir()
    subprocess.run([*tar, "-C", str(plain)], check=True)
    want = listing(plain)
    base_image(layerfs_cli, tmp_path)
    with mounted(layerfs_cli, "base:1", tmp_path / "mnt", "--rw", "--no-init") as mnt:
        (mnt / "deb").mkdir()
        subprocess.run([*tar, "-C", str(mnt / "deb")], check=True)
        assert diff_listings(listing(mnt / "deb"), want) == []
        layerfs_cli("commit", mnt, "base:deb")
    with mounted(layerfs_cli, "base:deb", tmp_path / "mnt2", "--no-init") as mnt:
        assert diff_listings(listing(mnt / "deb"), want) == []
