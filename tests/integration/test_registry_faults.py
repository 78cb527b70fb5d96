"""Pulls through a fault-injecting proxy in front of the real registry; concurrent pulls.

Each test pushes its images with layerfs to a fresh docker-registry, then pulls
through :class:`FaultProxy`, which breaks things in one precise way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.registry_proxy import FaultProxy, Rule

if TYPE_CHECKING:
    from .conftest import LayerfsCli, RegistryFactory, RegistryServer

pytestmark = [pytest.mark.integration, pytest.mark.registry]

FAST = ["--retries", "4"]


def layer_tar(path: Path, name: str, size: int) -> Path:
    """A rootfs tar with one incompressible file (so the blob is big enough to break)."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(f"data/{name}")
        info.size = size
        info.mtime = 1_700_000_000
        with open("/dev/urandom", "rb") as random:
            tar.addfile(info, random)
    return path


@pytest.fixture
def registry(registry_server: RegistryFactory) -> RegistryServer:
    return registry_server()


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(registry.url)
    try:
        yield proxy
    finally:
        proxy.stop()


def push_image(
    cli: LayerfsCli, registry: RegistryServer, tmp: Path, name: str, size: int = 2_000_000
) -> tuple[str, str]:
    """Import a one-layer image and push it; returns (image ID, layer blob digest)."""
    ref = f"{registry.host}/{name}"
    cli("import", layer_tar(tmp / f"{name.replace('/', '_')}.tar", name, size), ref)
    cli("push", ref)
    image_id = json.loads(cli("inspect", ref).stdout)[0]["Id"].removeprefix("sha256:")
    # The push recorded the compressed digest as the node's checksum (Docker's layer digest).
    from layerfs.store.store import Store

    store = Store.open(cli.root)
    return image_id, store.graph.get_layer_digest(store.tags.lookup_image(ref).id)


