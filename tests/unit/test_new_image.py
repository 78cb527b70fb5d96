"""Images made here (import, commit) enter the store through the copy pipeline.

``transports/new_image.py``: the new image is a source whose config is written once the
store destination has measured the new layer; the store puts one node above the base.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from layerfs.errors import IntegrityError, MountError
from layerfs.fs.commit import commit_upper
from layerfs.fs.upper import STATE_VERSION
from layerfs.model.digest import sha256_digest
from layerfs.rootfs import import_rootfs
from layerfs.store import codec
from layerfs.store.check import fsck
from layerfs.store.store import Store
from layerfs.transports.local import StoreSource
from tests.conformance import assert_valid_image
from tests.helpers import build_tar, tar_file

ROOTFS = build_tar(tar_file("a", b"1"), tar_file("b", b"22"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def write_upper(directory: Path, image_id: str, *, data: bool = True) -> Path:
    """An upper directory's saved state holding one new file, ``hello``."""
    (directory / "data").mkdir(parents=True)
    if data:
        (directory / "data" / "0").write_bytes(b"hello\n")
    row = [b"hello", "f", 0o644, 0, 0, 6, 1_700_000_000 * 10**9, 0, b"", 0, 0, None, None]
    doc = {"version": STATE_VERSION, "image": image_id, "init": False, "rows": [row]}
    (directory / "state").write_bytes(codec.pack(doc))
    return directory


def stored(store: Store) -> tuple[list[str], list[str]]:
    """Every image node and layer of the store."""
    nodes = sorted(p.name for p in store.graph.root.iterdir() if len(p.name) == 64)
    return nodes, store.layers.diff_ids()


def staging_left(store: Store) -> list[str]:
    return sorted(p.name for p in store.tmp.iterdir()) if store.tmp.is_dir() else []


def test_an_import_is_one_node_whose_id_is_its_config_digest(store: Store, tmp_path: Path):
    (tmp_path / "rootfs.tar").write_bytes(ROOTFS)
    result = import_rootfs(store, str(tmp_path / "rootfs.tar"), "made/here:1", message="hi")
    image = result.image
    assert image.id == sha256_digest(image.raw_json)[7:] and image.parent == ""
    assert image.diff_ids == [sha256_digest(ROOTFS)]
    assert [h.get("comment") for h in image.history] == ["hi"]
    assert store.tags.lookup_image("made/here:1").id == image.id
    assert store.layers.tar_path(image.diff_ids[0]).read_bytes() == ROOTFS
    assert_valid_image(StoreSource(store, ["made/here:1"]))


def test_a_commit_is_one_node_above_the_mounted_image(store: Store, tmp_path: Path):
    (tmp_path / "rootfs.tar").write_bytes(ROOTFS)
    base = import_rootfs(store, str(tmp_path / "rootfs.tar"), "base:1").image
    upper = write_upper(tmp_path / "upper", base.id)
    image, renamed = commit_upper(store, upper, base.id, "top:1", message="m", author="me")
    assert renamed is None
    assert image.parent == base.id
    assert image.diff_ids[:1] == base.diff_ids and len(image.diff_ids) == 2
    assert image.history[:1] == base.history
    assert image.history[1]["comment"] == "m" and image.history[1]["author"] == "me"
    assert store.tags.lookup_image("top:1").id == image.id
    assert_valid_image(StoreSource(store, ["top:1"]))
    assert fsck(store).problems == []


def test_a_commit_on_a_legacy_image_stays_one_node_above_it(store: Store, tmp_path: Path):
    """A v1 node (a legacy load) is no config; the commit still names it as parent."""
    staged = store.layers.ingest(io.BytesIO(ROOTFS))
    legacy_id = "ab" * 32
    raw = json.dumps({"id": legacy_id, "created": "2015-01-01T00:00:00Z", "os": "linux"})
    store.graph.register(raw.encode(), legacy_id, layer=staged)
    upper = write_upper(tmp_path / "upper", legacy_id)
    image, _ = commit_upper(store, upper, legacy_id, "top:1")
    assert image.parent == legacy_id
    assert [n.id for n in store.graph.walk_history(image)] == [image.id, legacy_id]


def test_a_commit_whose_tar_breaks_reports_why_and_stores_nothing(store: Store, tmp_path: Path):
    (tmp_path / "rootfs.tar").write_bytes(ROOTFS)
    base = import_rootfs(store, str(tmp_path / "rootfs.tar"), "base:1").image
    before = stored(store)
    upper = write_upper(tmp_path / "upper", base.id, data=False)  # the file's data is gone
    with pytest.raises(MountError, match=r"cannot commit upper 'upper': .*No such file"):
        commit_upper(store, upper, base.id, "top:1")
    assert stored(store) == before
    assert staging_left(store) == []
    assert store.tags.get("top") is None
    assert fsck(store).problems == []


def test_a_commit_on_a_damaged_layer_is_refused(store: Store, tmp_path: Path):
    (tmp_path / "rootfs.tar").write_bytes(ROOTFS)
    base = import_rootfs(store, str(tmp_path / "rootfs.tar"), "base:1").image
    store.layers.mark_damaged(base.diff_ids[0], "test")
    before = stored(store)
    upper = write_upper(tmp_path / "upper", base.id)
    with pytest.raises(IntegrityError, match=r"upper: layer sha256:.* is damaged"):
        commit_upper(store, upper, base.id, "top:1")
    assert stored(store) == before
    assert staging_left(store) == []
