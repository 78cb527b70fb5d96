"""The store's indexes: the blob index, the graph summaries and the parsed tag file.

Each is checked for the answers it gives, for not reading what it indexes (a lookup
must not touch every layer or node), and for staying right when a crash or a hand
left it behind its store (fsck reports it, --repair rebuilds it).
"""

from __future__ import annotations

import gzip
import io
import shutil
import time
from pathlib import Path

import pytest

from layerfs.listing import list_images
from layerfs.model.digest import sha256_digest
from layerfs.store import codec, summaries
from layerfs.store.check import fsck, gc
from layerfs.store.graph import Graph
from layerfs.store.layers import LayerStore
from layerfs.store.store import Store
from layerfs.store.summaries import SummaryCache
from tests.helpers import build_tar, fake_image_id, legacy_image_json, tar_file

LAYERS = [build_tar(tar_file(f"file{i}", f"content {i}".encode())) for i in range(4)]
BLOBS = [gzip.compress(data, mtime=0) for data in LAYERS]
DIFF_IDS = [sha256_digest(data) for data in LAYERS]
BLOB_DIGESTS = [sha256_digest(blob) for blob in BLOBS]


def add_layer(store: Store, index: int, *, image: bool = True) -> str:
    """Ingest layer ``index`` as a pull does: from its gzip blob, under its blob digest.

    With ``image`` a base image uses it (so that fsck sees no unused layer).
    """
    staged = store.layers.ingest(io.BytesIO(BLOBS[index]))
    staged.info.blob_digests.append(BLOB_DIGESTS[index])
    (staged.staging / "info.json").write_bytes(staged.info.to_json())
    with store.graph.transaction():
        staged.publish()
    if image:
        image_id = fake_image_id(f"user of layer {index}")
        store.graph.register(legacy_image_json(image_id), image_id, layer=staged.diff_id)
    return staged.diff_id


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def no_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every whole-store listing fail: what is left must use the indexes."""

    def refuse(*args: object) -> None:
        raise AssertionError("a lookup listed the whole store")

    monkeypatch.setattr(LayerStore, "diff_ids", refuse)
    monkeypatch.setattr(Graph, "map", refuse)
    monkeypatch.setattr(Graph, "ids", refuse)


# -- the blob index ---------------------------------------------------------------------------


def test_a_blob_is_found_through_the_index_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        add_layer(store, i)
    no_scans(monkeypatch)
    assert store.layers.find_by_blob_digest(BLOB_DIGESTS[1]) == DIFF_IDS[1]
    assert store.layers.find_by_blob_digest(BLOB_DIGESTS[3]) is None
    assert store.layers.find_by_blob_digest("not a digest") is None
    entry = store.root / "index" / "blobs" / BLOB_DIGESTS[1][7:]
    assert entry.read_text() == DIFF_IDS[1]


def test_add_blob_digest_indexes_and_delete_unindexes(store: Store) -> None:
    diff_id = add_layer(store, 0, image=False)
    other = sha256_digest(b"the same layer, compressed another way")
    with store.graph.transaction():
        store.layers.add_blob_digest(diff_id, other)
    assert store.layers.find_by_blob_digest(other) == diff_id
    with store.graph.transaction():
        store.layers.delete(diff_id)
    assert store.layers.find_by_blob_digest(other) is None
    assert store.layers.find_by_blob_digest(BLOB_DIGESTS[0]) is None
    assert list((store.root / "index" / "blobs").iterdir()) == []
    assert fsck(store).clean


def test_an_entry_a_crash_left_is_ignored_and_removed_by_repair_and_gc(store: Store) -> None:
    diff_id = add_layer(store, 0)
    # A crash between writing the entry and the info.json that lists the digest: harmless,
    # so fsck right after the crash is clean; repair and gc tidy it away.
    stray = sha256_digest(b"never listed")
    (store.root / "index" / "blobs" / stray[7:]).write_text(diff_id)
    assert store.layers.find_by_blob_digest(stray) is None
    assert fsck(store).clean
    repaired = fsck(store, repair=True)
    assert repaired.repaired == [f"removed the blob index entry of {stray}: no layer lists it"]
    assert not (store.root / "index" / "blobs" / stray[7:]).exists()
    (store.root / "index" / "blobs" / stray[7:]).write_text(diff_id)
    assert gc(store) == [f"the blob index entry of {stray}"]
    assert fsck(store).clean
    assert store.layers.find_by_blob_digest(BLOB_DIGESTS[0]) == diff_id


def test_a_missing_entry_is_reported_and_rebuilt(store: Store) -> None:
    diff_id = add_layer(store, 0)
    (store.root / "index" / "blobs" / BLOB_DIGESTS[0][7:]).unlink()
    assert store.layers.find_by_blob_digest(BLOB_DIGESTS[0]) is None  # the index is trusted
    assert fsck(store).stale_indexes == [f"blob index lacks {BLOB_DIGESTS[0]} (layer {diff_id})"]
    assert fsck(store, repair=True).repaired == [f"indexed {BLOB_DIGESTS[0]} in the blob index"]
    assert store.layers.find_by_blob_digest(BLOB_DIGESTS[0]) == diff_id
    assert fsck(store).clean


def test_a_store_from_before_the_indexes_gets_them_when_opened(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    diff_id = add_layer(store, 2)
    shutil.rmtree(store.root / "index")
    reopened = Store.open(tmp_path / "store")
    assert (reopened.root / "index" / "version").is_file()
    assert reopened.layers.find_by_blob_digest(BLOB_DIGESTS[2]) == diff_id
    assert fsck(reopened).clean


# -- the graph summaries ------------------------------------------------------------------------


def chain(store: Store, count: int, *, parent: str = "", seed: str = "") -> list[str]:
    ids = []
    for i in range(count):
        image_id = fake_image_id(f"{seed}{i}")
        store.graph.register(legacy_image_json(image_id, parent, created=f"2024-0{i + 1}"),
                             image_id, parent=parent)  # fmt: skip
        ids.append(image_id)
        parent = image_id
    return ids


def test_children_heads_and_summaries(store: Store) -> None:
    a = chain(store, 3, seed="a")
    b = chain(store, 1, parent=a[0], seed="b")
    assert store.graph.children(a[0]) == sorted([a[1], b[0]])
    assert store.graph.children(a[2]) == []
    assert set(store.graph.heads()) == {a[2], b[0]}
    summary = store.graph.summaries()[a[1]]
    assert (summary.parent, summary.layer, summary.size, summary.created) == (
        a[0],
        None,
        0,
        "2024-02",
    )
    assert (store.root / "index" / "graph").is_file()


def test_a_second_read_opens_no_node(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = chain(store, 4)
    store.graph.summaries()  # learns every node, writes the cache

    def refuse(self: Graph, image_id: str) -> None:
        raise AssertionError(f"opened node {image_id[:12]}")

    fresh = Store.open(store.root)  # another process: only the file on disk is shared
    monkeypatch.setattr(Graph, "_load", refuse)
    assert sorted(fresh.graph.summaries()) == sorted(ids)


def test_changes_by_other_processes_are_seen(store: Store) -> None:
    ids = chain(store, 2)
    assert set(store.graph.summaries()) == set(ids)
    other = Store.open(store.root)
    other.graph.delete(ids[1])
    more = chain(other, 1, parent=ids[0], seed="x")
    assert set(store.graph.summaries()) == {ids[0], more[0]}
    assert store.graph.children(ids[0]) == more


def test_an_id_registered_again_with_other_content_is_read_again(store: Store) -> None:
    first = chain(store, 2)
    store.graph.summaries()
    store.graph.delete(first[1])
    image_id = first[1]  # the same v1 ID, now a base image with another date
    store.graph.register(legacy_image_json(image_id, created="2030-01"), image_id)
    summary = Store.open(store.root).graph.summaries()[image_id]
    assert (summary.parent, summary.created) == ("", "2030-01")


def cached_rows(cache: Path) -> dict[str, list[object]]:
    doc = codec.unpack(cache.read_bytes(), what="cache")
    return {**doc["leaves"], **codec.unpack(doc["inner"], what="inner rows")}


def test_a_damaged_cache_is_ignored_and_rewritten(store: Store) -> None:
    ids = chain(store, 3)
    store.graph.summaries()
    cache = store.root / "index" / "graph"
    cache.write_bytes(b"\xc1 not msgpack")
    assert set(Store.open(store.root).graph.summaries()) == set(ids)
    assert set(cached_rows(cache)) == set(ids)


def test_a_row_that_disagrees_with_its_node_is_reported_and_repaired(store: Store) -> None:
    ids = chain(store, 2)
    store.graph.summaries()
    cache = store.root / "index" / "graph"
    doc = codec.unpack(cache.read_bytes(), what="cache")
    doc["leaves"][ids[1]][0] = ""  # the node has a parent; the row says it has none
    cache.write_bytes(codec.pack(doc))
    report = fsck(Store.open(store.root))
    assert report.stale_indexes == [f"graph summary of image {ids[1][:12]} disagrees with its node"]
    fsck(Store.open(store.root), repair=True)
    assert fsck(Store.open(store.root)).clean
    assert Store.open(store.root).graph.summaries()[ids[1]].parent == ids[0]


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes to graph/ count as settled at once: reads record and trust its stamp."""
    monkeypatch.setattr(summaries, "RACY_NS", -(1 << 62))


