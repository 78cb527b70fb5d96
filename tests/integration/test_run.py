"""Mounted images as container root file systems: chroot, layerfs run, runc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerfs.store.store import Store
from tests.helpers import write_busybox_rootfs_tar
from tests.integration.conftest import LayerfsCli
from tests.integration.mounting import Layer, build_image, debian_rootfs_tar
from tests.integration.test_mount_ro import mounted

pytestmark = [pytest.mark.fuse, pytest.mark.integration, pytest.mark.usefixtures("engine")]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, namespaces)")


@pytest.fixture(scope="session")
def debian_tar() -> Path:
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    return debian_rootfs_tar()


@pytest.fixture
def busybox(layerfs_cli: LayerfsCli, tmp_path: Path) -> str:
    if not Path("/bin/busybox").exists():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    tar = write_busybox_rootfs_tar(
        tmp_path / "busybox.tar",
        applets=(
            "sh",
            "ls",
            "cat",
            "echo",
            "wc",
            "tr",
            "sleep",
            "id",
            "hostname",
            "head",
            "mount",
            "sort",
        ),
    )
    layerfs_cli("import", "-c", 'CMD ["/bin/sh"]', tar, "busybox:test")
    return "busybox:test"


@needs_root
def test_chroot_into_a_mounted_busybox_image(layerfs_cli: LayerfsCli, busybox: str, tmp_path: Path):
    with mounted(layerfs_cli, busybox, tmp_path / "mnt") as mnt:
        result = subprocess.run(
            ["chroot", str(mnt), "/bin/sh", "-c", "echo hello | tr a-z A-Z; ls /bin | wc -l"],
            capture_output=True,
            check=True,
        )
        assert result.stdout.split() == [b"HELLO", b"13"]


@needs_root
def test_layerfs_run_a_pipeline_returns_output_and_exit_code(layerfs_cli: LayerfsCli, busybox: str):
    result = layerfs_cli(
        "run",
        "--rm",
        "-e",
        "GREETING=hi there",
        busybox,
        "sh",
        "-c",
        'echo "$GREETING" | wc -w; hostname | wc -c; echo $$; exit 7',
        check=False,
    )
    assert result.returncode == 7, result.stderr
    words, hostname_len, pid = result.stdout.split()
    assert words == b"2" and hostname_len == b"13" and pid == b"1"
    assert not list((layerfs_cli.root / "upper").iterdir())  # --rm
    assert layerfs_cli("mounts", "-q").stdout == b""


@needs_root
def test_layerfs_run_user_workdir_default_cmd_and_kept_upper(layerfs_cli: LayerfsCli, busybox: str):
    result = layerfs_cli(
        "run",
        "-u",
        "nobody",
        "-w",
        "/tmp",
        busybox,
        "sh",
        "-c",
        "id -u; id -g; pwd; ls /proc/1/ns >/dev/null && echo proc",
        check=False,
    )
    assert result.stdout.split() == [b"65534", b"65534", b"/tmp", b"proc"], result.stderr
    uppers = list((layerfs_cli.root / "upper").iterdir())
    assert len(uppers) == 1  # without --rm the upper stays
    default = layerfs_cli(
        "run", "--rm", "--name", "x", busybox, input=b"echo from stdin\n", check=False
    )
    assert default.stdout == b"from stdin\n"


@needs_root
def test_layerfs_run_forwards_signals(layerfs_cli: LayerfsCli, busybox: str):
    proc = subprocess.Popen(
        layerfs_cli.argv(
            "run",
            "--rm",
            busybox,
            "sh",
            "-c",
            'trap "echo got TERM; exit 42" TERM; echo ready; sleep 60 & wait',
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=30)
        assert proc.returncode == 42
        assert out == b"got TERM\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_root
def test_layerfs_run_refuses_a_chain_too_deep_for_a_container(
    layerfs_cli: LayerfsCli, tmp_path: Path
):
    store = Store.open(layerfs_cli.root)
    empty = Layer(tmp_path / "empty.tar").close()
    parent = ""
    for _ in range(125):
        with open(empty, "rb") as stream:
            parent = store.graph.create(store.layers.ingest(stream), parent=parent).id
    store.tags.tag("deep", "125", parent, force=True)
    result = layerfs_cli("run", "--rm", "deep:125", "true", check=False)
    assert result.returncode != 0
    assert b"Cannot create container with more than 127 parents" in result.stderr


@needs_root
def test_runc_runs_a_bundle_whose_root_is_a_layerfs_mount(
    layerfs_cli: LayerfsCli, busybox: str, tmp_path: Path
):
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (apt-get install runc)")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with mounted(layerfs_cli, busybox, tmp_path / "rootfs") as mnt:
        subprocess.run(["runc", "spec"], cwd=bundle, check=True)
        config = json.loads((bundle / "config.json").read_text())
        config["root"] = {"path": str(mnt), "readonly": True}
        config["process"]["terminal"] = False
        config["process"]["args"] = [
            "/bin/sh",
            "-c",
            "head -1 /etc/passwd; ls /bin | wc -l; echo $$",
        ]
        config["hostname"] = "layerfs-runc"
        (bundle / "config.json").write_text(json.dumps(config))
        name = f"layerfs-test-{os.getpid()}-{time.monotonic_ns()}"
        try:
            result = subprocess.run(
                ["runc", "run", "--bundle", str(bundle), name],
                capture_output=True,
                timeout=120,
                check=False,
            )
        finally:
            subprocess.run(["runc", "delete", "-f", name], capture_output=True, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [b"root:x:0:0:root:/root:/bin/sh", b"13", b"1"]


def _hello_deb(work: Path) -> Path:
    package = work / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN/control").write_text(
        "Package: layerfs-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: layerfs tests <tests@example.invalid>\nDescription: test package\n"
    )
    (package / "usr/bin").mkdir(parents=True)
    script = package / "usr/bin/layerfs-hello"
    script.write_text("#!/bin/sh\necho hello from a package\n")
    script.chmod(0o755)
    deb = work / "layerfs-hello.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(package), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


@needs_root
def test_debian_image_chroot_dpkg_install_and_busybox(
    layerfs_cli: LayerfsCli, debian_tar: Path, tmp_path: Path
):
    layerfs_cli("import", "-q", "-c", 'CMD ["/bin/bash"]', debian_tar, "debian:test")
    deb = _hello_deb(tmp_path)
    extra = Layer(tmp_path / "extra.tar").dir("tmp", mode=0o1777)
    extra.file("tmp/layerfs-hello.deb", deb.read_bytes())
    extra.dir("opt").file("opt/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    build_image(layerfs_cli.root, [extra.close()], "debian:extra", parent="debian:test")

    with mounted(layerfs_cli, "debian:test", tmp_path / "mnt") as mnt:
        result = subprocess.run(
            [
                "chroot",
                str(mnt),
                "/bin/bash",
                "-c",
                "dpkg-query -W -f='${Package}\\n' | wc -l; ls /usr/bin | wc -l; "
                ". /etc/os-release; echo $ID $VERSION_CODENAME",
            ],
            capture_output=True,
            check=True,
        )
        packages, programs, *release = result.stdout.split()
        assert int(packages) > 80 and int(programs) > 200
        assert release == [b"debian", b"bookworm"]

    result = layerfs_cli(
        "run",
        "--rm",
        "debian:extra",
        "bash",
        "-c",
        "set -e; dpkg -i /tmp/layerfs-hello.deb >/dev/null; layerfs-hello; "
        "dpkg -s layerfs-hello | grep ^Status; /opt/busybox echo busybox says hi | "
        "/opt/busybox tr a-z A-Z",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        b"hello from a package",
        b"Status: install ok installed",
        b"BUSYBOX SAYS HI",
    ]


def test_run_without_root_says_it_needs_root(tmp_path: Path) -> None:
    # Refused before the store is touched: as root, the test drops to a user who could
    # not even reach tmp_path; a normal user runs it as is.
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run(
        [
            *(drop if os.geteuid() == 0 else []),
            sys.executable,
            "-m",
            "layerfs",
            "--root",
            str(tmp_path / "store"),
            "run",
            "busybox:1",
            "true",
        ],
        capture_output=True,
        check=False,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert lines[0] == (
        "layerfs: error: layerfs run needs root: it creates namespaces, mounts /proc and /dev "
        "and chroots"
    )
    assert [line for line in lines[1:] if not line.startswith("hint: ")] == []
