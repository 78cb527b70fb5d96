"""The registry client, pull and push against a fake registry on 127.0.0.1 (tests/fake_registry)."""

from __future__ import annotations

import gzip
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.errors import (
    AuthenticationError,
    DigestMismatchError,
    LayerfsError,
    RegistryError,
)
from layerfs.model.config import schema1_config
from layerfs.model.digest import sha256_digest
from layerfs.model.platform import Platform, PlatformNotFoundError
from layerfs.model.reference import Reference
from layerfs.registry import client as client_module
from layerfs.registry.auth import Credentials
from layerfs.registry.client import RegistryClient, RegistryOptions
from layerfs.store.store import Store
from layerfs.transfer import pull, push
from layerfs.transports.base import SourceImage
from layerfs.transports.registry import RegistrySource
from tests.conformance import assert_valid_image
from tests.fake_registry import BlobHost, FakeRegistry, Fault, image_documents, running, sha256
from tests.helpers import build_tar, tar_file

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def make_layer(seed: str, size: int = 3000) -> tuple[bytes, bytes, str]:
    """(tar, gzipped tar, diff ID) of a layer holding one file of pseudo-random bytes."""
    raw = build_tar(tar_file(f"files/{seed}", seed.encode() + os.urandom(size)))
    return raw, gzip.compress(raw, mtime=0), sha256_digest(raw)


def publish_image(
    reg: FakeRegistry, repo: str, tag: str, seeds: list[str], arch: str = "amd64", size: int = 3000
) -> tuple[str, str, list[bytes]]:
    """Put an image in the fake registry; returns (manifest digest, image ID, blobs)."""
    layers = [make_layer(s, size) for s in seeds]
    blobs = [gz for _, gz, _ in layers]
    config, manifest = image_documents(blobs, [d for _, _, d in layers], arch=arch)
    for blob in blobs:
        reg.add_blob(repo, blob)
    reg.add_blob(repo, config)
    digest = reg.add_manifest(repo, tag, manifest, DOCKER_MANIFEST)
    return digest, sha256_digest(config)[7:], blobs


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


