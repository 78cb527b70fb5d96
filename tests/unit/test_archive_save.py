"""Saving images of the store as docker-archives and OCI layouts, and reading them back."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from layerfs.cli import main
from layerfs.copy import copy
from layerfs.errors import LayerfsError
from layerfs.model.v1compat import v1_layers
from layerfs.store.store import Store
from layerfs.transports import open_destination, open_source
from layerfs.transports.local import StoreDestination, StoreSource
from tests.archive_builders import (
    docker_members,
    hex_of,
    legacy_members,
    make_image,
    make_layer,
    pack,
    sha256,
)
from tests.conformance import assert_valid_image
from tests.helpers import REPO_ROOT, fake_image_id, read_fifo_while

BASE = make_layer("base")
MID = make_layer("mid")
# MID is the top of FIRST and a lower layer of SECOND: SECOND's directory for it must be a
# symlink to FIRST's layer.tar (different v1 IDs, one copy of the data).
FIRST = make_image([BASE, MID], ["first:1", "first:2"])
SECOND = make_image([BASE, MID, make_layer("top")], ["example.com/second:x"])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store.open(tmp_path / "store")
    (tmp_path / "in.tar").write_bytes(pack(docker_members([FIRST, SECOND])))
    copy(open_source(str(tmp_path / "in.tar"), tmp_dir=store.tmp), StoreDestination(store))
    return store


def save(store: Store, spec: str, *names: str) -> None:
    result = copy(
        StoreSource(store, list(names)), open_destination(spec, tmp_dir=store.tmp), keep_going=False
    )
    assert not result.failed


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name.rstrip("/"): m for m in tar.getmembers()}


def read(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


def test_docker_format_as_docker_writes_it(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"

    save(store, f"docker-archive:{out}", "first", "example.com/second:x")

    entries = members(out)
    manifest = json.loads(read(out, "manifest.json"))
    assert [m["RepoTags"] for m in manifest] == [["first:1", "first:2"], ["example.com/second:x"]]
    # SECOND is FIRST plus one step: Docker's loader accepts FIRST as its Parent.
    assert "Parent" not in manifest[0] and manifest[1]["Parent"] == sha256(FIRST.config)
    for entry, image in zip(manifest, (FIRST, SECOND), strict=True):
        assert entry["Config"] == f"{image.image_id}.json"
        assert read(out, entry["Config"]) == image.config
        expected = v1_layers(json.loads(image.config), image.diff_ids)
        assert entry["Layers"] == [f"{v1}/layer.tar" for v1, _ in expected]
        for (v1, v1_json), diff_id in zip(expected, image.diff_ids, strict=True):
            assert read(out, f"{v1}/json") == v1_json
            assert read(out, f"{v1}/VERSION") == b"1.0"
            assert sha256(read(out, f"{v1}/layer.tar")) == diff_id
    repositories = json.loads(read(out, "repositories"))
    assert repositories == {
        "first": {"1": manifest[0]["Layers"][-1][:64], "2": manifest[0]["Layers"][-1][:64]},
        "example.com/second": {"x": manifest[1]["Layers"][-1][:64]},
    }
    # Every layer's data is in the archive once; the repeat is a symlink, as Docker writes.
    data = [m for m in entries.values() if m.name.endswith("layer.tar") and m.isfile()]
    assert sorted(sha256(read(out, m.name)) for m in data) == sorted(set(SECOND.diff_ids))
    repeat = entries[manifest[1]["Layers"][1]]
    assert repeat.issym() and repeat.linkname == f"../{manifest[0]['Layers'][1]}"
    # Times are the image's created, owners root, as docker save.
    created = 1704164645  # 2024-01-02T03:04:05Z
    assert {
        m.mtime for m in entries.values() if m.name not in ("manifest.json", "repositories")
    } == {created}
    assert entries["manifest.json"].mtime == 0
    assert {(m.uid, m.gid) for m in entries.values()} == {(0, 0)}


def test_saving_twice_gives_the_same_bytes(store: Store, tmp_path: Path) -> None:
    for fmt in ("docker", "oci"):
        outputs = [tmp_path / f"a-{fmt}.tar", tmp_path / f"b-{fmt}.tar"]
        for out in outputs:
            args = ["save", "-q", "--format", fmt, "-o", str(out), "first", "example.com/second"]
            assert main(["--root", str(store.root), *args]) == 0
        assert outputs[0].read_bytes() == outputs[1].read_bytes()


@pytest.mark.parametrize("spec", ["docker-archive:{p}.tar", "oci-archive:{p}.tar", "oci:{p}"])
def test_round_trip_keeps_ids_and_digests(store: Store, tmp_path: Path, spec: str) -> None:
    target = spec.format(p=tmp_path / "saved")
    save(store, target, "first:1", "example.com/second:x")
    saved = assert_valid_image(open_source(target, tmp_dir=store.tmp))
    assert [image.config for image in saved] == [FIRST.config, SECOND.config]
    fresh = Store.open(tmp_path / "fresh")

    destination = StoreDestination(fresh)
    result = copy(open_source(target, tmp_dir=fresh.tmp), destination)

    assert not result.failed
    assert_valid_image(StoreSource(fresh, ["first:1", "example.com/second:x"]))
    for image in (FIRST, SECOND):
        node = fresh.graph.get(image.image_id)
        assert node.raw_json == image.config
        assert fresh.graph.layers_of(node) == image.diff_ids
    assert fresh.tags.lookup_image("first:1").id == FIRST.image_id
    assert fresh.tags.lookup_image("example.com/second:x").id == SECOND.image_id


def test_oci_format_as_docker_25_writes_it(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "oci.tar"

    save(store, f"oci-archive:{out}", "first")

    names = set(members(out))
    assert json.loads(read(out, "oci-layout")) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(read(out, "index.json"))
    assert [d["annotations"] for d in index["manifests"]] == [
        {
            "io.containerd.image.name": "docker.io/library/first:1",
            "org.opencontainers.image.ref.name": "1",
        },
        {
            "io.containerd.image.name": "docker.io/library/first:2",
            "org.opencontainers.image.ref.name": "2",
        },
    ]
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads(read(out, f"blobs/sha256/{hex_of(manifest_digest)}"))
    assert manifest["config"]["digest"] == sha256(FIRST.config)
    assert [layer["digest"] for layer in manifest["layers"]] == FIRST.diff_ids
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar"
    }
    for name in names:
        if name.startswith("blobs/sha256/") and name.count("/") == 2:
            assert sha256(read(out, name)) == "sha256:" + name.rsplit("/", 1)[1]
    docker = json.loads(read(out, "manifest.json"))
    assert docker == [
        {
            "Config": f"blobs/sha256/{FIRST.image_id}",
            "RepoTags": ["first:1", "first:2"],
            "Layers": [f"blobs/sha256/{hex_of(d)}" for d in FIRST.diff_ids],
        }
    ]
    assert json.loads(read(out, "repositories")) == {
        "first": {"1": hex_of(MID_ID), "2": hex_of(MID_ID)}
    }


MID_ID = sha256(MID)


def test_oci_dir_adds_to_an_existing_layout(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    save(store, f"oci:{layout}:one", "first:1")
    save(store, f"oci:{layout}:two", "example.com/second:x")
    save(store, f"oci:{layout}:one", "example.com/second:x")  # moves the ref name "one"

    index = json.loads((layout / "index.json").read_bytes())
    refs = [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]]
    assert refs == ["two", "one"]
    fresh = Store.open(tmp_path / "fresh")
    destination = StoreDestination(fresh)
    copy(open_source(f"oci:{layout}:one", tmp_dir=fresh.tmp), destination)
    assert [i.image_id for i, _ in destination.loaded] == [SECOND.image_id]


def test_save_to_standard_output_names_what_it_saved_on_stderr(
    store: Store, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "layerfs", "--root", str(store.root), "save", "first:1"],
        capture_output=True,
        check=True,
        cwd=REPO_ROOT,
    )
    file = tmp_path / "file.tar"
    assert main(["--root", str(store.root), "save", "-q", "-o", str(file), "first:1"]) == 0
    assert result.stdout == file.read_bytes()
    assert result.stderr.decode().splitlines()[-1] == "Saved image: first:1"


def test_save_refuses_a_terminal(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", Tty())
    assert main(["--root", str(store.root), "save", "first:1"]) == 2
    assert capsys.readouterr().err.startswith(
        "layerfs: error: refusing to write an archive to a terminal"
    )


def test_save_of_an_unknown_image_writes_nothing(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.tar"
    assert main(["--root", str(store.root), "save", "-o", str(out), "first:1", "nope:1"]) == 1
    assert not out.exists() and list(tmp_path.glob(".out.tar*")) == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("layerfs: error: ")


def test_a_broken_store_layer_fails_the_save_and_leaves_no_file(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tar = store.layers.tar_path(MID_ID)
    tar.write_bytes(tar.read_bytes()[:-1] + b"\1")
    out = tmp_path / "out.tar"

    assert main(["--root", str(store.root), "save", "-q", "-o", str(out), "first:1"]) == 1

    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "digest mismatch" in err[0]
    assert not out.exists() and list(tmp_path.glob(".out.tar*")) == []
    assert list(store.tmp.iterdir()) == []


def test_a_legacy_chain_is_saved_with_its_v1_ids(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    ids = [fake_image_id("old0"), fake_image_id("old1")]
    nodes = [
        (ids[0], {"created": "2015-01-01T00:00:00Z"}, make_layer("o0")),
        (ids[1], {"parent": ids[0]}, make_layer("o1")),
    ]
    (tmp_path / "legacy.tar").write_bytes(pack(legacy_members(nodes, {"old": {"1": ids[1]}})))
    copy(open_source(str(tmp_path / "legacy.tar"), tmp_dir=store.tmp), StoreDestination(store))
    out = tmp_path / "out.tar"

    save(store, f"docker-archive:{out}", "old:1")

    manifest = json.loads(read(out, "manifest.json"))
    assert manifest[0]["Layers"] == [f"{i}/layer.tar" for i in ids]
    original = dict(legacy_members(nodes, {}))
    for image_id in ids:
        assert read(out, f"{image_id}/json") == original[f"{image_id}/json"]
    assert json.loads(read(out, "repositories")) == {"old": {"1": ids[1]}}


def test_a_single_image_reference_for_an_archive(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    save(store, f"docker-archive:{out}:renamed:7", "first:1")
    assert json.loads(read(out, "manifest.json"))[0]["RepoTags"] == ["renamed:7"]
    with pytest.raises(LayerfsError, match="names one image"):
        save(
            store,
            f"docker-archive:{tmp_path / 'two.tar'}:renamed:7",
            "first:1",
            "example.com/second:x",
        )
    assert not (tmp_path / "two.tar").exists()


def test_a_repository_known_only_by_digests_saves_its_images_unnamed(
    store: Store, tmp_path: Path
) -> None:
    digest = "sha256:" + "e" * 64
    store.tags.set_digest("pinned/app", digest, FIRST.image_id)
    out = tmp_path / "pinned.tar"
    assert main(["--root", str(store.root), "save", "-q", "-o", str(out), "pinned/app"]) == 0
    manifest = json.loads(read(out, "manifest.json"))
    assert [(m["Config"], m["RepoTags"]) for m in manifest] == [(f"{FIRST.image_id}.json", None)]
    out2 = tmp_path / "by-digest.tar"
    assert (
        main(["--root", str(store.root), "save", "-q", "-o", str(out2), f"pinned/app@{digest}"])
        == 0
    )
    assert read(out2, "manifest.json") == read(out, "manifest.json")


def test_save_platform_refuses_an_image_for_another_platform(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.tar"
    root = ["--root", str(store.root)]
    assert main([*root, "save", "-q", "--platform", "linux/amd64", "-o", str(out), "first:1"]) == 0
    assert main([*root, "save", "-q", "--platform", "linux/arm64", "-o", str(out), "first:1"]) == 1
    assert capsys.readouterr().err == (
        "layerfs: error: image first:1 is for linux/amd64, not linux/arm64\n"
    )


def test_save_into_a_fifo_writes_into_it_and_never_replaces_it(
    store: Store, tmp_path: Path
) -> None:
    # -o names a device or a named pipe: the archive goes into it; a temporary file
    # renamed over it would replace the device (as root, -o /dev/null would).
    file = tmp_path / "file.tar"
    assert main(["--root", str(store.root), "save", "-q", "-o", str(file), "first:1"]) == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    status, received = read_fifo_while(
        fifo, lambda: main(["--root", str(store.root), "save", "-q", "-o", str(fifo), "first:1"])
    )
    assert status == 0 and received == file.read_bytes()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert list(tmp_path.glob(".fifo*")) == []
