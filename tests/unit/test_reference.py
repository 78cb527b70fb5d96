"""Tests for layerfs.model.reference: parsing, validation and name normalisation."""

from __future__ import annotations

import dataclasses

import pytest

from layerfs.errors import InvalidReferenceError, UsageError
from layerfs.model.reference import (
    DEFAULT_TAG,
    Reference,
    familiar_name,
    full_name,
    image_reference,
    is_short_id,
    normalize_local_name,
    parse_repository_tag,
    registry_api_host,
    registry_host,
    remote_name,
    split_hostname,
    truncate_id,
    validate_digest_ref,
    validate_repo_name,
    validate_tag,
)

HEX = "0123456789abcdef" * 4
DIGEST = "sha256:" + HEX


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("ubuntu", ("ubuntu", "")),
        ("ubuntu:14.04", ("ubuntu", "14.04")),
        ("user/app:v1", ("user/app", "v1")),
        ("localhost:5000/foo", ("localhost:5000/foo", "")),
        ("localhost:5000/foo:bar", ("localhost:5000/foo", "bar")),
        ("myhost:5000/a/b", ("myhost:5000/a/b", "")),
        ("repo@" + DIGEST, ("repo", DIGEST)),
        ("localhost:5000/repo@" + DIGEST, ("localhost:5000/repo", DIGEST)),
        ("a:b@sha256:x", ("a:b", "sha256:x")),  # '@' is split first
        ("ubuntu:", ("ubuntu", "")),
        ("", ("", "")),
        (HEX, (HEX, "")),
    ],
)
def test_parse_repository_tag(s: str, expected: tuple[str, str]) -> None:
    assert parse_repository_tag(s) == expected


@pytest.mark.parametrize("tag", ["latest", "1.0", "_x", "A-b.C_d", "x" * 128, "9"])
def test_validate_tag_accepts(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", [".x", "-x", "a:b", "a/b", "a b", "x" * 129, "x" * 200, "latest\n", "é"]
)
def test_validate_tag_rejects(tag: str) -> None:
    with pytest.raises(InvalidReferenceError, match=r"^Illegal tag name \(") as info:
        validate_tag(tag)
    assert "only [A-Za-z0-9_.-] are allowed" in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_tag_empty() -> None:
    with pytest.raises(InvalidReferenceError, match="tag name can't be empty"):
        validate_tag("")


def test_validate_digest_ref_accepts() -> None:
    assert validate_digest_ref(DIGEST) == DIGEST


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:b",  # valid for 1.8's lax regex, not here
        "sha256:" + HEX.upper(),
        "sha256:" + HEX[:63],
        "sha256:" + HEX + "0",
        "sha512:" + HEX + HEX,
        HEX,
        "",
        DIGEST + "\n",
    ],
)
def test_validate_digest_ref_rejects(digest: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid reference format: digest"):
        validate_digest_ref(digest)


@pytest.mark.parametrize(
    "name",
    [
        "ubuntu",
        "user/app",
        "a/b/c/d",
        "a.b_c-d",
        "a__b",
        "a---b",
        "localhost:5000/foo",
        "localhost/foo",
        "my.registry.com:5000/a/b",
        "Registry.Example.COM/app",
        "docker.io/library/busybox",
        "index.docker.io/user/x",
        "[::1]:5000/foo",
        "user/" + HEX,  # only a single-component name may not be an ID
        "x" * 255,
        "localhost",  # without '/' it is a repository on docker.io
        "foo.com",
    ],
)
def test_validate_repo_name_accepts(name: str) -> None:
    assert validate_repo_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "Repository name can't be empty"),
        ("Ubuntu", "invalid reference format: repository name must be lowercase"),
        ("user/App", "invalid reference format: repository name must be lowercase"),
        ("localhost:5000/Foo", "invalid reference format: repository name must be lowercase"),
        ("scratch", "'scratch' is a reserved name"),
        ("docker.io/library/scratch", "'scratch' is a reserved name"),
        ("sha256", "refusing to create an ambiguous tag using digest algorithm as name"),
        (HEX, "cannot specify 64-byte hexadecimal strings"),
        ("localhost:5000/" + HEX, "cannot specify 64-byte hexadecimal strings"),
        ("docker.io/library/" + HEX, "cannot specify 64-byte hexadecimal strings"),
        ("x" * 256, "must not be more than 255 characters"),
        ("a..b", "repository name component 'a..b'"),
        ("a_._b", "repository name component"),
        ("-a", "repository name component"),
        ("a-", "repository name component"),
        ("a/", "repository name component"),
        ("/a", "repository name component"),
        ("a//b", "repository name component"),
        ("a b", "repository name component"),
        ("ubuntu:latest", "repository name component"),
        ("http://host.com/foo", "must not contain a scheme"),
        ("-host.com/foo", "Cannot begin or end with a hyphen"),
        ("host.com:port/foo", "invalid registry host"),
        ("localhost:5000/", "at least one component"),
    ],
)
def test_validate_repo_name_rejects(name: str, message: str) -> None:
    with pytest.raises(InvalidReferenceError, match=message.replace("(", r"\(")) as info:
        validate_repo_name(name)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ubuntu", ("docker.io", "ubuntu")),
        ("user/app", ("docker.io", "user/app")),
        ("library/ubuntu", ("docker.io", "library/ubuntu")),
        ("docker.io/library/ubuntu", ("docker.io", "library/ubuntu")),
        ("index.docker.io/user/x", ("docker.io", "user/x")),
        ("localhost/foo", ("localhost", "foo")),
        ("localhost:5000/foo", ("localhost:5000", "foo")),
        ("my.host/a/b", ("my.host", "a/b")),
        ("localhost", ("docker.io", "localhost")),
        ("foo.com", ("docker.io", "foo.com")),
    ],
)
def test_split_hostname(name: str, expected: tuple[str, str]) -> None:
    assert split_hostname(name) == expected


