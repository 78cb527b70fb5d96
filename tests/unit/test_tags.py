"""Tests for layerfs.store.tags: the TagStore over Docker's legacy repositories file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.errors import (
    AmbiguousIDError,
    ConflictError,
    ImageNotFoundError,
    IntegrityError,
    InvalidReferenceError,
    TagNotFoundError,
    UsageError,
)
from layerfs.store import tags as tags_module
from layerfs.store.files import locked as real_locked
from layerfs.store.tags import TagStore


def make_id(prefix: str = "", seed: str = "") -> str:
    """A 64-hex image ID starting with ``prefix``."""
    tail = hashlib.sha256((prefix + seed).encode()).hexdigest()
    return (prefix + tail)[:64]


ID_A = make_id("aaaa")
ID_B = make_id("bbbb")
ID_C = make_id("cccc")
DIGEST = "sha256:" + make_id("dddd")
DIGEST_2 = "sha256:" + make_id("eeee")


@dataclass(frozen=True)
class FakeImage:
    id: str


class FakeGraph:
    """A graph of known IDs resolving unique prefixes, like Docker's truncindex."""

    def __init__(self, *ids: str) -> None:
        self.ids = set(ids)
        self.calls: list[str] = []

    def get(self, name: str) -> FakeImage:
        self.calls.append(name)
        if name == "":
            raise UsageError("Prefix can't be empty")
        matches = sorted(i for i in self.ids if i.startswith(name))
        if not matches:
            raise ImageNotFoundError(f"no such id: {name}")
        if len(matches) > 1:
            raise AmbiguousIDError("Multiple IDs found with provided prefix")
        return FakeImage(matches[0])


def open_store(root: Path, graph: FakeGraph) -> TagStore[FakeImage]:
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    return TagStore(root / "repositories-layerfs", graph, tmp, root / "repositories.lock")


@pytest.fixture
def graph() -> FakeGraph:
    return FakeGraph(ID_A, ID_B, ID_C)


@pytest.fixture
def store(tmp_path: Path, graph: FakeGraph) -> TagStore[FakeImage]:
    return open_store(tmp_path, graph)


def read_file(store: TagStore[FakeImage]) -> object:
    return json.loads(store.path.read_bytes())


def file_identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


# -- the file ----------------------------------------------------------------------------------


def test_missing_file_is_an_empty_store(store: TagStore[FakeImage]) -> None:
    assert store.all() == {}
    assert store.get("busybox") is None
    assert store.by_id() == {}
    assert store.get_repo_refs() == {}
    assert not store.path.exists()  # reading never creates the file


def test_file_is_docker_legacy_format_with_mode_0600(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.set_digest("busybox", DIGEST, ID_A)
    raw = store.path.read_bytes()
    expected = {"Repositories": {"busybox": {"latest": ID_A, DIGEST: ID_A}}}
    assert json.loads(raw) == expected
    # Go's json.Marshal: compact, sorted keys, no trailing newline.
    assert raw == json.dumps(expected, separators=(",", ":"), sort_keys=True).encode()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert list((store.tmp_root).iterdir()) == []  # the temp file was renamed away


def test_reads_a_file_written_by_docker(tmp_path: Path, graph: FakeGraph) -> None:
    path = tmp_path / "repositories-layerfs"
    path.write_text(
        json.dumps(
            {
                "Repositories": {
                    "ubuntu": {"14.04": ID_A, "latest": ID_A},
                    "myhost:5000/app": {"v1": ID_B},
                }
            },
            indent=2,
        )
    )
    store = open_store(tmp_path, graph)
    assert store.get("ubuntu") == {"14.04": ID_A, "latest": ID_A}
    assert store.lookup_image("myhost:5000/app:v1").id == ID_B
    assert store.by_id() == {ID_A: ["ubuntu:14.04", "ubuntu:latest"], ID_B: ["myhost:5000/app:v1"]}


def test_null_repositories_is_empty(tmp_path: Path, graph: FakeGraph) -> None:
    store = open_store(tmp_path, graph)
    store.path.write_text('{"Repositories":null}')
    assert store.all() == {}
    store.tag("busybox", "", ID_A)
    assert read_file(store) == {"Repositories": {"busybox": {"latest": ID_A}}}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[]",
        b"{}",
        b'{"Repositories": []}',
        b'{"Repositories": {"busybox": ["latest"]}}',
        b'{"Repositories": {"busybox": {"latest": 5}}}',
        b"\xff\xfe",
    ],
)
def test_malformed_file_is_an_integrity_error(
    tmp_path: Path, graph: FakeGraph, content: bytes
) -> None:
    store = open_store(tmp_path, graph)
    store.path.write_bytes(content)
    with pytest.raises(IntegrityError, match="repositories-layerfs") as info:
        store.all()
    assert str(store.path) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(IntegrityError):
        store.tag("busybox", "latest", ID_A)
    assert store.path.read_bytes() == content  # a broken file is never overwritten


