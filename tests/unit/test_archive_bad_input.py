"""Every kind of bad archive: one-line error, nothing published, fsck clean, others untouched.

Each case starts from a store that already holds an image (and a canary directory beside
the store), loads a broken archive through the command line, and checks that the
command failed with one ``layerfs: error:`` line, that the store is exactly as before
(images, tags, layers; tmp/ empty; fsck clean) and that nothing was written outside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from layerfs.cli import main
from layerfs.store.check import fsck
from layerfs.store.store import Store
from tests.archive_builders import (
    Link,
    Members,
    compress,
    docker_members,
    hex_of,
    legacy_members,
    make_image,
    make_layer,
    oci_members,
    pack,
    sha256,
    write_dir,
)
from tests.helpers import build_tar, fake_image_id, tar_file

Mutation = Callable[[Members], object]

GOOD = make_image([make_layer("good")], ["canary:1"])
BAD = make_image([make_layer("bad-base"), make_layer("bad-top")], ["bad:1"])


def _snapshot(root: Path) -> dict[str, object]:
    store = Store.open(root)
    return {
        "images": store.graph.ids(),
        "tags": store.tags.all(),
        "layers": store.layers.diff_ids(),
    }


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "store"
    good = tmp_path / "good.tar"
    good.write_bytes(pack(docker_members([GOOD])))
    assert main(["--root", str(root), "load", "-q", "-i", str(good)]) == 0
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("untouched")
    return {"root": root, "tmp": tmp_path, "canary": canary}


def run_load(
    env: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    data: bytes | None = None,
    path: Path | None = None,
) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()
    before_store = _snapshot(env["root"])
    before_tree = sorted(p for p in os.listdir(env["tmp"]))
    if path is None:
        path = env["tmp"] / "input.tar"
        path.write_bytes(data or b"")
        before_tree = sorted(os.listdir(env["tmp"]))
    code = main(["--root", str(env["root"]), "load", "-q", "-i", str(path)])
    captured = capsys.readouterr()
    store = Store.open(env["root"])
    report = fsck(store)
    assert report.clean, report.problems + report.leftovers
    assert list(store.tmp.iterdir()) == []
    assert sorted(os.listdir(env["tmp"])) == before_tree
    assert os.listdir(env["canary"]) == ["keep"]
    assert store.tags.lookup_image("canary:1").id == GOOD.image_id
    if code != 0 and not captured.out:
        assert _snapshot(env["root"]) == before_store
    return code, captured.out.splitlines(), captured.err.splitlines()


def assert_one_line_error(result: tuple[int, list[str], list[str]], *words: str) -> None:
    code, out, err = result
    assert code != 0
    assert out == []
    assert len(err) == 1, err
    assert err[0].startswith("layerfs: error: "), err
    for word in words:
        assert word in err[0], err


# -- modern archives ------------------------------------------------------------------------


def _manifest(members: Members) -> list[dict[str, object]]:
    return json.loads(members["manifest.json"])  # type: ignore[arg-type]


def _set_manifest(members: Members, doc: object) -> None:
    members["manifest.json"] = json.dumps(doc).encode()


def _layer_path(members: Members, index: int) -> str:
    return _manifest(members)[0]["Layers"][index]  # type: ignore[index,return-value]


def _replace_config(members: Members, change: Callable[[dict[str, object]], None]) -> None:
    doc = json.loads(BAD.config)
    change(doc)
    _replace_config_bytes(members, json.dumps(doc).encode())


def _set_diff_ids(*ids: str) -> Callable[[dict[str, object]], None]:
    def change(doc: dict[str, object]) -> None:
        doc["rootfs"] = {"type": "layers", "diff_ids": list(ids)}

    return change


def _entry(change: Callable[[dict[str, object]], None]) -> Mutation:
    def mutate(members: Members) -> None:
        manifest = _manifest(members)
        change(manifest[0])
        _set_manifest(members, manifest)

    return mutate


MODERN_CASES: dict[str, tuple[Mutation, str]] = {
    "layer diff ID mismatch": (
        lambda m: m.__setitem__(_layer_path(m, 1), make_layer("other")),
        "diff ID mismatch",
    ),
    "config digest mismatch": (
        lambda m: m.__setitem__(f"{BAD.image_id}.json", BAD.config + b" "),
        "config digest mismatch",
    ),
    "diff_ids count": (
        lambda m: _replace_config(m, _set_diff_ids(*BAD.diff_ids, sha256(b"x"))),
        "3 diff_ids",
    ),
    "missing layer file": (
        _entry(lambda e: e["Layers"].__setitem__(0, "nope/layer.tar")),  # type: ignore[attr-defined]
        "'nope/layer.tar', which is not in",
    ),
    "missing config file": (_entry(lambda e: e.__setitem__("Config", "x.json")), "x.json"),
    "layer path with ..": (
        _entry(lambda e: e["Layers"].__setitem__(0, "../../etc/passwd")),  # type: ignore[attr-defined]
        "outside the archive",
    ),
    "absolute layer path": (
        _entry(lambda e: e["Layers"].__setitem__(0, "/etc/passwd")),  # type: ignore[attr-defined]
        "absolute path",
    ),
    "config path with ..": (_entry(lambda e: e.__setitem__("Config", "../x.json")), "outside"),
    "symlink leaving the archive": (
        lambda m: m.__setitem__(_layer_path(m, 0), Link("../../../../etc/passwd")),
        "outside the archive",
    ),
    "absolute symlink": (
        lambda m: m.__setitem__(_layer_path(m, 0), Link("/etc/passwd")),
        "absolute path",
    ),
    "symlink loop": (
        lambda m: m.__setitem__(_layer_path(m, 0), Link("layer.tar")),
        "too many levels of symlinks",
    ),
    "diff ID in upper case": (
        lambda m: _replace_config(m, _set_diff_ids(*[d.upper() for d in BAD.diff_ids])),
        "invalid digest",
    ),
    "diff ID sha512": (
        lambda m: _replace_config(m, _set_diff_ids("sha512:" + "ab" * 64, BAD.diff_ids[1])),
        "unsupported digest algorithm",
    ),
    "diff ID too short": (
        lambda m: _replace_config(m, _set_diff_ids("sha256:abc", BAD.diff_ids[1])),
        "invalid digest",
    ),
    "config not JSON": (lambda m: _replace_config_bytes(m, b"{"), "malformed JSON"),
    "config not an object": (lambda m: _replace_config_bytes(m, b"[]"), "expected a JSON object"),
    "config with duplicate keys": (
        lambda m: _replace_config_bytes(m, b'{"os":"linux","os":"windows"}'),
        "duplicate key 'os'",
    ),
    "config rootfs wrong type": (
        lambda m: _replace_config(m, lambda d: d.__setitem__("rootfs", 5)),
        "rootfs",
    ),
    "config diff_ids wrong type": (
        lambda m: _replace_config(m, lambda d: d.__setitem__("rootfs", {"diff_ids": "x"})),
        "diff_ids",
    ),
    "config created wrong type": (
        lambda m: _replace_config(m, lambda d: d.__setitem__("created", 12)),
        "created must be a string",
    ),
    "config history wrong type": (
        lambda m: _replace_config(m, lambda d: d.__setitem__("history", {"a": 1})),
        "history must be an array",
    ),
    "config huge number": (
        lambda m: _replace_config_bytes(m, b'{"architecture": 1e999}'),
        "out of range",
    ),
    "config number too long": (
        lambda m: _replace_config_bytes(m, b'{"size": ' + b"9" * 5000 + b"}"),
        "malformed JSON",
    ),
    "RepoTags not a list": (_entry(lambda e: e.__setitem__("RepoTags", "bad:1")), "RepoTags"),
    "RepoTags with a digest": (
        _entry(lambda e: e.__setitem__("RepoTags", ["bad@sha256:" + "a" * 64])),
        "not a name:tag",
    ),
    "RepoTags invalid name": (
        _entry(lambda e: e.__setitem__("RepoTags", ["Bad Name:1"])),
        "invalid reference format",
    ),
    "Layers null": (_entry(lambda e: e.__setitem__("Layers", None)), "Layers"),
    "Layers huge number": (
        lambda m: m.__setitem__("manifest.json", b'[{"Config":"x.json","Layers":[1e400]}]'),
        "out of range",
    ),
    "Config a number": (_entry(lambda e: e.__setitem__("Config", 5)), "Config"),
}


def _replace_config_bytes(members: Members, config: bytes) -> None:
    manifest = _manifest(members)
    del members[str(manifest[0]["Config"])]
    manifest[0]["Config"] = "config.json"
    members["config.json"] = config
    _set_manifest(members, manifest)


@pytest.mark.parametrize("case", list(MODERN_CASES))
def test_bad_modern_archive(env: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str):
    mutate, words = MODERN_CASES[case]
    members = docker_members([BAD])
    mutate(members)

    result = run_load(env, capsys, pack(members))

    assert_one_line_error(result, "cannot load", words)


ARCHIVE_CASES: dict[str, tuple[bytes, str]] = {
    "manifest.json not JSON": (pack({"manifest.json": b"[{"}), "malformed JSON"),
    "manifest.json null": (pack({"manifest.json": b"null"}), "manifest.json is null"),
    "manifest.json an object": (pack({"manifest.json": b"{}"}), "expected a JSON array"),
    "manifest.json duplicate keys": (
        pack({"manifest.json": b'[{"Config":"a","Config":"b"}]'}),
        "duplicate key",
    ),
    "not a tar": (b"this is not an archive at all" * 40, "not a tar archive"),
    "empty": (b"", "empty"),
    "no known documents": (pack({"hello.txt": b"hi"}), "unrecognized image format"),
    "oci-layout version": (
        pack({"oci-layout": b'{"imageLayoutVersion":"2.0.0"}', "index.json": b"{}"}),
        "unsupported OCI layout version",
    ),
}


@pytest.mark.parametrize("case", list(ARCHIVE_CASES))
def test_bad_archive(env: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str):
    data, words = ARCHIVE_CASES[case]

    result = run_load(env, capsys, data)

    assert_one_line_error(result, words)


def test_truncated_archive(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = pack(docker_members([BAD]))
    for cut in (len(data) // 2, 512 * 3 + 100, len(data) - 10240 - 200):
        result = run_load(env, capsys, data[:cut])
        assert_one_line_error(result, "truncated")


def test_truncated_compressed_archive(env: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    data = compress(pack(docker_members([BAD])), "gzip")

    result = run_load(env, capsys, data[: len(data) - 20])

    assert_one_line_error(result, "truncated")


def test_decompression_bombs(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("layerfs.compression.FREE_OUTPUT", 1 << 20)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "100")
    zeros = build_tar(tar_file("zeros", bytes(16 << 20)))
    bomb = make_image([zeros], ["bomb:1"])
    layer_bomb = pack(docker_members([bomb], layer_compression="gzip"))
    assert_one_line_error(run_load(env, capsys, layer_bomb), "decompression bomb")

    archive_bomb = compress(pack(docker_members([bomb])), "gzip")
    assert_one_line_error(run_load(env, capsys, archive_bomb), "decompression bomb")


def test_path_traversal_inside_a_layer(env: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    for name in ("../canary/pwned", "../../canary/pwned", "/../canary/pwned"):
        evil = make_image([build_tar(tar_file(name, b"pwned"))], ["evil:1"])
        result = run_load(env, capsys, pack(docker_members([evil])))
        assert_one_line_error(result, "evil:1")


def test_an_absolute_name_inside_a_layer_stays_inside(env: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    # As in Docker, "/abs/pwned" is the layer's own abs/pwned.
    image = make_image([build_tar(tar_file("/abs/pwned", b"inside"))], ["abs:1"])
    code, _, _ = run_load(env, capsys, pack(docker_members([image])))
    assert code == 0
    store = Store.open(env["root"])
    assert [e.path for e in store.layers.entries(image.diff_ids[0])] == [b"abs/pwned"]


def test_layer_writing_through_its_own_symlink(env, capsys) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import tar_symlink

    evil = make_image(
        [build_tar(tar_symlink("link", "../canary"), tar_file("link/pwned", b"x"))], ["evil:2"]
    )
    assert_one_line_error(run_load(env, capsys, pack(docker_members([evil]))), "link")


# -- legacy archives ------------------------------------------------------------------------


def _legacy(nodes: list[tuple[str, dict[str, object]]], repos: dict[str, dict[str, str]]) -> bytes:
    return pack(legacy_members([(i, doc, make_layer(i[:8])) for i, doc in nodes], repos))


A, B, C = (fake_image_id(x) for x in "abc")

LEGACY_CASES: dict[str, tuple[bytes, str]] = {
    "cycle": (_legacy([(A, {"parent": B}), (B, {"parent": A})], {}), "cycle"),
    "missing parent": (_legacy([(A, {"parent": C})], {"x": {"1": A}}), "not loaded"),
    "json not JSON": (
        pack({f"{A}/json": b"{", f"{A}/layer.tar": make_layer("a"), "repositories": b"{}"}),
        "malformed JSON",
    ),
    "json id mismatch": (_legacy([(A, {"id": B})], {}), "not its directory's name"),
    "json parent not an ID": (_legacy([(A, {"parent": "../x"})], {}), "not a 64-hex image ID"),
    "directory not an ID": (
        pack({"x/json": b"{}", "x/layer.tar": make_layer("x"), "repositories": b"{}"}),
        "not a 64-hex image ID",
    ),
    "directory an ID and a newline": (_legacy([(A + "\n", {})], {}), "not a 64-hex image ID"),
    "json parent an ID and a newline": (
        _legacy([(A, {"parent": B + "\n"})], {}),
        "not a 64-hex image ID",
    ),
    "repositories not JSON": (
        pack(
            {
                f"{A}/json": json.dumps({"id": A}).encode(),
                f"{A}/layer.tar": make_layer("a"),
                "repositories": b"{",
            }
        ),
        "malformed JSON",
    ),
    "repositories wrong type": (_legacy([(A, {})], {"x": "y"}), "expected a JSON object"),  # type: ignore[dict-item]
    "repositories names a missing image": (
        _legacy([(A, {})], {"x": {"1": B}}),
        "not in the archive",
    ),
}


@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_bad_legacy_archive(env: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str):
    data, words = LEGACY_CASES[case]

    result = run_load(env, capsys, data)

    code, _, err = result
    assert code != 0
    assert any(words in line for line in err), err
    assert err[0].startswith("layerfs: error: "), err
    assert err[1:] in ([], ["layerfs: 1 of 2 images were not loaded"]), err


def test_legacy_chain_deeper_than_the_limit(env: dict[str, Path], capsys: pytest.CaptureFixture):
    ids = [fake_image_id(f"deep{i}") for i in range(130)]
    nodes = [(ids[0], {})] + [(ids[i], {"parent": ids[i - 1]}) for i in range(1, 130)]
    members = legacy_members([(i, d, build_tar()) for i, d in nodes], {"deep": {"1": ids[-1]}})

    result = run_load(env, capsys, pack(members))

    assert_one_line_error(result, "max depth exceeded")


# -- OCI layouts ----------------------------------------------------------------------------


def _index(members: Members) -> dict[str, object]:
    return json.loads(members["index.json"])  # type: ignore[arg-type]


def _set_index(members: Members, change: Callable[[dict[str, object]], None]) -> None:
    index = _index(members)
    change(index["manifests"][0])  # type: ignore[index]
    members["index.json"] = json.dumps(index).encode()


def _manifest_blob(members: Members) -> str:
    return "blobs/sha256/" + hex_of(_index(members)["manifests"][0]["digest"])  # type: ignore[index]


def _corrupt_layer(members: Members) -> None:
    manifest = json.loads(members[_manifest_blob(members)])  # type: ignore[arg-type]
    path = "blobs/sha256/" + hex_of(manifest["layers"][0]["digest"])
    blob = members[path]
    assert isinstance(blob, bytes)
    members[path] = compress(make_layer("other"), "gzip")[: len(blob)].ljust(len(blob), b"\0")


OCI_CASES: dict[str, tuple[Mutation, str]] = {
    "layer blob digest mismatch": (_corrupt_layer, "bad:1"),
    "manifest digest mismatch": (
        lambda m: m.__setitem__(_manifest_blob(m), m[_manifest_blob(m)] + b" "),  # type: ignore[operator]
        "size mismatch",
    ),
    "descriptor size negative": (
        lambda m: _set_index(m, lambda d: d.__setitem__("size", -1)),
        "out of range",
    ),
    "descriptor size huge": (
        lambda m: _set_index(m, lambda d: d.__setitem__("size", 10**30)),
        "out of range",
    ),
    "descriptor size a string": (
        lambda m: _set_index(m, lambda d: d.__setitem__("size", "12")),
        "expected an integer size",
    ),
    "descriptor digest invalid": (
        lambda m: _set_index(m, lambda d: d.__setitem__("digest", "sha256:XYZ")),
        "invalid digest",
    ),
    "index.json not JSON": (lambda m: m.__setitem__("index.json", b"{"), "malformed JSON"),
    "index.json manifests wrong type": (
        lambda m: m.__setitem__("index.json", b'{"manifests": {}}'),
        "expected a JSON array",
    ),
    "missing blob": (lambda m: m.pop(_manifest_blob(m)), "which is not in"),
}


@pytest.mark.parametrize("case", list(OCI_CASES))
def test_bad_oci_layout(env: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str):
    mutate, words = OCI_CASES[case]
    members = oci_members([BAD])
    mutate(members)

    result = run_load(env, capsys, pack(members))

    assert_one_line_error(result, words)
    result = run_load(env, capsys, path=write_dir(members, env["tmp"] / f"layout-{len(case)}"))
    assert_one_line_error(result, words)


# -- one bad image among good ones ------------------------------------------------------------


def test_one_broken_image_among_good_ones(env: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    first = make_image([make_layer("first")], ["first:1"])
    last = make_image([make_layer("last")], ["last:1"])
    members = docker_members([first, BAD, last])
    manifest = _manifest(members)
    members[manifest[1]["Layers"][1]] = make_layer("tampered")  # type: ignore[index]

    code, out, err = run_load(env, capsys, pack(members))

    assert code == 1
    assert out == ["Loaded image: first:1", "Loaded image: last:1"]
    assert err[0].startswith(
        f"layerfs: error: cannot load bad:1: layer 2/2 ({BAD.diff_ids[1][:19]}): diff ID mismatch"
    )
    assert err[1] == "layerfs: 1 of 3 images were not loaded"
    store = Store.open(env["root"])
    assert store.tags.lookup_image("first:1").id == first.image_id
    assert store.tags.lookup_image("last:1").id == last.image_id
    assert not store.graph.exists(BAD.image_id)
    assert BAD.diff_ids[1] not in store.layers.diff_ids()
    # The base layer of the broken image was staged, never published.
    assert BAD.diff_ids[0] not in store.layers.diff_ids()


def test_one_image_with_broken_documents_among_good_ones(env, capsys) -> None:  # type: ignore[no-untyped-def]
    first = make_image([make_layer("first")], ["first:1"])
    members = docker_members([first, BAD])
    manifest = _manifest(members)
    manifest[1]["Layers"][0] = "../../x"  # type: ignore[index]
    _set_manifest(members, manifest)

    code, out, err = run_load(env, capsys, pack(members))

    assert code == 1
    assert out == ["Loaded image: first:1"]
    assert "cannot load bad:1" in err[0] and "outside the archive" in err[0]


# -- documents made to exhaust memory ---------------------------------------------------------


def _sparse_archive(path: Path, members: dict[str, bytes], big: str, size: int) -> Path:
    """A tar whose member ``big`` is ``size`` bytes of zeros that take no disk (a hole)."""
    with open(path, "wb") as out, tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(big)
        info.size = size
        out.write(info.tobuf(tarfile.PAX_FORMAT))
        out.seek(size, os.SEEK_CUR)
        tar.offset = out.tell()  # carry on after the hole
    return path


@pytest.mark.parametrize("which", ["manifest.json", "config"])
def test_a_document_of_100_mb_is_refused_unread(
    which: str, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import tracemalloc

    image = make_image([make_layer("big")], ["big:1"])
    members = docker_members([image])
    config_name = next(n for n in members if n.endswith(".json") and n != "manifest.json")
    big = which if which == "manifest.json" else config_name
    del members[big]
    path = _sparse_archive(env["tmp"] / "big.tar", dict(members), big, 100 << 20)  # type: ignore[arg-type]
    assert path.stat().st_blocks * 512 < 1 << 20  # really a hole
    tracemalloc.start()
    try:
        result = run_load(env, capsys, path=path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(result, "104857600 bytes, more than 8388608 allowed")
    assert peak < 16 << 20


@pytest.mark.parametrize("which", ["manifest.json", "config"])
def test_a_document_nested_10000_levels_is_refused(
    which: str, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image([make_layer("deep")], ["deep:1"])
    members = docker_members([image])
    nested = b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    if which == "manifest.json":
        members["manifest.json"] = nested
    else:
        config_name = next(n for n in members if n.endswith(".json") and n != "manifest.json")
        del members[config_name]
        named = f"{hashlib.sha256(nested).hexdigest()}.json"  # the name its digest checks
        members[named] = nested
        manifest = json.loads(members["manifest.json"])  # type: ignore[arg-type]
        manifest[0]["Config"] = named
        members["manifest.json"] = json.dumps(manifest).encode()
    assert_one_line_error(run_load(env, capsys, pack(members)), "JSON nested too deeply")