@pytest.fixture
def options() -> RegistryOptions:
    return RegistryOptions(retry_delay=0.001, timeout=10, retries=4, use_config=False)


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    with running() as reg:
        yield reg


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff sleeps are recorded, not slept."""
    recorded: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", recorded.append)
    return recorded


def images_of(store: Store) -> list[str]:
    return sorted(store.graph.map())


# -- pull ------------------------------------------------------------------------------------


def test_pull_by_tag_records_digest(registry: FakeRegistry, store: Store, options):
    digest, image_id, _ = publish_image(registry, "team/app", "v1", ["a", "b", "c"])

    result = pull(store, f"{registry.host}/team/app:v1", options=options)

    assert result.image_id == image_id
    assert result.digest == digest
    assert result.layers_copied == 3
    assert store.tags.get(f"{registry.host}/team/app") == {"v1": image_id, digest: image_id}
    again = pull(store, f"{registry.host}/team/app:v1", options=options)
    assert again.layers_copied == 0 and again.layers_skipped == 3
    assert len(registry.requests("GET", "/blobs/")) == 4  # 3 layers + config, once


def test_pull_by_digest_verifies_the_manifest(registry: FakeRegistry, store: Store, options):
    digest, image_id, _ = publish_image(registry, "app", "v1", ["a"])
    result = pull(store, f"{registry.host}/app@{digest}", options=options)
    assert result.image_id == image_id
    assert store.tags.get(f"{registry.host}/app") == {digest: image_id}

    other = store.root.parent / "other"
    wrong = "sha256:" + "0" * 64
    registry.manifests[("app", wrong)] = registry.manifests[("app", "v1")]
    with pytest.raises(DigestMismatchError, match="digest mismatch"):
        pull(Store.open(other), f"{registry.host}/app@{wrong}", options=options)
    assert images_of(Store.open(other)) == []


def test_pull_picks_the_platform_from_an_index(registry: FakeRegistry, store: Store, options):
    amd_digest, amd_id, _ = publish_image(registry, "multi", "amd", ["x1"], arch="amd64")
    arm_digest, arm_id, _ = publish_image(registry, "multi", "arm", ["y1"], arch="arm64")
    entries = []
    for digest, plat in (
        (amd_digest, {"os": "linux", "architecture": "amd64"}),
        (arm_digest, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    ):
        data = registry.manifests[("multi", digest)][0]
        entries.append({"mediaType": DOCKER_MANIFEST, "digest": digest, "size": len(data),
                        "platform": plat})  # fmt: skip
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    index_digest = registry.add_manifest("multi", "latest", index, OCI_INDEX)

    result = pull(
        store, f"{registry.host}/multi", options=options, platform=Platform.parse("arm64")
    )
    assert result.image_id == arm_id
    assert result.digest == index_digest  # docker records the index digest
    result = pull(
        store, f"{registry.host}/multi", options=options, platform=Platform.parse("linux/amd64")
    )
    assert result.image_id == amd_id
    with pytest.raises(PlatformNotFoundError, match=r"available: linux/amd64, linux/arm64"):
        pull(store, f"{registry.host}/multi", options=options, platform=Platform.parse("s390x"))


def test_pull_schema1(registry: FakeRegistry, store: Store, options):
    layers = [make_layer(s) for s in ("base", "top")]
    for _, gz, _ in layers:
        registry.add_blob("old", gz)
    v1 = [
        {"id": "b" * 64, "created": "2015-01-01T00:00:00Z", "container_config": {"Cmd": ["ADD"]}},
        {"id": "e" * 64, "parent": "b" * 64, "created": "2015-01-02T00:00:00Z",
         "throwaway": True, "container_config": {"Cmd": ["ENV a=b"]}},
        {"id": "c" * 64, "parent": "e" * 64, "created": "2015-01-03T00:00:00Z",
         "container_config": {"Cmd": ["RUN x"]}, "architecture": "amd64", "os": "linux"},
    ]  # fmt: skip
    empty = registry.add_blob("old", gzip.compress(b"\0" * 1024))
    sums = [sha256(layers[0][1]), empty, sha256(layers[1][1])]
    manifest = json.dumps(
        {
            "schemaVersion": 1,
            "name": "old",
            "tag": "v1",
            "architecture": "amd64",
            "fsLayers": [{"blobSum": s} for s in reversed(sums)],
            "history": [{"v1Compatibility": json.dumps(d)} for d in reversed(v1)],
        }
    ).encode()
    registry.add_manifest(
        "old", "v1", manifest, "application/vnd.docker.distribution.manifest.v1+json"
    )

    result = pull(store, f"{registry.host}/old:v1", options=options)

    from layerfs.model.manifest import parse

    expected = schema1_config(parse(manifest, "", "m"), [layers[0][2], layers[1][2]])  # type: ignore[arg-type]
    assert result.image_id == sha256_digest(expected)[7:]
    assert store.graph.get(result.image_id).raw_json == expected
    assert len(registry.requests("GET", empty)) == 0  # throwaway layers are not layers


def test_wrong_blob_is_rejected_and_nothing_published(
    registry: FakeRegistry, store: Store, options
):
    _, _, blobs = publish_image(registry, "app", "v1", ["a", "b"])
    registry.wrong_blob = sha256(blobs[1])
    with pytest.raises(LayerfsError):
        pull(store, f"{registry.host}/app:v1", options=options)
    assert images_of(store) == []
    assert store.layers.diff_ids() == []
    assert list((store.root / "tmp").iterdir()) == []
    assert store.tags.get(f"{registry.host}/app") is None


def test_dropped_download_resumes_with_range(registry: FakeRegistry, store: Store, options):
    _, image_id, blobs = publish_image(registry, "app", "v1", ["big"], size=400_000)
    registry.drop_blob_after = 50_000
    registry.drops_left = 2

    result = pull(store, f"{registry.host}/app:v1", options=options)

    assert result.image_id == image_id
    assert result.resumes == 2
    gets = registry.requests("GET", sha256(blobs[0]))
    assert [g.headers.get("Range") for g in gets] == [None, "bytes=50000-", "bytes=100000-"]


def test_resume_without_range_support_skips_what_it_has(
    registry: FakeRegistry, store: Store, options
):
    _, image_id, _ = publish_image(registry, "app", "v1", ["big"], size=200_000)
    registry.drop_blob_after = 30_000
    registry.drops_left = 1
    registry.ignore_range = True
    assert pull(store, f"{registry.host}/app:v1", options=options).image_id == image_id


def test_retries_500_and_429_with_retry_after(
    registry: FakeRegistry, store: Store, options, sleeps: list[float]
):
    _, image_id, _ = publish_image(registry, "app", "v1", ["a"])
    registry.faults = [
        Fault("GET", "/manifests/", 500, times=2),
        Fault("GET", "/blobs/", 429, times=1, headers={"Retry-After": "3"}),
        Fault("GET", "/blobs/", 503, times=1),
    ]
    result = pull(store, f"{registry.host}/app:v1", options=options)
    assert result.image_id == image_id
    assert 3.0 in sleeps  # Retry-After honoured
    assert len(sleeps) == 4
    assert sleeps[1] > sleeps[0]  # exponential backoff


def test_gives_up_after_the_retries(registry: FakeRegistry, store: Store, options, sleeps):
    publish_image(registry, "app", "v1", ["a"])
    registry.faults = [Fault("GET", "/manifests/", 500, times=100)]
    with pytest.raises(RegistryError, match="500"):
        pull(store, f"{registry.host}/app:v1", options=options)
    assert len(sleeps) == options.retries


def test_registry_that_never_answers_times_out(store: Store, options):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # connections complete in the backlog; nobody ever answers
    try:
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        options.timeout, options.retries = 0.3, 0
        with pytest.raises(RegistryError) as err:
            pull(store, f"{host}/app:v1", options=options)
        assert "did not answer within 0.3 s (timeout)" in str(err.value)
    finally:
        listener.close()


def test_connection_refused_is_a_clear_error(store: Store, options, sleeps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options.retries = 1
    with pytest.raises(RegistryError, match="connection refused"):
        pull(store, f"127.0.0.1:{port}/app:v1", options=options)


# -- auth ------------------------------------------------------------------------------------


def test_basic_auth(store: Store, options):
    with running(auth="basic", users={"alice": "s3cret"}) as reg:
        publish_image(reg, "app", "v1", ["a"])
        client = RegistryClient(reg.host, options, Credentials("alice", "s3cret"))
        from layerfs.registry.blobs import Repository

        raw, _, _ = Repository(client, "app").get_manifest("v1")
        client.close()
        assert json.loads(raw)["schemaVersion"] == 2
        bad = RegistryClient(reg.host, options, Credentials("alice", "wrong-password"))
        with pytest.raises(AuthenticationError) as err:
            Repository(bad, "app").get_manifest("v1")
        bad.close()
        assert "wrong-password" not in str(err.value) and "401" in str(err.value)
        with pytest.raises(AuthenticationError, match="401"):
            pull(store, f"{reg.host}/app:v1", options=options)


def test_bearer_token_flow_with_push_scope(store: Store, options, monkeypatch):
    monkeypatch.setattr(
        "layerfs.registry.client.load_credentials", lambda r: Credentials("bob", "pw")
    )
    options.use_config = True
    with running(auth="bearer", users={"bob": "pw"}) as reg:
        _, image_id, _ = publish_image(reg, "team/app", "v1", ["a", "b"])
        result = pull(store, f"{reg.host}/team/app:v1", options=options)
        assert result.image_id == image_id
        scopes = [q["query"].get("scope") for q in reg.token_requests]
        assert ["repository:team/app:pull"] in scopes
        assert all(q["query"]["service"] == ["fake-registry"] for q in reg.token_requests)
        # one token serves the whole pull
        assert len([s for s in scopes if s == ["repository:team/app:pull"]]) == 1

        store.tags.tag(f"{reg.host}/team/copy", "v2", image_id)
        push(store, f"{reg.host}/team/copy:v2", options=options)
        scopes = [q["query"].get("scope") for q in reg.token_requests]
        assert any(s and "repository:team/copy:pull,push" in s for s in scopes)
        assert reg.manifests[("team/copy", "v2")]
        # the pulled blobs were mounted from team/app, whose pull scope was asked for too
        assert any(s and "repository:team/app:pull" in s and len(s) == 2 for s in scopes)
        assert reg.requests("POST", "mount=")


def test_token_is_renewed_when_it_expires(store: Store, options, monkeypatch):
    with running(auth="bearer", anonymous_pull=True, token_lifetime=60) as reg:
        publish_image(reg, "app", "v1", ["a"])
        client = RegistryClient(reg.host, options, None)
        from layerfs.registry import auth as auth_module
        from layerfs.registry.blobs import Repository

        repo = Repository(client, "app")
        repo.get_manifest("v1")
        repo.get_manifest("v1")
        assert len(reg.token_requests) == 1
        real = auth_module.time.time
        monkeypatch.setattr(auth_module.time, "time", lambda: real() + 120)
        for token in reg.tokens:  # the registry agrees they are stale
            reg.tokens[token] = (reg.tokens[token][0], real() - 1)
        repo.get_manifest("v1")
        assert len(reg.token_requests) == 2
        client.close()


def test_redirect_to_another_host_drops_authorization(store: Store, options, monkeypatch):
    with running(auth="basic", users={"alice": "pw"}) as reg:
        _, image_id, _ = publish_image(reg, "app", "v1", ["a", "b"])
        blob_host = BlobHost(reg)
        try:
            reg.redirect_blobs_to = blob_host.url
            monkeypatch.setattr(
                "layerfs.registry.client.load_credentials", lambda r: Credentials("alice", "pw")
            )
            options.use_config = True
            result = pull(store, f"{reg.host}/app:v1", options=options)
        finally:
            blob_host.stop()
        assert result.image_id == image_id
        assert len(blob_host.log) == 3  # config + 2 layers came from the other host
        assert all("Authorization" not in e.headers for e in blob_host.log)
        assert all("Authorization" in e.headers for e in reg.requests("GET", "/blobs/"))


# -- push ------------------------------------------------------------------------------------


def _import(store: Store, tmp_path: Path, name: str, seed: str, size: int = 3000) -> str:
    from layerfs.rootfs import import_rootfs

    raw, _, _ = make_layer(seed, size)
    path = tmp_path / f"{seed}.tar"
    path.write_bytes(raw)
    return import_rootfs(store, str(path), name).image.id


def assert_valid_in_registry(name: str, options: RegistryOptions) -> SourceImage:
    """The image ``name`` of a registry, read back as a docker:// source, is well-formed."""
    reference = Reference.parse(name)
    client = RegistryClient(reference.registry, options)
    try:
        (image,) = assert_valid_image(RegistrySource(client, reference))
    finally:
        client.close()
    return image


