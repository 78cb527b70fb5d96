"""Tests for layerfs.store.initlayer: Docker's SetupInitLayer entries, on disk (FORMATS §4)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.store.initlayer import (
    INIT_ENTRIES,
    INIT_PARENT_MODE,
    InitEntry,
    init_parents,
    setup_init_layer,
)

# FORMATS.md §4, row by row.
EXPECTED = {
    "dev/pts": ("d", 0o755, ""),
    "dev/shm": ("d", 0o755, ""),
    "proc": ("d", 0o755, ""),
    "sys": ("d", 0o755, ""),
    ".dockerinit": ("f", 0o755, ""),
    ".dockerenv": ("f", 0o755, ""),
    "etc/resolv.conf": ("f", 0o755, ""),
    "etc/hosts": ("f", 0o755, ""),
    "etc/hostname": ("f", 0o755, ""),
    "dev/console": ("f", 0o755, ""),
    "etc/mtab": ("l", 0o777, "/proc/mounts"),
}


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_init_entries_are_exactly_docker_s() -> None:
    assert {e.path: (e.type, e.mode, e.target) for e in INIT_ENTRIES} == EXPECTED
    assert len(INIT_ENTRIES) == len(EXPECTED)  # no path twice
    assert all(isinstance(e, InitEntry) and not e.path.startswith("/") for e in INIT_ENTRIES)


def test_dev_console_is_a_regular_file_not_a_device() -> None:
    console = next(e for e in INIT_ENTRIES if e.path == "dev/console")
    assert console.type == "f"


def test_init_parents() -> None:
    assert init_parents() == ["dev", "etc"]
    assert INIT_PARENT_MODE == 0o755


def _check_fresh(root: Path) -> None:
    for path, (kind, mode, target) in EXPECTED.items():
        st = os.lstat(root / path)
        if kind == "d":
            assert stat.S_ISDIR(st.st_mode), path
            assert stat.S_IMODE(st.st_mode) == mode, path
        elif kind == "f":
            assert stat.S_ISREG(st.st_mode), path
            assert st.st_size == 0, path
            assert stat.S_IMODE(st.st_mode) == mode, path
        else:
            assert stat.S_ISLNK(st.st_mode), path
            assert os.readlink(root / path) == target
    for parent in ("dev", "etc"):
        st = os.lstat(root / parent)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755


def test_setup_on_an_empty_directory(tmp_path: Path) -> None:
    setup_init_layer(tmp_path)
    _check_fresh(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".dockerenv",
        ".dockerinit",
        "dev",
        "etc",
        "proc",
        "sys",
    ]
    assert sorted(p.name for p in (tmp_path / "dev").iterdir()) == ["console", "pts", "shm"]
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == [
        "hostname",
        "hosts",
        "mtab",
        "resolv.conf",
    ]


def test_modes_are_subject_to_the_umask(tmp_path: Path) -> None:
    os.umask(0o077)
    setup_init_layer(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "proc").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "etc/hosts").st_mode) == 0o700


def test_setup_is_idempotent(tmp_path: Path) -> None:
    setup_init_layer(tmp_path)
    setup_init_layer(tmp_path)
    _check_fresh(tmp_path)


def test_setup_over_an_image_with_a_symlinked_hosts_and_an_existing_proc(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    host_hosts = outside / "hosts"
    host_hosts.write_bytes(b"127.0.0.1 host\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").symlink_to(host_hosts)
    (root / "proc").mkdir(mode=0o555)
    (root / "proc" / "keep").write_bytes(b"kept")
    (root / "etc" / "hostname").write_bytes(b"old-name\n")
    (root / "etc" / "mtab").write_bytes(b"a regular mtab\n")

    setup_init_layer(root)

    hosts = os.lstat(root / "etc" / "hosts")
    assert stat.S_ISREG(hosts.st_mode) and hosts.st_size == 0  # the symlink was replaced
    assert host_hosts.read_bytes() == b"127.0.0.1 host\n"  # and never written through
    proc = os.lstat(root / "proc")
    assert stat.S_ISDIR(proc.st_mode) and stat.S_IMODE(proc.st_mode) == 0o555  # left as is
    assert (root / "proc" / "keep").read_bytes() == b"kept"
    assert (root / "etc" / "hostname").read_bytes() == b""  # an existing file is replaced
    assert os.readlink(root / "etc" / "mtab") == "/proc/mounts"


def test_a_symlinked_parent_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "host-etc"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(outside)
    (root / "dev").symlink_to("/dev")

    setup_init_layer(root)

    assert list(outside.iterdir()) == []  # nothing was created through the link
    assert stat.S_ISDIR(os.lstat(root / "etc").st_mode)
    assert stat.S_ISDIR(os.lstat(root / "dev").st_mode)
    assert stat.S_ISREG(os.lstat(root / "dev" / "console").st_mode)
    _check_fresh(root)


def test_existing_directories_at_file_paths_are_left(tmp_path: Path) -> None:
    (tmp_path / "etc" / "hosts").mkdir(parents=True)
    (tmp_path / "etc" / "hosts" / "inner").write_bytes(b"x")
    (tmp_path / "dev" / "console").mkdir(parents=True)
    (tmp_path / "etc" / "mtab").mkdir()

    setup_init_layer(tmp_path)

    assert (tmp_path / "etc" / "hosts" / "inner").read_bytes() == b"x"
    assert stat.S_ISDIR(os.lstat(tmp_path / "dev" / "console").st_mode)
    assert stat.S_ISDIR(os.lstat(tmp_path / "etc" / "mtab").st_mode)
    assert stat.S_ISREG(os.lstat(tmp_path / "etc" / "resolv.conf").st_mode)


def test_a_file_where_a_directory_goes_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "sys").write_bytes(b"not a dir")
    (tmp_path / "dev").write_bytes(b"not a dir either")
    (tmp_path / "dev-target").mkdir()
    (tmp_path / "proc").symlink_to("dev-target")

    setup_init_layer(tmp_path)

    for path in ("sys", "dev", "proc", "dev/pts"):
        assert stat.S_ISDIR(os.lstat(tmp_path / path).st_mode), path
    assert list((tmp_path / "dev-target").iterdir()) == []


def test_dangling_symlinks_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    (tmp_path / ".dockerenv").symlink_to("nowhere")

    setup_init_layer(tmp_path)

    assert stat.S_ISREG(os.lstat(tmp_path / "etc" / "resolv.conf").st_mode)
    assert stat.S_ISREG(os.lstat(tmp_path / ".dockerenv").st_mode)


def test_other_content_is_not_touched(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir(mode=0o750)
    (tmp_path / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sh").write_bytes(b"ELF")

    setup_init_layer(tmp_path)

    assert (tmp_path / "etc" / "passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    assert (tmp_path / "bin" / "sh").read_bytes() == b"ELF"
    assert stat.S_IMODE(os.lstat(tmp_path / "etc").st_mode) == 0o750  # existing dir kept
