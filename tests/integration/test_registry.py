"""Pull and push against Debian's docker-registry, with a real Docker engine and skopeo.

Three registry configurations: plain http; TLS with a CA made here plus htpasswd
Basic auth; Bearer tokens from a small token server here, JWTs signed with a test
key the registry trusts. Faults are injected by tests/integration/registry_proxy.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest

from layerfs.model.reference import Reference
from layerfs.registry.client import RegistryClient, RegistryOptions
from layerfs.transports.registry import RegistrySource
from tests.conformance import assert_valid_image
from tests.helpers import build_tar, tar_file, write_busybox_rootfs_tar

if TYPE_CHECKING:
    from .conftest import DockerEngine, LayerfsCli, RegistryFactory, RegistryServer

pytestmark = [pytest.mark.integration, pytest.mark.registry]

USER, PASSWORD = "alice", "s3cret-pw"
SERVICE, ISSUER = "layerfs-test-registry", "layerfs-test-issuer"
# Entries docker's init layer adds to a container; an image export has none of them.
INIT_ENTRIES = {
    ".dockerenv", "dev", "dev/console", "dev/pts", "dev/shm", "etc/hostname", "etc/hosts",
    "etc/mtab", "etc/resolv.conf", "proc", "sys",
}  # fmt: skip


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    return subprocess.run(argv, capture_output=True, check=True, **kw)


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install {package})")
    return path


# -- a CA, a token issuer ---------------------------------------------------------------------


def make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, server key), all PEM."""
    openssl = _need("openssl", "openssl")
    ca, ca_key = tmp / "ca.pem", tmp / "ca.key"
    cert, key, csr, ext = tmp / "server.pem", tmp / "server.key", tmp / "server.csr", tmp / "ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run([openssl, "req", "-x509", *ec, "-days", "2", "-subj", "/CN=layerfs test CA",
          "-keyout", str(ca_key), "-out", str(ca)])  # fmt: skip
    _run([openssl, "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)])
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
          "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)])  # fmt: skip
    return ca, cert, key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class TokenServer:
    """Issues registry tokens (RS256 JWTs with an x5c chain) for USER/PASSWORD."""

    def __init__(self, tmp: Path) -> None:
        self.openssl = _need("openssl", "openssl")
        self.key, self.cert = tmp / "token.key", tmp / "token.pem"
        _run([self.openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
              "-subj", "/CN=layerfs token issuer", "-keyout", str(self.key),
              "-out", str(self.cert)])  # fmt: skip
        der = _run([self.openssl, "x509", "-in", str(self.cert), "-outform", "DER"]).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sign(self, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}  # fmt: skip
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = _run(
            [self.openssl, "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                server.requests.append({"query": query, "basic": auth.startswith("Basic ")})
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if auth != expected:
                    self._answer(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                    return
                access = []
                for scope in query.get("scope", []):
                    for item in scope.split(" "):
                        kind, _, rest = item.partition(":")
                        name, _, actions = rest.rpartition(":")
                        access.append({"type": kind, "name": name, "actions": actions.split(",")})
                token = server.sign(access)
                self._answer(200, {"token": token, "access_token": token, "expires_in": 300})

        return Handler


# -- registry set-ups ------------------------------------------------------------------------


@dataclass
class Setup:
    kind: str
    registry: RegistryServer
    layerfs_args: list[str] = field(default_factory=list)  # connection options for pull/push
    skopeo_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # for the layerfs CLI (DOCKER_CONFIG)

    @property
    def host(self) -> str:
        return self.registry.host


@pytest.fixture(params=["plain", "tls-basic", "token"])
def setup(
    request: pytest.FixtureRequest,
    registry_server: RegistryFactory,
    tmp_path: Path,
    layerfs_cli: LayerfsCli,
) -> Iterator[Setup]:
    kind = request.param
    config_dir = tmp_path / "docker-config"
    env = {"DOCKER_CONFIG": str(config_dir)}
    skopeo = ["--tls-verify=false"]
    token_server = None
    try:
        if kind == "plain":
            yield Setup(kind, registry_server(), [], skopeo, env)
            return
        if kind == "tls-basic":
            htpasswd = tmp_path / "htpasswd"
            tool = _need("htpasswd", "apache2-utils")
            htpasswd.write_bytes(_run([tool, "-Bbn", USER, PASSWORD]).stdout)
            ca, cert, key = make_ca(tmp_path)
            registry = registry_server(tls=(cert, key), htpasswd=htpasswd)
            args = ["--ca-cert", str(ca)]
        else:
            token_server = TokenServer(tmp_path)
            registry = registry_server(
                token={
                    "realm": token_server.realm,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": token_server.cert,
                }
            )
            args = []
        layerfs_cli("login", "-u", USER, "--password-stdin", *args, registry.host,
                    input=PASSWORD.encode(), env=env)  # fmt: skip
        yield Setup(kind, registry, args, [*skopeo, "--creds", f"{USER}:{PASSWORD}"], env)
    finally:
        if token_server is not None:
            token_server.stop()


def docker_login(engine: DockerEngine, s: Setup) -> None:
    if s.kind != "plain":
        engine.run("login", "-u", USER, "--password-stdin", s.host, input=PASSWORD.encode())


# -- images ------------------------------------------------------------------------------------


def build_docker_image(engine: DockerEngine, tmp: Path, tag: str) -> str:
    """A three-layer busybox image built by docker; returns its ID (sha256:...)."""
    if not Path("/bin/busybox").exists():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    base = f"layerfs-test/base:{uuid.uuid4().hex[:8]}"
    engine.run("import", write_busybox_rootfs_tar(tmp / "rootfs.tar"), base)
    context = tmp / "context"
    context.mkdir()
    (context / "hello.txt").write_text("hello from layerfs\n")
    (context / "data.bin").write_bytes(os.urandom(300_000))
    (context / "Dockerfile").write_text(
        f"FROM {base}\nCOPY hello.txt /srv/hello.txt\nCOPY data.bin /srv/data/data.bin\n"
        'CMD ["/bin/cat", "/srv/hello.txt"]\n'
    )
    engine.run("build", "-q", "-t", tag, str(context))
    engine.run("rmi", base)
    return engine.run("inspect", "-f", "{{.Id}}", tag).stdout.decode().strip()


def tar_names(data: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()}
    return {n for n in names if n and n != "."} - INIT_ENTRIES


def docker_listing(engine: DockerEngine, image: str) -> set[str]:
    container = engine.run("create", image).stdout.decode().strip()
    try:
        return tar_names(engine.run("export", container).stdout)
    finally:
        engine.run("rm", container)


# -- the three configurations ------------------------------------------------------------------


@pytest.mark.docker
def test_docker_push_then_layerfs_pull(
    setup: Setup, docker_engine: DockerEngine, layerfs_cli: LayerfsCli, tmp_path: Path
):
    name = f"{setup.host}/team/app:v1"
    docker_id = build_docker_image(docker_engine, tmp_path, name)
    docker_login(docker_engine, setup)
    docker_engine.run("push", name)

    out = layerfs_cli("pull", *setup.layerfs_args, name, env=setup.env).stdout.decode()

    digest = next(line.split()[1] for line in out.splitlines() if line.startswith("Digest:"))
    assert "Status: Downloaded newer image" in out
    inspect = json.loads(layerfs_cli("inspect", name).stdout)
    assert "sha256:" + inspect[0]["Id"].removeprefix("sha256:") == docker_id
    repo_digests = docker_engine.run("inspect", "-f", "{{json .RepoDigests}}", name).stdout
    assert f"{setup.host}/team/app@{digest}" in json.loads(repo_digests)
    images = layerfs_cli("images", "--digests").stdout.decode()
    assert digest in images
    exported = tmp_path / "export.tar"
    layerfs_cli("export", name, "-o", exported)
    assert tar_names(exported.read_bytes()) == docker_listing(docker_engine, name)
    docker_engine.run("rmi", name)


@pytest.mark.docker
def test_layerfs_push_then_docker_pull_and_run(
    setup: Setup, docker_engine: DockerEngine, layerfs_cli: LayerfsCli, tmp_path: Path
):
    source = f"{setup.host}/team/app:v1"
    docker_id = build_docker_image(docker_engine, tmp_path, source)
    docker_login(docker_engine, setup)
    docker_engine.run("push", source)
    layerfs_cli("pull", *setup.layerfs_args, source, env=setup.env)
    target = f"{setup.host}/other/copy:v2"
    layerfs_cli("tag", source, target)

    pushed = layerfs_cli("push", *setup.layerfs_args, target, env=setup.env)

    line = next(x for x in pushed.stdout.decode().splitlines() if x.startswith("v2: digest: "))
    digest, size = line.split()[2], int(line.split()[4])
    assert b"Mounted from team/app" in pushed.stderr  # pulled blobs are mounted, not uploaded
    skopeo = _need("skopeo", "skopeo")
    inspected = json.loads(
        _run(
            [skopeo, "inspect", *setup.skopeo_args, f"docker://{target}"], env=_skopeo_env(tmp_path)
        ).stdout
    )
    assert inspected["Digest"] == digest
    raw = _run([skopeo, "inspect", "--raw", *setup.skopeo_args, f"docker://{target}"],
               env=_skopeo_env(tmp_path)).stdout  # fmt: skip
    assert len(raw) == size and "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    assert inspected["Layers"] == [layer["digest"] for layer in json.loads(raw)["layers"]]

    docker_engine.run("rmi", source)
    docker_engine.run("pull", target)
    assert (
        docker_engine.run("inspect", "-f", "{{.Id}}", target).stdout.decode().strip() == docker_id
    )
    result = docker_engine.run("run", "--rm", "--network", "none", target)
    assert result.stdout == b"hello from layerfs\n"
    docker_engine.run("rmi", target)


def _skopeo_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["DOCKER_CONFIG"] = str(tmp / "skopeo-config")
    env["REGISTRY_AUTH_FILE"] = str(tmp / "skopeo-auth.json")
    return env


def test_layerfs_push_repeat_is_free_and_pull_round_trips(
    setup: Setup, layerfs_cli: LayerfsCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    name = f"{setup.host}/solo/busybox:1"
    layerfs_cli("import", write_busybox_rootfs_tar(tmp_path / "rootfs.tar"), name)
    image_id = json.loads(layerfs_cli("inspect", name).stdout)[0]["Id"]
    first = layerfs_cli("push", *setup.layerfs_args, name, env=setup.env)
    second = layerfs_cli("push", *setup.layerfs_args, name, env=setup.env)
    assert b"Layer already exists" in second.stderr and b"Pushed" not in second.stderr
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]

    # What the registry now holds, read as a docker:// source, is a well-formed image.
    for key, value in setup.env.items():
        monkeypatch.setenv(key, value)  # the credentials login stored
    ca = setup.layerfs_args[1] if setup.layerfs_args[:1] == ["--ca-cert"] else None
    reference = Reference.parse(name)
    client = RegistryClient(reference.registry, RegistryOptions(ca_cert=ca))
    try:
        (pushed,) = assert_valid_image(RegistrySource(client, reference))
    finally:
        client.close()
    assert pushed.config_digest == image_id

    other = tmp_path / "other-store"
    pulled = subprocess.run(
        [*layerfs_cli_argv(other), "pull", *setup.layerfs_args, name],
        capture_output=True, env={**os.environ, **setup.env}, check=True,
    )  # fmt: skip
    assert b"Pull complete" in pulled.stderr
    inspect = subprocess.run([*layerfs_cli_argv(other), "inspect", name], capture_output=True,
                             check=True)  # fmt: skip
    assert json.loads(inspect.stdout)[0]["Id"] == image_id


def layerfs_cli_argv(root: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "layerfs", "--root", str(root)]


@pytest.mark.parametrize("setup", ["tls-basic", "token"], indirect=True)
def test_login_logout_and_denied_without_credentials(
    setup: Setup, layerfs_cli: LayerfsCli, tmp_path: Path
):
    config = Path(setup.env["DOCKER_CONFIG"]) / "config.json"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert PASSWORD not in config.read_text() or setup.kind == "tls-basic"
    name = f"{setup.host}/solo/x:1"
    layerfs_cli("import", write_busybox_rootfs_tar(tmp_path / "rootfs.tar"), name)
    layerfs_cli("push", *setup.layerfs_args, name, env=setup.env)
    out = layerfs_cli("logout", setup.host, env=setup.env).stdout.decode()
    assert f"Removing login credentials for {setup.host}" in out
    denied = layerfs_cli("pull", *setup.layerfs_args, name, env=setup.env, check=False)
    assert denied.returncode != 0
    message = denied.stderr.decode()
    assert "layerfs: error:" in message and "Traceback" not in message
    assert PASSWORD not in message
    wrong = layerfs_cli("login", "-u", USER, "--password-stdin", *setup.layerfs_args, setup.host,
                        input=b"wrong", env=setup.env, check=False)  # fmt: skip
    assert wrong.returncode != 0 and b"incorrect username or password" in wrong.stderr


def test_tls_is_verified(registry_server: RegistryFactory, layerfs_cli: LayerfsCli, tmp_path: Path):
    ca, cert, key = make_ca(tmp_path)
    registry = registry_server(tls=(cert, key))
    name = f"{registry.host}/x/y:1"
    result = layerfs_cli("pull", name, check=False)
    assert result.returncode != 0
    assert b"certificate verify failed" in result.stderr and b"--ca-cert" in result.stderr
    # a docker-style certs.d directory works as well as --ca-cert
    certs = tmp_path / "certs.d" / registry.host
    certs.mkdir(parents=True)
    shutil.copy(ca, certs / "ca.crt")
    result = layerfs_cli("pull", "--certs-dir", tmp_path / "certs.d", name, check=False)
    assert b"manifest unknown" in result.stderr or b"404" in result.stderr
    # --insecure-registry: TLS without verification (as dockerd does for such registries)
    result = layerfs_cli("pull", "--insecure-registry", registry.host, name, check=False)
    assert b"manifest unknown" in result.stderr or b"404" in result.stderr
    assert b"certificate" not in result.stderr


# -- a multi-platform index ---------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "size": len(data),
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
    }


def _push_platform_image(repo: Any, plat: dict[str, str]) -> tuple[str, bytes, bytes]:
    """Upload a one-layer image for ``plat``; returns (manifest digest, manifest, config)."""
    import gzip

    raw = build_tar(tar_file("etc/arch", f"built for {plat['architecture']}\n".encode()))
    blob = gzip.compress(raw, mtime=0)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    config = json.dumps({**plat, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    for data in (blob, config):
        repo.upload_bytes(data, "sha256:" + hashlib.sha256(data).hexdigest())
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar+gzip", blob)],
        }
    ).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    repo.put_manifest(digest, manifest, OCI_MANIFEST)
    return digest, manifest, config


def test_multi_platform_index_picks_the_platform(
    registry_server: RegistryFactory, layerfs_cli: LayerfsCli, tmp_path: Path
):
    from layerfs.registry.blobs import Repository
    from layerfs.registry.client import RegistryClient, RegistryOptions

    registry = registry_server()
    client = RegistryClient(registry.host, RegistryOptions(use_config=False))
    repo = Repository(client, "multi/app", "pull,push")
    entries = []
    ids = {}
    for arch, variant in (("amd64", ""), ("arm64", "v8"), ("arm", "v7")):
        plat = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        digest, manifest, config = _push_platform_image(repo, plat)
        entries.append(
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest), "platform": plat}
        )
        ids[f"{arch}{variant}"] = hashlib.sha256(config).hexdigest()
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()  # fmt: skip
    repo.put_manifest("latest", index, "application/vnd.oci.image.index.v1+json")
    client.close()
    name = f"{registry.host}/multi/app"

    for plat, key in (
        ("linux/arm64", "arm64v8"),
        ("linux/arm/v7", "armv7"),
        ("linux/amd64", "amd64"),
    ):
        layerfs_cli("pull", "--platform", plat, name)
        assert (
            json.loads(layerfs_cli("inspect", f"{name}:latest").stdout)[0]["Id"].removeprefix(
                "sha256:"
            )
            == ids[key]
        )
    failed = layerfs_cli("pull", "--platform", "linux/s390x", name, check=False)
    assert failed.returncode != 0
    assert b"available: linux/amd64, linux/arm/v7, linux/arm64" in failed.stderr
    skopeo = _need("skopeo", "skopeo")
    inspected = _run([skopeo, "inspect", "--tls-verify=false", "--override-arch", "arm64",
                      f"docker://{name}"], env=_skopeo_env(tmp_path)).stdout  # fmt: skip
    assert json.loads(inspected)["Architecture"] == "arm64"


# -- schema1 -------------------------------------------------------------------------------------


@pytest.mark.docker
def test_schema1_pull_matches_docker(
    registry_server: RegistryFactory,
    docker_engine: DockerEngine,
    layerfs_cli: LayerfsCli,
    tmp_path: Path,
):
    """skopeo writes signed schema1 manifests; layerfs converts them as docker does."""
    skopeo = _need("skopeo", "skopeo")
    modern = registry_server()
    old = registry_server(extra={"compatibility": {"schema1": {"enabled": True}}})
    built = f"{modern.host}/s1/built:1"  # by docker: has docker_version, an empty layer
    build_docker_image(docker_engine, tmp_path, built)
    docker_engine.run("push", built)
    imported = f"{modern.host}/s1/imported:1"  # by layerfs: no docker_version (Docker < 1.8.3 path)
    layerfs_cli("import", write_busybox_rootfs_tar(tmp_path / "rootfs.tar"), imported)
    layerfs_cli("push", imported)
    for name in ("built", "imported"):
        source, target = f"{modern.host}/s1/{name}:1", f"{old.host}/s1/{name}:1"
        _run([skopeo, "copy", "--format", "v2s1", "--src-tls-verify=false",
              "--dest-tls-verify=false", f"docker://{source}", f"docker://{target}"],
             env=_skopeo_env(tmp_path))  # fmt: skip
        raw = _run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{target}"],
                   env=_skopeo_env(tmp_path)).stdout  # fmt: skip
        assert json.loads(raw)["schemaVersion"] == 1 and b'"signatures"' in raw
        inspected = json.loads(
            _run(
                [skopeo, "inspect", "--tls-verify=false", f"docker://{target}"],
                env=_skopeo_env(tmp_path),
            ).stdout
        )
        out = layerfs_cli("pull", target).stdout.decode()
        assert f"Digest: {inspected['Digest']}" in out
        layerfs_id = json.loads(layerfs_cli("inspect", target).stdout)[0]["Id"]
        docker_engine.run("pull", target)
        docker_id = docker_engine.run("inspect", "-f", "{{.Id}}", target).stdout.decode().strip()
        assert "sha256:" + layerfs_id.removeprefix("sha256:") == docker_id, name
        by_digest = f"{old.host}/s1/{name}@{inspected['Digest']}"
        layerfs_cli("pull", by_digest)
        docker_engine.run("rmi", target)
    docker_engine.run("rmi", built)
