"""Loading docker-archives and OCI layouts into the store through the copy pipeline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from layerfs.cli import main
from layerfs.copy import copy
from layerfs.errors import LayerfsError
from layerfs.store.check import fsck
from layerfs.store.store import Store
from layerfs.transports import open_source
from layerfs.transports.files import TarFiles
from layerfs.transports.local import StoreDestination
from tests.archive_builders import (
    MEDIA_INDEX,
    MEDIA_MANIFEST,
    BuiltImage,
    compress,
    descriptor,
    docker_members,
    hex_of,
    legacy_members,
    make_image,
    make_layer,
    oci_manifest,
    oci_members,
    pack,
    sha256,
    write_dir,
)
from tests.helpers import fake_image_id


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def two_images() -> list[BuiltImage]:
    base = make_layer("base")
    return [
        make_image([base, make_layer("one")], ["one:latest", "one:v1"]),
        make_image([base, make_layer("two"), make_layer("two-b")], ["example.com:5000/two:x"]),
    ]


def load(store: Store, spec: str, **kwargs: object) -> tuple[StoreDestination, object]:
    source = open_source(spec, tmp_dir=store.tmp, **kwargs)  # type: ignore[arg-type]
    destination = StoreDestination(store)
    result = copy(source, destination)
    return destination, result


def assert_loaded(store: Store, image: BuiltImage) -> None:
    node = store.graph.get(image.image_id)
    assert node.raw_json == image.config
    assert store.graph.layers_of(node) == image.diff_ids
    assert store.graph.depth(node) == len(image.layers)
    for tag in image.tags:
        assert store.tags.lookup_image(tag).id == image.image_id


def assert_clean(store: Store) -> None:
    report = fsck(store)
    assert report.clean, report.problems + report.leftovers
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("layout", ["docker", "docker25"])
@pytest.mark.parametrize("layer_compression", ["none", "gzip", "zstd"])
def test_modern_archive_loads_with_same_ids(
    store: Store, tmp_path: Path, layout: str, layer_compression: str
) -> None:
    images = two_images()
    archive = tmp_path / "images.tar"
    archive.write_bytes(
        pack(docker_members(images, layout=layout, layer_compression=layer_compression))
    )

    destination, result = load(store, str(archive))

    assert not result.failed  # type: ignore[attr-defined]
    for image in images:
        assert_loaded(store, image)
    assert [i.references for i, _ in destination.loaded] == [
        ["one:latest", "one:v1"],
        ["example.com:5000/two:x"],
    ]
    # The base layer both images share is stored once.
    assert result.layers_copied == 4 and result.layers_skipped == 1  # type: ignore[attr-defined]
    assert_clean(store)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_compressed_archive_from_a_file_and_from_stdin(
    store: Store, tmp_path: Path, kind: str
) -> None:
    images = two_images()
    data = compress(pack(docker_members(images)), kind)
    path = tmp_path / "images.tar.x"
    path.write_bytes(data)

    load(store, str(path))
    for image in images:
        assert_loaded(store, image)

    other = Store.open(tmp_path / "other")
    load(other, "-", stdin=io.BytesIO(data))
    for image in images:
        assert_loaded(other, image)
    assert_clean(store)
    assert_clean(other)


def test_an_archive_on_disk_is_read_in_place_and_a_compressed_one_spooled(
    store: Store, tmp_path: Path
) -> None:
    path = tmp_path / "plain.tar"
    path.write_bytes(pack(docker_members(two_images())))
    source = open_source(str(path), tmp_dir=store.tmp)
    files = source.files  # type: ignore[attr-defined]
    assert isinstance(files, TarFiles) and files.path == path
    source.close()

    gz = tmp_path / "plain.tar.gz"
    gz.write_bytes(compress(path.read_bytes(), "gzip"))
    source = open_source(str(gz), tmp_dir=store.tmp)
    spooled = source.files.path  # type: ignore[attr-defined]
    assert spooled.parent == store.tmp and spooled.exists()
    source.close()
    assert not spooled.exists()


def test_layers_already_in_the_store_are_not_stored_again(store: Store, tmp_path: Path) -> None:
    first, second = two_images()
    (tmp_path / "a.tar").write_bytes(pack(docker_members([first])))
    (tmp_path / "b.tar").write_bytes(pack(docker_members([second])))
    load(store, str(tmp_path / "a.tar"))

    _, result = load(store, str(tmp_path / "b.tar"))

    assert result.layers_skipped == 1 and result.layers_copied == 2  # type: ignore[attr-defined]
    assert_loaded(store, first)
    assert_loaded(store, second)
    # Shared base nodes: both images hang below the same base node.
    base = store.graph.walk_history(store.graph.get(first.image_id))[-1]
    assert base.id == store.graph.walk_history(store.graph.get(second.image_id))[-1].id


def test_a_repeated_layer_within_one_image(store: Store, tmp_path: Path) -> None:
    empty = make_layer("same")
    image = make_image([empty, make_layer("mid"), empty], ["rep:1"])
    (tmp_path / "a.tar").write_bytes(pack(docker_members([image])))

    load(store, str(tmp_path / "a.tar"))

    assert_loaded(store, image)
    assert_clean(store)


def test_optional_fields_missing(store: Store, tmp_path: Path) -> None:
    image = make_image([make_layer("x")], created=None, history=False)
    (tmp_path / "a.tar").write_bytes(pack(docker_members([image])))

    destination, _ = load(store, str(tmp_path / "a.tar"))

    assert_loaded(store, image)
    assert destination.loaded[0][0].references == []


def test_legacy_archive_keeps_its_v1_ids(store: Store, tmp_path: Path) -> None:
    ids = [fake_image_id(f"legacy{i}") for i in range(3)]
    layers = [make_layer(f"l{i}") for i in range(3)]
    nodes = [
        (ids[0], {"created": "2015-01-01T00:00:00Z"}, layers[0]),
        (
            ids[1],
            {"parent": ids[0], "container_config": {"Cmd": ["/bin/sh", "-c", "x"]}},
            layers[1],
        ),
        (ids[2], {"parent": ids[1], "comment": "top"}, compress(layers[2], "gzip")),
    ]
    (tmp_path / "legacy.tar").write_bytes(pack(legacy_members(nodes, {"old": {"v1": ids[2]}})))

    destination, result = load(store, str(tmp_path / "legacy.tar"))

    assert not result.failed  # type: ignore[attr-defined]
    top = store.tags.lookup_image("old:v1")
    assert top.id == ids[2]
    chain = store.graph.walk_history(top)
    assert [n.id for n in chain] == list(reversed(ids))
    assert [n.layer for n in reversed(chain)] == [sha256(layer) for layer in layers]
    assert json.loads(chain[1].raw_json)["container_config"]["Cmd"] == ["/bin/sh", "-c", "x"]
    assert destination.loaded[0][0].image_id == ids[2]
    assert_clean(store)


def test_legacy_archive_onto_a_parent_already_in_the_store(store: Store, tmp_path: Path) -> None:
    base, top = fake_image_id("base"), fake_image_id("top")
    (tmp_path / "a.tar").write_bytes(pack(legacy_members([(base, {}, make_layer("b"))], {})))
    (tmp_path / "b.tar").write_bytes(
        pack(legacy_members([(top, {"parent": base}, make_layer("t"))], {"t": {"latest": top}}))
    )
    load(store, str(tmp_path / "a.tar"))

    load(store, str(tmp_path / "b.tar"))

    assert store.graph.get(top).parent == base


@pytest.mark.parametrize("as_dir", [False, True])
def test_oci_layout_with_nested_indexes_and_platforms(
    store: Store, tmp_path: Path, as_dir: bool
) -> None:
    amd64 = make_image([make_layer("amd")], architecture="amd64")
    arm64 = make_image([make_layer("arm")], architecture="arm64")
    plain = make_image([make_layer("plain")], ["plain:1"])
    members = oci_members([plain], layer_compression="zstd")
    platform_entries = []
    for image, arch in ((arm64, "arm64"), (amd64, "amd64")):
        manifest, blobs = oci_manifest(image)
        members.update(blobs)
        entry = descriptor(manifest, MEDIA_MANIFEST)
        entry["platform"] = {"os": "linux", "architecture": arch}
        platform_entries.append(entry)
    attestation = descriptor(b"{}", MEDIA_MANIFEST)
    attestation["platform"] = {"os": "unknown", "architecture": "unknown"}
    inner = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [attestation, *platform_entries],
        }
    ).encode()
    outer = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [descriptor(inner, MEDIA_INDEX)],
        }
    ).encode()
    members[f"blobs/sha256/{hex_of(sha256(inner))}"] = inner
    members[f"blobs/sha256/{hex_of(sha256(outer))}"] = outer
    index = json.loads(members["index.json"])  # type: ignore[arg-type]
    index["manifests"].append(
        descriptor(outer, MEDIA_INDEX, **{"org.opencontainers.image.ref.name": "multi:2"})
    )
    members["index.json"] = json.dumps(index).encode()
    if as_dir:
        spec = str(write_dir(members, tmp_path / "layout"))
    else:
        (tmp_path / "layout.tar").write_bytes(pack(members))
        spec = str(tmp_path / "layout.tar")

    _, result = load(store, spec)

    assert not result.failed  # type: ignore[attr-defined]
    assert_loaded(store, plain)
    assert store.tags.lookup_image("multi:2").id == amd64.image_id
    assert not store.graph.exists(arm64.image_id)
    assert_clean(store)


def test_oci_ref_selects_an_image_and_a_bare_tag_names_none(store: Store, tmp_path: Path) -> None:
    first = make_image([make_layer("first")], ["first:1"])
    second = make_image([make_layer("second")], ["second:2"])
    members = oci_members([first, second])
    index = json.loads(members["index.json"])  # type: ignore[arg-type]
    for entry in index["manifests"]:
        del entry["annotations"]["io.containerd.image.name"]
    members["index.json"] = json.dumps(index).encode()
    write_dir(members, tmp_path / "layout")

    destination, _ = load(store, f"oci:{tmp_path / 'layout'}:2")

    assert [i.image_id for i, _ in destination.loaded] == [second.image_id]
    assert destination.loaded[0][0].references == []
    assert not store.graph.exists(first.image_id)


def test_cli_load_prints_what_it_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = two_images()
    untagged = make_image([make_layer("lonely")])
    (tmp_path / "a.tar").write_bytes(pack(docker_members([*images, untagged])))

    code = main(["--root", str(tmp_path / "store"), "load", "-q", "-i", str(tmp_path / "a.tar")])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == [
        "Loaded image: one:latest",
        "Loaded image: one:v1",
        "Loaded image: example.com:5000/two:x",
        f"Loaded image ID: sha256:{untagged.image_id}",
    ]


def test_cli_load_moves_a_tag_with_dockers_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tmp_path / "store")
    old = make_image([make_layer("old")], ["app:1"])
    new = make_image([make_layer("new")], ["app:1"])
    for name, image in (("old", old), ("new", new)):
        (tmp_path / f"{name}.tar").write_bytes(pack(docker_members([image])))
    assert main(["--root", root, "load", "-q", "-i", str(tmp_path / "old.tar")]) == 0
    capsys.readouterr()

    assert main(["--root", root, "load", "-q", "-i", str(tmp_path / "new.tar")]) == 0

    assert capsys.readouterr().out.splitlines() == [
        f"The image app:1 already exists, renaming the old one with ID {old.image_id[:12]} "
        "to empty string",
        "Loaded image: app:1",
    ]


def test_cli_load_refuses_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.BytesIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Tty())
    code = main(["--root", str(tmp_path / "store"), "load"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err == [
        "layerfs: error: refusing to read an archive from a terminal; use -i FILE or redirect "
        "standard input"
    ]


def test_layerfs_load_entry_point_help(capsys: pytest.CaptureFixture[str]) -> None:
    from layerfs.cli import load_main, save_main

    for entry, name in ((load_main, "layerfs-load"), (save_main, "layerfs-save")):
        with pytest.raises(SystemExit) as exit_info:
            entry(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {name} ")
        assert "--root" in out


def test_archives_named_the_way_skopeo_and_crane_name_them(store: Store, tmp_path: Path) -> None:
    image = make_image([make_layer("a"), make_layer("b")], ["named:1"])
    for style in ("skopeo", "crane"):
        members: dict[str, bytes] = {}
        if style == "skopeo":  # <config hex>.json, <diff hex>.tar
            config_name = f"{image.image_id}.json"
            blobs = image.layers
            names = [f"{hex_of(sha256(layer))}.tar" for layer in blobs]
        else:  # sha256:<config hex>, <blob hex>.tar.gz with gzip layers
            config_name = f"sha256:{image.image_id}"
            blobs = [compress(layer, "gzip") for layer in image.layers]
            names = [f"{hex_of(sha256(blob))}.tar.gz" for blob in blobs]
        members[config_name] = image.config
        members.update(zip(names, blobs, strict=True))
        manifest = [{"Config": config_name, "RepoTags": image.tags, "Layers": names}]
        members["manifest.json"] = json.dumps(manifest).encode()
        (tmp_path / f"{style}.tar").write_bytes(pack(members))  # type: ignore[arg-type]

        _, result = load(store, str(tmp_path / f"{style}.tar"))

        assert not result.failed  # type: ignore[attr-defined]
        assert_loaded(store, image)


def test_an_oci_ref_that_names_nothing(store: Store, tmp_path: Path) -> None:
    write_dir(oci_members([make_image([make_layer("x")], ["x:1"])]), tmp_path / "layout")
    with pytest.raises(LayerfsError, match="no image named 'nope'"):
        load(store, f"oci:{tmp_path / 'layout'}:nope")
    assert list(store.tmp.iterdir()) == []


# -- Docker 1.8/1.9 digests, Parent, platforms ---------------------------------------------------


def test_legacy_repositories_with_digest_keys_record_them(store: Store, tmp_path: Path) -> None:
    # Docker 1.8/1.9 saved a repository's digests beside its tags (one map, FORMATS §2).
    base, top = fake_image_id("d-base"), fake_image_id("d-top")
    digest = "sha256:" + "c" * 64
    repositories = {
        "busybox": {"latest": top, digest: top},
        "pinned": {digest: base},
        "lax": {"sha256:b": base},  # 1.8's lax digest: no store can hold it; skipped
    }
    nodes = [(base, {}, make_layer("db")), (top, {"parent": base}, make_layer("dt"))]
    (tmp_path / "old.tar").write_bytes(pack(legacy_members(nodes, repositories)))

    _, result = load(store, str(tmp_path / "old.tar"))

    assert not result.failed  # type: ignore[attr-defined]
    assert store.tags.references(top) == ["busybox:latest", f"busybox@{digest}"]
    assert store.tags.references(base) == [f"pinned@{digest}"]
    assert store.tags.lookup_image(f"busybox@{digest}").id == top
    assert_clean(store)


def test_manifest_parent_builds_the_child_on_its_parent(store: Store, tmp_path: Path) -> None:
    base = make_layer("p-base")
    parent = make_image([base], ["parent:1"], config={"Cmd": ["sh"]})
    history = [*parent.config_doc["history"], {"created": "2024-02-01T00:00:00Z"}]
    child = make_image([base, make_layer("p-child")], ["child:1"], history=False)
    child.config_doc["history"] = history
    child.config = json.dumps(child.config_doc, sort_keys=True).encode()
    members = docker_members([child, parent])  # the child first: load must reorder
    manifest = json.loads(members["manifest.json"])  # type: ignore[arg-type]
    manifest[0]["Parent"] = "sha256:" + parent.image_id
    members["manifest.json"] = json.dumps(manifest).encode()
    (tmp_path / "p.tar").write_bytes(pack(members))

    load(store, str(tmp_path / "p.tar"))

    node = store.graph.get(child.image_id)
    assert node.parent == parent.image_id  # no extra <none> node stands in for the parent
    assert sorted(store.graph.ids()) == sorted([child.image_id, parent.image_id])
    assert store.graph.layers_of(node) == child.diff_ids
    doc = json.loads(main_output(store, ["inspect", "child:1"]))[0]
    assert doc["Parent"] == "sha256:" + parent.image_id
    assert_clean(store)


def test_an_invalid_or_outside_parent_is_ignored(store: Store, tmp_path: Path) -> None:
    base = make_layer("q-base")
    parent = make_image([base], ["qparent:1"])
    # Its first history entry differs from the parent's: not built on it.
    child = make_image([base, make_layer("q-child")], ["qchild:1"], created="2025-01-01T00:00:00Z")
    members = docker_members([parent, child])
    manifest = json.loads(members["manifest.json"])  # type: ignore[arg-type]
    manifest[1]["Parent"] = "sha256:" + parent.image_id
    members["manifest.json"] = json.dumps(manifest).encode()
    (tmp_path / "q.tar").write_bytes(pack(members))

    load(store, str(tmp_path / "q.tar"))

    node = store.graph.get(child.image_id)
    assert node.parent not in ("", parent.image_id)  # its own derived base node
    assert_loaded(store, child)


def main_output(store: Store, argv: list[str]) -> str:
    import contextlib
    import io as _io

    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--root", str(store.root), *argv]) == 0
    return out.getvalue()


def test_load_platform_picks_an_index_entry_and_filters_images(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    amd64 = make_image([make_layer("pl-amd")], architecture="amd64")
    arm64 = make_image([make_layer("pl-arm")], architecture="arm64", variant="v8")
    members = oci_members([])
    entries = []
    for image, arch in ((amd64, "amd64"), (arm64, "arm64")):
        manifest, blobs = oci_manifest(image)
        members.update(blobs)
        entry = descriptor(manifest, MEDIA_MANIFEST)
        entry["platform"] = {"os": "linux", "architecture": arch}
        entries.append(entry)
    index = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": entries})
    members[f"blobs/sha256/{hex_of(sha256(index.encode()))}"] = index.encode()
    top = json.loads(members["index.json"])  # type: ignore[arg-type]
    top["manifests"] = [
        descriptor(index.encode(), MEDIA_INDEX, **{"org.opencontainers.image.ref.name": "m:1"})
    ]
    members["index.json"] = json.dumps(top).encode()
    (tmp_path / "multi.tar").write_bytes(pack(members))
    root = ["--root", str(store.root)]

    assert (
        main([*root, "load", "-q", "--platform", "linux/arm64", "-i", str(tmp_path / "multi.tar")])
        == 0
    )
    assert store.tags.lookup_image("m:1").id == arm64.image_id
    assert (
        main([*root, "load", "-q", "--platform", "linux/s390x", "-i", str(tmp_path / "multi.tar")])
        == 1
    )
    assert capsys.readouterr().err == (
        "layerfs: error: cannot load m:1: no manifest for platform linux/s390x; available: "
        "linux/amd64, linux/arm64\n"
    )
