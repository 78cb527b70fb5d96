"""layerfs.fs.host: mount records, the mount table parser, mountpoint checks, -o options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layerfs.cli.mount import parse_options
from layerfs.errors import MountError, MountpointBusyError, UsageError
from layerfs.fs import host
from layerfs.fs.host import MountRecord, Records, check_mountpoint


def test_mountinfo_escapes_are_decoded():
    assert host._unescape(r"/tmp/with\040space\011tab\134back") == "/tmp/with space\ttab\\back"
    assert host._unescape("/plain") == "/plain"


def test_mount_table_knows_the_root():
    assert "/" in host.mount_table()


def test_records_round_trip_and_liveness(tmp_path: Path):
    records = Records(tmp_path / "mounts", tmp_path)
    (tmp_path / "mounts").mkdir()
    record = MountRecord(
        id="abc",
        mountpoint=str(tmp_path / "mnt"),
        image="f" * 64,
        reference="img:1",
        mode="rw",
        upper="u",
        pid=123,
    )
    records.write(record)
    assert records.find(tmp_path / "mnt") == record
    assert not records.alive("abc")  # nobody holds its lock
    lock = records.hold("abc")
    try:
        assert records.alive("abc")
        assert not records.wait_released("abc", 0.05)
    finally:
        lock.release()
    assert records.wait_released("abc", 1)
    records.remove("abc")
    assert records.all() == [] and records.find(tmp_path / "mnt") is None


def test_mountpoint_must_be_an_empty_directory(tmp_path: Path):
    with pytest.raises(MountError, match="no such directory"):
        check_mountpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MountError, match="not a directory"):
        check_mountpoint(tmp_path / "file")
    with pytest.raises(MountpointBusyError, match="not empty"):
        check_mountpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    assert check_mountpoint(tmp_path / "empty") == (tmp_path / "empty").resolve()


def test_mount_options():
    assert parse_options(["allow_other,ro", "suid"]) == {"allow_other", "ro", "suid"}
    with pytest.raises(UsageError, match="unsupported mount option 'exec'"):
        parse_options(["exec"])


def test_other_mount_namespace_is_false_for_our_own_and_for_unknown_processes() -> None:
    assert host._other_mount_namespace(os.getpid()) is False
    assert host._other_mount_namespace(2**22 + 12345) is False  # no such process
