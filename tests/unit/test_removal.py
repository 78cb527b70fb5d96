"""Tests for layerfs.store.removal: ``rmi`` untags and deletes the way ``docker rmi`` does."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from layerfs.errors import ConflictError, ImageHeldError, ImageNotFoundError
from layerfs.model.digest import sha256_digest
from layerfs.store.removal import Removal, remove_image
from layerfs.store.store import Store
from tests.helpers import build_tar, fake_image_id, legacy_image_json, tar_file

LAYERS = [build_tar(tar_file(f"layer{n}", b"content %d" % n)) for n in range(4)]
DIFF_IDS = [sha256_digest(data) for data in LAYERS]
MANIFEST_DIGEST = "sha256:" + "d" * 64


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def add(store: Store, name: str, parent: str = "", layer: int | None = None) -> str:
    image_id = fake_image_id(name)
    staged = store.layers.ingest(io.BytesIO(LAYERS[layer])) if layer is not None else None
    store.graph.register(legacy_image_json(image_id, parent), image_id, parent=parent, layer=staged)
    return image_id


@pytest.fixture
def chain(store: Store) -> list[str]:
    """base <- middle <- top, each with its own layer; only top is tagged (app:latest)."""
    base = add(store, "base", layer=0)
    middle = add(store, "middle", base, layer=1)
    top = add(store, "top", middle, layer=2)
    store.tags.tag("app", "latest", top)
    return [base, middle, top]


def exists(store: Store, *image_ids: str) -> list[bool]:
    return [store.graph.exists(i) for i in image_ids]


# -- untagging --------------------------------------------------------------------------------


def test_removing_one_of_several_references_only_untags(store: Store, chain: list[str]) -> None:
    top = chain[2]
    store.tags.tag("app", "v1", top)
    store.tags.tag("mirror/app", "v1", top)
    assert remove_image(store, "app:v1") == Removal(["app:v1"], [])
    assert store.tags.references(top) == ["app:latest", "mirror/app:v1"]
    assert exists(store, *chain) == [True, True, True]


def test_a_reference_without_a_tag_means_latest(store: Store, chain: list[str]) -> None:
    store.tags.tag("app", "v1", chain[2])
    assert remove_image(store, "app") == Removal(["app:latest"], [])
    assert store.tags.references(chain[2]) == ["app:v1"]


def test_removing_a_digest_reference(store: Store, chain: list[str]) -> None:
    store.tags.set_digest("app", MANIFEST_DIGEST, chain[2])
    assert remove_image(store, f"app@{MANIFEST_DIGEST}") == Removal([f"app@{MANIFEST_DIGEST}"], [])
    assert store.tags.references(chain[2]) == ["app:latest"]


def test_a_registry_host_with_a_port_is_part_of_the_repository(
    store: Store, chain: list[str]
) -> None:
    store.tags.tag("localhost:5000/app", "v1", chain[2])
    assert remove_image(store, "localhost:5000/app:v1") == Removal(["localhost:5000/app:v1"], [])
    assert store.tags.references(chain[2]) == ["app:latest"]


# -- deleting ---------------------------------------------------------------------------------


def test_the_last_reference_deletes_the_image_and_its_untagged_parents(
    store: Store, chain: list[str]
) -> None:
    base, middle, top = chain
    removal = remove_image(store, "app:latest")
    assert removal == Removal(["app:latest"], [top, middle, base])  # top first
    assert store.graph.ids() == []
    assert store.layers.diff_ids() == []
    assert store.tags.all() == {}


def test_no_prune_deletes_only_the_image(store: Store, chain: list[str]) -> None:
    base, middle, top = chain
    assert remove_image(store, "app:latest", prune=False) == Removal(["app:latest"], [top])
    assert exists(store, base, middle, top) == [True, True, False]
    assert sorted(store.layers.diff_ids()) == sorted(DIFF_IDS[:2])


def test_deleting_by_id_prefix_untags_a_tag_and_its_digests(store: Store, chain: list[str]) -> None:
    top = chain[2]
    store.tags.set_digest("app", MANIFEST_DIGEST, top)
    removal = remove_image(store, top[:12])
    assert sorted(removal.untagged) == sorted(["app:latest", f"app@{MANIFEST_DIGEST}"])
    assert removal.deleted == chain[::-1]
    assert store.tags.all() == {}


def test_two_tags_by_id_need_force_even_in_one_repository(store: Store, chain: list[str]) -> None:
    # docker's isSingleReference: more than one tag is not a single reference.
    top = chain[2]
    store.tags.tag("app", "v1", top)
    with pytest.raises(ConflictError, match=r"must be forced\) - image is referenced in multiple"):
        remove_image(store, top[:12])
    removal = remove_image(store, "sha256:" + top[:12], force=True)
    assert removal.untagged == ["app:latest", "app:v1"] and removal.deleted == chain[::-1]


def test_records_list_untagged_names_then_each_image_and_its_layers(
    store: Store, chain: list[str]
) -> None:
    base, middle, top = chain
    removal = remove_image(store, "app")
    assert removal.records == [
        ("Untagged", "app:latest"),
        ("Deleted", f"sha256:{top}"),
        ("Deleted", DIFF_IDS[2]),
        ("Deleted", f"sha256:{middle}"),
        ("Deleted", DIFF_IDS[1]),
        ("Deleted", f"sha256:{base}"),
        ("Deleted", DIFF_IDS[0]),
    ]


def test_removing_the_last_tag_of_a_repository_drops_its_digests(
    store: Store, chain: list[str]
) -> None:
    top = chain[2]
    store.tags.tag("other", "1", top)
    store.tags.set_digest("app", MANIFEST_DIGEST, top)
    assert remove_image(store, "app:latest") == Removal(
        ["app:latest", f"app@{MANIFEST_DIGEST}"], []
    )
    assert store.tags.references(top) == ["other:1"]


def test_pruning_stops_at_a_tagged_parent(store: Store, chain: list[str]) -> None:
    base, middle, top = chain
    store.tags.tag("base", "1", base)
    assert remove_image(store, "app").deleted == [top, middle]
    assert exists(store, base) == [True]
    assert store.layers.diff_ids() == [DIFF_IDS[0]]


def test_pruning_stops_at_a_parent_with_other_children(store: Store, chain: list[str]) -> None:
    base, middle, top = chain
    sibling = add(store, "sibling", middle, layer=3)
    store.tags.tag("sibling", "latest", sibling)
    assert remove_image(store, "app").deleted == [top]
    assert exists(store, base, middle, sibling) == [True, True, True]


def test_pruning_stops_at_a_held_parent(store: Store, chain: list[str]) -> None:
    base, middle, top = chain
    store.graph.retain("pull", middle)
    assert remove_image(store, "app").deleted == [top]
    assert exists(store, base, middle) == [True, True]
    store.graph.release("pull")


def test_a_parent_that_shares_the_layer_keeps_it(store: Store) -> None:
    base = add(store, "shared-base", layer=0)
    top_id = fake_image_id("shared-top")
    store.graph.register(legacy_image_json(top_id, base), top_id, parent=base, layer=DIFF_IDS[0])
    store.tags.tag("base", "1", base)
    store.tags.tag("top", "1", top_id)
    assert remove_image(store, "top:1") == Removal(["top:1"], [top_id])
    assert store.layers.diff_ids() == [DIFF_IDS[0]]


def test_an_untagged_image_by_id(store: Store) -> None:
    lone = add(store, "lone", layer=0)
    assert remove_image(store, lone[:5]) == Removal([], [lone])
    assert store.layers.diff_ids() == []


# -- refusals ---------------------------------------------------------------------------------


def test_an_image_with_children_is_not_deleted(store: Store, chain: list[str]) -> None:
    _, middle, top = chain
    store.tags.tag("mid", "1", middle)
    with pytest.raises(ConflictError, match="image has dependent child images") as info:
        remove_image(store, middle)
    assert "(cannot be forced)" in str(info.value) and top[:12] in str(info.value)
    assert store.tags.references(middle) == ["mid:1"]  # nothing was untagged either
    assert exists(store, *chain) == [True, True, True]


def test_removing_the_name_of_an_image_with_children_untags_it(
    store: Store, chain: list[str]
) -> None:
    middle = chain[1]
    store.tags.tag("mid", "1", middle)
    assert remove_image(store, "mid:1") == Removal(["mid:1"], [])
    assert store.tags.references(middle) == []
    assert exists(store, *chain) == [True, True, True]


def test_force_by_id_on_an_image_with_children_is_refused(store: Store, chain: list[str]) -> None:
    # As docker: children are a conflict -f cannot force, and nothing is untagged.
    middle = chain[1]
    store.tags.tag("mid", "1", middle)
    with pytest.raises(ConflictError, match="cannot be forced"):
        remove_image(store, middle, force=True)
    assert store.tags.references(middle) == ["mid:1"]
    assert exists(store, *chain) == [True, True, True]


def test_force_cannot_delete_an_untagged_image_with_children(
    store: Store, chain: list[str]
) -> None:
    with pytest.raises(ConflictError, match="cannot be forced"):
        remove_image(store, chain[0], force=True)
    assert exists(store, *chain) == [True, True, True]


def test_an_image_in_several_repositories_needs_force(store: Store, chain: list[str]) -> None:
    top = chain[2]
    store.tags.tag("other", "v9", top)
    with pytest.raises(ConflictError, match=r"must be forced\) - image is referenced in multiple"):
        remove_image(store, top)
    assert store.tags.references(top) == ["app:latest", "other:v9"]
    removal = remove_image(store, top, force=True)
    assert sorted(removal.untagged) == ["app:latest", "other:v9"]
    assert removal.deleted == chain[::-1]


def test_a_held_image_is_not_deleted(store: Store, chain: list[str]) -> None:
    top = chain[2]
    store.graph.retain("pull", top)
    with pytest.raises(ImageHeldError, match=r"must force.* is held by an ongoing pull"):
        remove_image(store, "app:latest")
    assert store.tags.references(top) == ["app:latest"]  # not untagged either
    with pytest.raises(ImageHeldError, match=r"cannot be forced.* held by an ongoing pull"):
        remove_image(store, top, force=True)
    # Like docker with a running container: -f on the name untags, the image stays.
    assert remove_image(store, "app:latest", force=True) == Removal(["app:latest"], [])
    assert exists(store, *chain) == [True, True, True]
    store.graph.release("pull")
    assert remove_image(store, top).deleted == chain[::-1]


def test_an_image_whose_layer_is_held_is_not_deleted(store: Store, chain: list[str]) -> None:
    store.graph.retain("mount", DIFF_IDS[2])
    with pytest.raises(ImageHeldError):
        remove_image(store, "app:latest")
    assert exists(store, *chain) == [True, True, True]
    store.graph.release("mount")


def test_a_held_image_can_still_lose_one_of_its_tags(store: Store, chain: list[str]) -> None:
    top = chain[2]
    store.tags.tag("app", "v1", top)
    store.graph.retain("pull", top)
    assert remove_image(store, "app:v1") == Removal(["app:v1"], [])
    store.graph.release("pull")


def test_an_unknown_name(store: Store, chain: list[str]) -> None:
    for name in ("nope:latest", "app:v404", "ffff" + "0" * 60):
        with pytest.raises(ImageNotFoundError, match=f"No such image: {name}"):
            remove_image(store, name)
    assert exists(store, *chain) == [True, True, True]