@pytest.mark.parametrize(
    ("name", "local", "remote", "host", "full"),
    [
        ("busybox", "busybox", "library/busybox", "docker.io", "docker.io/library/busybox"),
        ("library/busybox", "busybox", "library/busybox", "docker.io", "docker.io/library/busybox"),
        (
            "docker.io/library/busybox",
            "busybox",
            "library/busybox",
            "docker.io",
            "docker.io/library/busybox",
        ),
        (
            "index.docker.io/library/busybox",
            "busybox",
            "library/busybox",
            "docker.io",
            "docker.io/library/busybox",
        ),
        (
            "docker.io/busybox",
            "busybox",
            "library/busybox",
            "docker.io",
            "docker.io/library/busybox",
        ),
        ("index.docker.io/user/x", "user/x", "user/x", "docker.io", "docker.io/user/x"),
        ("user/x", "user/x", "user/x", "docker.io", "docker.io/user/x"),
        (
            "localhost:5000/foo",
            "localhost:5000/foo",
            "foo",
            "localhost:5000",
            "localhost:5000/foo",
        ),
        ("myhost.com/a/b", "myhost.com/a/b", "a/b", "myhost.com", "myhost.com/a/b"),
        (
            "localhost/library/x",
            "localhost/library/x",
            "library/x",
            "localhost",
            "localhost/library/x",
        ),
    ],
)
def test_name_normalisation(name: str, local: str, remote: str, host: str, full: str) -> None:
    assert normalize_local_name(name) == local
    assert familiar_name(name) == local
    assert remote_name(name) == remote
    assert registry_host(name) == host
    assert full_name(name) == full


@pytest.mark.parametrize("name", ["Foo", HEX, "a..b", "http://x/y", "", "sha256:" + HEX])
def test_normalize_local_name_returns_invalid_input_unchanged(name: str) -> None:
    assert normalize_local_name(name) == name


@pytest.mark.parametrize("function", [familiar_name, remote_name, registry_host, full_name])
def test_derived_names_reject_invalid_input(function: object) -> None:
    assert callable(function)
    with pytest.raises(InvalidReferenceError, match="must be lowercase"):
        function("Foo/bar")


def test_registry_api_host() -> None:
    assert registry_api_host("docker.io") == "registry-1.docker.io"
    assert registry_api_host("index.docker.io") == "registry-1.docker.io"
    assert registry_api_host("localhost:5000") == "localhost:5000"
    assert registry_api_host(registry_host("busybox")) == "registry-1.docker.io"


