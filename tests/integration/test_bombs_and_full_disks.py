"""Decompression bombs and the free-space reserve, through the real command line.

The bombs are the real thing: a 20 MB docker-archive (or a pushed image) whose one
layer inflates to 20 GiB of zeros and carries that tar's true diff ID, gzip and zstd
(tests/hostile.py builds them without writing them out). The reserve is shown on a
small tmpfs made for the test, with the bomb cap lifted so that only the reserve
stands between an ingest and a full disk: load, import, pull and commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.hostile import BOMB_SIZE, bomb_digests, write_gzip_bomb, write_zstd_bomb
from tests.integration.conftest import LayerfsCli, unmount_all_under
from tests.integration.mounting import Layer, build_image
from tests.integration.test_mount_ro import mounted

if TYPE_CHECKING:
    from .conftest import RegistryFactory

pytestmark = pytest.mark.integration

LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@pytest.fixture(scope="session")
def bomb_diff_id(pytestconfig: pytest.Config) -> str:
    """The diff ID of the 20 GiB tar: hashed once (~15 s), then kept in pytest's cache."""
    return bomb_digests(BOMB_SIZE, pytestconfig.cache)[0]


def _bomb_blob(kind: str, tmp: Path, pytestconfig: pytest.Config) -> Path:
    if kind == "gzip":
        crc = bomb_digests(BOMB_SIZE, pytestconfig.cache)[1]
        return write_gzip_bomb(tmp / "bomb.tar.gz", BOMB_SIZE, crc)
    return write_zstd_bomb(tmp / "bomb.tar.zst", BOMB_SIZE)


