"""The registry's pure parts: challenges, platforms, manifests and schema1, credentials."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from pathlib import Path

import pytest

from layerfs.errors import DigestMismatchError, FormatError, InvalidReferenceError
from layerfs.model.config import go_time, schema1_config
from layerfs.model.digest import sha256_digest
from layerfs.model.manifest import (
    ImageManifest,
    IndexManifest,
    Schema1Manifest,
    build_image_manifest,
    parse,
    verify_digest,
)
from layerfs.model.platform import (
    Platform,
    PlatformNotFoundError,
    candidates,
    normalize,
    select,
)
from layerfs.registry.auth import Credentials, parse_challenges
from layerfs.registry.blobs import parse_range
from layerfs.registry.client import is_loopback, safe_url
from layerfs.registry.credentials import DockerConfig, auth_key

# -- challenges ------------------------------------------------------------------------------


def test_bearer_challenge_keeps_commas_inside_quotes():
    [c] = parse_challenges(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:user/app:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:user/app:pull,push",
    }


def test_several_challenges_bearer_not_first():
    found = parse_challenges(
        'Basic realm="x, y", Bearer realm="https://a/t", service=svc, error="insufficient_scope"'
    )
    assert [c.scheme for c in found] == ["basic", "bearer"]
    assert found[0].params == {"realm": "x, y"}
    assert found[1].params["service"] == "svc"
    assert found[1].params["error"] == "insufficient_scope"


def test_challenge_escapes_and_junk():
    [c] = parse_challenges('Bearer realm="a\\"b" , scope="x"')
    assert c.params == {"realm": 'a"b', "scope": "x"}
    assert parse_challenges("") == []
    assert [c.scheme for c in parse_challenges("Negotiate")] == ["negotiate"]


# -- platforms -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/x86_64", "linux/amd64"),
        ("linux/amd64/v1", "linux/amd64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/i386", "linux/386"),
        ("arm64", "linux/arm64"),
    ],
)
def test_platform_normalisation(text, expected):
    assert str(Platform.parse(text)) == expected


def test_platform_parse_rejects_garbage():
    with pytest.raises(InvalidReferenceError):
        Platform.parse("linux//amd64")
    with pytest.raises(InvalidReferenceError):
        Platform.parse("")


def test_candidates_fall_back_in_order():
    assert [str(p) for p in candidates(Platform.parse("linux/amd64/v3"))] == [
        "linux/amd64/v3",
        "linux/amd64/v2",
        "linux/amd64",
        "linux/386",
    ]
    assert [str(p) for p in candidates(Platform.parse("linux/arm/v7"))] == [
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/arm/v5",
    ]
    assert normalize(Platform("Linux", "AMD64")) == Platform("linux", "amd64")


def _entry(plat: dict, digest_char: str, **extra) -> dict:
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + digest_char * 64,
        "size": 100,
        "platform": plat,
        **extra,
    }


def test_select_picks_the_right_platform_and_skips_attestations():
    entries = [
        _entry({"os": "unknown", "architecture": "unknown"}, "0"),
        _entry({"os": "linux", "architecture": "arm", "variant": "v6"}, "1"),
        _entry({"os": "linux", "architecture": "arm", "variant": "v7"}, "2"),
        _entry({"os": "linux", "architecture": "amd64"}, "3"),
        _entry({"os": "linux", "architecture": "arm64", "variant": "v8"}, "4"),
        _entry({"os": "linux", "architecture": "amd64"}, "5"),
    ]
    assert select(entries, Platform.parse("linux/amd64"), "x")["digest"][7] == "3"
    assert select(entries, Platform.parse("linux/arm/v7"), "x")["digest"][7] == "2"
    assert select(entries, Platform.parse("linux/arm/v6"), "x")["digest"][7] == "1"
    assert select(entries, Platform.parse("linux/arm64"), "x")["digest"][7] == "4"
    # amd64/v2 falls back to plain amd64, the first in index order
    assert select(entries, Platform.parse("linux/amd64/v2"), "x")["digest"][7] == "3"


def test_select_error_lists_available_platforms():
    entries = [
        _entry({"os": "linux", "architecture": "amd64"}, "3"),
        _entry({"os": "linux", "architecture": "arm64"}, "4"),
        _entry({"os": "unknown", "architecture": "unknown"}, "0"),
    ]
    with pytest.raises(PlatformNotFoundError) as err:
        select(entries, Platform.parse("linux/s390x"), "busybox:latest")
    assert "no manifest for platform linux/s390x" in str(err.value)
    assert "available: linux/amd64, linux/arm64" in str(err.value)
    assert "unknown" not in str(err.value)


# -- manifests -------------------------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def _schema2(layers: int = 1) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "x", "size": 2, "digest": "sha256:" + "a" * 64},
            "layers": [
                {"mediaType": "y", "size": 3, "digest": "sha256:" + "b" * 64} for _ in range(layers)
            ],
        }
    ).encode()


def test_parse_dispatches_on_type_and_checks_agreement():
    raw = _schema2(2)
    m = parse(raw, DOCKER_MANIFEST + "; charset=utf-8", "m")
    assert isinstance(m, ImageManifest)
    assert len(m.layers) == 2 and m.digest == sha256_digest(raw)
    with pytest.raises(FormatError, match="served as"):
        parse(raw, "application/vnd.oci.image.manifest.v1+json", "m")
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert isinstance(parse(index, "application/json", "i"), IndexManifest)
    with pytest.raises(FormatError):
        parse(b'{"schemaVersion": 3}', "", "m")
    with pytest.raises(DigestMismatchError):
        verify_digest(raw, "sha256:" + "0" * 64, "m")


def test_build_manifest_docker_and_oci():
    from layerfs.model.manifest import Descriptor

    layer = Descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", "sha256:" + "c" * 64, 5)
    raw, media = build_image_manifest(b"{}", [layer], "docker")
    doc = json.loads(raw)
    assert media == DOCKER_MANIFEST and doc["mediaType"] == media
    assert doc["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert raw.startswith(b'{\n   "schemaVersion": 2')  # docker's three-space indent
    raw, media = build_image_manifest(b"{}", [layer], "oci")
    doc = json.loads(raw)
    assert doc["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert doc["config"]["digest"] == sha256_digest(b"{}")


V1_BASE = "b" * 64
V1_TOP = "c" * 64


def _schema1(signed: bool = False) -> tuple[bytes, dict]:
    history = [
        {
            "v1Compatibility": json.dumps(
                {
                    "id": V1_TOP,
                    "parent": V1_BASE,
                    "created": "2020-02-02T00:00:00.500000000Z",
                    "container_config": {"Cmd": ["/bin/sh", "-c", "echo <hi> & bye"]},
                    "config": {"Cmd": ["sh"]},
                    "architecture": "amd64",
                    "os": "linux",
                    "Size": 12,
                }
            )
        },
        {
            "v1Compatibility": json.dumps(
                {
                    "id": V1_BASE,
                    "created": "2020-01-01T00:00:00Z",
                    "container_config": {"Cmd": ["ADD file"]},
                }
            )
        },
    ]
    doc = {
        "schemaVersion": 1,
        "name": "team/app",
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": "sha256:" + "1" * 64}, {"blobSum": "sha256:" + "2" * 64}],
        "history": history,
    }
    payload = json.dumps(doc, indent=3).encode()
    if not signed:
        return payload, doc
    # A JWS the way libtrust makes it: the payload without its closing "\n}".
    length = len(payload) - 2
    tail = payload[length:]
    protected = (
        base64.urlsafe_b64encode(
            json.dumps(
                {
                    "formatLength": length,
                    "formatTail": base64.urlsafe_b64encode(tail).decode().rstrip("="),
                }
            ).encode()
        )
        .decode()
        .rstrip("=")
    )
    signed_doc = (
        payload[:length]
        + b',\n   "signatures": [{"header": {}, "signature": "x", "protected": "'
        + protected.encode()
        + b'"}]\n}'
    )
    return signed_doc, doc


def test_schema1_signed_digest_is_of_the_payload():
    unsigned, _ = _schema1()
    signed, _ = _schema1(signed=True)
    m = parse(signed, "application/vnd.docker.distribution.manifest.v1+prettyjws", "s1")
    assert isinstance(m, Schema1Manifest)
    assert m.digest == sha256_digest(unsigned)
    assert m.blob_sums == ["sha256:" + "2" * 64, "sha256:" + "1" * 64]  # base first


def test_schema1_config_as_docker_makes_it():
    raw, _ = _schema1()
    m = parse(raw, "application/vnd.docker.distribution.manifest.v1+json", "s1")
    assert isinstance(m, Schema1Manifest)
    config = schema1_config(m, ["sha256:" + "d" * 64, "sha256:" + "e" * 64])
    doc = json.loads(config)
    assert list(doc) == sorted(doc)
    assert "id" not in doc and "parent" not in doc and "Size" not in doc
    assert doc["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + "d" * 64, "sha256:" + "e" * 64],
    }
    assert doc["history"] == [
        {"created": "2020-01-01T00:00:00Z", "created_by": "ADD file"},
        {"created": "2020-02-02T00:00:00.5Z", "created_by": "/bin/sh -c echo <hi> & bye"},
    ]
    # Go's encoder: compact, HTML characters escaped
    assert b"\\u003chi\\u003e \\u0026 bye" in config
    assert b": " not in config


def test_schema1_chain_checks():
    _, doc = _schema1()
    doc["history"][0]["v1Compatibility"] = json.dumps({"id": V1_TOP, "parent": "f" * 64})
    with pytest.raises(FormatError, match="invalid parent ID"):
        parse(json.dumps(doc).encode(), "", "s1")
    _, doc = _schema1()
    doc["fsLayers"].pop()
    with pytest.raises(FormatError, match="does not match"):
        parse(json.dumps(doc).encode(), "", "s1")
    # adjacent duplicates collapse
    _, doc = _schema1()
    doc["fsLayers"].insert(0, doc["fsLayers"][0])
    doc["history"].insert(0, doc["history"][0])
    m = parse(json.dumps(doc).encode(), "", "s1")
    assert isinstance(m, Schema1Manifest) and len(m.blob_sums) == 2


def test_go_time():
    assert go_time("2020-01-01T00:00:00.000000000Z") == "2020-01-01T00:00:00Z"
    assert go_time("2020-01-01T00:00:00.1234567891+00:00") == "2020-01-01T00:00:00.123456789Z"
    assert go_time("2020-01-01T01:00:00.10+01:00") == "2020-01-01T01:00:00.1+01:00"
    assert go_time(None) == "0001-01-01T00:00:00Z"


# -- wire helpers ---------------------------------------------------------------------------


def test_range_both_forms():
    assert parse_range("0-1023") == 1023
    assert parse_range("bytes=0-1023") == 1023
    assert parse_range(None) is None
    assert parse_range("junk") is None


def test_safe_url_and_loopback():
    url = "https://user:pw@s3.example/b?X-Amz-Signature=abc&X-Amz-Credential=k&part=1"
    shown = safe_url(url)
    assert "pw" not in shown and "abc" not in shown and "part=1" in shown
    for host in ("127.0.0.1:5000", "127.9.9.9", "localhost:80", "[::1]:5000", "::1"):
        assert is_loopback(host), host
    for host in ("example.com", "10.0.0.1:5000", "[2001:db8::1]:5000"):
        assert not is_loopback(host), host


# -- credentials ------------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_config_lookup_like_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.delenv("DOCKER_AUTH_CONFIG", raising=False)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _b64("hubuser:hub:pw\x00")},
                    "https://myreg:5000/v2/": {"auth": _b64("me:secret")},
                    "other:1": {"username": "u", "password": "p", "identitytoken": "tok"},
                },
                "HttpHeaders": {"X": "y"},
            }
        )
    )
    config = DockerConfig()
    assert config.get("docker.io") == Credentials("hubuser", "hub:pw")
    assert config.get("myreg:5000") == Credentials("me", "secret")
    assert config.get("other:1") == Credentials("u", "p", "tok")
    assert config.get("nowhere") is None
    assert auth_key("docker.io") == "https://index.docker.io/v1/"
    monkeypatch.setenv(
        "DOCKER_AUTH_CONFIG", json.dumps({"auths": {"myreg:5000": {"auth": _b64("env:pw")}}})
    )
    assert DockerConfig().get("myreg:5000") == Credentials("env", "pw")


def test_config_store_and_erase_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "new"))
    config = DockerConfig()
    config.store("reg:5000", Credentials("alice", "s3cret"))
    path = tmp_path / "new" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"auths": {"reg:5000": {"auth": _b64("alice:s3cret")}}}
    doc["extra"] = {"kept": True}
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o640)
    config = DockerConfig()
    config.store("docker.io", Credentials("bob", "pw"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # docker keeps an existing mode
    doc = json.loads(path.read_text())
    assert doc["extra"] == {"kept": True}
    assert "https://index.docker.io/v1/" in doc["auths"]
    assert config.erase("reg:5000") is True
    assert config.erase("reg:5000") is False
    assert "reg:5000" not in json.loads(path.read_text())["auths"]
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp files left


HELPER = """#!/usr/bin/env python3
import json, pathlib, sys
store = pathlib.Path({store!r})
action, data = sys.argv[1], sys.stdin.read()
if action == "store":
    doc = json.loads(data)
    (store / doc["ServerURL"].replace("/", "_").replace(":", "_")).write_text(data)
    sys.exit(0)
