"""A full disk: every write of the store on a small file system made for the test.

The store lives on a size-limited tmpfs. Each case runs out of space in a different
place (the free-space check of a load, a layer's ingest, a metadata write, save's
output, a copy-up in a writable mount) and checks: a one-line error naming the store's
file system, exit status 1 (never the "internal error" of a bug), no staging left in
tmp/, what was stored before unchanged and ``fsck --verify`` clean, and the same
command passing once there is room.
"""

from __future__ import annotations

import errno
import gzip
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.archive_builders import docker_members, make_image, pack
from tests.helpers import build_tar, tar_file
from tests.integration.conftest import LayerfsCli
from tests.integration.test_mount_ro import mounted

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted whatever happens."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


@pytest.fixture
def cli(small: Path, layerfs_cli: LayerfsCli, monkeypatch: pytest.MonkeyPatch) -> LayerfsCli:
    # The disk itself runs out here: no free-space reserve, no expansion cap (both have
    # their own tests) stop the commands before it does.
    monkeypatch.setenv("LAYERFS_MIN_FREE", "0")
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "0")
    cli = LayerfsCli(small / "store")
    layerfs_cli.root = cli.root  # its cleanup (mounts, processes) covers this store
    seed = small.parent / "seed.tar"
    seed.write_bytes(_tar("seed", 64 << 10))
    cli("import", seed, "seed/img:1")
    return cli


def _tar(name: str, size: int, *, zeros: bool = False) -> bytes:
    return build_tar(tar_file(f"{name}/data", bytes(size) if zeros else os.urandom(size)))


def _fill(path: Path, leave: int) -> Path:
    """Fill the file system of ``path`` until ``leave`` bytes are free."""
    filler = path / "filler"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as out:
        left = max(free - leave, 0)
        while left > 0:
            chunk = min(left, 1 << 20)
            try:
                out.write(bytes(chunk))
                out.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            left -= chunk
    return filler


def _state(cli: LayerfsCli) -> tuple[bytes, list[str]]:
    return cli("images", "-a", "-q", "--no-trunc").stdout, sorted(os.listdir(cli.root / "layers"))


def _failed_cleanly(cli: LayerfsCli, result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("layerfs: error: "), stderr
    first = errors[0]
    assert os.listdir(cli.root / "tmp") == []
    assert cli("fsck", "--verify").returncode == 0
    return first


def test_a_load_that_cannot_fit_is_refused_before_it_starts(
    cli: LayerfsCli, tmp_path: Path
) -> None:
    before = _state(cli)
    archive = tmp_path / "big.tar"  # on the big disk: only the store is small
    archive.write_bytes(pack(docker_members([make_image([_tar("big", 30 << 20)], ["big/img:1"])])))
    result = cli("load", "-i", archive, check=False)
    line = _failed_cleanly(cli, result)
    assert "cannot load big/img:1: needs 30.0 MiB but the file system of " in line
    assert str(cli.root) in line
    assert _state(cli) == before


def test_a_layer_that_runs_out_of_space_while_inflating(cli: LayerfsCli, tmp_path: Path) -> None:
    before = _state(cli)
    layer = gzip.compress(_tar("zeros", 40 << 20, zeros=True))  # 40 KiB that inflate to 40 MiB
    archive = tmp_path / "zeros.tar"
    image = make_image([_tar("zeros", 40 << 20, zeros=True)], ["zeros/img:1"])
    members = docker_members([image])
    for name in list(members):
        if name.endswith("/layer.tar"):
            members[name] = layer
    archive.write_bytes(pack(members))
    result = cli("load", "-i", archive, check=False)
    line = _failed_cleanly(cli, result)
    assert "no space left on the file system of " + str(cli.root) in line
    assert _state(cli) == before
    source = tmp_path / "zeros.tar.gz"
    source.write_bytes(layer)
    line = _failed_cleanly(cli, cli("import", source, "zeros/imported", check=False))
    assert line.startswith(f"layerfs: error: cannot import '{source}': no space left on the")
    assert _state(cli) == before


def test_a_metadata_write_on_a_full_disk(cli: LayerfsCli, small: Path) -> None:
    before = _state(cli)
    tags = (cli.root / "repositories.json").read_bytes()
    filler = _fill(small, 0)
    result = cli("tag", "seed/img:1", "other/name:1", check=False)
    filler.unlink()
    line = _failed_cleanly(cli, result)
    assert "cannot write repositories.json: no space left on the file system of" in line
    assert (cli.root / "repositories.json").read_bytes() == tags
    assert _state(cli) == before
    cli("tag", "seed/img:1", "other/name:1")  # with room again


def test_save_to_a_full_disk_leaves_no_partial_output(cli: LayerfsCli, small: Path) -> None:
    source = small.parent / "mid.tar"
    source.write_bytes(_tar("mid", 6 << 20))
    cli("import", source, "mid/img:1")
    filler = _fill(small, 2 << 20)
    output = small / "out.tar"
    result = cli("save", "-o", output, "mid/img:1", check=False)
    filler.unlink()
    line = _failed_cleanly(cli, result)
    assert line.startswith(f"layerfs: error: cannot save to {output}: no space left on the")
    assert sorted(os.listdir(small)) == ["store"]  # no output, whole or in part
    cli("save", "-o", output, "mid/img:1")
    assert output.stat().st_size > 6 << 20


def test_a_copy_up_on_a_full_disk_keeps_the_lower_file(cli: LayerfsCli, small: Path) -> None:
    data = os.urandom(5 << 20)
    source = small.parent / "rootfs.tar"
    source.write_bytes(build_tar(tar_file("big", data)))
    cli("import", source, "cow/img:1")
    with mounted(cli, "cow/img:1", small.parent / "mnt", "--rw") as mnt:
        upper = cli.root / "upper"
        filler = _fill(small, 1 << 20)
        try:
            # The open for writing copies up, and fails.
            with pytest.raises(OSError) as caught, open(mnt / "big", "r+b") as handle:
                handle.write(b"changed")
            assert caught.value.errno == errno.ENOSPC, caught.value
        finally:
            filler.unlink()
        assert (mnt / "big").read_bytes() == data  # the lower file, whole
        data_files = [p for p in upper.rglob("data/*") if p.is_file()]
        assert data_files == []  # no upper file, not even a part of one
    assert cli("fsck", "--verify").returncode == 0


def test_a_commit_on_a_full_disk_keeps_the_upper(cli: LayerfsCli, small: Path) -> None:
    before = _state(cli)
    with mounted(cli, "seed/img:1", small.parent / "mnt", "--rw", "--upper", "work") as mnt:
        (mnt / "new").write_bytes(os.urandom(3 << 20))
        filler = _fill(small, 1 << 20)
        try:
            result = cli("commit", mnt, "committed/img:1", check=False)
        finally:
            filler.unlink()
        line = _failed_cleanly(cli, result)
        assert "no space left on the file system of " + str(cli.root) in line
        assert _state(cli) == before
        assert len((mnt / "new").read_bytes()) == 3 << 20  # the change is still there
        cli("commit", mnt, "committed/img:1")  # with room again
    assert cli("fsck", "--verify").returncode == 0