@pytest.mark.parametrize(
    ("repo", "ref", "expected"),
    [
        ("ubuntu", "latest", "ubuntu:latest"),
        ("localhost:5000/foo", "v1", "localhost:5000/foo:v1"),
        ("ubuntu", DIGEST, "ubuntu@" + DIGEST),
    ],
)
def test_image_reference(repo: str, ref: str, expected: str) -> None:
    assert image_reference(repo, ref) == expected


def test_truncate_id() -> None:
    assert truncate_id(HEX) == HEX[:12]
    assert truncate_id("abc") == "abc"
    assert truncate_id("") == ""
    assert truncate_id("sha256:" + HEX) == HEX[:12]


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        (HEX[:12], True),
        ("abcdefghijkl", True),  # the legacy regex is [a-z0-9], not hex
        (HEX[:11], False),
        (HEX[:13], False),
        (HEX[:11] + "A", False),
        (HEX[:12] + "\n", False),
        ("", False),
    ],
)
def test_is_short_id(s: str, expected: bool) -> None:
    assert is_short_id(s) is expected


def test_default_tag() -> None:
    assert DEFAULT_TAG == "latest"


@pytest.mark.parametrize(
    ("s", "repository", "tag", "digest", "shown"),
    [
        ("busybox", "busybox", "latest", None, "busybox:latest"),
        ("busybox:1.36", "busybox", "1.36", None, "busybox:1.36"),
        ("docker.io/library/busybox:1", "busybox", "1", None, "busybox:1"),
        ("localhost:5000/foo", "localhost:5000/foo", "latest", None, "localhost:5000/foo:latest"),
        ("localhost:5000/foo:bar", "localhost:5000/foo", "bar", None, "localhost:5000/foo:bar"),
        ("user/app@" + DIGEST, "user/app", None, DIGEST, "user/app@" + DIGEST),
        ("scratch", "scratch", "latest", None, "scratch:latest"),  # parsing is not tagging
    ],
)
def test_reference_parse(
    s: str, repository: str, tag: str | None, digest: str | None, shown: str
) -> None:
    ref = Reference.parse(s)
    assert ref == Reference(repository, tag, digest)
    assert str(ref) == shown
    assert ref.ref == (digest or tag)


def test_reference_parse_default_tag() -> None:
    assert Reference.parse("busybox", default_tag="stable").tag == "stable"
    bare = Reference.parse("busybox", default_tag=None)
    assert bare.tag is None and bare.digest is None
    assert str(bare) == "busybox"
    assert bare.ref == ""


def test_reference_registry_and_remote_name() -> None:
    hub = Reference.parse("busybox")
    assert hub.registry == "docker.io"
    assert hub.remote_name == "library/busybox"
    private = Reference.parse("localhost:5000/team/app:v2")
    assert private.registry == "localhost:5000"
    assert private.remote_name == "team/app"


def test_reference_is_frozen() -> None:
    ref = Reference.parse("busybox")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("s", "message"),
    [
        ("Busybox", "repository name must be lowercase"),
        ("busybox:" + "x" * 129, "Illegal tag name"),
        ("busybox:.x", "Illegal tag name"),
        ("busybox@sha256:b", "invalid reference format: digest"),
        ("busybox@" + DIGEST + "@x", "invalid reference format: digest"),
        ("busybox:1@" + DIGEST, "repository name component"),
        (":latest", "has no repository name"),
        ("", "has no repository name"),
        (HEX, "cannot specify 64-byte hexadecimal strings"),
    ],
)
def test_reference_parse_rejects(s: str, message: str) -> None:
    with pytest.raises(InvalidReferenceError, match=message) as info:
        Reference.parse(s)
    assert "\n" not in str(info.value)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidReferenceError) as info:
        validate_tag("x" * 500)
    assert len(str(info.value)) < 300
    with pytest.raises(InvalidReferenceError) as info:
        validate_tag("bad\ntag")
    assert "\n" not in str(info.value)
    assert "bad\\ntag" in str(info.value)