path = store / data.strip().replace("/", "_").replace(":", "_")
if not path.exists():
    print("credentials not found in native keychain")
    sys.exit(1)
if action == "get":
    print(path.read_text())
elif action == "erase":
    path.unlink()
"""


def test_credential_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bindir, store = tmp_path / "bin", tmp_path / "secrets"
    bindir.mkdir()
    store.mkdir()
    helper = bindir / "docker-credential-test"
    helper.write_text(HELPER.format(store=str(store)))
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    monkeypatch.delenv("DOCKER_AUTH_CONFIG", raising=False)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(
        json.dumps({"credsStore": "test", "credHelpers": {"special:1": "missing"}})
    )
    config = DockerConfig()
    assert config.get("reg:5000") is None  # "credentials not found" means none
    config.store("reg:5000", Credentials("alice", "pw"))
    saved = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert saved["auths"] == {"reg:5000": {}}  # no secret in the file
    assert DockerConfig().get("reg:5000") == Credentials("alice", "pw")
    config.store("tok:1", Credentials("", "", "refresh-me"))
    assert DockerConfig().get("tok:1") == Credentials("", "", "refresh-me")
    assert config.erase("reg:5000") is True
    assert DockerConfig().get("reg:5000") is None
    from layerfs.registry.credentials import CredentialsError

    with pytest.raises(CredentialsError, match="docker-credential-missing is not installed"):
        DockerConfig().get("special:1")


def test_progress_speaks_docker():
    from layerfs.cli.registry import PULL_WORDS, PUSH_WORDS, DockerProgress

    out = io.StringIO()
    progress = DockerProgress(PULL_WORDS, stream=out, tty=False)
    progress.start("sha256:" + "a" * 64, "aaaaaaaaaaaa", 10, "Waiting")
    progress.status("sha256:" + "a" * 64, "Waiting for another process")
    progress.status("sha256:" + "a" * 64, "Copying")  # the pipeline's word: not shown
    progress.status("sha256:" + "a" * 64, "Downloading")
    progress.finish("sha256:" + "a" * 64, "Complete")
    assert out.getvalue().splitlines() == [
        "aaaaaaaaaaaa: Pulling fs layer",
        "aaaaaaaaaaaa: Waiting",
        "aaaaaaaaaaaa: Downloading",
        "aaaaaaaaaaaa: Pull complete",
    ]
    out = io.StringIO()
    progress = DockerProgress(PUSH_WORDS, stream=out, tty=False)
    progress.note("k1", "Mounted from team/app")
    progress.start("k1", "bbbbbbbbbbbb", None, "Already exists")
    progress.start("k2", "cccccccccccc", None, "Already exists")
    progress.start("k3", "dddddddddddd", 5, "Waiting")
    progress.status("k3", "Copying")
    progress.finish("k3", "Complete")
    assert out.getvalue().splitlines() == [
        "bbbbbbbbbbbb: Mounted from team/app",
        "cccccccccccc: Layer already exists",
        "dddddddddddd: Preparing",
        "dddddddddddd: Pushing",
        "dddddddddddd: Pushed",
    ]


def test_index_or_manifest_is_decided_once():
    """The rule model.manifest.manifest_kind applies for the registry and OCI layouts alike."""
    from layerfs.model.manifest import (
        MEDIA_DOCKER_LAYER_GZIP,
        MEDIA_DOCKER_LIST,
        MEDIA_OCI_LAYER_GZIP,
        MEDIA_OCI_LAYER_TAR,
        MEDIA_OCI_LAYER_ZSTD,
        MEDIA_OCI_MANIFEST,
        blob_layer_type,
        layer_type_for_format,
        manifest_kind,
    )

    assert manifest_kind(MEDIA_DOCKER_LIST, {"layers": []}) == "index"  # the type decides
    assert manifest_kind(MEDIA_OCI_MANIFEST, {"manifests": []}) == "image"
    assert manifest_kind("", {"manifests": []}) == "index"  # no type: the shape decides
    assert manifest_kind("", {"layers": []}) == "image"
    assert manifest_kind("", {}) is None
    assert manifest_kind("text/plain", {"layers": []}) is None
    assert blob_layer_type(b"\x1f\x8b\x08\x00") == MEDIA_OCI_LAYER_GZIP
    assert blob_layer_type(b"\x28\xb5\x2f\xfd") == MEDIA_OCI_LAYER_ZSTD
    assert blob_layer_type(b"etc/") == MEDIA_OCI_LAYER_TAR
    assert layer_type_for_format(MEDIA_OCI_LAYER_GZIP, "docker") == MEDIA_DOCKER_LAYER_GZIP
    assert layer_type_for_format(MEDIA_DOCKER_LAYER_GZIP, "oci") == MEDIA_OCI_LAYER_GZIP
    assert layer_type_for_format(MEDIA_OCI_LAYER_ZSTD, "docker") == MEDIA_OCI_LAYER_ZSTD
