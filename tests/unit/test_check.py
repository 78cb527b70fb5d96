"""Tests for layerfs.store.check: fsck (and --repair) and gc."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerfs.model.digest import sha256_digest
from layerfs.model.image import canonical_json
from layerfs.store.check import Report, fsck, gc, stale_tmp_entries
from layerfs.store.files import is_locked
from layerfs.store.store import Store
from tests.helpers import build_tar, fake_image_id, legacy_image_json, tar_dir, tar_file

LAYER_A = build_tar(tar_dir("bin"), tar_file("bin/sh", b"shell"))
LAYER_B = build_tar(tar_file("etc/hostname", b"box\n"))
LAYER_C = build_tar(tar_file("unused", b"nobody wants me"))
DIFF_A, DIFF_B, DIFF_C = (sha256_digest(x) for x in (LAYER_A, LAYER_B, LAYER_C))


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped) just now."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(child.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def publish(store: Store, data: bytes) -> str:
    staged = store.layers.ingest(io.BytesIO(data))
    staged.publish()
    return staged.diff_id


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A healthy store: a two-image modern chain, a legacy image and three tags."""
    store = Store.open(tmp_path / "store")
    base = store.graph.create(store.layers.ingest(io.BytesIO(LAYER_A)), created="t1")
    top = store.graph.create(store.layers.ingest(io.BytesIO(LAYER_B)), parent=base.id, created="t2")
    legacy = fake_image_id("legacy")
    store.graph.register(legacy_image_json(legacy), legacy, layer=DIFF_A)
    store.tags.tag("app", "latest", top.id)
    store.tags.tag("app", "base", base.id)
    store.tags.tag("old", "1", legacy)
    return store


def ids(store: Store) -> dict[str, str]:
    refs = store.tags.all()
    return {"top": refs["app"]["latest"], "base": refs["app"]["base"], "legacy": refs["old"]["1"]}


def only_problem(report: Report) -> str:
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


# -- fsck -------------------------------------------------------------------------------------


def test_a_healthy_store_is_clean(store: Store) -> None:
    report = fsck(store)
    assert report.problems == [] and report.leftovers == [] and report.repaired == []


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_fsck_reads_the_graph_and_the_tags_under_the_store_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    """Every command that changes the store holds its lock: a check that reads the images
    and later the tags without it took an image imported in between for a dangling tag."""
    held: list[tuple[str, bool]] = []
    for owner, name in ((store.graph, "map"), (store.tags, "all")):
        real = getattr(owner, name)

        def recording(*args: object, _real: Any = real, _name: str = name) -> Any:
            held.append((_name, is_locked(store.lock_path)))
            return _real(*args)

        monkeypatch.setattr(owner, name, recording)
    report = fsck(store, verify=verify)
    assert report.clean, report.problems
    assert held == [("map", True), ("all", True)]


