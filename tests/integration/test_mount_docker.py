"""Mounts against the real Docker engine: docker export agrees, a commit loads and runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DockerEngine, LayerfsCli
from tests.integration.mounting import Layer, build_image, diff_listings, listing
from tests.integration.test_mount_ro import mounted, torture_layers

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.docker,
    pytest.mark.integration,
    pytest.mark.usefixtures("engine"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (Docker, mknod)"),
]

# The init layer: what docker export shows and the image does not hold (modern Docker has
# no /.dockerinit; layerfs keeps 1.8's).
DOCKER_INIT = {
    b".dockerinit",
    b".dockerenv",
    b"dev",
    b"dev/console",
    b"dev/pts",
    b"dev/shm",
    b"etc/hostname",
    b"etc/hosts",
    b"etc/mtab",
    b"etc/resolv.conf",
    b"proc",
    b"sys",
}


def _comparable(entries: dict[bytes, tuple[Any, ...]]) -> dict[bytes, tuple[Any, ...]]:
    """Drop the init layer, directory mtimes and xattrs Docker does not carry."""
    out = {}
    for path, entry in entries.items():
        if path in DOCKER_INIT:
            continue
        # (kind, mode, uid, gid, size, digest, target, rdev, xattrs, mtime, group)
        kind, xattrs, mtime = entry[0], entry[8], entry[9]
        kept = tuple(x for x in xattrs if x[0] == "security.capability")
        out[path] = (*entry[:8], kept, None if kind == 0o040000 else mtime, *entry[10:])
    return out


def test_docker_export_shows_what_the_mount_shows(
    layerfs_cli: LayerfsCli, docker_engine: DockerEngine, tmp_path: Path
):
    layers = torture_layers(tmp_path / "layers", big=False)
    build_image(layerfs_cli.root, layers, "layerfs-test/torture:1", config={"Cmd": ["/bin/sh"]})
    archive = tmp_path / "torture.tar"
    layerfs_cli("save", "-q", "-o", archive, "layerfs-test/torture:1")
    docker_engine.run("load", "-i", archive)
    container = docker_engine.run("create", "layerfs-test/torture:1").stdout.decode().strip()
    exported = tmp_path / "export.tar"
    with open(exported, "wb") as out:
        subprocess.run(
            ["docker", "-H", docker_engine.host, "export", container],
            stdout=out,
            check=True,
            env=docker_engine.env,
        )
    docker_engine.run("rm", container)
    extracted = tmp_path / "exported"
    extracted.mkdir()
    subprocess.run(
        [
            "tar",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-xpf",
            str(exported),
            "-C",
            str(extracted),
        ],
        check=True,
    )

    with mounted(layerfs_cli, "layerfs-test/torture:1", tmp_path / "mnt") as mnt:
        got = _comparable(listing(mnt))
    want = _comparable(listing(extracted))
    assert diff_listings(got, want) == []


def test_a_committed_image_saved_by_layerfs_save_runs_in_docker(
    layerfs_cli: LayerfsCli, docker_engine: DockerEngine, tmp_path: Path
):
    if not Path("/bin/busybox").exists():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    work = tmp_path / "layers"
    work.mkdir()
    base = (
        Layer(work / "0.tar")
        .dir("bin")
        .file("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    )
    base.symlink("bin/sh", "busybox").dir("etc").file("etc/old", b"old\n")
    base.dir("opt").file("opt/a", b"a").dir("opt/sub").file("opt/sub/b", b"b")
    build_image(
        layerfs_cli.root, [base.close()], "layerfs-test/base:1", config={"Cmd": ["/bin/sh"]}
    )
    with mounted(layerfs_cli, "layerfs-test/base:1", tmp_path / "mnt", "--rw") as mnt:
        (mnt / "etc/new").write_bytes(b"made through the mount\n")
        os.unlink(mnt / "etc/old")
        os.rename(mnt / "opt", mnt / "opt2")
        (mnt / "opt").mkdir()
        (mnt / "opt/fresh").write_bytes(b"fresh\n")
        os.chmod(mnt / "etc/new", 0o640)
        layerfs_cli(
            "commit",
            mnt,
            "layerfs-test/base:2",
            "-c",
            'CMD ["/bin/sh", "-c", '
            '"cat /etc/new; ls /etc /opt /opt2 /opt2/sub; stat -c %a /etc/new"]',
        )
    archive = tmp_path / "committed.tar"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from layerfs.cli import save_main; sys.exit(save_main())",
            "--root",
            str(layerfs_cli.root),
            "-o",
            str(archive),
            "layerfs-test/base:2",
        ],
        check=True,
        capture_output=True,
    )
    docker_engine.run("load", "-i", archive)
    result = docker_engine.run("run", "--rm", "--network", "none", "layerfs-test/base:2")
    assert result.stdout.decode().split() == [
        "made",
        "through",
        "the",
        "mount",
        "/etc:",
        "hostname",
        "hosts",
        "mtab",
        "new",
        "resolv.conf",
        "/opt:",
        "fresh",
        "/opt2:",
        "a",
        "sub",
        "/opt2/sub:",
        "b",
        "640",
    ]