def test_push_then_pull_back(registry: FakeRegistry, store: Store, options, tmp_path: Path):
    image_id = _import(store, tmp_path, f"{registry.host}/app:v1", "one", 100_000)
    result = push(store, f"{registry.host}/app:v1", options=options)
    [(tag, digest, size)] = result.pushed
    assert tag == "v1" and size == len(registry.manifests[("app", "v1")][0])
    assert digest == sha256(registry.manifests[("app", "v1")][0])
    manifest = json.loads(registry.manifests[("app", "v1")][0])
    assert manifest["mediaType"] == DOCKER_MANIFEST
    layer_digest = manifest["layers"][0]["digest"]
    diff_id = store.graph.get(image_id).layer
    assert layer_digest in store.layers.info(diff_id).blob_digests
    assert store.graph.get_layer_digest(image_id) == layer_digest
    pushed = assert_valid_in_registry(f"{registry.host}/app:v1", options)
    assert pushed.config_digest == "sha256:" + image_id

    other = Store.open(tmp_path / "other")
    assert pull(other, f"{registry.host}/app:v1", options=options).image_id == image_id


def test_chunked_upload_both_range_forms(
    registry: FakeRegistry, store: Store, options, tmp_path: Path
):
    options.chunk_size = 16 * 1024
    _import(store, tmp_path, f"{registry.host}/app:v1", "chunky", 200_000)
    push(store, f"{registry.host}/app:v1", options=options)
    patches = registry.requests("PATCH")
    assert len(patches) >= 2
    assert patches[0].headers["Content-Range"].startswith("0-")
    registry.old_range_form = True
    _import(store, tmp_path, f"{registry.host}/app:v2", "chunky2", 200_000)
    push(store, f"{registry.host}/app:v2", options=options)
    assert len(registry.requests("PATCH")) > len(patches)


