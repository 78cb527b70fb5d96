"""Tests for layerfs.store.graph (Docker's legacy Graph, FORMATS §1.2) and the store layout."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.errors import (
    AmbiguousIDError,
    DepthLimitError,
    DigestNotSetError,
    ImageHeldError,
    ImageNotFoundError,
    IntegrityError,
    InvalidReferenceError,
    StoreError,
    UsageError,
)
from layerfs.model.digest import sha256_digest
from layerfs.model.image import MAX_IMAGE_DEPTH, canonical_json
from layerfs.store import store as store_module
from layerfs.store.files import FileLock
from layerfs.store.graph import EMPTY_TAR, Graph
from layerfs.store.layers import StagedLayer
from layerfs.store.store import STORE_VERSION, Store, default_root
from tests.helpers import (
    build_tar,
    fake_image_id,
    legacy_image_json,
    spawn_python,
    tar_dir,
    tar_file,
)

LAYER_A = build_tar(tar_dir("bin"), tar_file("bin/sh", b"#!shell" * 10))  # 70 bytes of content
LAYER_B = build_tar(tar_dir("etc"), tar_file("etc/os-release", b"ID=test\n"))  # 8 bytes
DIFF_A, DIFF_B = sha256_digest(LAYER_A), sha256_digest(LAYER_B)


def make_id(prefix: str, seed: str = "") -> str:
    """A valid image ID starting with ``prefix``."""
    return (prefix + hashlib.sha256((prefix + seed).encode()).hexdigest())[:64]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


@pytest.fixture
def graph(store: Store) -> Graph:
    return store.graph


def stage(store: Store, data: bytes = LAYER_A) -> StagedLayer:
    return store.layers.ingest(io.BytesIO(data))


def add_legacy(
    store: Store,
    image_id: str,
    parent: str = "",
    layer: StagedLayer | str | None = None,
    **fields: object,
) -> str:
    assert store.graph.register(
        legacy_image_json(image_id, parent, **fields), image_id, parent=parent, layer=layer
    )
    return image_id


def tmp_names(store: Store) -> list[str]:
    return sorted(p.name for p in store.tmp.iterdir())


def node_files(store: Store, image_id: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (store.graph.root / image_id).iterdir()}


# -- the store layout -------------------------------------------------------------------------


def test_store_open_creates_the_layout(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "new")
    assert sorted(p.name for p in store.root.iterdir()) == [
        "graph",
        "holds",
        "index",
        "journal",
        "layerfs-store.json",
        "layers",
        "owners",
        "tmp",
    ]
    assert json.loads((store.root / "layerfs-store.json").read_bytes()) == {"version": 1}
    assert json.loads((store.root / "index" / "version").read_bytes()) == {"version": 1}
    assert STORE_VERSION == 1
    assert Store.open(tmp_path / "new").root == store.root  # opening again is fine


def test_store_open_refuses_other_versions_and_other_directories(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Store.open(root)
    (root / "layerfs-store.json").write_text('{"version": 2}')
    with pytest.raises(StoreError, match="has layout version 2; this layerfs reads version 1"):
        Store.open(root)
    (root / "layerfs-store.json").write_text("{broken")
    with pytest.raises(StoreError, match=r"unreadable layerfs-store.json"):
        Store.open(root)
    other = tmp_path / "home"
    other.mkdir()
    (other / "photos").mkdir()
    with pytest.raises(StoreError, match="is not empty and is not a layerfs store"):
        Store.open(other)
    with pytest.raises(StoreError, match="no layerfs store at"):
        Store.open(tmp_path / "missing", create=False)


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAYERFS_ROOT", str(tmp_path / "env"))
    assert default_root() == tmp_path / "env"
    monkeypatch.delenv("LAYERFS_ROOT")
    uid_map = tmp_path / "uid_map"
    monkeypatch.setattr(store_module, "UID_MAP", uid_map)
    uid_map.write_text("         0          0 4294967295\n")  # the initial namespace
    monkeypatch.setattr(store_module.os, "geteuid", lambda: 0)
    assert default_root() == Path("/var/lib/layerfs")
    # `unshare --map-root-user` as user 1000: root in there is that user, with its store.
    uid_map.write_text("         0       1000          1\n")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "layerfs"
    monkeypatch.delenv("XDG_DATA_HOME")
    uid_map.unlink()  # no /proc: not known to be a user namespace
    assert default_root() == Path("/var/lib/layerfs")
    monkeypatch.setattr(store_module.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "layerfs"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_root() == Path.home() / ".local" / "share" / "layerfs"


# -- register ---------------------------------------------------------------------------------


def test_register_writes_a_node(store: Store, graph: Graph) -> None:
    base = make_id("b1")
    raw = b'{"id": "%s",  "comment": "exact bytes kept"}\n' % base.encode()
    assert graph.register(raw, base, layer=stage(store), layer_digest="sha256:" + "f" * 64)
    child = make_id("c1")
    add_legacy(store, child, parent=base, layer=stage(store, LAYER_B))
    files = node_files(store, base)
    assert files == {
        "json": raw,
        "layer": DIFF_A.encode(),
        "layersize": b"70",
        "checksum": b"sha256:" + b"f" * 64,
    }
    assert node_files(store, child)["parent"] == base.encode()
    for path in (graph.root / base).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    image = graph.get(base)
    assert (image.id, image.parent, image.layer, image.size) == (base, "", DIFF_A, 70)
    assert image.raw_json == raw
    assert tmp_names(store) == []


def test_register_without_a_layer(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("e0"))
    assert node_files(store, image_id).keys() == {"json", "layersize"}
    image = graph.get(image_id)
    assert image.layer is None and image.size == 0


def test_register_of_an_existing_id_is_a_no_op(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("aa"), layer=stage(store))
    before = node_files(store, image_id)
    staged = stage(store, LAYER_B)
    assert graph.register(b'{"other": "bytes"}', image_id, layer=staged) is False
    assert node_files(store, image_id) == before
    assert store.layers.exists(DIFF_B)  # the caller's layer is still published for later use
    assert tmp_names(store) == []


@pytest.mark.parametrize(
    "bad_id",
    ["", "abc", "A" * 64, "g" * 64, "a" * 65, "sha256:" + "a" * 64, "../" + "a" * 61],
)
def test_register_refuses_invalid_ids(store: Store, graph: Graph, bad_id: str) -> None:
    with pytest.raises(UsageError, match="invalid image ID"):
        graph.register(b"{}", bad_id)
    assert graph.ids() == []


def test_register_refuses_a_missing_layer(store: Store, graph: Graph) -> None:
    image_id = make_id("ab")
    with pytest.raises(IntegrityError, match=f"layer {DIFF_B} is not in the store"):
        graph.register(legacy_image_json(image_id), image_id, layer=DIFF_B)
    assert not (graph.root / image_id).exists()
    assert tmp_names(store) == []


def test_register_refuses_a_missing_parent(store: Store, graph: Graph) -> None:
    image_id, parent = make_id("ac"), make_id("ad")
    with pytest.raises(ImageNotFoundError, match=f"no such id: {parent}"):
        graph.register(legacy_image_json(image_id, parent), image_id, parent=parent)
    assert graph.ids() == []


def test_register_refuses_a_bad_layer_digest_and_leaves_nothing(store: Store, graph: Graph) -> None:
    image_id = make_id("ae")
    with pytest.raises(InvalidReferenceError, match="invalid layer digest"):
        graph.register(legacy_image_json(image_id), image_id, layer_digest="md5:abc")
    assert graph.ids() == []
    assert tmp_names(store) == []


def test_register_replaces_a_stale_directory(store: Store, graph: Graph) -> None:
    image_id = make_id("af")
    (graph.root / image_id).mkdir()
    (graph.root / image_id / "junk").write_bytes(b"left by a crash")
    add_legacy(store, image_id)
    assert sorted(node_files(store, image_id)) == ["json", "layersize"]


def test_register_keeps_v1_compatibility(store: Store, graph: Graph) -> None:
    image_id = make_id("a0")
    graph.register(b"{}", image_id, v1_compatibility=b'{"id":"x"} ')
    assert graph.get_v1_compatibility_config(image_id) == b'{"id":"x"} '


# -- create -----------------------------------------------------------------------------------


def test_create_names_the_image_by_its_config_digest(store: Store, graph: Graph) -> None:
    base = graph.create(
        stage(store),
        config={"Cmd": ["sh"]},
        created_by="layerfs import",
        created="2024-01-01T00:00:00Z",
        author="me",
        comment="first",
    )
    assert base.id == hashlib.sha256(base.raw_json).hexdigest()
    assert base.raw_json == canonical_json(base.data)
    assert base.is_config and base.layer == DIFF_A and base.parent == ""
    assert base.diff_ids == [DIFF_A]
    assert base.history == [
        {
            "created": "2024-01-01T00:00:00Z",
            "author": "me",
            "created_by": "layerfs import",
            "comment": "first",
        }
    ]
    assert base.config == {"Cmd": ["sh"]} and base.size == 70
    assert tmp_names(store) == []


def test_create_continues_the_parent_s_diff_ids_and_history(store: Store, graph: Graph) -> None:
    base = graph.create(stage(store), config={"Env": ["A=1"]}, created="t1", created_by="one")
    meta = graph.create(None, parent=base.id[:10], created="t2", created_by="ENV B=2")
    top = graph.create(stage(store, LAYER_B), parent="sha256:" + meta.id, created="t3")
    assert meta.parent == base.id and top.parent == meta.id
    assert meta.layer is None and meta.diff_ids == [DIFF_A]
    assert meta.history[-1] == {"created": "t2", "created_by": "ENV B=2", "empty_layer": True}
    assert top.diff_ids == [DIFF_A, DIFF_B]
    assert [h["created"] for h in top.history] == ["t1", "t2", "t3"]
    assert top.config == {"Env": ["A=1"]}  # inherited
    assert graph.layers_of(top) == [DIFF_A, DIFF_B]
    assert node_files(store, top.id)["parent"] == meta.id.encode()


def test_creating_the_same_config_twice_gives_one_image(store: Store, graph: Graph) -> None:
    first = graph.create(stage(store), created="t")
    second = graph.create(stage(store), created="t")
    assert first.id == second.id
    assert graph.ids() == [first.id]
    assert tmp_names(store) == []


def test_create_on_an_unknown_parent(store: Store, graph: Graph) -> None:
    with pytest.raises(ImageNotFoundError):
        graph.create(None, parent="feedface")
    assert graph.ids() == []


# -- delete -----------------------------------------------------------------------------------


def test_delete_removes_the_node_and_its_unused_layer(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("d0"), layer=stage(store))
    assert graph.delete(image_id[:6]) == [DIFF_A]
    assert graph.ids() == []
    assert not store.layers.exists(DIFF_A)
    assert tmp_names(store) == []
    with pytest.raises(ImageNotFoundError):
        graph.delete(image_id)


def test_delete_keeps_a_layer_another_node_uses(store: Store, graph: Graph) -> None:
    first = add_legacy(store, make_id("d1"), layer=stage(store))
    second = add_legacy(store, make_id("d2"), layer=DIFF_A)  # same layer, by diff ID
    assert graph.delete(first) == []
    assert store.layers.exists(DIFF_A)
    assert graph.delete(second) == [DIFF_A]
    assert not store.layers.exists(DIFF_A)


def test_delete_of_a_node_without_a_layer(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("d3"))
    assert graph.delete(image_id) == []
    assert not graph.exists(image_id)


def test_delete_does_not_check_children(store: Store, graph: Graph) -> None:
    parent = add_legacy(store, make_id("d4"))
    child = add_legacy(store, make_id("d5"), parent=parent)
    graph.delete(parent)  # like Docker's Graph.Delete: callers check children
    image = graph.get(child)
    assert image.parent == parent
    with pytest.raises(ImageNotFoundError):
        graph.get_parent(image)


def test_delete_refuses_a_held_image(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("d6"), layer=stage(store))
    graph.retain("pull", image_id)
    with pytest.raises(
        ImageHeldError, match=f"Conflict, cannot delete because {image_id[:12]} is held"
    ):
        graph.delete(image_id)
    assert graph.exists(image_id) and store.layers.exists(DIFF_A)
    graph.release("pull", image_id)
    assert graph.delete(image_id) == [DIFF_A]


def test_delete_refuses_an_image_whose_layer_is_held(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("d7"), layer=stage(store))
    graph.retain("load", DIFF_A)
    with pytest.raises(ImageHeldError, match=f"the layer of {image_id[:12]} is held"):
        graph.delete(image_id)
    assert graph.exists(image_id) and store.layers.exists(DIFF_A)
    graph.release("load")
    assert graph.delete(image_id) == [DIFF_A]


# -- lookup -----------------------------------------------------------------------------------


@pytest.fixture
def prefixed(store: Store) -> tuple[str, str, str]:
    """Three images: two sharing the prefix "abc", one alone under "f"."""
    ids = (make_id("abc1"), make_id("abc2"), make_id("f00d"))
    for image_id in ids:
        add_legacy(store, image_id)
    return ids


def test_get_by_full_id_unique_prefix_and_sha256_prefix(
    graph: Graph, prefixed: tuple[str, str, str]
) -> None:
    one, _, alone = prefixed
    for name in (one, one[:5], one[:12], "sha256:" + one, "sha256:" + one[:5]):
        assert graph.get(name).id == one
        assert graph.exists(name)
    assert graph.get("f").id == alone  # any unique prefix, even one character


@pytest.mark.parametrize("name", ["", "sha256:"])
def test_empty_prefix(graph: Graph, prefixed: tuple[str, str, str], name: str) -> None:
    with pytest.raises(UsageError, match=r"^Prefix can't be empty$"):
        graph.get(name)
    assert not graph.exists(name)


def test_ambiguous_prefix(graph: Graph, prefixed: tuple[str, str, str]) -> None:
    with pytest.raises(AmbiguousIDError, match="Multiple IDs found with provided prefix: abc"):
        graph.get("abc")
    assert not graph.exists("abc")


@pytest.mark.parametrize("name", ["0123", "ABC1", "abc1 ", "abc 1", "zzz", "f00d" + "0" * 61])
def test_unknown_id(graph: Graph, prefixed: tuple[str, str, str], name: str) -> None:
    with pytest.raises(ImageNotFoundError, match=r"^no such id: "):
        graph.get(name)
    assert not graph.exists(name)


def test_ids_ignore_other_directory_entries(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("ee"))
    (graph.root / "_tmp").mkdir()
    (graph.root / ("E" * 64)).mkdir()
    (graph.root / "notes.txt").write_text("x")
    assert graph.ids() == [image_id]


def test_get_refuses_a_node_whose_json_names_another_id(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("e1"))
    (graph.root / image_id / "json").write_bytes(legacy_image_json(make_id("e2")))
    with pytest.raises(IntegrityError, match="has wrong id"):
        graph.get(image_id)
    assert not graph.exists(image_id)


def test_get_refuses_corrupt_json(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("e3"))
    (graph.root / image_id / "json").write_bytes(b'{"id": 1, "id": 2}')
    with pytest.raises(IntegrityError, match=f"image {image_id[:12]} has corrupt json"):
        graph.get(image_id)


def test_a_directory_without_json_is_no_image(store: Store, graph: Graph) -> None:
    image_id = make_id("e4")
    (graph.root / image_id).mkdir()
    with pytest.raises(ImageNotFoundError):
        graph.get(image_id)
    assert graph.map() == {}


def test_missing_layersize_is_computed_from_the_layer(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("e5"), layer=stage(store))
    (graph.root / image_id / "layersize").unlink()
    assert graph.get(image_id).size == 70


def test_raw_json_is_the_exact_bytes(store: Store, graph: Graph) -> None:
    image_id = make_id("e6")
    raw = b'{\n  "id": "%s",\n  "z": 1, "a": "\\u00e9"\n}\n' % image_id.encode()
    graph.register(raw, image_id)
    assert graph.raw_json(image_id[:8]) == raw


# -- the chain --------------------------------------------------------------------------------


@pytest.fixture
def chain(store: Store) -> list[str]:
    """base (70 bytes) <- middle (no layer) <- top (8 bytes), plus a sibling of top."""
    base = add_legacy(store, make_id("c0"), layer=stage(store))
    middle = add_legacy(store, make_id("c1"), parent=base)
    top = add_legacy(store, make_id("c2"), parent=middle, layer=stage(store, LAYER_B))
    sibling = add_legacy(store, make_id("c3"), parent=middle)
    return [base, middle, top, sibling]


def test_get_parent(graph: Graph, chain: list[str]) -> None:
    base, middle, top, _ = chain
    assert graph.get_parent(graph.get(base)) is None
    parent = graph.get_parent(graph.get(top))
    assert parent is not None and parent.id == middle


def test_walk_history_goes_from_the_image_to_its_base(graph: Graph, chain: list[str]) -> None:
    base, middle, top, _ = chain
    seen: list[str] = []
    history = graph.walk_history(graph.get(top), lambda image: seen.append(image.id))
    assert [i.id for i in history] == [top, middle, base]
    assert seen == [top, middle, base]


def test_depth_and_layers_of(graph: Graph, chain: list[str]) -> None:
    base, middle, top, _ = chain
    assert [graph.depth(graph.get(i)) for i in (base, middle, top)] == [1, 2, 3]
    assert graph.layers_of(graph.get(top)) == [DIFF_A, DIFF_B]  # base first, empty skipped
    assert graph.layers_of(graph.get(middle)) == [DIFF_A]


def test_get_parents_size(store: Store, graph: Graph, chain: list[str]) -> None:
    base, middle, top, _ = chain
    assert graph.get_parents_size(graph.get(top)) == 70  # middle 0 + base 70
    assert graph.get_parents_size(graph.get(base)) == 0
    orphan = add_legacy(store, make_id("c9"), parent=top, layer=DIFF_A)
    assert graph.get_parents_size(graph.get(orphan)) == 78
    graph.delete(middle)
    assert graph.get_parents_size(graph.get(orphan)) == 8  # stops at the missing parent


def test_heads_by_parent_children_and_map(store: Store, graph: Graph, chain: list[str]) -> None:
    base, middle, top, sibling = chain
    assert set(graph.heads()) == {top, sibling}
    by_parent = graph.by_parent()
    assert {k: sorted(i.id for i in v) for k, v in by_parent.items()} == {
        base: [middle],
        middle: sorted([top, sibling]),
    }
    assert graph.children(middle) == sorted([top, sibling])
    assert graph.children(top) == []
    assert set(graph.map()) == set(chain)


def test_unloadable_images_are_skipped(store: Store, graph: Graph, chain: list[str]) -> None:
    base, middle, top, sibling = chain
    (graph.root / middle / "json").write_bytes(b"not json")
    assert set(graph.map()) == {base, top, sibling}
    assert graph.by_parent() == {}  # middle's children have an unloadable parent
    assert set(graph.heads()) == {base, top, sibling}


def test_a_cycle_in_the_parent_chain_is_an_integrity_error(
    store: Store, graph: Graph, chain: list[str]
) -> None:
    base, _, top, _ = chain
    (graph.root / base / "parent").write_text(top)  # base -> top -> middle -> base
    with pytest.raises(IntegrityError, match="has a cycle in its parent chain"):
        graph.walk_history(graph.get(top))


# -- the depth limit --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, list[str]]:
    """A store holding one chain of MAX_IMAGE_DEPTH (127) legacy images, base first."""
    store = Store.open(tmp_path_factory.mktemp("deep") / "store")
    ids: list[str] = []
    parent = ""
    for n in range(MAX_IMAGE_DEPTH):
        image_id = fake_image_id(f"deep-{n}")
        registered = store.graph.register(
            legacy_image_json(image_id, parent), image_id, parent=parent
        )
        assert registered, f"image {n + 1} of {MAX_IMAGE_DEPTH} was refused"
        ids.append(image_id)
        parent = image_id
    return store, ids


def test_a_chain_of_127_images_registers(deep: tuple[Store, list[str]]) -> None:
    store, ids = deep
    assert store.graph.depth(store.graph.get(ids[-1])) == 127
    assert len(store.graph.walk_history(store.graph.get(ids[-1]))) == 127


def test_check_depth_allows_124_and_refuses_125(deep: tuple[Store, list[str]]) -> None:
    store, ids = deep
    store.graph.check_depth(store.graph.get(ids[123]))  # depth 124: 124 + 2 < 127
    with pytest.raises(
        DepthLimitError, match=r"^Cannot create container with more than 127 parents"
    ):
        store.graph.check_depth(store.graph.get(ids[124]))  # depth 125
    with pytest.raises(DepthLimitError):
        store.graph.check_depth(store.graph.get(ids[-1]))


def test_a_128th_image_is_refused_and_nothing_is_published(
    deep: tuple[Store, list[str]],
) -> None:
    store, ids = deep
    image_id = fake_image_id("deep-127")
    staged = stage(store, LAYER_B)
    with pytest.raises(DepthLimitError, match="max depth exceeded"):
        store.graph.register(
            legacy_image_json(image_id, ids[-1]), image_id, parent=ids[-1], layer=staged
        )
    assert not (store.graph.root / image_id).exists()
    assert not store.layers.exists(DIFF_B)
    staged.discard()
    assert tmp_names(store) == []
    with pytest.raises(DepthLimitError, match="max depth exceeded"):
        store.graph.create(None, parent=ids[-1])
    assert len(store.graph.ids()) == MAX_IMAGE_DEPTH


# -- holds ------------------------------------------------------------------------------------


def test_retain_and_release_in_one_process(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("40"), layer=stage(store))
    assert not graph.is_held(image_id)
    graph.retain("s1", image_id, DIFF_A)
    assert graph.is_held(image_id) and graph.is_held(DIFF_A)
    assert graph.is_held(DIFF_A.removeprefix("sha256:"))
    graph.retain("s1", image_id)  # a session holds an ID once
    graph.retain("s2", image_id)
    graph.release("s1", image_id)
    assert graph.is_held(image_id)  # s2 still holds it
    graph.release("s2", image_id)
    assert not graph.is_held(image_id)
    assert graph.is_held(DIFF_A)
    graph.release("s1")  # no IDs: everything the session holds
    assert not graph.is_held(DIFF_A)
    graph.release("nobody", image_id, make_id("49"))  # unknown: no-op


def test_retain_refuses_things_that_are_not_ids(store: Store, graph: Graph) -> None:
    with pytest.raises(UsageError, match="cannot hold 'latest'"):
        graph.retain("s", "latest")
    with pytest.raises(UsageError):
        graph.retain("s", "../" + "a" * 61)


def test_is_held_of_an_id_nobody_ever_held(graph: Graph) -> None:
    assert not graph.is_held(make_id("41"))
    assert not graph.is_held("sha256:" + make_id("41"))


def test_prune_hold_files_keeps_live_holds(store: Store, graph: Graph) -> None:
    a, b = make_id("42"), make_id("43")
    graph.retain("s", a, b)
    graph.release("s", a)
    assert graph.prune_hold_files() == 1
    assert sorted(p.name for p in graph.holds_root.iterdir()) == [b]
    assert graph.is_held(b)
    graph.release("s")
    assert graph.prune_hold_files() == 1
    assert list(graph.holds_root.iterdir()) == []


_HOLDER = """
import sys
from pathlib import Path
from layerfs.store.store import Store

