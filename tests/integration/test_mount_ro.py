"""Read-only mounts through the real command line, compared with the kernel's overlayfs.

Every test mounts in a subprocess (``layerfs mount``) and unmounts in a ``finally``;
the ``layerfs_cli`` fixture also unmounts and kills whatever is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from layerfs.model.image import canonical_json
from layerfs.store.store import Store
from tests.integration.conftest import LayerfsCli
from tests.integration.mounting import (
    Layer,
    PatternStream,
    build_image,
    diff_listings,
    fuse_unmount,
    link_counts_agree,
    listing,
    overlay_reference,
)

pytestmark = [pytest.mark.fuse, pytest.mark.integration, pytest.mark.usefixtures("engine")]

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
BIG = 200 << 20
SPARSE = 256 << 20
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlayfs, mknod, chown)")


@contextmanager
def mounted(cli: LayerfsCli, image: str, mountpoint: Path, *args: str) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    cli("mount", *args, image, mountpoint)
    try:
        yield mountpoint
    finally:
        cli("umount", mountpoint, check=False)
        fuse_unmount(mountpoint)


def torture_layers(work: Path, *, big: bool = True) -> list[Path]:
    """Three layers with every kind of entry and every layer rule FORMATS.md §7 lists.

    ``big=False`` leaves out the 200 MB file and the 256 MB sparse one.
    """
    work.mkdir(parents=True, exist_ok=True)
    base = Layer(work / "0.tar")
    for name, mode in (
        ("bin", 0o755),
        ("etc", 0o755),
        ("data", 0o755),
        ("dirs", 0o755),
        ("dirs/empty", 0o755),
        ("dirs/mode000", 0o000),
        ("opq", 0o755),
        ("opq/sub", 0o755),
        ("wh", 0o755),
        ("wh/tree", 0o755),
        ("wh/tree/deep", 0o700),
        ("links", 0o755),
        ("dev", 0o755),
        ("names", 0o755),
        ("tmp", 0o1777),
        ("shared", 0o2775),
    ):
        base.dir(name, mode)
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    base.file("bin/sh", b"#!shell\n" * 100, mode=0o755)
    base.file("bin/suid", b"s", mode=0o4755)
    base.file("bin/sgid", b"g", mode=0o2755, gid=50)
    base.file("dirs/mode000/inside", b"hidden", mode=0o000)
    base.file("data/secret", b"nobody reads me", mode=0o000)
    base.file("data/odd", b"odd owner", uid=3_000_000_000, gid=65534)
    base.file("data/odd2", b"odd too", uid=1234, gid=4321)
    base.file("data/cap", b"ping", mode=0o755, xattrs={"security.capability": CAPABILITY})
    base.file("data/user", b"note", xattrs={"user.comment": b"hello", "trusted.t": b"\x00\x01"})
    base.add("dev/null0", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    base.add("dev/sda0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0))
    base.add("data/fifo", tarfile.FIFOTYPE, mode=0o620)
    base.symlink("links/abs", "/etc/passwd")
    base.symlink("links/rel", "../etc/passwd")
    base.symlink("links/dangling", "../nowhere")
    base.symlink("links/todir", "../etc")
    base.symlink("links/todir_abs", "/etc")
    base.file("data/h1", b"hardlinked data")
    base.hardlink("data/h2", "data/h1")
    base.hardlink("links/h3", "data/h1")
    base.file("data/g1", b"group")
    base.hardlink("data/g2", "data/g1")
    base.file("opq/a", b"a")
    base.file("opq/b", b"b")
    base.file("opq/sub/c", b"c")
    base.file("wh/x", b"x")
    base.file("wh/y", b"y")
    base.file("wh/tree/deep/f", b"f")
    base.file(b"names/caf\xe9", b"latin-1 name")
    base.file(b"names/\xff\xfe", b"bytes name")
    base.file("names/" + "L" * 255, b"long name")
    deep = "names/" + "/".join(["d" * 60] * 4)
    for i in range(1, 5):
        base.dir("names/" + "/".join(["d" * 60] * i))
    base.file(deep + "/file", b"deep path")
    if big:
        base.add(
            "data/sparse",
            stream=PatternStream(b"sparse", SPARSE, lambda i: i not in (0, 100, 255)),
            size=SPARSE,
        )
    base.close()

    middle = Layer(work / "1.tar")
    for name in ("wh", "opq", "data", "dirs", "names"):
        middle.dir(name)
    middle.dir("etc", 0o750, uid=5, gid=6)
    middle.whiteout("wh/x").whiteout("wh/tree")
    middle.whiteout("wh/y").file("wh/y", b"recreated in the same layer")
    middle.opaque("opq").file("opq/new", b"only this")
    middle.whiteout("data/g1")
    middle.dir("l1")
    middle.file("l1/a", b"second group")
    middle.hardlink("l1/b", "l1/a")
    middle.file("dirs/empty", b"was a directory")
    middle.whiteout("data/odd2").dir("data/odd2", 0o711)
    middle.close()

    top = Layer(work / "2.tar")
    for name in ("wh", "data"):
        top.dir(name)
    top.file("wh/x", b"back again")
    top.file("data/h2", b"no longer linked")
    if big:
        top.add("data/big", stream=PatternStream(b"big", BIG), size=BIG)
    top.close()
    return [base.path, middle.path, top.path]


@ROOT_ONLY
def test_merged_tree_matches_overlayfs_over_the_same_layers(
    layerfs_cli: LayerfsCli, tmp_path: Path
):
    layers = torture_layers(tmp_path / "layers")
    image = build_image(layerfs_cli.root, layers, "torture:1")

    with (
        overlay_reference(layers, tmp_path / "ref") as reference,
        mounted(layerfs_cli, "torture:1", tmp_path / "mnt", "--no-init") as mnt,
    ):
        want = listing(reference)
        got = listing(mnt)
        assert diff_listings(got, want) == []
        assert link_counts_agree(mnt) == []
        # A few facts the reference shares, spelled out.
        assert (mnt / "wh/y").read_bytes() == b"recreated in the same layer"
        assert sorted(os.listdir(mnt / "opq")) == ["new"]
        assert os.lstat(mnt / "data/h1").st_ino == os.lstat(mnt / "links/h3").st_ino
        assert os.lstat(mnt / "data/h1").st_nlink == 2
        assert os.getxattr(mnt / "data/cap", "security.capability") == CAPABILITY
        st = os.statvfs(mnt)
        assert st.f_blocks > 0 and st.f_namemax == 255
    assert image


@ROOT_ONLY
def test_opaque_root_hides_every_lower_layer(layerfs_cli: LayerfsCli, tmp_path: Path):
    work = tmp_path / "layers"
    work.mkdir()
    base = Layer(work / "0.tar").dir("bin").file("bin/sh", b"old").file("top", b"t").close()
    middle = Layer(work / "1.tar").opaque("").file("fresh", b"new").dir("bin").close()
    top = Layer(work / "2.tar").dir("bin").file("bin/tool", b"tool").close()
    build_image(layerfs_cli.root, [base, middle, top], "opaque-root:1")

    with (
        overlay_reference([base, middle, top], tmp_path / "ref") as reference,
        mounted(layerfs_cli, "opaque-root:1", tmp_path / "mnt", "--no-init") as mnt,
    ):
        assert diff_listings(listing(mnt), listing(reference)) == []
        assert sorted(os.listdir(mnt)) == ["bin", "fresh"]


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="checks that --suid lifts nosuid; fusermount3 imposes nosuid on a user's mount",
)
def test_init_layer_options_and_holds(layerfs_cli: LayerfsCli, tmp_path: Path):
    work = tmp_path / "layers"
    work.mkdir()
    layer = Layer(work / "0.tar").dir("etc").file("etc/hosts", b"127.0.0.1 image\n")
    layer.file("bin-suid", b"x", mode=0o4755).close()
    image = build_image(layerfs_cli.root, [layer.path], "init:1")

    with mounted(layerfs_cli, "init:1", tmp_path / "mnt") as mnt:
        assert (mnt / ".dockerenv").exists() and (mnt / "etc/hosts").read_bytes() == b""
        assert os.readlink(mnt / "etc/mtab") == "/proc/mounts"
        assert (mnt / "dev/pts").is_dir() and (mnt / "proc").is_dir()
        fields = _mount_options(mnt)
        assert {"ro", "nosuid", "nodev"} <= fields
        # The image is held: rmi refuses it from another process while it is mounted.
        result = layerfs_cli("rmi", "init:1", check=False)
        assert result.returncode != 0 and b"held" in result.stderr
        listed = layerfs_cli("mounts", "--no-trunc", "--format", "json").stdout.decode()
        rows = [json.loads(line) for line in listed.splitlines()]
        assert [(r["Mountpoint"], r["ID"], r["Mode"], r["Status"]) for r in rows] == [
            (str(mnt), "sha256:" + image, "ro", "running")
        ]
        with pytest.raises(OSError):
            (mnt / "newfile").write_bytes(b"x")
    assert layerfs_cli("mounts", "-q").stdout == b""
    with mounted(
        layerfs_cli,
        image[:12],
        tmp_path / "mnt",
        "--no-init",
        "--suid",
        "--dev",
        "-o",
        "allow_other",
    ) as mnt:
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 image\n"
        assert not (mnt / ".dockerenv").exists()
        fields = _mount_options(mnt)
        assert "nosuid" not in fields and "nodev" not in fields and "allow_other" in fields
    layerfs_cli("rmi", "init:1")


def _mount_options(mnt: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        if parts[4] == str(mnt):
            sep = parts.index("-")
            return set(parts[5].split(",")) | set(parts[sep + 3].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def test_fusermount_unmount_stops_the_server_cleanly(layerfs_cli: LayerfsCli, tmp_path: Path):
    layer = Layer(tmp_path / "0.tar").file("f", b"data").close()
    build_image(layerfs_cli.root, [layer], "clean:1")
    mnt = tmp_path / "mnt"
    with mounted(layerfs_cli, "clean:1", mnt):
        pid = json.loads(layerfs_cli("mounts", "--format", "json").stdout)["Pid"]
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert layerfs_cli("mounts", "-q").stdout == b""
        layerfs_cli("rmi", "clean:1")  # no hold left behind


def _alive(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def test_umount_cleans_up_after_a_crashed_server(layerfs_cli: LayerfsCli, tmp_path: Path):
    layer = Layer(tmp_path / "0.tar").file("f", b"data").close()
    build_image(layerfs_cli.root, [layer], "crash:1")
    mnt = tmp_path / "mnt"
    with mounted(layerfs_cli, "crash:1", mnt):
        pid = json.loads(layerfs_cli("mounts", "--format", "json").stdout)["Pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(OSError):
            os.listdir(mnt)
        status = json.loads(layerfs_cli("mounts", "--format", "json").stdout)["Status"]
        assert status == "dead"
        layerfs_cli("umount", mnt)
        assert os.listdir(mnt) == []
        assert layerfs_cli("mounts", "-q").stdout == b""
        layerfs_cli("rmi", "crash:1")


def _one_line_error(result: subprocess.CompletedProcess[bytes], *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert lines and lines[0].startswith("layerfs: error: "), result.stderr
    assert len([line for line in lines if not line.startswith("hint: ")]) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_errors_are_one_line(layerfs_cli: LayerfsCli, tmp_path: Path):
    layer = Layer(tmp_path / "0.tar").file("f", b"data").close()
    build_image(layerfs_cli.root, [layer], "err:1")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(layerfs_cli("mount", "nosuch:image", empty, check=False), "nosuch")
    _one_line_error(
        layerfs_cli("mount", "err:1", tmp_path / "missing", check=False), "no such directory"
    )
    _one_line_error(layerfs_cli("mount", "err:1", full, check=False), "not empty")
    _one_line_error(layerfs_cli("mount", "-o", "bogus", "err:1", full, check=False), "bogus")
    _one_line_error(layerfs_cli("umount", tmp_path, check=False), "not mounted")
    with mounted(layerfs_cli, "err:1", tmp_path / "mnt") as mnt:
        _one_line_error(layerfs_cli("mount", "err:1", mnt, check=False), "already mounted")
        _one_line_error(layerfs_cli("commit", mnt, "x:1", check=False), "read-only")


@ROOT_ONLY
def test_missing_or_forbidden_dev_fuse_is_explained(layerfs_cli: LayerfsCli, tmp_path: Path):
    import sys

    (tmp_path / "mnt").mkdir()
    hidden = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs none /dev && exec "$@"',
            "sh",
            *layerfs_cli.argv("mount", "x", tmp_path / "mnt"),
        ],
        capture_output=True,
        check=False,
    )
    _one_line_error(hidden, "/dev/fuse does not exist")
    # /dev/fuse is 0600 on some systems and 0666 on others: stage a root-only one in a
    # private mount namespace, so that the user below cannot open it wherever this runs.
    devdir = tmp_path / "dev"
    devdir.mkdir()
    forbidden = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs none "$0" && mknod -m 600 "$0/fuse" c 10 229 '
            '&& mount --bind "$0/fuse" /dev/fuse && exec "$@"',
            str(devdir),
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "layerfs",
            "--root",
            str(tmp_path / "nobody-store"),
            "mount",
            "x",
            str(tmp_path / "mnt"),
        ],
        capture_output=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        cwd="/",
    )
    _one_line_error(forbidden, "/dev/fuse cannot be opened")


def _chain(store_root: Path, count: int) -> list[str]:
    layers = []
    for i in range(count):
        layers.append(
            Layer(store_root.parent / f"d{i}.tar")
            .dir("d")
            .file(f"d/f{i:03}", f"layer {i}".encode())
            .close()
        )
    ids = []
    store = Store.open(store_root)
    parent = ""
    for path in layers:
        with open(path, "rb") as stream:
            parent = store.graph.create(store.layers.ingest(stream), parent=parent).id
        ids.append(parent)
    return ids


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="writes into root-owned directories of its image, which a user's mount refuses",
)
def test_127_layers_mount_and_depth_128_is_refused(layerfs_cli: LayerfsCli, tmp_path: Path):
    ids = _chain(layerfs_cli.root, 127)
    store = Store.open(layerfs_cli.root)
    store.tags.tag("deep", "127", ids[-1], force=True)

    with mounted(layerfs_cli, "deep:127", tmp_path / "mnt", "--rw") as mnt:
        names = sorted(os.listdir(mnt / "d"))
        assert names == [f"f{i:03}" for i in range(127)]
        assert (mnt / "d/f000").read_bytes() == b"layer 0"
        assert (mnt / "d/f126").read_bytes() == b"layer 126"
        (mnt / "d/one-more").write_bytes(b"x")
        # A 128th image cannot be made...
        _one_line_error(layerfs_cli("commit", mnt, "deep:128", check=False), "max depth")
    # ...and a chain of 128 made behind the store's back cannot be mounted.
    top = store.graph.get(ids[-1])
    doc = json.loads(top.raw_json)
    doc["comment"] = "crafted 128th"
    raw = canonical_json(doc)
    import hashlib

    crafted = hashlib.sha256(raw).hexdigest()
    node = layerfs_cli.root / "graph" / crafted
    node.mkdir()
    (node / "json").write_bytes(raw)
    (node / "parent").write_text(ids[-1])
    (node / "layersize").write_text("0")
    (tmp_path / "mnt2").mkdir()
    _one_line_error(
        layerfs_cli("mount", crafted, tmp_path / "mnt2", check=False), "128 images", "127"
    )


def test_archives_mount_without_loading(layerfs_cli: LayerfsCli, tmp_path: Path):
    work = tmp_path / "layers"
    work.mkdir()
    base = Layer(work / "0.tar").dir("etc").file("etc/a", b"base").file("etc/gone", b"x")
    top = Layer(work / "1.tar").dir("etc").whiteout("etc/gone").file("etc/b", b"top")
    build_image(layerfs_cli.root, [base.close(), top.close()], "arch:1")
    build_image(layerfs_cli.root, [base.path], "other:1")
    docker = tmp_path / "docker.tar"
    layerfs_cli("save", "-q", "-o", docker, "arch:1")
    oci_dir = tmp_path / "oci"
    layerfs_cli("save", "-q", "--format", "oci-dir", "-o", oci_dir, "arch:1")
    oci_tar = tmp_path / "oci.tar"
    layerfs_cli("save", "-q", "--format", "oci", "-o", oci_tar, "arch:1")
    gzipped = tmp_path / "docker.tar.gz"
    subprocess.run(f"gzip -c {docker} > {gzipped}", shell=True, check=True)
    both = tmp_path / "both.tar"
    layerfs_cli("save", "-q", "-o", both, "arch:1", "other:1")

    with mounted(layerfs_cli, "arch:1", tmp_path / "stored") as stored:
        want = listing(stored)
        for spec in (
            str(docker),
            str(oci_dir),
            f"oci-archive:{oci_tar}",
            str(gzipped),
            f"docker-archive:{both}:arch:1",
        ):
            with mounted(layerfs_cli, spec, tmp_path / "archive") as mnt:
                assert diff_listings(listing(mnt), want) == [], spec
                assert (mnt / "etc/b").read_bytes() == b"top"
    _one_line_error(layerfs_cli("mount", both, tmp_path / "archive", check=False), "2 images")
    _one_line_error(
        layerfs_cli("mount", "--rw", docker, tmp_path / "archive", check=False), "read-only"
    )


def test_foreground_mount_serves_until_a_signal(layerfs_cli: LayerfsCli, tmp_path: Path):
    layer = Layer(tmp_path / "0.tar").file("f", b"data").close()
    build_image(layerfs_cli.root, [layer], "fg:1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        layerfs_cli.argv("mount", "-f", "fg:1", mnt),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            time.sleep(0.05)
        assert (mnt / "f").read_bytes() == b"data"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
        assert layerfs_cli("mounts", "-q").stdout == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        fuse_unmount(mnt)


def test_image_deleted_underneath(layerfs_cli: LayerfsCli, tmp_path: Path):
    import shutil

    layer = Layer(tmp_path / "0.tar").file("f", b"still here").close()
    image = build_image(layerfs_cli.root, [layer], "gone:1")
    diff_id = Store.open(layerfs_cli.root).graph.get(image).layer
    assert diff_id is not None
    layer_dir = layerfs_cli.root / "layers" / diff_id.removeprefix("sha256:")
    with mounted(layerfs_cli, "gone:1", tmp_path / "mnt") as mnt:
        # Files removed behind the store's back: the open layer keeps serving.
        shutil.move(layer_dir, tmp_path / "moved")
        assert (mnt / "f").read_bytes() == b"still here"
    (tmp_path / "mnt2").mkdir()
    _one_line_error(
        layerfs_cli("mount", "gone:1", tmp_path / "mnt2", check=False), "not in the store"
    )