def refuse(*args: object) -> None:
    raise AssertionError("graph/ listed, a node opened or inner rows unpacked")


def refuse_to_list_or_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SummaryCache, "_node_inodes", refuse)
    monkeypatch.setattr(Graph, "_load", refuse)


@pytest.mark.usefixtures("settled")
def test_a_settled_graph_is_read_from_the_cache_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = chain(store, 3, seed="a")
    b = chain(store, 1, parent=a[0], seed="b")
    store.graph.summaries()  # lists graph/, writes the cache with graph/'s stamp
    fresh = Store.open(store.root)
    refuse_to_list_or_open(monkeypatch)
    assert set(fresh.graph.summaries()) == {*a, *b}
    view = fresh.graph.view()
    assert view.leaves == {a[2], b[0]}
    assert view.is_parent(a[0]) and view.is_parent(a[1]) and not view.is_parent(b[0])


@pytest.mark.usefixtures("settled")
def test_images_of_named_leaves_unpacks_no_inner_row(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = chain(store, 3, seed="a")
    store.tags.tag("a", "1", a[2])
    store.graph.summaries()
    refuse_to_list_or_open(monkeypatch)
    monkeypatch.setattr(SummaryCache, "_inner", refuse)
    assert [s.image.id for s in list_images(Store.open(store.root))] == [a[2]]
    monkeypatch.undo()
    store.tags.tag("a", "base", a[0])  # a named parent: its row is an inner one
    assert sorted(s.image.id for s in list_images(Store.open(store.root))) == sorted([a[2], a[0]])


@pytest.mark.usefixtures("settled")
def test_damaged_inner_rows_cost_a_full_read_not_a_wrong_answer(store: Store) -> None:
    a = chain(store, 3, seed="a")
    store.tags.tag("a", "base", a[0])
    expected = [(s.image.id, s.size, s.repo_tags) for s in list_images(store)]
    cache = store.root / "index" / "graph"
    doc = codec.unpack(cache.read_bytes(), what="cache")
    assert doc["stamp"] is not None
    doc["inner"] = b"\xc1 not msgpack"
    cache.write_bytes(codec.pack(doc))
    fresh = Store.open(store.root)
    assert [(s.image.id, s.size, s.repo_tags) for s in list_images(fresh)] == expected
    assert set(fresh.graph.summaries()) == set(a)
    assert set(cached_rows(cache)) == set(a)  # the full read wrote the cache anew


def test_a_stamp_younger_than_the_racy_margin_is_not_recorded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(summaries, "RACY_NS", 3600 * 10**9)
    chain(store, 2)
    store.graph.summaries()
    doc = codec.unpack((store.root / "index" / "graph").read_bytes(), what="cache")
    assert doc["stamp"] is None  # graph/ changed "just now": every read lists it
    assert summaries.racy_margin(1_700_000_000 * 10**9) == summaries.COARSE_RACY_NS
    assert summaries.racy_margin(1_700_000_000 * 10**9 + 1) == summaries.RACY_NS


def test_a_graph_left_alone_past_the_racy_margin_gets_its_stamp(store: Store) -> None:
    ids = chain(store, 2)
    time.sleep(2 * summaries.RACY_NS / 1e9)  # the real clock against graph/'s ctime
    store.graph.summaries()
    doc = codec.unpack((store.root / "index" / "graph").read_bytes(), what="cache")
    assert doc["stamp"] is not None
    more = chain(Store.open(store.root), 1, parent=ids[1], seed="x")
    assert set(store.graph.summaries()) == {*ids, *more}


@pytest.mark.usefixtures("settled")
def test_a_settled_cache_sees_changes_by_other_processes(store: Store) -> None:
    ids = chain(store, 3)
    store.graph.summaries()
    other = Store.open(store.root)
    other.graph.delete(ids[2])
    assert set(store.graph.summaries()) == {ids[0], ids[1]}
    assert store.graph.view().leaves == {ids[1]}
    more = chain(other, 1, parent=ids[0], seed="x")
    assert set(store.graph.summaries()) == {ids[0], ids[1], more[0]}
    assert store.graph.view().leaves == {ids[1], more[0]}


@pytest.mark.usefixtures("settled")
def test_a_graph_with_an_unreadable_node_gets_no_stamp(store: Store) -> None:
    ids = chain(store, 2)
    (store.graph.root / ids[1] / "json").write_text("{")
    assert set(store.graph.summaries()) == {ids[0]}
    doc = codec.unpack((store.root / "index" / "graph").read_bytes(), what="cache")
    assert doc["stamp"] is None  # the damaged node is tried again on every read
    (store.graph.root / ids[1] / "json").write_bytes(
        legacy_image_json(ids[1], ids[0], created="2024-02")
    )
    assert set(store.graph.summaries()) == set(ids)


@pytest.mark.usefixtures("settled")
def test_a_settled_cache_with_wrong_chain_sizes_is_reported_and_repaired(store: Store) -> None:
    ids = chain(store, 2)
    store.graph.summaries()
    cache = store.root / "index" / "graph"
    doc = codec.unpack(cache.read_bytes(), what="cache")
    assert doc["stamp"] is not None
    doc["leaves"][ids[1]][5] += 1
    cache.write_bytes(codec.pack(doc))
    assert fsck(Store.open(store.root)).stale_indexes == [
        "graph summary cache disagrees with graph/ (its nodes, leaves or chain sizes)"
    ]
    fsck(Store.open(store.root), repair=True)
    assert fsck(Store.open(store.root)).clean


def test_a_transaction_sees_its_own_changes(store: Store) -> None:
    ids = chain(store, 2)
    with store.graph.transaction():
        assert store.graph.children(ids[0]) == [ids[1]]
        store.graph.delete(ids[1])
        assert store.graph.children(ids[0]) == []
        more = chain(store, 1, parent=ids[0], seed="y")
        assert store.graph.children(ids[0]) == more
    assert store.graph.children(ids[0]) == more


def test_a_layer_used_by_an_unreadable_node_is_kept(store: Store) -> None:
    diff_id = add_layer(store, 0, image=False)
    keep, drop = fake_image_id("keep"), fake_image_id("drop")
    store.graph.register(legacy_image_json(keep), keep, layer=diff_id)
    store.graph.register(legacy_image_json(drop), drop, layer=diff_id)
    (store.graph.root / keep / "json").write_bytes(b"{broken")
    assert store.graph.delete(drop) == []  # the damaged node still names the layer
    assert store.layers.exists(diff_id)


# -- the tag file -----------------------------------------------------------------------------


def test_the_tag_file_is_parsed_once_per_version(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = chain(store, 2)
    store.tags.tag("app", "1", ids[0])
    parses = []
    parse = store.tags._parse
    monkeypatch.setattr(store.tags, "_parse", lambda data: parses.append(1) or parse(data))
    for _ in range(3):
        assert store.tags.references(ids[0]) == ["app:1"]
        assert store.tags.lookup_image("app:1").id == ids[0]
    assert parses == []  # our own write left the parsed file behind
    Store.open(store.root).tags.tag("app", "2", ids[1])  # another process changes it
    assert store.tags.references(ids[1]) == ["app:2"]
    assert store.tags.references(ids[0]) == ["app:1"]
    assert parses == [1]