def _config(diff_id: str) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_bomb_archive(path: Path, blob: Path, diff_id: str, tag: str) -> Path:
    """A docker-archive of one image whose one layer is the compressed ``blob``."""
    config = _config(diff_id)
    config_name = f"{_digest(config)[7:]}.json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["l/layer.tar"]}])
    with tarfile.open(path, "w") as tar:
        for name, data in ((config_name, config), ("manifest.json", manifest.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("l/layer.tar")
        info.size = blob.stat().st_size
        with open(blob, "rb") as stream:
            tar.addfile(info, stream)
    return path


def _error(stderr: bytes) -> str:
    """The one error line (progress lines may come before it)."""
    errors = [line for line in stderr.decode().splitlines() if line.startswith("layerfs: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _produced(stderr: bytes) -> int:
    match = re.search(rb"\((\d+) bytes from (\d+)\)", stderr)
    assert match, stderr
    return int(match.group(1))


def _assert_untouched(cli: LayerfsCli) -> None:
    """Nothing stored, nothing staged, fsck clean."""
    assert cli("images", "-a", "-q").stdout == b""
    assert sorted(os.listdir(cli.root / "layers")) == []
    assert sorted(os.listdir(cli.root / "tmp")) == []
    assert cli("fsck").returncode == 0


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_20_gib_bomb_in_a_20_mb_archive_is_stopped_at_once(
    kind: str,
    layerfs_cli: LayerfsCli,
    tmp_path: Path,
    bomb_diff_id: str,
    pytestconfig: pytest.Config,
) -> None:
    blob = _bomb_blob(kind, tmp_path, pytestconfig)
    archive = write_bomb_archive(tmp_path / "bomb.tar", blob, bomb_diff_id, "bomb:1")
    assert archive.stat().st_size < 25 << 20
    result = layerfs_cli("load", "-i", archive, check=False)
    assert result.returncode == 1, result.stderr
    first = _error(result.stderr)
    # The layer (its place and diff ID) and the override are named.
    assert f"bomb:1: layer 1/1 ({bomb_diff_id[:19]})" in first, first
    assert "decompression bomb" in first and "LAYERFS_MAX_EXPANSION_RATIO" in first
    # Stopped right after the 16 MiB grace: far from writing 20 GiB.
    assert _produced(result.stderr) < 32 << 20
    _assert_untouched(layerfs_cli)


def _push_bomb(registry_host: str, ref: str, blob: Path, kind: str, diff_id: str) -> None:
    from layerfs.model.reference import Reference
    from layerfs.registry.blobs import Repository
    from layerfs.registry.client import RegistryClient, RegistryOptions

    reference = Reference.parse(ref)
    client = RegistryClient(registry_host, RegistryOptions(use_config=False))
    repo = Repository(client, reference.remote_name, "pull,push")
    try:
        data = blob.read_bytes()
        repo.upload_bytes(data, _digest(data))
        config = _config(diff_id)
        repo.upload_bytes(config, _digest(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": len(config),
                "digest": _digest(config),
            },
            "layers": [
                {"mediaType": LAYER_TYPES[kind], "size": len(data), "digest": _digest(data)}
            ],
        }
        repo.put_manifest(
            reference.tag or "latest",
            json.dumps(manifest).encode(),
            "application/vnd.oci.image.manifest.v1+json",
        )
    finally:
        client.close()


@pytest.mark.registry
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_pulled_bomb_is_stopped_at_once(
    kind: str,
    registry_server: RegistryFactory,
    layerfs_cli: LayerfsCli,
    tmp_path: Path,
    bomb_diff_id: str,
    pytestconfig: pytest.Config,
) -> None:
    registry = registry_server()
    ref = f"{registry.host}/bomb/{kind}:1"
    _push_bomb(registry.host, ref, _bomb_blob(kind, tmp_path, pytestconfig), kind, bomb_diff_id)
    result = layerfs_cli("pull", ref, check=False)
    assert result.returncode == 1, result.stderr
    first = _error(result.stderr)
    assert "layer 1/1 (sha256:" in first and "LAYERFS_MAX_EXPANSION_RATIO" in first, first
    assert _produced(result.stderr) < 32 << 20
    _assert_untouched(layerfs_cli)


# -- the free-space reserve on a small file system -------------------------------------------

SMALL_FS = 96 << 20


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A store root on a 96 MiB tmpfs of its own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0700", "tmpfs",
                    str(point)], check=True)  # fmt: skip
    try:
        yield point / "store"
    finally:
        unmount_all_under(point)  # mounts made inside it first (FUSE)
        if os.path.ismount(point):
            subprocess.run(["umount", "-l", str(point)], check=False)


def _zeros_tar(path: Path, size: int, name: str = "zeros") -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        with open("/dev/zero", "rb") as zeros:
            tar.addfile(info, zeros)
    return path


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _assert_reserve_error(
    result: subprocess.CompletedProcess[bytes], store: Path, *, hint: bool = True
) -> None:
    assert result.returncode != 0
    lines = result.stderr.decode().splitlines()
    first = _error(result.stderr)
    assert f"the file system of {store}/tmp has" in first, first
    assert "LAYERFS_MIN_FREE" in first
    # load reports each image's failure on one line; the other commands add the hint.
    assert not hint or any(
        line.startswith("hint: ") and "LAYERFS_MIN_FREE" in line for line in lines
    )
    assert b"Traceback" not in result.stderr


def test_the_reserve_stops_load_and_import_before_the_disk_is_full(
    small_store: Path, tmp_path: Path, bomb_diff_id: str, pytestconfig: pytest.Config
) -> None:
    cli = LayerfsCli(small_store)
    cli("images")  # creates the store
    before = _free(small_store)
    no_cap = {"LAYERFS_MAX_EXPANSION_RATIO": "0"}
    blob = _bomb_blob("gzip", tmp_path, pytestconfig)
    archive = write_bomb_archive(tmp_path / "bomb.tar", blob, bomb_diff_id, "bomb:1")
    # The default reserve: 5% of the 96 MiB file system.
    load = cli("load", "-i", archive, env=no_cap, check=False)
    _assert_reserve_error(load, small_store, hint=False)
    assert "keeps 4.8 MiB free" in load.stderr.decode()
    assert _free(small_store) == before  # the staged layer is gone
    # A plain tar (ratio 1) from standard input, with a reserve chosen by the user.
    big = _zeros_tar(tmp_path / "big.tar", 60 << 20)
    with open(big, "rb") as stdin:
        result = subprocess.run(
            [*cli_argv(small_store), "import", "-", "big:1"], stdin=stdin, capture_output=True,
            env={**os.environ, "LAYERFS_MIN_FREE": "40M"}, check=False, timeout=120,
        )  # fmt: skip
    _assert_reserve_error(result, small_store)
    assert "keeps 40.0 MiB free" in result.stderr.decode()
    assert _free(small_store) == before
    assert cli("images", "-a", "-q").stdout == b""
    assert cli("fsck").returncode == 0
    # The same command goes through once the reserve allows it.
    with open(big, "rb") as stdin:
        subprocess.run([*cli_argv(small_store), "import", "-", "big:1"], stdin=stdin,
                       capture_output=True, check=True, timeout=120)  # fmt: skip
    cli("inspect", "big:1")


def cli_argv(root: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "layerfs", "--root", str(root)]


@pytest.mark.registry
def test_the_reserve_stops_a_pull(
    small_store: Path,
    registry_server: RegistryFactory,
    tmp_path: Path,
    bomb_diff_id: str,
    pytestconfig: pytest.Config,
) -> None:
    registry = registry_server()
    ref = f"{registry.host}/bomb/gzip:1"
    _push_bomb(registry.host, ref, _bomb_blob("gzip", tmp_path, pytestconfig), "gzip",
               bomb_diff_id)  # fmt: skip
    cli = LayerfsCli(small_store)
    cli("images")
    before = _free(small_store)
    result = cli("pull", ref, env={"LAYERFS_MAX_EXPANSION_RATIO": "0"}, check=False)
    _assert_reserve_error(result, small_store)
    assert _free(small_store) == before
    assert cli("images", "-a", "-q").stdout == b""
    assert cli("fsck").returncode == 0


@pytest.mark.fuse
def test_the_reserve_stops_a_commit(small_store: Path, tmp_path: Path) -> None:
    cli = LayerfsCli(small_store)
    base = Layer(tmp_path / "0.tar").dir("data").file("data/f", b"base").close()
    build_image(small_store, [base], "base:1")
    with mounted(cli, "base:1", tmp_path / "mnt", "--rw", "--upper", "work") as mnt:
        with open(mnt / "data/big", "wb") as out:
            out.write(os.urandom(30 << 20))
        free = _free(small_store)
        # The commit needs ~30 MiB more: refuse it when that would cut into the reserve.
        reserve = {"LAYERFS_MIN_FREE": str(free - (20 << 20))}
        result = cli("commit", mnt, "big:1", env=reserve, check=False)
        _assert_reserve_error(result, small_store)
        assert os.listdir(small_store / "tmp") == []
        # Nothing staged is left (the server may have saved the upper's state meanwhile).
        assert abs(_free(small_store) - free) < 1 << 20
        assert (mnt / "data/big").stat().st_size == 30 << 20  # the upper is untouched
        assert cli("inspect", "big:1", check=False).returncode != 0
        cli("commit", mnt, "big:1")
    assert cli("fsck").returncode == 0


# -- hostile names as Docker applies them -----------------------------------------------------


def _raw_member(name: bytes, data: bytes = b"", kind: bytes = b"0", link: bytes = b"",
                size_field: bytes | None = None) -> bytes:  # fmt: skip
    info = tarfile.TarInfo("x")
    info.mtime, info.mode = 1_700_000_000, 0o755 if kind == b"5" else 0o644
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[0:100] = name.ljust(100, b"\0")
    block[156:157] = kind
    block[157:257] = link.ljust(100, b"\0")
    block[124:136] = size_field or b"%011o\0" % len(data)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + data + bytes(-len(data) % 512)


HOSTILE_NAMES = [
    _raw_member(b"./", kind=b"5"),
    _raw_member(b"/abs/file", b"absolute"),  # no /abs directory entry either
    _raw_member(b"dup", b"the file"),
    _raw_member(b"s", kind=b"2", link=b"dup"),
    _raw_member(b"h", kind=b"1", link=b"s"),  # a second name of the symlink
    _raw_member(b"/abs-link", kind=b"1", link=b"/dup"),
    _raw_member(b"b256", b"base-256 size", size_field=b"\x80" + (13).to_bytes(11, "big")),
]
DUPLICATES = [
    _raw_member(b"dup", b"first"),
    _raw_member(b"./dup", b"second wins"),
    _raw_member(b"a", b"old a"),
    _raw_member(b"b", kind=b"1", link=b"a"),  # keeps "old a"
    _raw_member(b"a", b"new a"),
    _raw_member(b"d/", kind=b"5"),
    _raw_member(b"d/x", b"goes with d"),
    _raw_member(b"d", b"d is a file now"),
]


def _applied(tar_bytes: bytes, names: set[str]) -> dict[str, tuple[str, str]]:
    """name → (kind, content or link target) of ``names``, hardlinks resolved to content."""
    content: dict[str, tuple[str, str]] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            name = member.name.removeprefix("./").rstrip("/")
            if member.isfile():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                content[name] = ("file", data.decode())
            elif member.islnk():
                content[name] = content[member.linkname.removeprefix("./")]
            elif member.issym():
                content[name] = ("symlink", member.linkname)
            elif member.isdir():
                content[name] = ("dir", "")
    return {name: content[name] for name in names if name in content}


def _load_in_docker(engine: Any, archive: Path, tag: str, names: set[str]) -> Any:
    """What Docker's load and a container export make of ``names``, or its error."""
    loaded = engine.run("load", "-i", archive, check=False)
    if loaded.returncode != 0:
        return loaded.stderr.decode().strip()
    container = engine.run("create", tag, "true").stdout.decode().strip()
    try:
        return _applied(engine.run("export", container).stdout, names)
    finally:
        engine.run("rm", container)
        engine.run("rmi", tag)


@pytest.mark.docker
def test_hostile_names_apply_as_in_docker(
    docker_engine: Any, layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    from tests.archive_builders import docker_members, make_image, pack

    names = {"abs", "abs/file", "dup", "s", "h", "abs-link", "b256"}
    image = make_image([b"".join(HOSTILE_NAMES) + bytes(1024)], ["layerfs-hostile/names:1"])
    archive = tmp_path / "names.tar"
    archive.write_bytes(pack(docker_members([image])))
    docker = _load_in_docker(docker_engine, archive, "layerfs-hostile/names:1", names)
    layerfs_cli("load", "-i", archive)
    ours = _applied(layerfs_cli("export", "layerfs-hostile/names:1").stdout, names)
    assert ours == docker
    assert ours == {
        "abs": ("dir", ""), "abs/file": ("file", "absolute"), "dup": ("file", "the file"),
        "s": ("symlink", "dup"), "h": ("symlink", "dup"), "abs-link": ("file", "the file"),
        "b256": ("file", "base-256 size"),
    }  # fmt: skip


@pytest.mark.docker
def test_duplicate_paths_the_last_wins_where_docker_refuses_the_layer(
    docker_engine: Any, layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    # Docker's load records every layer with tar-split, which refuses a path seen twice;
    # its extractor alone (and containerd's) would apply them in order, the last winning.
    from tests.archive_builders import docker_members, make_image, pack

    image = make_image([b"".join(DUPLICATES) + bytes(1024)], ["layerfs-hostile/dups:1"])
    archive = tmp_path / "dups.tar"
    archive.write_bytes(pack(docker_members([image])))
    docker = _load_in_docker(docker_engine, archive, "layerfs-hostile/dups:1", {"dup"})
    assert "duplicates of file paths not supported" in docker
    layerfs_cli("load", "-i", archive)
    ours = _applied(layerfs_cli("export", "layerfs-hostile/dups:1").stdout,
                    {"dup", "a", "b", "d", "d/x"})  # fmt: skip
    assert ours == {
        "dup": ("file", "second wins"), "a": ("file", "new a"), "b": ("file", "old a"),
        "d": ("file", "d is a file now"),
    }  # fmt: skip