def test_a_layer_the_re_hashing_suspects_is_looked_at_again_under_the_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-hashing runs without the lock: what it saw of a layer a pull was replacing
    meanwhile is not a finding unless the layer is still wrong under the lock."""
    real = store.layers.verify
    seen: list[str] = []

    def first_time_wrong(diff_id: str) -> Iterator[str]:
        seen.append(diff_id)
        if diff_id == DIFF_A and seen.count(diff_id) == 1:
            yield f"layer {diff_id}: content hashes to something else"
            return
        yield from real(diff_id)

    monkeypatch.setattr(store.layers, "verify", first_time_wrong)
    report = fsck(store, verify=True)
    assert report.clean, report.problems
    assert seen.count(DIFF_A) == 2 and seen.count(DIFF_B) == 1
    assert not (store.layers.path(DIFF_A) / "damaged").exists()
    assert report.clean
    assert (report.checked_layers, report.checked_images, report.checked_tags) == (2, 3, 3)


def test_an_empty_store_is_clean(tmp_path: Path) -> None:
    report = fsck(Store.open(tmp_path / "empty"))
    assert report.clean and report.checked_layers == report.checked_images == 0


def test_progress_is_reported_per_layer(store: Store) -> None:
    class FakeProgress:
        def __init__(self) -> None:
            self.calls: list[tuple[str, ...]] = []

        def start(self, key: str, label: str, total: int | None = None) -> None:
            self.calls.append(("start", key, label, str(total)))

        def advance(self, key: str, n: int) -> None:
            self.calls.append(("advance", key, str(n)))

    progress = FakeProgress()
    fsck(store, progress=progress)  # type: ignore[arg-type]
    assert progress.calls == [
        ("start", "fsck", "Checking layers", "2"),
        ("advance", "fsck", "1"),
        ("advance", "fsck", "1"),
    ]


def test_a_flipped_byte_in_a_layer_is_found_by_verify_naming_its_images(store: Store) -> None:
    image = ids(store)
    tar = store.layers.tar_path(DIFF_A)
    data = bytearray(tar.read_bytes())
    data[1024] ^= 0x20  # "shell" -> "Shell": file data, the headers stay valid
    tar.write_bytes(bytes(data))
    assert fsck(store).clean  # same size: only re-hashing finds it
    report = fsck(store, verify=True)
    # Every image whose chain holds the layer is named: by its tags, else its short ID.
    assert only_problem(report).startswith(f"layer {DIFF_A}: content hashes to sha256:")
    assert only_problem(report).endswith(" (used by app:base, app:latest, old:1)")
    assert report.damaged_layers == [DIFF_A]
    assert store.layers.is_damaged(DIFF_A)  # a pull of these images fetches it again
    assert not report.clean
    assert image["top"] in store.graph.ids()


def test_a_truncated_layer_is_found_without_verify(store: Store) -> None:
    tar = store.layers.tar_path(DIFF_B)
    tar.write_bytes(tar.read_bytes()[:1024])
    assert only_problem(fsck(store)) == (
        f"layer {DIFF_B}: layer.tar has 1024 bytes, info.json records 10240 (used by app:latest)"
    )


def test_progress_names_verify(store: Store) -> None:
    calls = []

    class FakeProgress:
        def start(self, key: str, label: str, total: int | None = None) -> None:
            calls.append(label)

        def advance(self, key: str, n: int) -> None:
            pass

    fsck(store, verify=True, progress=FakeProgress())  # type: ignore[arg-type]
    assert calls == ["Verifying layers"]


def test_a_tampered_index_is_found_by_verify(store: Store) -> None:
    from layerfs.store import codec

    path = store.layers.path(DIFF_A) / "index"
    doc = codec.unpack(path.read_bytes(), what="index")
    doc["entries"][1][2] = 0o6755
    path.write_bytes(codec.pack(doc))
    assert only_problem(fsck(store, verify=True)) == (
        f"layer {DIFF_A}: index does not match the tar (used by app:base, app:latest, old:1)"
    )


def test_a_truncated_index_is_found_by_verify(store: Store) -> None:
    path = store.layers.path(DIFF_B) / "index"
    path.write_bytes(path.read_bytes()[:-7])
    problem = only_problem(fsck(store, verify=True))
    assert problem.startswith(f"layer {DIFF_B}: ") and "index" in problem
    assert problem.endswith("(used by app:latest)")


def test_a_config_edited_by_hand_is_found_once(store: Store) -> None:
    top = ids(store)["top"]
    path = store.graph.root / top / "json"
    path.write_bytes(path.read_bytes().replace(b'"os":"linux"', b'"os":"plan9"'))
    assert only_problem(fsck(store, verify=True)) == (
        f"image {top[:12]}: config does not hash to its ID (tagged app:latest)"
    )


def test_verify_clears_the_mark_of_a_layer_that_is_whole_again(store: Store) -> None:
    tar = store.layers.tar_path(DIFF_B)
    good = tar.read_bytes()
    tar.write_bytes(good.replace(b"box", b"Box"))
    fsck(store, verify=True)
    assert store.layers.is_damaged(DIFF_B)
    tar.write_bytes(good)
    assert fsck(store, verify=True).clean
    assert not store.layers.is_damaged(DIFF_B)


def test_repair_drops_the_images_of_a_damaged_layer_and_keeps_the_rest(store: Store) -> None:
    image = ids(store)
    tar = store.layers.tar_path(DIFF_B)
    tar.write_bytes(tar.read_bytes().replace(b"box", b"Box"))
    report = fsck(store, verify=True, repair=True)
    assert report.problems == []
    assert f"removed image {image['top'][:12]} (its chain has a damaged layer)" in report.repaired
    assert f"removed damaged layer {DIFF_B}" in report.repaired
    assert "untagged app:latest" in report.repaired
    assert sorted(store.graph.ids()) == sorted([image["base"], image["legacy"]])
    assert store.tags.all() == {"app": {"base": image["base"]}, "old": {"1": image["legacy"]}}
    assert not store.layers.exists(DIFF_B)
    assert fsck(store, verify=True).clean


def test_a_missing_parent_is_reported(store: Store) -> None:
    image = ids(store)
    store.graph.delete(image["base"])  # Graph.delete does not look at children
    report = fsck(store)
    assert (
        f"image {image['top'][:12]}: parent {image['base'][:12]} is missing (tagged app:latest)"
        in report.problems
    )
    assert f"tag app:base points to missing image {image['base'][:12]}" in report.problems
    assert len(report.problems) == 2


def test_a_missing_layer_is_reported(store: Store) -> None:
    image = ids(store)
    store.layers.delete(DIFF_B)
    assert only_problem(fsck(store)) == (
        f"image {image['top'][:12]}: layer {DIFF_B} is missing (tagged app:latest)"
    )


def test_a_tag_to_a_missing_image_is_reported(store: Store) -> None:
    missing = fake_image_id("gone")
    repos = json.loads(store.tags.path.read_bytes())
    repos["Repositories"]["ghost"] = {"v1": missing}
    store.tags.path.write_text(json.dumps(repos))
    report = fsck(store)
    assert only_problem(report) == f"tag ghost:v1 points to missing image {missing[:12]}"
    assert report.checked_tags == 4


def test_a_corrupt_image_json_is_reported_once_with_its_tags(store: Store) -> None:
    legacy = ids(store)["legacy"]
    (store.graph.root / legacy / "json").write_bytes(b"{not json")
    problem = only_problem(fsck(store))
    assert problem.startswith(f"image {legacy[:12]}: ") and "corrupt json" in problem
    # the tag to it is named there, not reported a second time as a missing image
    assert problem.endswith(" (tagged old:1)")


def test_a_config_that_does_not_hash_to_its_id_is_reported(store: Store) -> None:
    top = ids(store)["top"]
    path = store.graph.root / top / "json"
    path.write_bytes(path.read_bytes() + b" ")
    assert only_problem(fsck(store)) == (
        f"image {top[:12]}: config does not hash to its ID (tagged app:latest)"
    )


def test_diff_ids_that_do_not_match_the_chain_are_reported(store: Store) -> None:
    base = ids(store)["base"]
    doc = {"rootfs": {"type": "layers", "diff_ids": [DIFF_A, DIFF_C]}, "os": "linux"}
    raw = canonical_json(doc)
    image_id = sha256_digest(raw)[7:]
    store.graph.register(raw, image_id, parent=base, layer=DIFF_B)
    assert only_problem(fsck(store)) == (
        f"image {image_id[:12]}: rootfs.diff_ids do not match its chain's layers"
    )


def test_staging_of_a_dead_process_is_swept_before_fsck_looks(store: Store) -> None:
    pid = dead_pid()
    stale = store.tmp / f"layer-{pid}-abc"
    stale.mkdir()
    (stale / "layer.tar").write_bytes(b"half")
    mine = store.tmp / f"layer-{os.getpid()}-def"  # a live writer's: kept
    mine.mkdir()
    assert stale_tmp_entries(store) == [stale]
    report = fsck(store)
    assert report.clean and report.repaired == []
    assert not stale.exists() and mine.exists()


def test_tmp_entries_without_a_pid_count_as_stale(store: Store) -> None:
    (store.tmp / "stray").write_bytes(b"")
    (store.tmp / "write-notapid-x").write_bytes(b"")
    assert sorted(p.name for p in stale_tmp_entries(store)) == ["stray", "write-notapid-x"]


def test_an_unused_layer_is_a_leftover_unless_held(store: Store) -> None:
    publish(store, LAYER_C)
    report = fsck(store)
    assert report.problems == []
    assert report.leftovers == [f"layer {DIFF_C} is used by no image"]
    store.graph.retain("pull", DIFF_C)
    assert fsck(store).clean  # a pull is about to use it
    store.graph.release("pull")


def test_repair_removes_unused_layers_and_released_holds(store: Store) -> None:
    pid = dead_pid()
    (store.tmp / f"image-{pid}-0a1b").mkdir()
    live = store.tmp / f"layer-{os.getpid()}-keep"
    live.mkdir()
    publish(store, LAYER_C)
    store.graph.retain("s", fake_image_id("h1"))
    store.graph.release("s")  # leaves a released hold file behind

    report = fsck(store, repair=True)

    assert report.repaired == [f"removed unused layer {DIFF_C}"]
    assert report.leftovers == [] and report.problems == []
    assert not store.layers.exists(DIFF_C)
    assert sorted(p.name for p in store.tmp.iterdir()) == [live.name]
    assert list(store.graph.holds_root.iterdir()) == []
    assert store.layers.exists(DIFF_A) and store.layers.exists(DIFF_B)
    assert fsck(store).clean


def test_repair_keeps_held_layers_and_does_not_hide_problems(store: Store) -> None:
    publish(store, LAYER_C)
    store.graph.retain("pull", DIFF_C)
    store.layers.delete(DIFF_B)
    report = fsck(store, repair=True)
    assert store.layers.exists(DIFF_C)
    assert report.repaired == []
    assert len(report.problems) == 1 and not report.clean
    store.graph.release("pull")


# -- gc ---------------------------------------------------------------------------------------


def test_gc_removes_unused_layers_stale_staging_and_released_holds(store: Store) -> None:
    pid = dead_pid()
    (store.tmp / f"layer-{pid}-aaaa").mkdir()
    publish(store, LAYER_C)
    store.graph.retain("s", DIFF_A)
    store.graph.release("s")
    removed = gc(store)
    assert removed == [DIFF_C]  # the dead process's staging went when gc took the lock
    assert list(store.tmp.iterdir()) == []
    assert list(store.graph.holds_root.iterdir()) == []
    assert store.layers.diff_ids() == sorted([DIFF_A, DIFF_B])
    assert gc(store) == []
    assert fsck(store).clean


def test_gc_after_deleting_images(store: Store) -> None:
    image = ids(store)
    store.tags.delete("old")
    store.graph.delete(image["legacy"])
    assert gc(store) == []  # DIFF_A is still used by the base image
    store.tags.delete("app")
    store.graph.delete(image["top"])  # its layer goes with it: nothing left for gc
    assert gc(store) == []
    assert store.layers.diff_ids() == [DIFF_A]


def test_gc_keeps_held_layers(store: Store) -> None:
    publish(store, LAYER_C)
    store.graph.retain("mount", DIFF_C)
    assert gc(store) == []
    assert store.layers.exists(DIFF_C)
    store.graph.release("mount")
    assert gc(store) == [DIFF_C]


def test_a_pull_fetches_a_damaged_layer_again(tmp_path: Path) -> None:
    import gzip

    from layerfs.registry.client import RegistryOptions
    from layerfs.transfer import pull
    from tests.fake_registry import image_documents, running

    store = Store.open(tmp_path / "pulled")
    blobs = [gzip.compress(x, mtime=0) for x in (LAYER_A, LAYER_B)]
    config, manifest = image_documents(blobs, [DIFF_A, DIFF_B])
    with running() as reg:
        for blob in [*blobs, config]:
            reg.add_blob("lib/app", blob)
        reg.add_manifest(
            "lib/app", "1", manifest, "application/vnd.docker.distribution.manifest.v2+json"
        )
        options = RegistryOptions(insecure_registries=(reg.host,), retries=0, use_config=False)
        name = f"{reg.host}/lib/app:1"
        assert pull(store, name, options=options).layers_copied == 2
        assert pull(store, name, options=options).layers_copied == 0  # up to date
        tar = store.layers.tar_path(DIFF_B)
        tar.write_bytes(tar.read_bytes().replace(b"box", b"Box"))
        assert pull(store, name, options=options).layers_copied == 0  # not verified yet
        assert not fsck(store, verify=True).clean
        again = pull(store, name, options=options)
        assert (again.layers_copied, again.layers_skipped) == (1, 1)
    assert fsck(store, verify=True).clean
    assert not store.layers.is_damaged(DIFF_B)
    assert store.layers.tar_path(DIFF_B).read_bytes() == LAYER_B


def test_repair_fetches_a_damaged_layer_again_from_where_it_was_pulled(tmp_path: Path) -> None:
    import gzip

    from layerfs.registry.client import RegistryOptions
    from layerfs.transfer import pull
    from layerfs.transports.refetch import refetch_layer
    from tests.fake_registry import image_documents, running

    store = Store.open(tmp_path / "pulled")
    blobs = [gzip.compress(x, mtime=0) for x in (LAYER_A, LAYER_B)]
    config, manifest = image_documents(blobs, [DIFF_A, DIFF_B])
    options = RegistryOptions(retries=0, use_config=False)
    with running() as reg:
        for blob in [*blobs, config]:
            reg.add_blob("lib/app", blob)
        media = "application/vnd.docker.distribution.manifest.v2+json"
        reg.add_manifest("lib/app", "1", manifest, media)
        pull(store, f"{reg.host}/lib/app:1", options=options)
        before = sorted(store.graph.ids())
        tar = store.layers.tar_path(DIFF_B)
        tar.write_bytes(tar.read_bytes().replace(b"box", b"Box"))
        report = fsck(
            store, verify=True, repair=True, refetch=lambda d: refetch_layer(store, d, options)
        )
    assert report.problems == []
    assert report.repaired == [f"fetched layer {DIFF_B} again from {reg.host}/lib/app"]
    assert sorted(store.graph.ids()) == before  # no image was dropped
    assert store.layers.tar_path(DIFF_B).read_bytes() == LAYER_B
    assert fsck(store, verify=True).clean