# -- tag ---------------------------------------------------------------------------------------


def test_tag_stores_full_id_and_defaults_to_latest(store: TagStore[FakeImage]) -> None:
    assert store.tag("busybox", "", ID_A[:5]) is None
    assert store.get("busybox") == {"latest": ID_A}
    assert store.lookup_image("busybox").id == ID_A


@pytest.mark.parametrize(
    ("repo", "local"),
    [
        ("docker.io/library/busybox", "busybox"),
        ("index.docker.io/library/busybox", "busybox"),
        ("library/busybox", "busybox"),
        ("index.docker.io/user/x", "user/x"),
        ("localhost:5000/foo", "localhost:5000/foo"),
        ("myhost.com/a/b", "myhost.com/a/b"),
    ],
)
def test_tag_normalises_repository_names(store: TagStore[FakeImage], repo: str, local: str) -> None:
    store.tag(repo, "v1", ID_A)
    assert list(store.all()) == [local]
    assert store.get(repo) == {"v1": ID_A}
    assert store.get(local) == {"v1": ID_A}
    assert store.lookup_image(f"{repo}:v1").id == ID_A


def test_tag_conflict_without_force(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    with pytest.raises(ConflictError) as info:
        store.tag("busybox", "latest", ID_B)
    assert str(info.value) == (
        f"Conflict: Tag busybox:latest is already set to image {ID_A[:12]}, "
        "if you want to replace it, please use -f option"
    )
    assert store.get("busybox") == {"latest": ID_A}


def test_tag_conflict_even_for_the_same_image_without_force(store: TagStore[FakeImage]) -> None:
    # Docker 1.8: an existing tag without -f is a conflict, whatever it points to.
    store.tag("busybox", "latest", ID_A)
    with pytest.raises(ConflictError, match="already set to image"):
        store.tag("busybox", "latest", ID_A)
    assert store.get("busybox") == {"latest": ID_A}


def test_tag_force_moves_and_returns_rename_message(store: TagStore[FakeImage]) -> None:
    store.tag("localhost:5000/foo", "v1", ID_A)
    message = store.tag("localhost:5000/foo", "v1", ID_B, force=True)
    assert message == (
        f"The image localhost:5000/foo:v1 already exists, renaming the old one with ID "
        f"{ID_A[:12]} to empty string"
    )
    assert store.get("localhost:5000/foo") == {"v1": ID_B}


def test_tag_force_on_a_new_tag_returns_none(store: TagStore[FakeImage]) -> None:
    assert store.tag("busybox", "new", ID_A, force=True) is None
    assert store.get("busybox") == {"new": ID_A}


def test_tag_force_same_image_does_not_rewrite(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    before = file_identity(store.path)
    assert store.tag("busybox", "latest", ID_A, force=True) is None
    assert file_identity(store.path) == before


def test_tag_resolves_the_source_through_tags(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.tag("mine", "v1", "busybox")
    store.tag("mine", "v2", "busybox:latest")
    assert store.get("mine") == {"v1": ID_A, "v2": ID_A}


def test_tag_unknown_image(store: TagStore[FakeImage]) -> None:
    with pytest.raises(ImageNotFoundError, match=r"^No such image: nosuch$"):
        store.tag("busybox", "latest", "nosuch")
    assert not store.path.exists()


@pytest.mark.parametrize(
    ("repo", "tag", "message"),
    [
        ("Busybox", "latest", "repository name must be lowercase"),
        ("scratch", "latest", "'scratch' is a reserved name"),
        ("docker.io/library/scratch", "latest", "'scratch' is a reserved name"),
        ("sha256", "latest", "ambiguous tag using digest algorithm"),
        (ID_A, "latest", "cannot specify 64-byte hexadecimal strings"),
        ("localhost:5000/" + ID_A, "latest", "cannot specify 64-byte hexadecimal strings"),
        ("", "latest", "Repository name can't be empty"),
        ("busybox", "x" * 129, "Illegal tag name"),
        ("busybox", ".hidden", "Illegal tag name"),
        ("busybox", DIGEST, "Illegal tag name"),  # digests go through set_digest
    ],
)
def test_tag_rejects_invalid_names(
    store: TagStore[FakeImage], repo: str, tag: str, message: str
) -> None:
    with pytest.raises(InvalidReferenceError, match=message):
        store.tag(repo, tag, ID_A)
    assert not store.path.exists()


def test_tag_accepts_128_character_tag(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "t" * 128, ID_A)
    assert store.get("busybox") == {"t" * 128: ID_A}


# -- set_digest --------------------------------------------------------------------------------


def test_set_digest(store: TagStore[FakeImage]) -> None:
    store.set_digest("docker.io/library/busybox", DIGEST, ID_A)
    assert store.get("busybox") == {DIGEST: ID_A}
    assert store.lookup_image(f"busybox@{DIGEST}").id == ID_A


def test_set_digest_is_never_overwritten(store: TagStore[FakeImage]) -> None:
    store.set_digest("busybox", DIGEST, ID_A)
    with pytest.raises(ConflictError) as info:
        store.set_digest("busybox", DIGEST, ID_B)
    assert str(info.value) == f"Conflict: Digest {DIGEST} is already set to image {ID_A[:12]}"
    assert store.get("busybox") == {DIGEST: ID_A}
    # Forcing a tag cannot reach a digest key either.
    with pytest.raises(InvalidReferenceError):
        store.tag("busybox", DIGEST, ID_B, force=True)
    assert store.get("busybox") == {DIGEST: ID_A}


def test_set_digest_same_image_is_a_no_op(store: TagStore[FakeImage]) -> None:
    store.set_digest("busybox", DIGEST, ID_A)
    before = file_identity(store.path)
    store.set_digest("busybox", DIGEST, ID_A)
    assert file_identity(store.path) == before
    assert store.get("busybox") == {DIGEST: ID_A}


@pytest.mark.parametrize("digest", ["sha256:b", "sha256:" + ID_A.upper(), ID_A, "latest"])
def test_set_digest_rejects_invalid_digest(store: TagStore[FakeImage], digest: str) -> None:
    with pytest.raises(InvalidReferenceError, match="digest"):
        store.set_digest("busybox", digest, ID_A)
    assert not store.path.exists()


def test_set_digest_rejects_invalid_repo_and_unknown_image(store: TagStore[FakeImage]) -> None:
    with pytest.raises(InvalidReferenceError, match="'scratch' is a reserved name"):
        store.set_digest("scratch", DIGEST, ID_A)
    with pytest.raises(ImageNotFoundError, match="No such image: ffff"):
        store.set_digest("busybox", DIGEST, "ffff")
    assert not store.path.exists()


# -- delete / delete_all -----------------------------------------------------------------------


def test_delete_a_ref(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.tag("busybox", "1", ID_A)
    assert store.delete("busybox", "latest") is True
    assert store.get("busybox") == {"1": ID_A}
    assert store.delete("docker.io/library/busybox", "1") is True  # normalised
    assert store.get("busybox") is None  # an emptied repository is dropped
    assert read_file(store) == {"Repositories": {}}


def test_delete_a_digest_ref(store: TagStore[FakeImage]) -> None:
    store.set_digest("busybox", DIGEST, ID_A)
    store.tag("busybox", "latest", ID_A)
    assert store.delete("busybox", DIGEST) is True
    assert store.get("busybox") == {"latest": ID_A}


def test_delete_absent_ref_returns_false_without_rewrite(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    before = file_identity(store.path)
    assert store.delete("busybox", "nosuch") is False
    assert file_identity(store.path) == before
    assert store.get("busybox") == {"latest": ID_A}


def test_delete_unknown_repository(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    with pytest.raises(TagNotFoundError, match=r"^No such repository: nosuch$"):
        store.delete("nosuch", "latest")
    with pytest.raises(TagNotFoundError, match=r"^No such repository: nosuch$"):
        store.delete("docker.io/library/nosuch", "latest")


def test_delete_whole_repository(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.set_digest("busybox", DIGEST, ID_A)
    store.tag("other", "latest", ID_B)
    assert store.delete("busybox") is True
    assert store.all() == {"other": {"latest": ID_B}}
    before = file_identity(store.path)
    assert store.delete("busybox", "") is True  # absent: still true, nothing written
    assert file_identity(store.path) == before


def test_delete_all_handles_ports_and_digests(store: TagStore[FakeImage]) -> None:
    # Legacy DeleteAll split "name:ref" on ':' and broke on both of these.
    store.tag("localhost:5000/foo", "bar", ID_A)
    store.set_digest("repo", DIGEST, ID_A)
    store.tag("repo", "latest", ID_B)
    store.tag("busybox", "latest", ID_A)
    store.set_digest("localhost:5000/foo", DIGEST_2, ID_A)
    removed = store.delete_all(ID_A)
    assert removed == [
        "busybox:latest",
        "localhost:5000/foo:bar",
        f"localhost:5000/foo@{DIGEST_2}",
        f"repo@{DIGEST}",
    ]
    assert store.all() == {"repo": {"latest": ID_B}}
    assert not store.has_references(ID_A)


def test_delete_all_unknown_id_changes_nothing(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    before = file_identity(store.path)
    assert store.delete_all(ID_B) == []
    assert store.delete_all(ID_A[:12]) == []  # exact IDs only
    assert file_identity(store.path) == before
    assert store.get("busybox") == {"latest": ID_A}


# -- queries -----------------------------------------------------------------------------------


def test_get_returns_a_copy(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    refs = store.get("busybox")
    assert refs == {"latest": ID_A}
    refs["evil"] = ID_B
    assert store.get("busybox") == {"latest": ID_A}
    snapshot = store.all()
    snapshot.clear()
    assert store.all() == {"busybox": {"latest": ID_A}}


def test_get_image(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.set_digest("busybox", DIGEST, ID_B)
    image = store.get_image("busybox", "latest")
    assert image is not None and image.id == ID_A
    image = store.get_image("docker.io/library/busybox", DIGEST)
    assert image is not None and image.id == ID_B
    assert store.get_image("busybox", "nosuch") is None
    assert store.get_image("nosuch", "latest") is None


def test_get_image_by_short_id_within_repo(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    image = store.get_image("busybox", ID_A[:12])
    assert image is not None and image.id == ID_A
    image = store.get_image("busybox", ID_A)
    assert image is not None and image.id == ID_A
    assert store.get_image("busybox", ID_A[:11]) is None  # under 12 chars: no prefix match
    assert store.get_image("busybox", ID_B[:12]) is None  # not in this repository
    assert store.get_image("other", ID_A[:12]) is None


def test_get_image_short_id_picks_in_sorted_ref_order(tmp_path: Path) -> None:
    twin_1 = make_id("abcdef123456", "1")
    twin_2 = make_id("abcdef123456", "2")
    graph = FakeGraph(twin_1, twin_2)
    store = open_store(tmp_path, graph)
    store.tag("repo", "b", twin_1)
    store.tag("repo", "a", twin_2)
    image = store.get_image("repo", "abcdef123456")
    assert image is not None and image.id == twin_2  # ref "a" sorts first


def test_get_image_propagates_graph_errors(tmp_path: Path) -> None:
    graph = FakeGraph(ID_A)
    store = open_store(tmp_path, graph)
    store.tag("busybox", "latest", ID_A)
    graph.ids.clear()  # the image left the graph behind the tag store's back
    with pytest.raises(ImageNotFoundError, match="no such id"):
        store.get_image("busybox", "latest")


def test_lookup_image_resolution_order(tmp_path: Path) -> None:
    # "abcdef123456" is a repository with latest and also a prefix of another image's ID.
    id_prefixed = make_id("abcdef123456")
    graph = FakeGraph(ID_A, id_prefixed)
    store = open_store(tmp_path, graph)
    store.tag("abcdef123456", "latest", ID_A)
    assert store.lookup_image("abcdef123456").id == ID_A  # (1) the repository wins
    assert store.lookup_image("abcdef1234").id == id_prefixed  # (3) global ID prefix
    store.tag("busybox", "latest", ID_A)
    assert store.lookup_image("busybox:" + ID_A[:12]).id == ID_A  # (2) ID within the repo
    assert store.lookup_image(id_prefixed).id == id_prefixed


def test_lookup_image_forms(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.tag("localhost:5000/foo", "v1", ID_B)
    store.set_digest("busybox", DIGEST, ID_C)
    assert store.lookup_image("busybox").id == ID_A
    assert store.lookup_image("busybox:latest").id == ID_A
    assert store.lookup_image("docker.io/library/busybox:latest").id == ID_A
    assert store.lookup_image(f"busybox@{DIGEST}").id == ID_C
    assert store.lookup_image("localhost:5000/foo:v1").id == ID_B
    assert store.lookup_image(ID_C[:4]).id == ID_C
    with pytest.raises(ImageNotFoundError, match=r"^No such image: localhost:5000/foo$"):
        store.lookup_image("localhost:5000/foo")  # no tag: latest, which is absent


def test_lookup_image_falls_back_to_the_whole_string(tmp_path: Path) -> None:
    graph = FakeGraph(ID_A)
    store = open_store(tmp_path, graph)
    store.tag("busybox", "latest", ID_A)
    with pytest.raises(ImageNotFoundError, match=r"^No such image: busybox:nosuch$") as info:
        store.lookup_image("busybox:nosuch")
    assert graph.calls[-1] == "busybox:nosuch"
    assert isinstance(info.value.__cause__, ImageNotFoundError)


def test_lookup_image_passes_graph_usage_errors(tmp_path: Path) -> None:
    graph = FakeGraph(make_id("ab", "1"), make_id("ab", "2"))
    store = open_store(tmp_path, graph)
    with pytest.raises(AmbiguousIDError):
        store.lookup_image("ab")
    with pytest.raises(UsageError, match="Prefix can't be empty"):
        store.lookup_image("")


def test_by_id_and_references(store: TagStore[FakeImage]) -> None:
    store.tag("zeta", "latest", ID_A)
    store.tag("alpha", "2", ID_A)
    store.set_digest("alpha", DIGEST, ID_A)
    store.tag("localhost:5000/foo", "x", ID_B)
    expected_a = ["alpha:2", f"alpha@{DIGEST}", "zeta:latest"]
    assert store.by_id() == {ID_A: expected_a, ID_B: ["localhost:5000/foo:x"]}
    assert store.references(ID_A) == expected_a
    assert store.references(ID_C) == []
    assert store.has_references(ID_A) is True
    assert store.has_references(ID_C) is False


def test_image_name(store: TagStore[FakeImage]) -> None:
    store.tag("zeta", "latest", ID_A)
    store.tag("alpha", "1", ID_A)
    assert store.image_name(ID_A) == "alpha:1"
    assert store.image_name(ID_B) == ID_B[:12]


def test_get_repo_refs(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.tag("busybox", "1", ID_A)
    store.set_digest("other", DIGEST, ID_B)
    assert store.get_repo_refs() == {
        ID_A[:12]: ["busybox:1", "busybox:latest"],
        ID_B[:12]: [f"other@{DIGEST}"],
    }


def test_get_id(store: TagStore[FakeImage]) -> None:
    store.tag("busybox", "latest", ID_A)
    store.set_digest("busybox", DIGEST, ID_B)
    assert store.get_id("busybox") == ID_A
    assert store.get_id("docker.io/library/busybox:latest") == ID_A
    assert store.get_id(f"busybox@{DIGEST}") == ID_B
    for name in ("busybox:nosuch", "nosuch", ID_A, f"busybox:{ID_A[:12]}"):
        with pytest.raises(TagNotFoundError, match="image with specified name does not exist"):
            store.get_id(name)


def test_every_read_sees_other_writers(tmp_path: Path, graph: FakeGraph) -> None:
    first = open_store(tmp_path, graph)
    second = open_store(tmp_path, graph)
    first.tag("busybox", "latest", ID_A)
    assert second.get("busybox") == {"latest": ID_A}
    second.tag("busybox", "latest", ID_B, force=True)
    assert first.lookup_image("busybox").id == ID_B


def test_mutations_take_the_lock_unless_told_the_caller_holds_it(
    store: TagStore[FakeImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[Path] = []

    @contextlib.contextmanager
    def recording_locked(path: Path) -> Iterator[None]:
        taken.append(path)
        with real_locked(path):
            yield

    monkeypatch.setattr(tags_module, "locked", recording_locked)
    store.tag("busybox", "latest", ID_A)
    store.set_digest("busybox", DIGEST, ID_A)
    store.delete("busybox", "latest")
    store.delete_all(ID_A)
    assert taken == [store.lock_path] * 4
    taken.clear()
    # A caller already holding the lock (rmi's one locked section) does not deadlock.
    with real_locked(store.lock_path):
        store.tag("busybox", "latest", ID_A)
        store.set_digest("busybox", DIGEST, ID_A)
        assert store.delete("busybox", "latest") is True
        assert store.delete_all(ID_A) == [f"busybox@{DIGEST}"]
    assert taken == [store.lock_path] * 4
    assert store.all() == {}


# -- concurrency -------------------------------------------------------------------------------

WRITES_PER_PROCESS = 50


def _tag_many(root: str, repo: str) -> None:
    store = open_store(Path(root), FakeGraph(ID_A, ID_B))
    for i in range(WRITES_PER_PROCESS):
        store.tag(repo, f"t{i}", ID_A if i % 2 else ID_B)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    open_store(tmp_path, FakeGraph())  # makes tmp/
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_tag_many, args=(str(tmp_path), r)) for r in ("one", "two/x")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    store = open_store(tmp_path, FakeGraph(ID_A, ID_B))
    expected = {f"t{i}": (ID_A if i % 2 else ID_B) for i in range(WRITES_PER_PROCESS)}
    assert store.all() == {"one": expected, "two/x": expected}
    assert list((tmp_path / "tmp").iterdir()) == []
    assert (tmp_path / "repositories.lock").exists()