def push_layers(registry: RegistryServer, ref: str, tars: list[Path]) -> tuple[str, list[str]]:
    """Push an image made of these layer tars (base first) straight through the client API.

    Returns (image ID, blob digests). Images sharing a tar share that layer.
    """
    import gzip

    from layerfs.model.reference import Reference
    from layerfs.registry.blobs import Repository
    from layerfs.registry.client import RegistryClient, RegistryOptions

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    reference = Reference.parse(ref)
    client = RegistryClient(registry.host, RegistryOptions(use_config=False))
    repo = Repository(client, reference.remote_name, "pull,push")
    try:
        blobs, diff_ids = [], []
        for tar in tars:
            raw = tar.read_bytes()
            blob = gzip.compress(raw, compresslevel=1, mtime=0)
            if repo.blob_size(digest(blob)) is None:
                repo.upload_bytes(blob, digest(blob))
            blobs.append(blob)
            diff_ids.append(digest(raw))
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "2024-01-01T00:00:00Z",
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        repo.upload_bytes(config, digest(config))
        layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": digest(config),
            },
            "layers": [
                {"mediaType": layer_type, "size": len(b), "digest": digest(b)} for b in blobs
            ],
        }
        repo.put_manifest(
            reference.tag or "latest",
            json.dumps(manifest).encode(),
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    finally:
        client.close()
    return digest(config)[7:], [digest(b) for b in blobs]


def other_store(tmp: Path, name: str = "pulled") -> list[str]:
    return [sys.executable, "-m", "layerfs", "--root", str(tmp / name)]


def pull(tmp: Path, ref: str, *args: str, check: bool = True, store: str = "pulled"):
    result = subprocess.run(
        [*other_store(tmp, store), "pull", *args, ref],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pull failed: {result.stderr.decode()}")
    return result


def inspect_id(tmp: Path, ref: str, store: str = "pulled") -> str:
    out = subprocess.run(
        [*other_store(tmp, store), "inspect", ref], capture_output=True, check=True
    ).stdout
    return json.loads(out)[0]["Id"].removeprefix("sha256:")


def test_dropped_connection_resumes_with_range(
    registry: RegistryServer, proxy: FaultProxy, layerfs_cli: LayerfsCli, tmp_path: Path
):
    image_id, blob = push_image(layerfs_cli, registry, tmp_path, "drop/app:v1")
    proxy.rules = [Rule("GET", f"/blobs/{blob}", times=2, drop_after=300_000)]

    pull(tmp_path, f"{proxy.host}/drop/app:v1", *FAST)

    assert inspect_id(tmp_path, f"{proxy.host}/drop/app:v1") == image_id
    ranges = [s.headers.get("Range") for s in proxy.seen("GET", f"/blobs/{blob}")]
    assert ranges == [None, "bytes=300000-", "bytes=600000-"]  # resumed, never restarted


def test_500s_then_success_and_429_with_retry_after(
    registry: RegistryServer, proxy: FaultProxy, layerfs_cli: LayerfsCli, tmp_path: Path
):
    image_id, blob = push_image(layerfs_cli, registry, tmp_path, "flaky/app:v1", 200_000)
    proxy.rules = [
        Rule("GET", "/manifests/", times=2, status=500),
        Rule("GET", f"/blobs/{blob}", times=1, status=503),
        Rule("GET", f"/blobs/{blob}", times=1, status=429, headers={"Retry-After": "1"}),
    ]
    started = time.monotonic()
    pull(tmp_path, f"{proxy.host}/flaky/app:v1", *FAST)
    elapsed = time.monotonic() - started

    assert inspect_id(tmp_path, f"{proxy.host}/flaky/app:v1") == image_id
    assert len(proxy.seen("GET", "/manifests/")) == 3
    assert len(proxy.seen("GET", f"/blobs/{blob}")) == 3
    assert elapsed >= 1.0  # Retry-After was honoured


def test_wrong_blob_is_rejected_nothing_published(
    registry: RegistryServer, proxy: FaultProxy, layerfs_cli: LayerfsCli, tmp_path: Path
):
    _, blob = push_image(layerfs_cli, registry, tmp_path, "bad/app:v1", 200_000)
    proxy.rules = [Rule("GET", f"/blobs/{blob}", times=10, corrupt=True)]

    result = pull(tmp_path, f"{proxy.host}/bad/app:v1", *FAST, check=False)

    assert result.returncode != 0
    message = result.stderr.decode()
    assert "layerfs: error:" in message and "Traceback" not in message
    images = subprocess.run(
        [*other_store(tmp_path), "images", "-q"], capture_output=True, check=True
    )
    assert images.stdout == b""
    fsck = subprocess.run([*other_store(tmp_path), "fsck"], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert list((tmp_path / "pulled" / "layers").iterdir()) == []
    assert list((tmp_path / "pulled" / "tmp").iterdir()) == []


def test_redirect_to_another_host_carries_no_authorization(
    registry: RegistryServer, proxy: FaultProxy, layerfs_cli: LayerfsCli, tmp_path: Path
):
    image_id, _ = push_image(layerfs_cli, registry, tmp_path, "redir/app:v1", 200_000)
    storage = FaultProxy(registry.url, hostname="localhost")  # another origin
    try:
        proxy.basic = ("alice", "pw")
        proxy.rules = [Rule("GET", "/blobs/", times=10, redirect_to=storage.url)]
        config = tmp_path / "docker-config"
        config.mkdir()
        (config / "config.json").write_text(
            json.dumps({"auths": {proxy.host: {"auth": "YWxpY2U6cHc="}}})  # alice:pw
        )
        env = {**os.environ, "DOCKER_CONFIG": str(config)}
        result = subprocess.run(
            [*other_store(tmp_path), "pull", f"{proxy.host}/redir/app:v1"],
            capture_output=True,
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    finally:
        storage.stop()
    assert inspect_id(tmp_path, f"{proxy.host}/redir/app:v1") == image_id
    assert len(storage.seen("GET", "/blobs/")) == 2  # config and layer
    assert all("Authorization" not in s.headers for s in storage.log)
    assert all("Authorization" in s.headers for s in proxy.seen("GET", "/blobs/"))


def test_registry_that_never_answers_times_out(tmp_path: Path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # connections complete in the backlog; nobody answers
    try:
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        result = pull(tmp_path, f"{host}/x/y:1", "--timeout", "1", "--retries", "1", check=False)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert result.returncode != 0
    message = result.stderr.decode()
    assert f"registry {host} did not answer within 1 s (timeout)" in message, message
    assert "Traceback" not in message
    assert elapsed < 30


def test_two_pulls_sharing_layers_at_once(registry: RegistryServer, tmp_path: Path):
    base = layer_tar(tmp_path / "base.tar", "base", 1_000_000)
    ids = {}
    for name in ("one", "two"):
        top = layer_tar(tmp_path / f"{name}.tar", name, 500_000)
        ids[name], _ = push_layers(registry, f"{registry.host}/shared/{name}:1", [base, top])
    procs = [
        subprocess.Popen(
            [*other_store(tmp_path, "shared"), "pull", f"{registry.host}/shared/{n}:1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in ("one", "two")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for name in ("one", "two"):
        assert inspect_id(tmp_path, f"{registry.host}/shared/{name}:1", "shared") == ids[name]
    fsck = subprocess.run([*other_store(tmp_path, "shared"), "fsck"], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert len(list((tmp_path / "shared" / "layers").iterdir())) == 3  # base stored once


def test_rmi_during_a_pull_is_refused_for_held_layers(
    registry: RegistryServer, proxy: FaultProxy, tmp_path: Path
):
    """A pull holds the layers it finds in the store; rmi of an image using them fails."""
    base = layer_tar(tmp_path / "base.tar", "base", 300_000)
    top = layer_tar(tmp_path / "top.tar", "top", 300_000)
    base_id, _ = push_layers(registry, f"{registry.host}/held/base:1", [base])
    _, blobs = push_layers(registry, f"{registry.host}/held/top:1", [base, top])
    pull(tmp_path, f"{proxy.host}/held/base:1", store="s")  # the base layer is in the store

    gate = threading.Event()
    proxy.rules = [Rule("GET", f"/blobs/{blobs[1]}", times=1, gate=gate)]
    proc = subprocess.Popen(
        [*other_store(tmp_path, "s"), "pull", f"{proxy.host}/held/top:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not proxy.seen("GET", f"/blobs/{blobs[1]}") and time.monotonic() < deadline:
            time.sleep(0.05)
        rmi = subprocess.run([*other_store(tmp_path, "s"), "rmi", base_id], capture_output=True)
        assert rmi.returncode != 0
        assert b"held by an ongoing pull" in rmi.stderr, rmi.stderr
    finally:
        gate.set()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert inspect_id(tmp_path, f"{proxy.host}/held/base:1", store="s") == base_id
    fsck = subprocess.run([*other_store(tmp_path, "s"), "fsck"], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


class _Lines:
    """Collects a process's output lines as they come (a pipe read in a thread)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in iter(stream.readline, b""):  # type: ignore[attr-defined]
            self.lines.append(line.decode().rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.lines:
            assert time.monotonic() < deadline, f"no line {text!r} in {self.lines}"
            time.sleep(0.05)

    def join(self) -> list[str]:
        self._thread.join(30)
        return self.lines


def _start_pull(tmp: Path, ref: str, store: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*other_store(tmp, store), "pull", ref],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def _two_layers(registry: RegistryServer, tmp: Path, ref: str) -> tuple[str, list[str], list[str]]:
    """Push a two-layer image; returns (image ID, blob digests, short diff IDs)."""
    tars = [layer_tar(tmp / f"{n}.tar", n, 600_000) for n in ("first", "second")]
    image_id, blobs = push_layers(registry, ref, tars)
    shorts = [hashlib.sha256(t.read_bytes()).hexdigest()[:12] for t in tars]
    return image_id, blobs, shorts


@contextlib.contextmanager
def _second_pull_waiting(
    proxy: FaultProxy, tmp: Path, ref: str, store: str, blob: str, short: str
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], _Lines, threading.Event]]:
    """Two pulls of ``ref`` into ``store``: the first held by the proxy inside ``blob``'s
    download (until the yielded gate is set), the second printing "Waiting" for it.
    Both are killed, if still running, and reaped on the way out."""
    gate = threading.Event()
    proxy.rules = [Rule("GET", f"/blobs/{blob}", times=1, gate=gate)]
    first = _start_pull(tmp, ref, store)
    second: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 60
        while not proxy.seen("GET", f"/blobs/{blob}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.seen("GET", f"/blobs/{blob}"), "the first pull never asked for the blob"
        second = _start_pull(tmp, ref, store)
        output = _Lines(second)
        output.wait_for(f"{short}: Waiting")
        yield first, second, output, gate
    finally:
        gate.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        first.communicate()
        if second is not None:
            second.communicate()


def test_two_pulls_of_one_image_download_each_blob_once(
    registry: RegistryServer, proxy: FaultProxy, tmp_path: Path
):
    """The second pull waits for the layer the first is downloading, then takes its copy."""
    image_id, blobs, shorts = _two_layers(registry, tmp_path, f"{registry.host}/same/app:1")
    ref = f"{proxy.host}/same/app:1"
    with _second_pull_waiting(proxy, tmp_path, ref, "one", blobs[0], shorts[0]) as running:
        first, second, output, gate = running
        gate.set()
        assert first.wait(120) == 0, first.communicate()[1]
        assert second.wait(120) == 0, output.join()
    lines = output.join()
    assert lines.index(f"{shorts[0]}: Waiting") < lines.index(f"{shorts[0]}: Pull complete")
    for blob in blobs:  # every layer blob crossed the wire once, for both pulls
        assert len(proxy.seen("GET", f"/blobs/{blob}")) == 1, blob
    assert inspect_id(tmp_path, ref, "one") == image_id
    fsck = subprocess.run([*other_store(tmp_path, "one"), "fsck", "--verify"], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert list((tmp_path / "one" / "tmp").iterdir()) == []


def test_a_killed_pull_does_not_block_the_next(
    registry: RegistryServer, proxy: FaultProxy, tmp_path: Path
):
    """SIGKILL of the downloading pull: its lock dies with it, the waiting pull downloads."""
    image_id, blobs, shorts = _two_layers(registry, tmp_path, f"{registry.host}/kill/app:1")
    ref = f"{proxy.host}/kill/app:1"
    with _second_pull_waiting(proxy, tmp_path, ref, "k", blobs[0], shorts[0]) as running:
        first, second, output, _gate = running
        first.kill()
        first.wait()
        assert second.wait(120) == 0, output.join()
    assert inspect_id(tmp_path, ref, "k") == image_id
    assert len(proxy.seen("GET", f"/blobs/{blobs[0]}")) == 2  # the dead one's, then its own
    fsck = subprocess.run([*other_store(tmp_path, "k"), "fsck", "--verify"], capture_output=True)
    assert b"problem:" not in fsck.stdout, fsck.stdout  # only the dead pull's staging is left


def test_a_repeat_push_asks_for_the_manifest_and_sends_nothing(
    registry: RegistryServer, proxy: FaultProxy, layerfs_cli: LayerfsCli, tmp_path: Path
):
    """What the registry sees: a manifest HEAD, no blob HEAD, no upload, no manifest PUT."""
    ref = f"{proxy.host}/again/app:1"
    layerfs_cli("import", layer_tar(tmp_path / "app.tar", "app", 100_000), ref)
    layerfs_cli("push", ref)
    proxy.log.clear()
    again = layerfs_cli("push", ref)
    seen = [(s.method, s.path.split("?")[0]) for s in proxy.log if s.path != "/v2/"]
    assert seen == [("HEAD", "/v2/again/app/manifests/1")], seen
    assert again.stderr.decode().count("Layer already exists") == 1
    assert b"digest: sha256:" in again.stdout

    # Another tag of the same image: one HEAD finds nothing, the blobs are checked, at once.
    layerfs_cli("tag", ref, f"{proxy.host}/again/app:2")
    proxy.log.clear()
    layerfs_cli("push", f"{proxy.host}/again/app:2")
    methods = sorted((s.method, "blobs" in s.path) for s in proxy.log if s.path != "/v2/")
    assert ("PUT", False) in methods  # the manifest under the new tag
    assert ("POST", True) not in methods and ("PATCH", True) not in methods  # no upload