def test_repeat_push_neither_compresses_nor_uploads(
    registry: FakeRegistry, store: Store, options, tmp_path: Path, monkeypatch
):
    _import(store, tmp_path, f"{registry.host}/app:v1", "one")
    push(store, f"{registry.host}/app:v1", options=options)
    posts = len(registry.requests("POST"))
    from layerfs.transports import registry as transport

    def no_compression(*args, **kw):
        raise AssertionError("compressed again")

    monkeypatch.setattr(transport._Compressed, "pieces", no_compression)
    result = push(store, f"{registry.host}/app:v1", options=options)
    assert result.layers_uploaded == 0 and result.layers_skipped == 1
    assert len(registry.requests("POST")) == posts
    # another repository of the same registry: mounted, not uploaded
    store.tags.tag(
        f"{registry.host}/elsewhere", "x", store.tags.lookup_image(f"{registry.host}/app:v1").id
    )
    result = push(store, f"{registry.host}/elsewhere:x", options=options)
    assert result.layers_mounted == 1
    assert registry.requests("POST", "mount=")[0].path.count("from=app") == 1


def test_push_oci_format_and_all_tags(
    registry: FakeRegistry, store: Store, options, tmp_path: Path
):
    first = _import(store, tmp_path, f"{registry.host}/app:a", "one")
    _import(store, tmp_path, f"{registry.host}/app:b", "two")
    store.tags.tag(f"{registry.host}/app", "c", first)
    result = push(store, f"{registry.host}/app", all_tags=True, options=options, fmt="oci")
    assert sorted(t for t, _, _ in result.pushed) == ["a", "b", "c"]
    doc = json.loads(registry.manifests[("app", "a")][0])
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert doc["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    for tag in ("a", "b", "c"):
        assert_valid_in_registry(f"{registry.host}/app:{tag}", options)


def test_identity_token_is_exchanged_with_oauth(store: Store, options, monkeypatch):
    with running(auth="bearer", users={"bob": "pw"}) as reg:
        _, image_id, _ = publish_image(reg, "app", "v1", ["a"])
        monkeypatch.setattr(
            "layerfs.registry.client.load_credentials",
            lambda r: Credentials("", "", "refresh-abc"),
        )
        options.use_config = True
        assert pull(store, f"{reg.host}/app:v1", options=options).image_id == image_id
        [request] = reg.token_requests
        assert request["method"] == "POST"
        assert request["query"]["grant_type"] == ["refresh_token"]
        assert request["query"]["scope"] == ["repository:app:pull"]
        assert request["authorization"] == ""  # the refresh token is the credential


def test_login_stores_the_refresh_token(tmp_path: Path, options, monkeypatch):
    from layerfs.registry.credentials import DockerConfig
    from layerfs.registry.login import login, logout

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    monkeypatch.delenv("DOCKER_AUTH_CONFIG", raising=False)
    with running(auth="bearer", users={"bob": "pw"}) as reg:
        assert login(reg.host, "bob", "pw", options=options) == "Login Succeeded"
        creds = DockerConfig().get(reg.host)
        assert creds is not None and creds.identity_token.startswith("refresh-")
        assert "pw" not in (tmp_path / "cfg" / "config.json").read_text().replace("refresh", "")
        with pytest.raises(AuthenticationError, match="incorrect username or password"):
            login(reg.host, "bob", "nope", options=options)
        assert logout(reg.host) == f"Removing login credentials for {reg.host}"
        assert logout(reg.host) == f"Not logged in to {reg.host}"


def test_proxy_from_the_environment(store: Store, options, monkeypatch):
    """HTTP(S)_PROXY is used; the fake registry doubles as the proxy (absolute URIs)."""
    with running() as reg:
        _, image_id, _ = publish_image(reg, "app", "v1", ["a"])
        monkeypatch.setenv("HTTP_PROXY", reg.url)
        monkeypatch.setenv("HTTPS_PROXY", reg.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        options.insecure_registries = ("registry.invalid:5000",)
        result = pull(store, "registry.invalid:5000/app:v1", options=options)
        assert result.image_id == image_id
        assert reg.requests("GET", "http://registry.invalid:5000/v2/app/manifests/v1")


def test_plain_http_only_where_allowed(store: Store, options):
    with running() as reg:
        publish_image(reg, "app", "v1", ["a"])
        client = RegistryClient("registry.invalid", options)
        assert not client.plain_http_allowed
        client.close()
        assert RegistryClient("docker.io", options).host == "registry-1.docker.io"
        from layerfs.model.reference import Reference

        assert Reference.parse("busybox").remote_name == "library/busybox"
        assert Reference.parse("docker.io/library/busybox:1").repository == "busybox"


def test_failed_chunk_is_resumed_from_the_upload_status(
    registry: FakeRegistry, store: Store, options, tmp_path: Path, sleeps
):
    options.chunk_size = 16 * 1024
    _import(store, tmp_path, f"{registry.host}/app:v1", "chunky", 100_000)
    registry.faults = [Fault("PATCH", "/blobs/uploads/", 500, times=1)]
    push(store, f"{registry.host}/app:v1", options=options)
    statuses = [e for e in registry.requests("GET", "/blobs/uploads/")]
    assert len(statuses) == 1  # asked where the upload stood, then went on
    assert registry.manifests[("app", "v1")]


# -- the docker:// transport ----------------------------------------------------------------


def test_docker_transport_is_a_source_and_a_destination(
    registry: FakeRegistry, store: Store, tmp_path: Path
):
    from layerfs.copy import copy
    from layerfs.transports import open_destination, open_source
    from layerfs.transports.local import StoreDestination, StoreSource

    digest, image_id, blobs = publish_image(registry, "team/app", "v1", ["a", "b"])
    result = copy(open_source(f"docker://{registry.host}/team/app:v1"), StoreDestination(store))
    assert [i.image_id for i in result.copied] == [image_id]
    assert store.tags.get(f"{registry.host}/team/app")["v1"] == image_id

    destination = open_destination(f"docker://{registry.host}/copy:v2")
    copy(StoreSource(store, [f"{registry.host}/team/app:v1"]), destination, keep_going=False)
    pushed = json.loads(registry.manifests[("copy", "v2")][0])
    original = json.loads(registry.manifests[("team/app", "v1")][0])
    assert pushed["config"]["digest"] == original["config"]["digest"] == f"sha256:{image_id}"
    assert len(pushed["layers"]) == len(blobs)
    assert digest != sha256(registry.manifests[("copy", "v2")][0])  # recompressed, not copied


def test_docker_transport_names(registry: FakeRegistry, store: Store, tmp_path: Path):
    from layerfs.errors import UsageError
    from layerfs.transports import DESTINATIONS, SOURCES, open_destination, split_spec

    assert split_spec("docker://localhost:5000/a/b:v1", SOURCES) == (
        "docker",
        "localhost:5000/a/b:v1",
        None,
    )
    for spec in ("docker:/x", "docker://"):
        with pytest.raises(UsageError, match="docker://NAME"):
            split_spec(spec, DESTINATIONS)
    with pytest.raises(UsageError, match="digest"):
        open_destination(f"docker://{registry.host}/app@sha256:{'a' * 64}")


def test_load_from_a_registry(registry: FakeRegistry, tmp_path: Path, capsys):
    from layerfs.cli import main

    digest, image_id, _ = publish_image(registry, "app", "v1", ["a"])
    root = str(tmp_path / "store")
    assert main(["--root", root, "load", "-q", "-i", f"docker://{registry.host}/app:v1"]) == 0
    assert f"Loaded image: {registry.host}/app:v1" in capsys.readouterr().out
    tags = Store.open(Path(root)).tags.get(f"{registry.host}/app")
    assert tags == {"v1": image_id, digest: image_id}
