"""An archive's image as the lower layers of a mount, moved by the copy pipeline (no FUSE)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from layerfs.errors import DigestMismatchError
from layerfs.fs.lower import from_archive
from tests.helpers import build_tar, tar_dir, tar_file


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_archive(path: Path, layers: list[bytes], diff_ids: list[str]) -> None:
    """A docker save archive of one image; a layer is stored as given (maybe gzipped)."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }
    ).encode()
    names = [f"{i}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": "config.json", "RepoTags": ["arch:1"], "Layers": names}]
    with tarfile.open(path, "w") as out:
        for name, data in [
            *zip(names, layers, strict=True),
            ("config.json", config),
            ("manifest.json", json.dumps(manifest).encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


@pytest.fixture
def layers() -> list[bytes]:
    base = build_tar(tar_dir("etc"), tar_file("etc/a", b"base"))
    top = build_tar(tar_dir("etc"), tar_file("etc/b", b"top"))
    return [base, top, base]  # the base again: each place gets a descriptor of its own


def test_an_archive_mounts_as_its_layers(tmp_path: Path, layers: list[bytes]):
    archive = tmp_path / "a.tar"
    stored = [layers[0], gzip.compress(layers[1], mtime=0), layers[2]]
    write_archive(archive, stored, [_sha(t) for t in layers])

    lower = from_archive(str(archive), tmp_path)

    assert lower.diff_ids == [_sha(t) for t in layers]
    assert lower.config == {"Cmd": ["/bin/sh"]}
    fds = lower.open_tars()
    where = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
    for fd in fds:
        os.close(fd)
    assert len(set(fds)) == 3
    # The plain tars are read in place, in the archive; the gzipped one was inflated once.
    assert where[0] == where[2] == str(archive)
    assert where[1] != str(archive) and where[1].endswith("(deleted)")
    names = {bytes(path) for path, _ in lower.tree.walk()}
    assert {b"etc/a", b"etc/b"} <= names


def test_a_layer_that_is_not_what_the_config_says_is_refused(tmp_path: Path, layers: list[bytes]):
    archive = tmp_path / "a.tar"
    wrong = [_sha(layers[0]), _sha(b"something else"), _sha(layers[2])]
    write_archive(archive, layers, wrong)
    before = set(os.listdir("/proc/self/fd"))

    with pytest.raises(DigestMismatchError) as caught:
        from_archive(str(archive), tmp_path)

    assert str(caught.value) == (
        f"cannot mount {archive}: layer 2 has diff ID {_sha(layers[1])}, the config says {wrong[1]}"
    )
    assert set(os.listdir("/proc/self/fd")) == before  # nothing left open
    assert os.listdir(tmp_path) == ["a.tar"]  # no spooled layer left behind