store = Store.open(Path(sys.argv[1]))
store.graph.retain("pull-in-child", *sys.argv[2:])
print("held", flush=True)
if sys.stdin.readline().strip() == "release":
    store.graph.release("pull-in-child")
    print("released", flush=True)
    sys.stdin.readline()
"""


@contextlib.contextmanager
def holder(store: Store, *ids: str) -> Iterator[subprocess.Popen[str]]:
    with spawn_python(_HOLDER, str(store.root), *ids) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        yield child


@pytest.mark.timeout(60)
def test_a_hold_of_another_process_blocks_delete_until_released(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("44"), layer=stage(store))
    with holder(store, image_id) as child:
        assert graph.is_held(image_id)
        assert Store.open(store.root).graph.is_held(image_id)  # any other graph object too
        with pytest.raises(ImageHeldError):
            graph.delete(image_id)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("release\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        assert not graph.is_held(image_id)  # released while the child still runs
        child.stdin.write("exit\n")
        child.stdin.flush()
        assert child.wait(30) == 0
    assert graph.delete(image_id) == [DIFF_A]


@pytest.mark.timeout(60)
def test_a_hold_vanishes_with_a_killed_process(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("45"), layer=stage(store))
    with holder(store, image_id, DIFF_A) as child:
        assert graph.is_held(image_id) and graph.is_held(DIFF_A)
        with pytest.raises(ImageHeldError):
            graph.delete(image_id)
        child.kill()  # SIGKILL: no release, no cleanup
        assert child.wait(30) == -9
    assert not graph.is_held(image_id)
    assert not graph.is_held(DIFF_A)
    assert graph.delete(image_id) == [DIFF_A]
    assert graph.prune_hold_files() == 2


# -- per-node metadata ------------------------------------------------------------------------


def test_layer_digest(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("50"), layer=stage(store))
    with pytest.raises(DigestNotSetError, match=r"^digest is not set for layer$"):
        graph.get_layer_digest(image_id)
    digest = "sha256:" + "1" * 64
    graph.set_layer_digest(image_id[:7], digest)
    assert (graph.root / image_id / "checksum").read_bytes() == digest.encode()  # no newline
    assert stat.S_IMODE((graph.root / image_id / "checksum").stat().st_mode) == 0o600
    assert graph.get_layer_digest("sha256:" + image_id) == digest
    with pytest.raises(InvalidReferenceError):
        graph.set_layer_digest(image_id, "sha256:b")
    assert graph.get_layer_digest(image_id) == digest
    with pytest.raises(ImageNotFoundError):
        graph.set_layer_digest(make_id("59"), digest)
    assert tmp_names(store) == []


def test_a_corrupt_layer_digest_is_refused(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("51"))
    (graph.root / image_id / "checksum").write_text("garbage")
    with pytest.raises(InvalidReferenceError):
        graph.get_layer_digest(image_id)


def test_v1_compatibility_config(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("52"))
    with pytest.raises(ImageNotFoundError, match="no v1Compatibility config is stored"):
        graph.get_v1_compatibility_config(image_id)
    data = b'{"id":"whatever","throwaway":true} \n'
    graph.set_v1_compatibility_config(image_id, data)
    assert graph.get_v1_compatibility_config(image_id[:5]) == data
    assert tmp_names(store) == []


def test_generate_v1_compatibility_chain(store: Store, graph: Graph) -> None:
    base = graph.create(stage(store), config={"Cmd": ["sh"]}, created="t1")
    top = graph.create(stage(store, LAYER_B), parent=base.id, created="t2", author="me")
    data = graph.generate_v1_compatibility_chain(top.id)
    doc = json.loads(data)
    assert doc["id"] == top.id and doc["parent"] == base.id
    assert "rootfs" not in doc and "history" not in doc
    assert doc["author"] == "me" and doc["config"] == {"Cmd": ["sh"]}
    assert data == canonical_json(doc)
    base_doc = json.loads(graph.get_v1_compatibility_config(base.id))  # generated on the way
    assert base_doc["id"] == base.id and "parent" not in base_doc
    assert graph.get_v1_compatibility_config(top.id) == data  # and stored
    assert graph.generate_v1_compatibility_chain(top.id) == data
    assert tmp_names(store) == []


def test_generate_v1_compatibility_chain_returns_a_stored_file_verbatim(
    store: Store, graph: Graph
) -> None:
    base = graph.create(stage(store), created="t1")
    top = graph.create(None, parent=base.id, created="t2")
    stored = b'{"id":"' + b"9" * 64 + b'",  "kept": "as is"}'
    graph.set_v1_compatibility_config(base.id, stored)
    assert graph.generate_v1_compatibility_chain(base.id) == stored
    assert json.loads(graph.generate_v1_compatibility_chain(top.id))["parent"] == "9" * 64


def test_generate_v1_compatibility_of_a_legacy_chain(store: Store, graph: Graph) -> None:
    base = add_legacy(store, make_id("53"), comment="base")
    top = add_legacy(store, make_id("54"), parent=base, comment="top")
    doc = json.loads(graph.generate_v1_compatibility_chain(top))
    assert (doc["id"], doc["parent"], doc["comment"]) == (top, base, "top")


# -- layer data -------------------------------------------------------------------------------


def test_tar_layer_is_byte_exact(store: Store, graph: Graph) -> None:
    image = graph.create(stage(store), created="t")
    with graph.tar_layer(image) as tar:
        assert tar.read() == LAYER_A


def test_tar_layer_of_a_node_without_a_layer_is_an_empty_tar(store: Store, graph: Graph) -> None:
    image = graph.get(add_legacy(store, make_id("70")))
    with graph.tar_layer(image) as tar:
        assert tar.read() == EMPTY_TAR == bytes(1024)


def test_temp_layer_archive_is_gone_once_read_to_the_end(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("71"), layer=stage(store))
    seen: list[int] = []
    archive = graph.temp_layer_archive(image_id[:8], progress=seen.append)
    assert sum(seen) == len(LAYER_A)
    assert archive.path.parent == store.tmp and archive.path.is_file()
    data = b""
    while chunk := archive.read(1000):
        data += chunk
    assert data == LAYER_A
    assert not archive.path.exists()
    assert archive.closed
    assert tmp_names(store) == []


def test_temp_layer_archive_is_gone_once_closed(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("72"), layer=stage(store))
    with graph.temp_layer_archive(image_id) as archive:
        assert archive.read(10) == LAYER_A[:10]
        assert archive.path.exists()
    assert not archive.path.exists()
    assert tmp_names(store) == []


def test_temp_layer_archive_of_a_node_without_a_layer(store: Store, graph: Graph) -> None:
    image_id = add_legacy(store, make_id("73"))
    archive = graph.temp_layer_archive(image_id)
    assert archive.read() == EMPTY_TAR
    assert archive.read() == b""
    assert not archive.path.exists()


def test_temp_layer_archive_of_an_unknown_image(store: Store, graph: Graph) -> None:
    with pytest.raises(ImageNotFoundError):
        graph.temp_layer_archive(make_id("74"))
    assert tmp_names(store) == []


# -- transactions -----------------------------------------------------------------------------


def _lock_is_free(store: Store) -> bool:
    probe = FileLock(store.lock_path)
    if probe.acquire(blocking=False):
        probe.release()
        return True
    return False


@pytest.mark.timeout(60)
def test_transaction_is_reentrant_for_tags_registration_and_deletion(
    store: Store, graph: Graph
) -> None:
    with graph.transaction():
        assert not _lock_is_free(store)
        image = graph.create(stage(store), created="t")
        store.tags.tag("app", "v1", image.id)
        store.tags.tag("app", "v2", image.id)
        assert store.tags.delete("app", "v1")
        other = add_legacy(store, make_id("91"))
        graph.retain("tx", other)
        graph.release("tx")
        graph.delete(other)
        graph.set_layer_digest(image.id, "sha256:" + "2" * 64)
        with graph.transaction():
            store.tags.tag("app", "latest", image.id)
        assert not _lock_is_free(store)  # the inner transaction kept the outer hold
    assert _lock_is_free(store)
    assert store.tags.references(image.id) == ["app:latest", "app:v2"]
    assert graph.ids() == [image.id]


def test_a_failed_transaction_releases_the_lock(store: Store, graph: Graph) -> None:
    with pytest.raises(RuntimeError), graph.transaction():
        raise RuntimeError("boom")
    assert _lock_is_free(store)
