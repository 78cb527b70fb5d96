"""The two mount engines against each other, and what the native one asks of the kernel.

- Both engines show the same images (every path, attribute, content and xattr) and
  make the same changes (the same listing, the same committed layer).
- The native engine's read-only mount: after one walk and one read of every file, a
  second pass sends the server no OPEN, OPENDIR, READ or READDIR (its request
  counters say so).
- Passthrough: what a writable mount's files get written reads back exactly, and the
  server never saw the data.
- INTERRUPT: a read the server cannot answer (its data sits on a file system that
  hangs) ends with EINTR when the reader gets a signal, and the server goes on.
- A server killed with SIGKILL: ``layerfs umount`` cleans the mountpoint, the store
  checks clean, the upper is taken again.
- A normal user mounts through fusermount3, reads, unmounts; inside
  ``unshare --map-root-user`` writes into root's directories of the image.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import make_user_venv
from tests.integration.conftest import ENGINES, LayerfsCli
from tests.integration.mounting import (
    Layer,
    PatternStream,
    build_image,
    debian_rootfs_tar,
    diff_listings,
    listing,
)
from tests.integration.test_mount_ro import mounted, torture_layers

pytestmark = [pytest.mark.fuse, pytest.mark.integration]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, mount(2))")


def stats(mnt: Path) -> dict[str, int]:
    counts: dict[str, int] = json.loads(os.getxattr(mnt, "user.layerfs.stats"))
    counts.pop("getxattr", None)  # this very question
    return counts


def info(mnt: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads(os.getxattr(mnt, "user.layerfs.info"))
    return doc


@contextmanager
def pinned(root: Path, files: list[str]) -> Iterator[None]:
    """What the kernel caches of ``root`` kept from reclaim, as far as anything can keep it:
    every page of ``files`` mapped and locked in memory, and every other entry held open
    (``O_PATH``), which keeps its dentry and inode, so that the kernel neither looks it
    up again nor forgets it. Nothing keeps the pages of a directory's cached listing or
    of a symlink's cached target."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    libc.mlock.argtypes = libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    maps: list[tuple[int, int]] = []
    held: list[int] = []
    try:
        mapped: set[str] = set()
        for path in files:
            size = os.path.getsize(path)
            if not size:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            finally:
                os.close(fd)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                raise OSError(ctypes.get_errno(), f"cannot map {path}")
            maps.append((addr, size))
            if libc.mlock(addr, size):
                raise OSError(ctypes.get_errno(), f"cannot lock {path} in memory")
            mapped.add(path)
        pending = [str(root)]
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    if entry.path not in mapped:
                        held.append(os.open(entry.path, os.O_PATH | os.O_NOFOLLOW))
        yield
    finally:
        for fd in held:
            os.close(fd)
        for addr, size in maps:
            libc.munmap(addr, size)


def regular_files(root: Path) -> list[str]:
    return [
        os.path.join(d, n)
        for d, _, names in os.walk(root)
        for n in names
        if stat.S_ISREG(os.lstat(os.path.join(d, n)).st_mode)
    ]


