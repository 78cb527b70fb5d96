"""Tests for layerfs.listing, layerfs.prune and layerfs.diskusage: what ``images`` lists
under docker's filters, what ``image prune`` removes and what ``system df`` counts."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest

from layerfs.errors import UsageError
from layerfs.listing import (
    IMAGE_FILTERS,
    compile_pattern,
    image_rows,
    list_images,
    parse_filters,
)
from layerfs.prune import PRUNE_FILTERS, parse_go_duration, parse_until, prune_images
from layerfs.store import summaries
from layerfs.store.store import Store
from tests.helpers import build_tar, tar_file, tar_symlink

DIGEST = "sha256:" + "d" * 64


@pytest.fixture(params=["listed", "settled"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Each test runs twice: with the graph summaries checked against a listing of graph/
    on every read (as within two seconds of a change), and trusted on their stamp."""
    if request.param == "settled":
        monkeypatch.setattr(summaries, "RACY_NS", -(1 << 62))
    return Store.open(tmp_path / "store")


def make(
    store: Store,
    name: str,
    *,
    parent: str = "",
    day: int,
    labels: dict[str, str] | None = None,
) -> str:
    """An image with a layer of its own, created on 2024-01-<day>."""
    layer = store.layers.ingest(io.BytesIO(build_tar(tar_file(name, name.encode() * 10))))
    image = store.graph.create(
        layer,
        parent=parent,
        config={"Labels": labels} if labels else {},
        created=f"2024-01-{day:02d}T00:00:00Z",
    )
    return image.id


@pytest.fixture
def images(store: Store) -> dict[str, str]:
    """base (day 1) <- app (day 3, tagged app:1, app:2), lone (day 5, untagged head),
    tool (day 4, tools/tool:1, label tier=back), digested (day 2, only app@digest)."""
    ids = {
        "base": make(store, "base", day=1),
        "digested": make(store, "digested", day=2),
        "tool": make(store, "tool", day=4, labels={"tier": "back", "x": "y"}),
        "lone": make(store, "lone", day=5),
    }
    ids["app"] = make(store, "app", parent=ids["base"], day=3)
    store.tags.tag("app", "1", ids["app"])
    store.tags.tag("app", "2", ids["app"])
    store.tags.tag("tools/tool", "1", ids["tool"])
    store.tags.set_digest("app", DIGEST, ids["digested"])
    return ids


def listed(store: Store, *filters: str, all_images: bool = False) -> list[str]:
    found = list_images(
        store, all_images=all_images, filters=parse_filters(list(filters), IMAGE_FILTERS)
    )
    return [s.image.id for s in found]


def test_default_listing_is_tagged_images_and_heads_newest_first(
    store: Store, images: dict[str, str]
) -> None:
    assert listed(store) == [images[n] for n in ("lone", "tool", "app", "digested")]
    assert listed(store, all_images=True) == [
        images[n] for n in ("lone", "tool", "app", "digested", "base")
    ]


def test_a_tagged_parent_is_listed_and_an_untagged_one_only_with_all(
    store: Store, images: dict[str, str]
) -> None:
    assert images["base"] not in listed(store)
    store.tags.tag("base", "1", images["base"])
    assert listed(store) == [images[n] for n in ("lone", "tool", "app", "digested", "base")]
    assert listed(store, "dangling=false") == [
        images[n] for n in ("tool", "app", "digested", "base")
    ]
    assert listed(store, "dangling=true") == [images["lone"], images["digested"]]
    (base,) = [s for s in list_images(store) if s.image.id == images["base"]]
    (app,) = [s for s in list_images(store) if s.image.id == images["app"]]
    assert 0 < base.size < app.size


def test_dangling(store: Store, images: dict[str, str]) -> None:
    # Untagged heads, also one known only by a digest; never an intermediate image.
    assert listed(store, "dangling=true") == [images["lone"], images["digested"]]
    assert listed(store, "dangling=true", all_images=True) == [
        images["lone"],
        images["digested"],
    ]
    assert listed(store, "dangling=false") == [images["tool"], images["app"], images["digested"]]
    with pytest.raises(UsageError, match="dangling=true or dangling=false"):
        listed(store, "dangling=maybe")


def test_before_and_since(store: Store, images: dict[str, str]) -> None:
    assert listed(store, "before=tools/tool:1") == [images["app"], images["digested"]]
    assert listed(store, "since=app:1") == [images["lone"], images["tool"]]
    assert listed(store, "since=app:1", "before=" + images["lone"][:12]) == [images["tool"]]


def test_label(store: Store, images: dict[str, str]) -> None:
    assert listed(store, "label=tier") == [images["tool"]]
    assert listed(store, "label=tier=back", "label=x=y") == [images["tool"]]
    assert listed(store, "label=tier=front") == []


def test_reference_keeps_only_matching_names(store: Store, images: dict[str, str]) -> None:
    found = list_images(store, filters=parse_filters(["reference=app:2"], IMAGE_FILTERS))
    assert [(s.image.id, s.repo_tags, s.repo_digests) for s in found] == [
        (images["app"], ["app:2"], [])
    ]
    # A repository name matches its tags and digests; * does not cross a /.
    assert listed(store, "reference=app") == [images["app"], images["digested"]]
    assert listed(store, "reference=*/tool") == [images["tool"]]
    assert listed(store, "reference=*") == [images["app"], images["digested"]]
    assert listed(store, "reference=app", "reference=tools/*") == [
        images["tool"],
        images["app"],
        images["digested"],
    ]


