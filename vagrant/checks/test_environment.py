"""The machine can run the integration tests: a Docker engine, registries, skopeo, FUSE.

These check the host, not layerfs: ``make check-host`` runs them (the VM's test-root
provisioner does, before ``make test``), with the integration fixtures of
tests/integration/conftest.py loaded as a plugin. When one of them fails, the integration
tests cannot be trusted; look here first.
"""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import write_busybox_rootfs_tar

if TYPE_CHECKING:
    from tests.integration.conftest import DockerEngine, RegistryFactory

pytestmark = pytest.mark.integration


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install {package})")
    return path


def run_command(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, check=True, stdin=subprocess.DEVNULL)


@pytest.mark.docker
def test_docker_runs_an_imported_busybox_rootfs(docker_engine: DockerEngine, tmp_path: Path):
    if not Path("/bin/busybox").exists():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    tar = write_busybox_rootfs_tar(tmp_path / "rootfs.tar")
    docker_engine.run("import", tar, "layerfs-test/busybox:env")

    result = docker_engine.run(
        "run", "--rm", "--network", "none", "layerfs-test/busybox:env", "busybox", "echo", "hello"
    )

    assert result.stdout == b"hello\n"


@pytest.mark.registry
def test_plain_registry_answers_v2(registry_server: RegistryFactory):
    registry = registry_server()

    with urllib.request.urlopen(registry.url + "/v2/", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert registry.host == f"127.0.0.1:{registry.port}"


@pytest.fixture
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    openssl = _need("openssl", "openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run_command([
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    ])  # fmt: skip
    return cert, key


@pytest.mark.registry
def test_tls_registry_with_basic_auth(
    registry_server: RegistryFactory, self_signed_cert: tuple[Path, Path], tmp_path: Path
):
    htpasswd_tool = _need("htpasswd", "apache2-utils")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(run_command([htpasswd_tool, "-Bbn", "alice", "s3cret"]).stdout)
    cert, key = self_signed_cert
    registry = registry_server(tls=(cert, key), htpasswd=htpasswd)
    https = urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(cert)))
    opener = urllib.request.build_opener(https)

    assert registry.url.startswith("https://")
    with pytest.raises(urllib.error.HTTPError) as denied:
        opener.open(registry.url + "/v2/", timeout=10)
    assert denied.value.code == 401
    assert denied.value.headers["WWW-Authenticate"].startswith("Basic ")
    denied.value.close()
    request = urllib.request.Request(registry.url + "/v2/")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"alice:s3cret").decode())
    with opener.open(request, timeout=10) as response:
        assert response.status == 200


@pytest.mark.registry
def test_token_registry_challenges_with_realm(
    registry_server: RegistryFactory, self_signed_cert: tuple[Path, Path]
):
    cert, _key = self_signed_cert
    registry = registry_server(
        token={
            "realm": "http://127.0.0.1:1/token",
            "service": "layerfs-test-registry",
            "issuer": "layerfs-test-issuer",
            "rootcertbundle": cert,
        }
    )

    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(registry.url + "/v2/", timeout=10)
    assert denied.value.code == 401
    challenge = denied.value.headers["WWW-Authenticate"]
    denied.value.close()
    assert challenge.startswith("Bearer ")
    assert 'realm="http://127.0.0.1:1/token"' in challenge
    assert 'service="layerfs-test-registry"' in challenge


def test_skopeo_is_installed():
    skopeo = _need("skopeo", "skopeo")

    result = run_command([skopeo, "--version"])

    assert result.stdout.startswith(b"skopeo version ")


@pytest.mark.fuse
def test_fuse_mount_works(tmp_path: Path):
    """A FUSE mount by another program (fuse-overlayfs) works and is cleaned up."""
    fuse_overlayfs = _need("fuse-overlayfs", "fuse-overlayfs")
    lower, mountpoint = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mountpoint.mkdir()
    (lower / "hello").write_text("hello\n")
    run_command([fuse_overlayfs, "-o", f"lowerdir={lower}", str(mountpoint)])
    try:
        assert (mountpoint / "hello").read_text() == "hello\n"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
