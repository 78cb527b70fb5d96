"""Tests for layerfs.store.layers: ingest, publish, entries, verify and blob digests."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from layerfs import compression
from layerfs.errors import (
    CorruptIndexError,
    DigestMismatchError,
    ExpansionLimitError,
    FormatError,
    InvalidReferenceError,
    LayerNotFoundError,
)
from layerfs.model.digest import sha256_digest
from layerfs.store import codec
from layerfs.store.layers import INDEX_VERSION, LayerInfo, LayerStore
from layerfs.store.tarindex import index_tar
from tests.helpers import build_tar, tar_dir, tar_file, tar_hardlink, tar_member, tar_symlink

LAYER = build_tar(
    tar_dir("etc"),
    tar_file("etc/hostname", b"box\n"),
    tar_file("etc/motd", b"hello " * 200),
    tar_symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
    tar_hardlink("etc/motd.bak", "etc/motd"),
    tar_member(
        "bin/ping",
        data=b"\x7fELF",
        mode=0o4755,
        pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"},
    ),
    tar_file(b"caf\xe9".decode("utf-8", "surrogateescape"), b"latin-1 name"),
)
DIFF_ID = sha256_digest(LAYER)
OTHER = build_tar(tar_file("other", b"other"))


@pytest.fixture
def layers(tmp_path: Path) -> LayerStore:
    (tmp_path / "tmp").mkdir()
    return LayerStore(tmp_path / "layers", tmp_path / "tmp")


def tmp_entries(layers: LayerStore) -> list[str]:
    return sorted(p.name for p in layers.tmp_root.iterdir())


def store_layer(layers: LayerStore, data: bytes = LAYER, **kw: object) -> str:
    staged = layers.ingest(io.BytesIO(data), **kw)  # type: ignore[arg-type]
    staged.publish()
    return staged.diff_id


# -- ingest -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compress",
    [
        lambda d: d,
        lambda d: gzip.compress(d, mtime=0),
        lambda d: zstandard.ZstdCompressor().compress(d),
        bz2.compress,
        lzma.compress,
    ],
    ids=["plain", "gzip", "zstd", "bzip2", "xz"],
)
def test_ingest_gives_the_diff_id_of_the_uncompressed_tar(
    layers: LayerStore, compress: Callable[[bytes], bytes]
) -> None:
    staged = layers.ingest(io.BytesIO(compress(LAYER)))
    assert staged.diff_id == DIFF_ID
    assert staged.staging.parent == layers.tmp_root
    assert (staged.staging / "layer.tar").read_bytes() == LAYER
    assert not layers.exists(DIFF_ID)  # staged, not visible yet
    assert staged.publish() is True
    assert layers.exists(DIFF_ID)
    assert layers.tar_path(DIFF_ID).read_bytes() == LAYER
    assert tmp_entries(layers) == []


def test_layer_directory_is_named_by_the_diff_id(layers: LayerStore) -> None:
    store_layer(layers)
    hex_id = DIFF_ID.removeprefix("sha256:")
    assert sorted(p.name for p in (layers.root / hex_id).iterdir()) == [
        "index",
        "info.json",
        "layer.tar",
    ]
    assert layers.diff_ids() == [DIFF_ID]


def test_info_records_sizes_entries_and_blob_digest(layers: LayerStore) -> None:
    blob = gzip.compress(LAYER, mtime=0)
    store_layer(layers, blob, blob_digest=sha256_digest(blob))
    info = layers.info(DIFF_ID)
    assert info.diff_id == DIFF_ID
    assert info.tar_size == len(LAYER)
    # Files plus the symlink's target length, as overlay2 measures a layer for Docker.
    assert info.content_size == 4 + 1200 + 4 + 12 + len("/usr/share/zoneinfo/UTC")
    assert info.entries == 7
    assert info.blob_digests == [sha256_digest(blob)]


def test_layer_info_json_round_trip() -> None:
    info = LayerInfo("sha256:" + "a" * 64, 10, 5, 2, ["sha256:" + "c" * 64, "sha256:" + "b" * 64])
    back = LayerInfo.from_json(info.to_json(), "x")
    assert back.blob_digests == ["sha256:" + "b" * 64, "sha256:" + "c" * 64]  # sorted
    assert (back.diff_id, back.tar_size, back.content_size, back.entries) == (
        info.diff_id,
        10,
        5,
        2,
    )


def test_progress_reports_every_byte(layers: LayerStore) -> None:
    seen: list[int] = []
    layers.ingest(io.BytesIO(LAYER), progress=seen.append).discard()
    assert sum(seen) == len(LAYER)


def test_expected_diff_id_that_matches(layers: LayerStore) -> None:
    staged = layers.ingest(io.BytesIO(LAYER), expected_diff_id=DIFF_ID)
    assert staged.diff_id == DIFF_ID
    staged.discard()
    assert tmp_entries(layers) == []


def test_expected_diff_id_mismatch_leaves_nothing_behind(layers: LayerStore) -> None:
    wrong = sha256_digest(b"something else")
    with pytest.raises(DigestMismatchError) as info:
        layers.ingest(io.BytesIO(LAYER), expected_diff_id=wrong, what="layer 3/5")
    message = str(info.value)
    assert message.startswith("layer 3/5: diff ID mismatch")
    assert wrong in message and DIFF_ID in message
    assert tmp_entries(layers) == []
    assert not layers.root.exists() or list(layers.root.iterdir()) == []


def test_malformed_tar_leaves_nothing_behind(layers: LayerStore) -> None:
    with pytest.raises(FormatError, match="truncated tar"):
        layers.ingest(io.BytesIO(LAYER[:1000]))
    with pytest.raises(FormatError, match="escapes the root"):
        layers.ingest(io.BytesIO(build_tar(tar_file("../x"))))
    assert tmp_entries(layers) == []


def test_truncated_compressed_layer_leaves_nothing_behind(layers: LayerStore) -> None:
    blob = zstandard.ZstdCompressor().compress(LAYER)
    with pytest.raises(FormatError, match="zstd"):
        layers.ingest(io.BytesIO(blob[:-5]), what="blob")
    assert tmp_entries(layers) == []


def test_decompression_bomb_leaves_nothing_behind(
    layers: LayerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compression, "FREE_OUTPUT", 1024)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "4")
    bomb = gzip.compress(build_tar(tar_file("zeros", bytes(4 << 20))), mtime=0)
    with pytest.raises(ExpansionLimitError):
        layers.ingest(io.BytesIO(bomb))
    assert tmp_entries(layers) == []


def test_decompress_false_takes_the_bytes_as_they_are(layers: LayerStore) -> None:
    staged = layers.ingest(io.BytesIO(LAYER), decompress=False)
    assert staged.diff_id == DIFF_ID
    staged.discard()
    with pytest.raises(FormatError, match="not a tar archive"):
        layers.ingest(io.BytesIO(gzip.compress(LAYER)), decompress=False)
    assert tmp_entries(layers) == []


# -- publish ----------------------------------------------------------------------------------


def test_publishing_the_same_layer_twice_stores_it_once(layers: LayerStore) -> None:
    first = layers.ingest(io.BytesIO(LAYER))
    second = layers.ingest(io.BytesIO(gzip.compress(LAYER)))
    assert first.staging != second.staging
    assert first.publish() is True
    assert second.publish() is False
    assert layers.diff_ids() == [DIFF_ID]
    assert tmp_entries(layers) == []
    assert layers.tar_path(DIFF_ID).read_bytes() == LAYER


def test_discard_removes_the_staging_directory(layers: LayerStore) -> None:
    staged = layers.ingest(io.BytesIO(LAYER))
    assert staged.staging.is_dir()
    staged.discard()
    assert not staged.staging.exists()
    assert not layers.exists(DIFF_ID)


def test_delete_removes_the_layer(layers: LayerStore) -> None:
    store_layer(layers)
    store_layer(layers, OTHER)
    layers.delete(DIFF_ID)
    assert not layers.exists(DIFF_ID)
    assert layers.diff_ids() == [sha256_digest(OTHER)]
    assert tmp_entries(layers) == []
    layers.delete(DIFF_ID)  # already gone: fine


# -- reading back -----------------------------------------------------------------------------


def test_entries_round_trip_through_the_index(layers: LayerStore) -> None:
    store_layer(layers)
    expected = index_tar(io.BytesIO(LAYER)).entries
    stored = layers.entries(DIFF_ID)
    assert stored == expected
    by_path = {e.path: e for e in stored}
    assert b"caf\xe9" in by_path  # bytes survive msgpack as bytes
    assert by_path[b"bin/ping"].xattrs == {"security.capability": b"\x01\x00\x00\x02"}
    assert by_path[b"bin/ping"].mode == 0o4755
    assert by_path[b"etc/motd.bak"].linkname == b"etc/motd"


def test_open_tar_gives_the_exact_bytes(layers: LayerStore) -> None:
    store_layer(layers)
    with layers.open_tar(DIFF_ID) as tar:
        assert tar.read() == LAYER


def test_unknown_layer(layers: LayerStore) -> None:
    unknown = sha256_digest(b"nope")
    assert not layers.exists(unknown)
    for call in (layers.info, layers.entries, layers.tar_path, layers.open_tar):
        with pytest.raises(LayerNotFoundError, match=f"layer {unknown} is not in the store"):
            call(unknown)


def test_invalid_diff_ids(layers: LayerStore) -> None:
    assert not layers.exists("sha256:xyz")
    assert not layers.exists("a" * 64)
    with pytest.raises(InvalidReferenceError):
        layers.path("sha256:" + "A" * 64)
    with pytest.raises(InvalidReferenceError):
        layers.path("../../etc")


def test_diff_ids_ignores_other_names(layers: LayerStore) -> None:
    store_layer(layers, OTHER)
    store_layer(layers)
    (layers.root / "README").write_text("not a layer")
    assert layers.diff_ids() == sorted([DIFF_ID, sha256_digest(OTHER)])


def test_diff_ids_of_a_missing_root(tmp_path: Path) -> None:
    assert LayerStore(tmp_path / "nothing", tmp_path).diff_ids() == []


def _write_index(layers: LayerStore, doc: object) -> None:
    (layers.path(DIFF_ID) / "index").write_bytes(codec.pack(doc))


def test_index_version_mismatch_is_a_corrupt_index(layers: LayerStore) -> None:
    store_layer(layers)
    rows = [e.to_row() for e in layers.entries(DIFF_ID)]
    _write_index(layers, {"version": INDEX_VERSION + 1, "diff_id": DIFF_ID, "entries": rows})
    with pytest.raises(CorruptIndexError, match=f"has version 2, expected {INDEX_VERSION}"):
        layers.entries(DIFF_ID)


def test_index_that_is_no_map_is_a_corrupt_index(layers: LayerStore) -> None:
    store_layer(layers)
    _write_index(layers, [1, 2, 3])
    with pytest.raises(CorruptIndexError, match="has version None"):
        layers.entries(DIFF_ID)


def test_index_with_bad_rows_is_a_corrupt_index(layers: LayerStore) -> None:
    store_layer(layers)
    _write_index(layers, {"version": INDEX_VERSION, "entries": [[b"x", "f"]]})
    with pytest.raises(CorruptIndexError, match="malformed"):
        layers.entries(DIFF_ID)
    _write_index(layers, {"version": INDEX_VERSION})
    with pytest.raises(CorruptIndexError, match="malformed"):
        layers.entries(DIFF_ID)


def test_index_that_is_not_msgpack_is_a_corrupt_index(layers: LayerStore) -> None:
    store_layer(layers)
    (layers.path(DIFF_ID) / "index").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(CorruptIndexError, match=f"cannot read index of layer {DIFF_ID}"):
        layers.entries(DIFF_ID)


# -- verify -----------------------------------------------------------------------------------


def test_verify_a_sound_layer(layers: LayerStore) -> None:
    store_layer(layers)
    assert list(layers.verify(DIFF_ID)) == []


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_reports_a_flipped_byte_in_file_data(layers: LayerStore) -> None:
    store_layer(layers)
    motd = {e.path: e for e in layers.entries(DIFF_ID)}[b"etc/motd"]
    _flip(layers.tar_path(DIFF_ID), motd.offset + 10)
    problems = list(layers.verify(DIFF_ID))
    assert len(problems) == 1
    assert problems[0].startswith(f"layer {DIFF_ID}: content hashes to sha256:")


def test_verify_reports_a_flipped_byte_in_a_header(layers: LayerStore) -> None:
    store_layer(layers)
    _flip(layers.tar_path(DIFF_ID), 600)  # inside the second header's name field
    problems = list(layers.verify(DIFF_ID))
    assert len(problems) == 1
    assert problems[0].startswith(f"layer {DIFF_ID}: cannot be read: corrupt tar")


def test_verify_reports_a_flipped_byte_in_the_trailing_padding(layers: LayerStore) -> None:
    store_layer(layers)
    _flip(layers.tar_path(DIFF_ID), len(LAYER) - 1)
    assert [p for p in layers.verify(DIFF_ID) if "content hashes to" in p]


def test_verify_reports_a_tampered_index(layers: LayerStore) -> None:
    store_layer(layers)
    rows = [e.to_row() for e in layers.entries(DIFF_ID)]
    rows[1][2] = 0o4777  # etc/hostname made setuid in the index only
    _write_index(layers, {"version": INDEX_VERSION, "diff_id": DIFF_ID, "entries": rows})
    assert list(layers.verify(DIFF_ID)) == [f"layer {DIFF_ID}: index does not match the tar"]


def test_verify_reports_an_index_with_a_dropped_entry(layers: LayerStore) -> None:
    store_layer(layers)
    rows = [e.to_row() for e in layers.entries(DIFF_ID)][:-1]
    _write_index(layers, {"version": INDEX_VERSION, "diff_id": DIFF_ID, "entries": rows})
    assert list(layers.verify(DIFF_ID)) == [f"layer {DIFF_ID}: index does not match the tar"]


def test_verify_reports_an_unreadable_index(layers: LayerStore) -> None:
    store_layer(layers)
    _write_index(layers, {"version": 7, "entries": []})
    problems = list(layers.verify(DIFF_ID))
    assert len(problems) == 1
    assert "has version 7" in problems[0]


def test_verify_reports_a_wrong_tar_size_in_info(layers: LayerStore) -> None:
    store_layer(layers)
    info_path = layers.path(DIFF_ID) / "info.json"
    doc = json.loads(info_path.read_bytes())
    doc["tar_size"] += 512
    info_path.write_text(json.dumps(doc))
    assert list(layers.verify(DIFF_ID)) == [
        f"layer {DIFF_ID}: info records {len(LAYER) + 512} bytes, tar has {len(LAYER)}"
    ]


def test_verify_reports_a_missing_tar_and_corrupt_info(layers: LayerStore) -> None:
    store_layer(layers)
    store_layer(layers, OTHER)
    layers.tar_path(DIFF_ID).unlink()
    assert list(layers.verify(DIFF_ID)) == [f"layer {DIFF_ID}: layer {DIFF_ID} is not in the store"]
    other = sha256_digest(OTHER)
    (layers.path(other) / "info.json").write_text("{not json")
    [problem] = layers.verify(other)
    assert problem.startswith(f"layer {other}: corrupt layer info")


# -- blob digests -----------------------------------------------------------------------------


def test_add_blob_digest_and_find_by_blob_digest(layers: LayerStore) -> None:
    gz = gzip.compress(LAYER, mtime=0)
    zst = zstandard.ZstdCompressor().compress(LAYER)
    store_layer(layers, gz, blob_digest=sha256_digest(gz))
    store_layer(layers, OTHER)
    assert layers.find_by_blob_digest(sha256_digest(gz)) == DIFF_ID
    assert layers.find_by_blob_digest(sha256_digest(zst)) is None
    layers.add_blob_digest(DIFF_ID, sha256_digest(zst))
    layers.add_blob_digest(DIFF_ID, sha256_digest(zst))  # twice: recorded once
    assert layers.find_by_blob_digest(sha256_digest(zst)) == DIFF_ID
    assert layers.info(DIFF_ID).blob_digests == sorted([sha256_digest(gz), sha256_digest(zst)])
    assert tmp_entries(layers) == []  # info.json was replaced atomically
    assert layers.find_by_blob_digest(sha256_digest(b"unknown")) is None


def test_publishing_again_keeps_the_first_blob_digests(layers: LayerStore) -> None:
    gz = gzip.compress(LAYER, mtime=0)
    store_layer(layers, gz, blob_digest=sha256_digest(gz))
    store_layer(layers, LAYER, blob_digest=sha256_digest(b"other blob"))
    assert layers.info(DIFF_ID).blob_digests == [sha256_digest(gz)]


def test_add_blob_digest_to_an_unknown_layer(layers: LayerStore) -> None:
    with pytest.raises(LayerNotFoundError):
        layers.add_blob_digest(sha256_digest(b"x"), sha256_digest(b"y"))


def test_find_by_blob_digest_skips_layers_without_info(layers: LayerStore) -> None:
    gz = gzip.compress(OTHER, mtime=0)
    store_layer(layers, gz, blob_digest=sha256_digest(gz))
    store_layer(layers)
    (layers.path(DIFF_ID) / "info.json").unlink()  # half-deleted layer
    assert layers.find_by_blob_digest(sha256_digest(gz)) == sha256_digest(OTHER)


def test_the_diff_id_is_the_sha256_of_the_stored_tar(layers: LayerStore) -> None:
    store_layer(layers)
    digest = hashlib.sha256(layers.tar_path(DIFF_ID).read_bytes()).hexdigest()
    assert layers.path(DIFF_ID).name == digest
