"""Tests for layerfs.model.image (times, strict JSON, Image, build_config) and model.digest."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from layerfs.errors import DigestMismatchError, FormatError, InvalidReferenceError
from layerfs.model.digest import (
    EMPTY_GZIP_TAR_DIGEST,
    EMPTY_TAR_DIFF_ID,
    HashingReader,
    hex_of,
    is_image_id,
    is_oci_digest,
    is_sha256_digest,
    sha256_digest,
    validate_digest,
)
from layerfs.model.image import (
    MAX_IMAGE_DEPTH,
    Image,
    build_config,
    canonical_json,
    decode_json_object,
    host_architecture,
    now_rfc3339,
    parse_created,
)

DIFF_A = "sha256:" + "a" * 64
DIFF_B = "sha256:" + "b" * 64


def make_image(data: dict[str, Any], image_id: str = "c" * 64, parent: str = "") -> Image:
    raw = canonical_json(data)
    return Image(id=image_id, parent=parent, layer=None, raw_json=raw, data=data)


# -- times ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-09-10T12:34:56.123456789Z", datetime(2015, 9, 10, 12, 34, 56, 123456, UTC)),
        ("2015-09-10T12:34:56.999999999Z", datetime(2015, 9, 10, 12, 34, 56, 999999, UTC)),
        ("2015-09-10T12:34:56.1Z", datetime(2015, 9, 10, 12, 34, 56, 100000, UTC)),
        ("2015-09-10T12:34:56Z", datetime(2015, 9, 10, 12, 34, 56, tzinfo=UTC)),
        ("2015-09-10T12:34:56", datetime(2015, 9, 10, 12, 34, 56, tzinfo=UTC)),
        (
            "2015-09-10T12:34:56.000000001+02:00",
            datetime(2015, 9, 10, 12, 34, 56, 0, timezone(timedelta(hours=2))),
        ),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),  # Go's zero time
    ],
)
def test_parse_created(text: str, expected: datetime) -> None:
    parsed = parse_created(text)
    assert parsed == expected
    assert parsed is not None and parsed.utcoffset() == expected.utcoffset()


def test_parse_created_nanoseconds_are_truncated_not_rounded() -> None:
    parsed = parse_created("2020-01-01T00:00:00.0000009Z")
    assert parsed is not None and parsed.microsecond == 0


@pytest.mark.parametrize("value", [None, "", 1441888496, "yesterday", "2015-13-45T00:00:00Z", []])
def test_parse_created_gives_none_for_absent_or_bad_values(value: object) -> None:
    assert parse_created(value) is None


def test_now_rfc3339_looks_like_go_and_parses_back() -> None:
    text = now_rfc3339()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", text)
    parsed = parse_created(text)
    assert parsed is not None
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 3600


# -- JSON -------------------------------------------------------------------------------------


def test_canonical_json_is_compact_with_sorted_keys() -> None:
    doc = {"b": 1, "a": {"d": [1, 2], "c": None}, "é": "ünï"}
    assert canonical_json(doc) == '{"a":{"c":null,"d":[1,2]},"b":1,"é":"ünï"}'.encode()


def test_canonical_json_keeps_html_characters_as_they_are() -> None:
    # docs/store-format.md fixes these bytes for derived node IDs: json.dumps with sorted
    # keys, no spaces, UTF-8 kept. (Go's json.Marshal would write \u0026 for "&"; the ID
    # is the digest of the stored bytes either way.)
    doc = {"Cmd": ["/bin/sh", "-c", "a && b > c"]}
    assert canonical_json(doc) == b'{"Cmd":["/bin/sh","-c","a && b > c"]}'
    assert json.loads(canonical_json(doc)) == doc


def test_decode_json_object_accepts_an_object() -> None:
    assert decode_json_object(b'{"a": [1, {"b": null}], "c": "d"}', "x") == {
        "a": [1, {"b": None}],
        "c": "d",
    }


@pytest.mark.parametrize("data", [b'{"a": 1, "a": 2}', b'{"x": {"k": 1, "k": 1}}'])
def test_decode_json_object_rejects_duplicate_keys(data: bytes) -> None:
    with pytest.raises(FormatError, match=r"image json: duplicate key '(a|k)'"):
        decode_json_object(data, "image json")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_decode_json_object_rejects_nan_and_infinity(constant: str) -> None:
    with pytest.raises(FormatError, match=f"{constant} is not valid JSON"):
        decode_json_object(f'{{"size": {constant}}}'.encode(), "config")


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"[]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType"), (b"1.5", "float")],
)
def test_decode_json_object_rejects_non_objects(data: bytes, kind: str) -> None:
    with pytest.raises(FormatError, match=f"config: expected a JSON object, got {kind}"):
        decode_json_object(data, "config")


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"a": }', b"{'a': 1}", b'{"a": 1} trailing', b'{"a": "\xff"}']
)
def test_decode_json_object_rejects_malformed_input(data: bytes) -> None:
    with pytest.raises(FormatError, match="config: malformed JSON"):
        decode_json_object(data, "config")


def test_decode_json_object_survives_absurd_nesting() -> None:
    with pytest.raises(FormatError, match="config: JSON nested too deeply"):
        decode_json_object(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", "config")


# -- Image ------------------------------------------------------------------------------------


def test_image_of_a_modern_config() -> None:
    data = {
        "architecture": "arm64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "author": "me",
        "comment": "hello",
        "config": {"Cmd": ["sh"]},
        "history": [
            {"created_by": "ADD rootfs"},
            "junk",
            {"created_by": "ENV A=1", "empty_layer": True},
            {"created_by": "RUN make"},
            {"created_by": "LABEL x=y", "empty_layer": True},
        ],
        "rootfs": {"type": "layers", "diff_ids": [DIFF_A, 7, DIFF_B]},
    }
    img = make_image(data)
    assert img.is_config
    assert (img.architecture, img.os, img.author, img.comment) == ("arm64", "linux", "me", "hello")
    assert img.created == "2024-01-01T00:00:00Z"
    assert img.config == {"Cmd": ["sh"]}
    assert len(img.history) == 4  # the non-object entry is dropped
    assert img.diff_ids == [DIFF_A, DIFF_B]
    assert img.created_by() == "RUN make"  # the last history entry that made a layer


def test_image_of_a_legacy_v1_json() -> None:
    data = {
        "id": "d" * 64,
        "parent": "e" * 64,
        "created": "2015-01-01T00:00:00Z",
        "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) ADD file"]},
        "config": None,
        "os": "",
    }
    img = make_image(data, image_id="d" * 64, parent="e" * 64)
    assert not img.is_config
    assert img.created_by() == "/bin/sh -c #(nop) ADD file"
    assert img.config == {}
    assert img.os == "linux"  # an empty os means linux
    assert img.diff_ids == [] and img.history == []


@pytest.mark.parametrize(
    "data",
    [
        {"rootfs": "not a dict"},
        {"rootfs": {"diff_ids": "nope"}},
        {"history": {"not": "a list"}},
        {"created": 5, "author": ["x"], "config": [], "container_config": "x"},
    ],
)
def test_image_tolerates_odd_types(data: dict[str, Any]) -> None:
    img = make_image(data)
    assert img.diff_ids == []
    assert img.history == []
    assert img.created == ""
    assert img.author == "" and img.config == {} and img.container_config == {}
    assert img.created_by() == ""


def test_created_by_of_a_config_without_layers() -> None:
    img = make_image({"rootfs": {"diff_ids": []}, "history": [{"empty_layer": True}]})
    assert img.created_by() == ""


def test_max_image_depth() -> None:
    assert MAX_IMAGE_DEPTH == 127


@pytest.mark.parametrize(
    ("machine", "goarch"),
    [
        ("x86_64", "amd64"),
        ("aarch64", "arm64"),
        ("armv7l", "arm"),
        ("i686", "386"),
        ("mips", "mips"),
    ],
)
def test_host_architecture_uses_go_names(
    machine: str, goarch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert host_architecture() == goarch


# -- build_config -----------------------------------------------------------------------------


def test_build_config_of_a_base_image() -> None:
    doc = build_config(
        parent=None,
        parent_diff_ids=[],
        diff_id=DIFF_A,
        config={"Cmd": ["sh"]},
        author="me",
        comment="imported",
        created_by="layerfs import",
        created="2024-02-03T04:05:06.000000007Z",
    )
    assert doc == {
        "architecture": host_architecture(),
        "os": "linux",
        "created": "2024-02-03T04:05:06.000000007Z",
        "author": "me",
        "comment": "imported",
        "config": {"Cmd": ["sh"]},
        "history": [
            {
                "created": "2024-02-03T04:05:06.000000007Z",
                "author": "me",
                "created_by": "layerfs import",
                "comment": "imported",
            }
        ],
        "rootfs": {"type": "layers", "diff_ids": [DIFF_A]},
    }


def test_build_config_of_an_empty_layer() -> None:
    doc = build_config(parent=None, parent_diff_ids=[], diff_id=None, config=None, created="t")
    assert doc["rootfs"] == {"type": "layers", "diff_ids": []}
    assert doc["history"] == [{"created": "t", "empty_layer": True}]
    assert doc["config"] == {}
    assert "author" not in doc and "comment" not in doc


def test_build_config_continues_the_parent_s_chain() -> None:
    parent_data = {
        "architecture": "s390x",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "history": [{"created": "p", "created_by": "base"}],
        "rootfs": {"type": "layers", "diff_ids": [DIFF_A]},
    }
    parent = make_image(parent_data)
    doc = build_config(
        parent=parent, parent_diff_ids=[DIFF_A], diff_id=DIFF_B, config=None, created="c"
    )
    assert doc["rootfs"]["diff_ids"] == [DIFF_A, DIFF_B]
    assert doc["history"] == [{"created": "p", "created_by": "base"}, {"created": "c"}]
    assert doc["architecture"] == "s390x"
    assert doc["config"] == {"Env": ["PATH=/bin"]}
    doc["config"]["Env"].append("X=1")  # a copy of the parent's dict, at least at the top
    doc["config"]["new"] = 1
    assert "new" not in parent.config
    assert parent_data["history"] == [{"created": "p", "created_by": "base"}]


def test_build_config_on_a_legacy_parent_starts_a_new_history() -> None:
    parent = make_image({"id": "c" * 64, "architecture": "", "config": {"Cmd": ["x"]}})
    doc = build_config(
        parent=parent, parent_diff_ids=[DIFF_A], diff_id=None, config={"Cmd": ["y"]}, created="c"
    )
    assert doc["history"] == [{"created": "c", "empty_layer": True}]
    assert doc["rootfs"]["diff_ids"] == [DIFF_A]
    assert doc["architecture"] == host_architecture()  # the parent had none
    assert doc["config"] == {"Cmd": ["y"]}


def test_build_config_defaults_created_to_now() -> None:
    doc = build_config(parent=None, parent_diff_ids=[], diff_id=None, config=None)
    assert parse_created(doc["created"]) is not None
    assert doc["history"][0]["created"] == doc["created"]


# -- digests ----------------------------------------------------------------------------------


def test_digest_helpers() -> None:
    assert sha256_digest(bytes(1024)) == EMPTY_TAR_DIFF_ID
    assert is_sha256_digest(EMPTY_TAR_DIFF_ID) and is_sha256_digest(EMPTY_GZIP_TAR_DIGEST)
    assert not is_sha256_digest("sha256:" + "A" * 64)
    assert not is_sha256_digest("sha512:" + "a" * 64)
    assert not is_sha256_digest(None)
    assert is_oci_digest("sha512:" + "ab" * 64) and is_oci_digest("multihash+base58:QmRZxt")
    assert not is_oci_digest("sha256")
    assert hex_of(EMPTY_TAR_DIFF_ID) == EMPTY_TAR_DIFF_ID[7:]
    assert hex_of("abc") == "abc"
    assert is_image_id("a" * 64) and not is_image_id("a" * 63) and not is_image_id(5)
    # A trailing newline is not part of an ID: "$" would let it through, into file names.
    assert not is_image_id("a" * 64 + "\n")
    assert not is_sha256_digest(EMPTY_TAR_DIFF_ID + "\n")
    assert not is_oci_digest(EMPTY_TAR_DIFF_ID + "\n")
    with pytest.raises(InvalidReferenceError):
        validate_digest(EMPTY_TAR_DIFF_ID + "\n")
    assert validate_digest(EMPTY_TAR_DIFF_ID) == EMPTY_TAR_DIFF_ID
    with pytest.raises(InvalidReferenceError, match="invalid layer digest 'sha256:b'"):
        validate_digest("sha256:b", "layer digest")


def test_hashing_reader_counts_and_verifies() -> None:
    reader = HashingReader(io.BytesIO(b"hello world"))
    assert reader.read(5) == b"hello"
    buf = bytearray(100)
    assert reader.readinto(buf) == 6 and bytes(buf[:6]) == b" world"
    assert reader.read() == b""
    assert reader.count == 11
    assert reader.digest == sha256_digest(b"hello world")
    reader.verify(sha256_digest(b"hello world"), "blob")
    with pytest.raises(DigestMismatchError, match="blob: digest mismatch: expected sha256:0"):
        reader.verify("sha256:" + "0" * 64, "blob")