def test_filter_syntax_errors() -> None:
    with pytest.raises(UsageError, match="expected name=value"):
        parse_filters(["dangling"], IMAGE_FILTERS)
    with pytest.raises(UsageError, match="invalid filter 'until'"):
        parse_filters(["until=1h"], IMAGE_FILTERS)
    assert parse_filters([" Label = a=b "], IMAGE_FILTERS) == {"label": ["a=b"]}
    with pytest.raises(UsageError, match="syntax error in pattern"):
        compile_pattern("app[")


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("app", "app", True),
        ("a*", "app", True),
        ("*", "team/app", False),
        ("*/*", "team/app", True),
        ("te?m/app", "team/app", True),
        ("[a-c]pp", "bpp", True),
        ("[^a-c]pp", "bpp", False),
        ("app\\*", "app*", True),
    ],
)
def test_go_path_match(pattern: str, name: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).regex.fullmatch(name)) is matches


def test_rows_per_tag_and_digest(store: Store, images: dict[str, str]) -> None:
    store.tags.set_digest("app", "sha256:" + "e" * 64, images["app"])
    store.tags.set_digest("mirror/app", "sha256:" + "f" * 64, images["app"])
    summary = next(s for s in list_images(store) if s.image.id == images["app"])
    plain = [(r.repository, r.tag, r.digest) for r in image_rows(summary, digests=False)]
    assert plain == [("app", "1", "<none>"), ("app", "2", "<none>"), ("mirror/app", "<none>", "")]
    with_digests = [(r.repository, r.tag, r.digest) for r in image_rows(summary, digests=True)]
    assert with_digests == [
        ("app", "1", "sha256:" + "e" * 64),
        ("app", "2", "sha256:" + "e" * 64),
        ("mirror/app", "<none>", "sha256:" + "f" * 64),
    ]


def test_an_untagged_image_known_by_digest_shows_its_name(
    store: Store, images: dict[str, str]
) -> None:
    summary = next(s for s in list_images(store) if s.image.id == images["digested"])
    assert [(r.repository, r.tag, r.digest) for r in image_rows(summary, digests=True)] == [
        ("app", "<none>", DIGEST)
    ]


def test_size_is_the_whole_chain(store: Store, images: dict[str, str]) -> None:
    sizes = {s.image.id: s.size for s in list_images(store, all_images=True)}
    assert sizes[images["base"]] == len(b"base") * 10
    assert sizes[images["app"]] == len(b"base") * 10 + len(b"app") * 10


def test_layer_size_counts_symlink_targets(store: Store) -> None:
    layer = store.layers.ingest(
        io.BytesIO(build_tar(tar_file("f", b"12345"), tar_symlink("l", "target")))
    )
    image = store.graph.create(layer)
    assert image.size == 5 + len("target")


# -- image prune -------------------------------------------------------------------------------


def test_prune_removes_dangling_images_only(store: Store, images: dict[str, str]) -> None:
    report = prune_images(store)
    assert ("deleted", "sha256:" + images["lone"]) in report.records
    assert ("untagged", f"app@{DIGEST}") in report.records
    assert not store.graph.exists(images["lone"]) and not store.graph.exists(images["digested"])
    assert all(store.graph.exists(images[n]) for n in ("base", "app", "tool"))
    assert report.reclaimed > 0


def test_prune_all_removes_every_image_nothing_holds(store: Store, images: dict[str, str]) -> None:
    store.graph.retain("mount", images["app"])
    report = prune_images(store, all_images=True)
    assert store.graph.ids() == sorted([images["app"], images["base"]])
    assert store.tags.references(images["app"]) == ["app:1", "app:2"]
    assert ("untagged", "tools/tool:1") in report.records
    store.graph.release("mount")
    prune_images(store, all_images=True)
    assert store.graph.ids() == [] and store.layers.diff_ids() == []


def test_prune_filters(store: Store, images: dict[str, str]) -> None:
    filters = parse_filters(["until=2024-01-04T12:00:00Z", "label!=tier"], PRUNE_FILTERS)
    prune_images(store, all_images=True, filters=filters)
    # tool has the label, lone is too new; app (and base with it), digested went.
    assert sorted(store.graph.ids()) == sorted([images["tool"], images["lone"]])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h", 86400.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("-2m", -120.0),
        ("0", 0.0),
        ("soon", None),
        ("10", None),
        ("1d", None),
    ],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    assert parse_go_duration(text) == seconds


def test_until_values() -> None:
    now = 1_700_000_000.0
    assert parse_until("1h", now) == datetime.fromtimestamp(now - 3600, UTC)
    assert parse_until("2024-01-02T03:04:05Z") == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_until("1700000000") == datetime.fromtimestamp(1_700_000_000, UTC)
    assert parse_until("2024-01-02").tzinfo is not None  # local time, as docker
    with pytest.raises(UsageError, match="failed to parse value as time or duration"):
        parse_until("yesterday")


# -- system df ---------------------------------------------------------------------------------


def test_disk_usage(store: Store, images: dict[str, str]) -> None:
    from layerfs.diskusage import disk_usage

    (store.root / "upper" / "kept").mkdir(parents=True)
    (store.root / "upper" / "kept" / "file").write_bytes(b"x" * 100)
    orphan = store.layers.ingest(io.BytesIO(build_tar(tar_file("orphan", b"o" * 50))))
    orphan.publish()
    rows = {r.kind: r for r in disk_usage(store)}
    assert (rows["Images"].total, rows["Images"].active) == (4, 0)
    assert rows["Images"].size == rows["Images"].reclaimable > 0
    layers = rows["Layers"]
    assert (layers.total, layers.active) == (6, 5)
    assert 0 < layers.reclaimable < layers.size
    assert (rows["Mounts"].total, rows["Mounts"].size) == (0, 0)
    assert (rows["Upper directories"].total, rows["Upper directories"].size) == (1, 100)
    assert rows["Upper directories"].reclaimable == 100