def walk_and_read(root: Path) -> int:
    """lstat everything, read every regular file; returns the bytes read."""
    total = 0
    buf = bytearray(1 << 20)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                os.readlink(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o444:
                fd = os.open(path, os.O_RDONLY)
                try:
                    while n := os.readv(fd, [buf]):
                        total += n
                finally:
                    os.close(fd)
    return total


@pytest.fixture(scope="module")
def debian_tar() -> Path:
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    return debian_rootfs_tar()


# -- the engines against each other ----------------------------------------------------------


@ROOT_ONLY
def test_both_engines_show_the_same_images(
    layerfs_cli: LayerfsCli, tmp_path: Path, debian_tar: Path
):
    layers = torture_layers(tmp_path / "layers", big=False)
    extra = Layer(tmp_path / "layers" / "3.tar").dir("data")
    extra.add("data/medium", stream=PatternStream(b"medium", 5 << 20), size=5 << 20)
    build_image(layerfs_cli.root, [*layers, extra.close()], "torture:1")
    layerfs_cli("import", "-q", debian_tar, "debian:1")
    for image in ("torture:1", "debian:1"):
        seen = {}
        for engine in ENGINES:
            with mounted(layerfs_cli, image, tmp_path / f"mnt-{engine}", "--engine", engine) as mnt:
                assert info(mnt)["engine"] == engine
                seen[engine] = listing(mnt)
        assert len(seen["native"]) > 20
        assert diff_listings(seen["native"], seen["pyfuse3"]) == [], image


def change_everything(mnt: Path) -> None:
    """The same changes, made the same way, through either engine."""
    (mnt / "etc/new").write_bytes(b"created\n")
    with open(mnt / "etc/passwd", "r+b") as handle:
        handle.seek(5)
        handle.write(b"XYZ")
    with open(mnt / "data/medium", "r+b") as handle:  # a 5 MiB lower file: copied up
        handle.seek(3 << 20)
        handle.write(b"middle")
        handle.truncate(4 << 20)
    (mnt / "etc/motd").write_bytes(b"short\n")  # O_TRUNC over a longer lower file
    os.truncate(mnt / "bin/sh", 3)
    os.mkdir(mnt / "opt", 0o750)
    os.symlink("../etc/new", mnt / "opt/link")
    os.link(mnt / "etc/new", mnt / "opt/hard")
    os.mknod(mnt / "opt/null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.rename(mnt / "dirs", mnt / "dirs2")  # a lower directory
    os.unlink(mnt / "dirs2/empty")  # a file over a lower directory
    os.unlink(mnt / "wh/y")
    os.chmod(mnt / "bin/suid", 0o755)
    os.chown(mnt / "data/user", 12, 34)
    os.utime(mnt / "etc/new", (1_600_000_000, 1_600_000_000))
    os.setxattr(mnt / "etc/new", "user.note", b"made here")
    os.removexattr(mnt / "data/user", "user.comment")
    fd = os.open(mnt / "opt/sparse", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, 1 << 16)
        os.pwrite(fd, b"end", (1 << 20) - 3)
    finally:
        os.close(fd)
    with open(mnt / "data/h1", "rb") as src, open(mnt / "opt/copied", "wb") as dst:
        os.copy_file_range(src.fileno(), dst.fileno(), 1 << 20, 0, 0)  # a lower file's data
    with open(mnt / "opt/big", "wb") as handle:
        for block in range(8):
            handle.write(bytes([block]) * (1 << 20))
        handle.flush()
        os.fsync(handle.fileno())


@ROOT_ONLY
def test_both_engines_make_the_same_changes(layerfs_cli: LayerfsCli, tmp_path: Path):
    layers = torture_layers(tmp_path / "layers", big=False)
    extra = Layer(tmp_path / "layers" / "3.tar").dir("data").file("etc/motd", b"a long motd\n")
    extra.add("data/medium", stream=PatternStream(b"medium", 5 << 20), size=5 << 20)
    build_image(layerfs_cli.root, [*layers, extra.close()], "torture:1")
    seen, exported = {}, {}
    for engine in ENGINES:
        with mounted(
            layerfs_cli,
            "torture:1",
            tmp_path / f"mnt-{engine}",
            "--rw",
            "--no-init",
            "--engine",
            engine,
        ) as mnt:
            change_everything(mnt)
            seen[engine] = listing(mnt)
            layerfs_cli("commit", "-q", mnt, f"changed:{engine}")
        out = tmp_path / f"{engine}.tar"
        layerfs_cli("export", "-q", "-o", out, f"changed:{engine}")
        with tarfile.open(out) as tar:
            exported[engine] = sorted(
                (m.name, m.type, m.mode, m.uid, m.gid, m.size, m.linkname) for m in tar
            )
    # Changed entries got "now" as their mtime, which differs between the two runs.
    assert seen["native"][b"etc/new"][9] == seen["pyfuse3"][b"etc/new"][9] == 1_600_000_000
    assert diff_listings(without_mtimes(seen["native"]), without_mtimes(seen["pyfuse3"])) == []
    assert exported["native"] == exported["pyfuse3"]
    got = seen["native"]
    assert got[b"etc/motd"][4] == 6 and got[b"data/medium"][4] == 4 << 20
    assert got[b"opt/sparse"][4] == 1 << 20 and got[b"opt/big"][4] == 8 << 20
    assert got[b"opt/copied"][5] == got[b"data/h1"][5]


def without_mtimes(entries: dict[bytes, tuple[object, ...]]) -> dict[bytes, tuple[object, ...]]:
    return {path: (*value[:9], *value[10:]) for path, value in entries.items()}


# -- what the native engine asks of the kernel ------------------------------------------------


@ROOT_ONLY
def test_a_second_pass_sends_no_open_opendir_read_or_readdir(
    layerfs_cli: LayerfsCli, tmp_path: Path, debian_tar: Path
):
    layerfs_cli("import", "-q", debian_tar, "debian:1")
    with mounted(layerfs_cli, "debian:1", tmp_path / "mnt", "--engine", "native") as mnt:
        flags = info(mnt)["engine_info"]["flags"]  # type: ignore[index]
        assert {
            "no_open_support",
            "no_opendir_support",
            "cache_symlinks",
            "do_readdirplus",
            "max_pages",
        } <= set(flags)
        before = stats(mnt)
        listed = first_pass(mnt)
        during = delta(before, stats(mnt))
        # The first pass asked: one OPEN and one OPENDIR (answered ENOSYS), every file's
        # data, every directory's listing, every symlink's target.
        assert during["read"] > 1000 and during["readdirplus"] > 500
        assert during["lookup"] > 0 and during["readlink"] > 500
        assert during.get("open", 0) == 1 and during.get("opendir", 0) == 1
        assert "release" not in during and "releasedir" not in during
        # The kernel may drop what it cached behind everyone's back (drop_caches, memory
        # pressure, or proactive reclaim: this machine pages out cold unmapped page cache
        # with DAMON). The files' pages are kept locked in memory and every other entry
        # held open, which no reclaim takes; a directory whose cached listing lost pages
        # (cachestat says) may be read again; a symlink whose target was asked for again
        # must not be asked for a third time.
        with pinned(mnt, [path for path, _ in listed if not path.startswith("\0")]):
            middle = stats(mnt)
            unexpected = second_pass(mnt, listed)
            second = delta(middle, stats(mnt))
        assert unexpected == [], unexpected
        for kind in (
            "open",
            "opendir",
            "read",
            "release",
            "releasedir",
            "lookup",
            "getattr",
            "readdir",
        ):
            assert kind not in second, second


def delta(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    return {k: v - old.get(k, 0) for k, v in new.items() if v - old.get(k, 0)}


# What the kernel sends on its own when it evicts inodes (memory pressure in any memory
# cgroup that charged them, drop_caches): no call asks for it, and it reaches the server
# whenever the kernel gets to it, in the middle of whatever the test measures.
UNASKED = frozenset({"forget", "batch_forget"})


def asked(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    """The requests between two :func:`stats` but those no call asks for (UNASKED)."""
    return {k: n for k, n in delta(old, new).items() if k not in UNASKED}


def cachestat(fd: int) -> tuple[int, int] | None:
    """(pages cached, pages evicted and not read again) of ``fd``'s page cache
    (cachestat(2), Linux 6.5; None where there is none)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    window = ctypes.create_string_buffer(16)  # offset 0, length 0: the whole file
    out = ctypes.create_string_buffer(40)
    if libc.syscall(451, fd, window, out, 0) != 0:
        return None
    cached, _dirty, _writeback, evicted, _recently = struct.unpack("QQQQQ", out.raw)
    return cached, evicted


def first_pass(root: Path) -> list[tuple[str, int]]:
    """Walk (following symlinks, as os.walk does) and read everything once; returns every
    directory, marked with a leading NUL, with the pages its cached listing holds, and
    every regular file (with 0)."""
    found: list[tuple[str, int]] = []
    pending = [str(root)]
    buf = bytearray(1 << 20)
    while pending:
        path = pending.pop()
        with os.scandir(path) as entries:
            names = list(entries)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            pages = cachestat(fd)
        finally:
            os.close(fd)
        found.append((f"\0{path}", pages[0] if pages is not None else 0))
        for entry in names:
            if entry.is_symlink():
                os.readlink(entry.path)
                entry.is_dir()  # follows it, as os.walk does
            elif entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif entry.is_file(follow_symlinks=False) and entry.stat().st_mode & 0o444:
                fd = os.open(entry.path, os.O_RDONLY)
                try:
                    while os.readv(fd, [buf]):
                        pass
                finally:
                    os.close(fd)
                found.append((entry.path, 0))
    return found


def second_pass(root: Path, listed: list[tuple[str, int]]) -> list[str]:
    """The same again; returns what sent the server a request it should not have."""
    problems: list[str] = []
    buf = bytearray(1 << 20)
    for path, pages in listed:
        if not path.startswith("\0"):
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.readv(fd, [buf]):
                    pass
            finally:
                os.close(fd)
            continue
        directory = path[1:]
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = stats(root)
            # Right before the listing is read: reclaim has less time to take it in between.
            intact = cachestat(fd) == (pages, 0) and pages > 0
            with os.scandir(directory) as entries:
                names = list(entries)
            sent = asked(before, stats(root))
        finally:
            os.close(fd)
        if intact and sent:
            problems.append(f"{directory}: its listing was cached, yet {sent}")
        for entry in names:
            if entry.is_symlink():
                before = stats(root)
                os.readlink(entry.path)
                entry.is_dir()
                after = stats(root)
                if asked(before, after):  # its page was dropped: it must stay now
                    os.readlink(entry.path)
                    entry.is_dir()
                    sent = asked(after, stats(root))
                    if sent:
                        problems.append(f"{entry.path}: its target read twice in a row: {sent}")
            else:
                os.lstat(entry.path)
    return problems


@ROOT_ONLY
def test_passthrough_reads_back_exactly_what_was_written(layerfs_cli: LayerfsCli, tmp_path: Path):
    layer = Layer(tmp_path / "0.tar").dir("srv").file("srv/lower", bytes(range(256)) * 4096)
    build_image(layerfs_cli.root, [layer.close()], "pt:1")
    pattern = PatternStream(b"passthrough", 24 << 20).read()
    with mounted(
        layerfs_cli, "pt:1", tmp_path / "mnt", "--rw", "--upper", "pt", "--engine", "native"
    ) as mnt:
        assert info(mnt)["engine_info"]["passthrough"] is True  # type: ignore[index]
        before = stats(mnt)
        with open(mnt / "srv/new", "wb") as handle:
            for start in range(0, len(pattern), 3 << 20):
                handle.write(pattern[start : start + (3 << 20)])
            os.fsync(handle.fileno())
        fd = os.open(mnt / "srv/lower", os.O_RDWR)  # copied up on open, then passthrough
        try:
            os.pwrite(fd, b"HEAD", 0)
            os.pwrite(fd, b"TAIL", (1 << 20) - 4)
            os.ftruncate(fd, 1 << 20)
        finally:
            os.close(fd)
        assert (mnt / "srv/new").read_bytes() == pattern
        want = b"HEAD" + (bytes(range(256)) * 4096)[4 : (1 << 20) - 4] + b"TAIL"
        assert (mnt / "srv/lower").read_bytes() == want
        assert os.stat(mnt / "srv/new").st_size == len(pattern)
        during = {k: v - before.get(k, 0) for k, v in stats(mnt).items()}
        assert "read" not in during and "write" not in during, during  # all in the kernel
        mtime = os.stat(mnt / "srv/new").st_mtime_ns
        layerfs_cli("commit", "-q", mnt, "pt:2")
    with mounted(
        layerfs_cli, "pt:1", tmp_path / "mnt", "--upper", "pt", "--engine", "native"
    ) as mnt:
        assert (mnt / "srv/new").read_bytes() == pattern
        assert (mnt / "srv/lower").read_bytes() == want
        assert os.stat(mnt / "srv/new").st_mtime_ns == mtime
    with mounted(layerfs_cli, "pt:2", tmp_path / "mnt", "--engine", "native") as mnt:
        assert (mnt / "srv/new").read_bytes() == pattern
        assert (mnt / "srv/lower").read_bytes() == want


READER = textwrap.dedent("""
    import mmap, os, signal, sys

    class Interrupted(Exception):
        pass

    def on_signal(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGUSR1, on_signal)
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 16)
    print("reading", flush=True)
    try:
        os.preadv(fd, [buf], 0)
        print("read", flush=True)
    except Interrupted:
        print("interrupted", flush=True)
""")


@ROOT_ONLY
def test_interrupt_ends_a_blocked_read(layerfs_cli: LayerfsCli, tmp_path: Path):
    from tests.integration.blocking_fs import BlockingFs

    layer = Layer(tmp_path / "0.tar").file("data", PatternStream(b"i", 1 << 20).read())
    build_image(layerfs_cli.root, [layer.close()], "slow:1")
    archive = tmp_path / "slow.tar"
    layerfs_cli("save", "-q", "-o", archive, "slow:1")
    (tmp_path / "blocking").mkdir()
    slow = BlockingFs(tmp_path / "blocking", b"slow.tar", archive.read_bytes())
    with slow, mounted(layerfs_cli, str(slow.path), tmp_path / "mnt", "--engine", "native") as mnt:
        slow.block()
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(mnt / "data")], stdout=subprocess.PIPE, text=True
        )
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline() == "reading\n"
            assert slow.files.waiting.wait(30), "the read never reached the blocked file"
            before = stats(mnt)
            reader.send_signal(signal.SIGUSR1)
            out, _ = reader.communicate(timeout=30)  # while the file still hangs
            assert out == "interrupted\n"
            assert stats(mnt).get("interrupt", 0) > before.get("interrupt", 0)
            assert not slow.files.released.is_set()
            # The server goes on answering.
            assert sorted(os.listdir(mnt)) == sorted(
                ["data", ".dockerenv", ".dockerinit", "dev", "etc", "proc", "sys"]
            )
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
            slow.release()


# -- a killed server ------------------------------------------------------------------------------


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still there")


@pytest.mark.usefixtures("engine")
@pytest.mark.skipif(os.geteuid() != 0, reason="writes into root-owned directories of its image")
def test_a_killed_writable_server_leaves_a_mountpoint_umount_cleans(
    layerfs_cli: LayerfsCli, tmp_path: Path
):
    layer = Layer(tmp_path / "0.tar").dir("etc").file("etc/keep", b"kept\n").close()
    build_image(layerfs_cli.root, [layer], "kill:1")
    mnt = tmp_path / "mnt"
    with mounted(layerfs_cli, "kill:1", mnt, "--rw", "--upper", "killed"):
        (mnt / "etc/saved").write_bytes(b"before the sync\n")
        layerfs_cli("commit", "-q", mnt, "kill:2")  # saves the upper's state first
        with open(mnt / "etc/unsaved", "wb") as handle:
            handle.write(b"x" * 100_000)
            pid = json.loads(layerfs_cli("mounts", "--format", "json").stdout)["Pid"]
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
        row = json.loads(layerfs_cli("mounts", "--format", "json").stdout)
        assert row["Status"] == "dead"
        with pytest.raises(OSError):
            os.listdir(mnt)
        layerfs_cli("umount", mnt)
        assert os.listdir(mnt) == []
        assert layerfs_cli("mounts", "-q").stdout == b""
    assert layerfs_cli("fsck").returncode == 0
    with mounted(layerfs_cli, "kill:1", mnt, "--upper", "killed") as again:
        assert (again / "etc/saved").read_bytes() == b"before the sync\n"
        assert (again / "etc/keep").read_bytes() == b"kept\n"
    with mounted(layerfs_cli, "kill:2", mnt) as committed:
        assert (committed / "etc/saved").read_bytes() == b"before the sync\n"
    layerfs_cli("rmi", "kill:2")
    layerfs_cli("rmi", "kill:1")


# -- a normal user ---------------------------------------------------------------------------------

USER_SCRIPT = """\
set -e
L="$VENV/bin/python -m layerfs --root $HOME/store"
$L import -q "$HOME/image.tar" me/image >/dev/null
mkdir "$HOME/mnt"
$L mount --engine {engine} me/image "$HOME/mnt"
$L mounts --format json
cat "$HOME/mnt/etc/motd"
$L umount "$HOME/mnt"
$L mount --rw --upper outside --engine {engine} me/image "$HOME/mnt"
if echo nope 2>/dev/null > "$HOME/mnt/etc/motd"; then echo "wrote root's file"; \
else echo "denied outside"; fi
$L umount "$HOME/mnt"
unshare --map-root-user --mount sh -euc '
  L="$VENV/bin/python -m layerfs --root $HOME/store"
  $L mount --rw --upper ns --engine {engine} me/image "$HOME/mnt"
  echo "written in a namespace" > "$HOME/mnt/etc/motd"
  mkdir "$HOME/mnt/root/made"
  stat -c "%u %g %a" "$HOME/mnt/etc/motd" "$HOME/mnt/root/made"
  $L umount "$HOME/mnt"
'
$L mount --upper ns --engine {engine} me/image "$HOME/mnt"
cat "$HOME/mnt/etc/motd"
stat -c "%u %g %a" "$HOME/mnt/root/made"
$L umount "$HOME/mnt"
$L mounts -q
echo done
"""


@pytest.mark.usefixtures("engine")
@pytest.mark.skipif(os.geteuid() != 0, reason="stages a user and a /dev/fuse it may open")
def test_a_normal_user_mounts_reads_writes_in_a_user_namespace(tmp_path: Path, engine: str):
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("setpriv and unshare are needed (util-linux)")
    uid = gid = 65534
    home = Path(tempfile.mkdtemp(prefix="layerfs-user-"))
    try:
        home.chmod(0o755)
        if not os.access("/usr/bin/python3", os.X_OK):
            pytest.skip("/usr/bin/python3 is missing (apt-get install python3-venv)")
        venv = Path(make_user_venv(home)).parents[1]
        layer = Layer(home / "image.tar").dir("etc").file("etc/motd", b"from the image\n")
        layer.dir("root", mode=0o755).close()
        for path in [home, *home.rglob("*")]:
            os.lchown(path, uid, gid)
        script = home / "user.sh"
        script.write_text(USER_SCRIPT.format(engine=engine))
        # /dev/fuse is root's alone here (0600): in a mount namespace of the test's own, a
        # node of the same device that the user may open stands in for it, as a
        # distribution's 0666 /dev/fuse would. fusermount3 opens it as the user.
        devdir = tmp_path / "dev"
        devdir.mkdir()
        result = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                'mount --make-rprivate / && mount -t tmpfs none "$0" && '
                'mknod -m 666 "$0/fuse" c 10 229 && mount --bind "$0/fuse" /dev/fuse && '
                'exec "$@"',
                str(devdir),
                "setpriv",
                f"--reuid={uid}",
                f"--regid={gid}",
                "--clear-groups",
                "env",
                "-i",
                f"HOME={home}",
                f"VENV={venv}",
                "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
                "sh",
                str(script),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd="/",
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        mounts = json.loads(lines[0])
        assert (mounts["Engine"], mounts["Mode"], mounts["Status"]) == (engine, "ro", "running")
        assert lines[1:] == [
            "from the image",
            "denied outside",
            "0 0 644",
            "0 0 755",
            "written in a namespace",
            "0 0 755",
            "done",
        ]
    finally:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(home / "mnt")], capture_output=True, check=False
        )
        shutil.rmtree(home, ignore_errors=True)
