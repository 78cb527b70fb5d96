"""A small in-process registry (API v2) for tests, served by http.server on 127.0.0.1.

It keeps blobs and manifests in memory, speaks Basic or Bearer auth (with its own
token endpoint), logs every request with its headers, and can be told to misbehave:
fail requests with a status a few times, drop a blob download after some bytes,
ignore Range, redirect blob downloads to another server, serve the wrong bytes,
answer upload Range headers in the old ``bytes=`` form.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class Fault:
    """Answer ``status`` (with ``headers``) to the next ``times`` requests matching."""

    method: str
    path_regex: str
    status: int
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)


class FakeRegistry:
    def __init__(
        self,
        *,
        auth: str | None = None,  # None, "basic", "bearer"
        users: dict[str, str] | None = None,
        anonymous_pull: bool = False,
        token_lifetime: int = 300,
    ) -> None:
        self.auth = auth
        self.users = users or {}
        self.anonymous_pull = anonymous_pull
        self.token_lifetime = token_lifetime
        self.blobs: dict[str, bytes] = {}  # digest -> data, shared by every repository
        self.repo_blobs: dict[str, set[str]] = {}  # repo -> digests it holds
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.uploads: dict[str, bytearray] = {}
        self.upload_repo: dict[str, str] = {}
        self.log: list[Logged] = []
        self.faults: list[Fault] = []
        self.tokens: dict[str, tuple[set[str], float]] = {}  # token -> (scopes, expiry)
        self.token_requests: list[dict[str, Any]] = []
        self.drop_blob_after: int | None = None  # close the next blob GET after N bytes
        self.drops_left = 0
        self.ignore_range = False
        self.redirect_blobs_to: str | None = None  # base URL of a BlobHost
        self.wrong_blob: str | None = None  # serve other bytes for this digest
        self.old_range_form = False
        self.hang = False
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )

    def start(self) -> FakeRegistry:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- content -------------------------------------------------------------------------

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        self.repo_blobs.setdefault(repo, set()).add(digest)
        return digest

    def add_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        digest = sha256(data)
        self.manifests[(repo, ref)] = (data, media_type)
        self.manifests[(repo, digest)] = (data, media_type)
        return digest

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        return [
            e for e in self.log if (method is None or e.method == method) and contains in e.path
        ]

    # -- auth ----------------------------------------------------------------------------

    def challenge(self, scope: str) -> str:
        if self.auth == "basic":
            return 'Basic realm="fake"'
        scope_part = f',scope="{scope}"' if scope else ""
        return f'Bearer realm="{self.url}/token",service="fake-registry"{scope_part}'

    def allowed(self, headers: Any, scope: str) -> bool:
        if self.auth is None:
            return True
        value = headers.get("Authorization", "")
        if self.auth == "basic":
            if not value.startswith("Basic "):
                return False
            user, _, password = base64.b64decode(value[6:]).decode().partition(":")
            return self.users.get(user) == password
        if not value.startswith("Bearer "):
            return False
        granted = self.tokens.get(value[7:])
        if granted is None or granted[1] < time.time():
            return False
        if not scope:
            return True
        kind, name, actions = scope.split(":")
        have = set()
        for s in granted[0]:
            k, n, a = s.split(":")
            if (k, n) == (kind, name):
                have |= set(a.split(","))
        return set(actions.split(",")) <= have


def _handler(reg: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(
            self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
        ) -> None:
            reg.log[-1].status = status
            self.send_response(status)
            hdrs = {"Content-Length": str(len(body)), **(headers or {})}
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD" and body:
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        def _error(self, status: int, code: str, message: str, scope: str = "") -> None:
            body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
            headers = {"Content-Type": "application/json"}
            if status == 401:
                headers["WWW-Authenticate"] = reg.challenge(scope)
            self._reply(status, body, headers)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _dispatch(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            reg.log.append(Logged(self.command, self.path, dict(self.headers.items())))
            if reg.hang:
                time.sleep(30)
                return
            body = self._body() if self.command in ("PUT", "POST", "PATCH") else b""
            with reg.lock:
                for fault in reg.faults:
                    if (
                        fault.times > 0
                        and fault.method in (self.command, "*")
                        and re.search(fault.path_regex, path)
                    ):
                        fault.times -= 1
                        self._reply(fault.status, b"", fault.headers)
                        return
            if path == "/token":
                if self.command == "POST":
                    query = parse_qs(body.decode())
                self._token(query)
                return
            if path in ("/v2/", "/v2"):
                if not reg.allowed(self.headers, ""):
                    self._error(401, "UNAUTHORIZED", "authentication required")
                    return
                self._reply(200, b"{}", {"Docker-Distribution-API-Version": "registry/2.0"})
                return
            m = re.match(r"^/v2/(.+?)/(blobs/uploads|blobs|manifests)/(.*)$", path)
            if not m:
                self._error(404, "NAME_UNKNOWN", "no route")
                return
            repo, kind, rest = m.groups()
            pushing = self.command in ("PUT", "POST", "PATCH", "DELETE")
            scope = f"repository:{repo}:{'pull,push' if pushing else 'pull'}"
            if not reg.allowed(self.headers, scope):
                self._error(401, "UNAUTHORIZED", "authentication required", scope)
                return
            if kind == "manifests":
                self._manifest(repo, rest, body)
            elif kind == "blobs":
                self._blob(repo, rest)
            else:
                self._upload(repo, rest, query, body)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch

        def _token(self, query: dict[str, list[str]]) -> None:
            auth = self.headers.get("Authorization", "")
            reg.token_requests.append(
                {"query": query, "authorization": auth, "method": self.command}
            )
            if query.get("grant_type") == ["refresh_token"]:
                if not query.get("refresh_token", [""])[0].startswith("refresh-"):
                    self._reply(401, b'{"details":"bad refresh token"}')
                    return
                auth = "refresh"  # as good as a password
            elif auth:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                if reg.users.get(user) != password:
                    self._reply(401, b'{"details":"bad credentials"}')
                    return
            elif not reg.anonymous_pull:
                self._reply(401, b'{"details":"login required"}')
                return
            scopes = set()
            for scope in query.get("scope", []):
                for s in scope.split(" "):
                    if s and (auth or s.endswith(":pull")):
                        scopes.add(s)
            token = uuid.uuid4().hex
            reg.tokens[token] = (scopes, time.time() + reg.token_lifetime)
            doc = {"token": token, "expires_in": reg.token_lifetime}
            if "offline_token" in query:
                doc["refresh_token"] = "refresh-" + token
            self._reply(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

        def _manifest(self, repo: str, ref: str, body: bytes) -> None:
            if self.command == "PUT":
                ctype = self.headers.get("Content-Type", "")
                digest = reg.add_manifest(repo, ref, body, ctype)
                self._reply(201, b"", {"Docker-Content-Digest": digest, "Location": self.path})
                return
            found = reg.manifests.get((repo, ref))
            if found is None:
                self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                return
            data, ctype = found
            self._reply(200, data, {"Content-Type": ctype, "Docker-Content-Digest": sha256(data)})

        def _blob(self, repo: str, digest: str) -> None:
            if digest not in reg.repo_blobs.get(repo, set()):
                self._error(404, "BLOB_UNKNOWN", "blob unknown")
                return
            if reg.redirect_blobs_to and self.command == "GET":
                self._reply(307, b"", {"Location": f"{reg.redirect_blobs_to}/blob/{digest}"})
                return
            data = reg.blobs[digest]
            if reg.wrong_blob == digest:
                data = bytes(b ^ 0x55 for b in data)
            self._send_blob(data)

        def _send_blob(self, data: bytes) -> None:
            start = 0
            rng = self.headers.get("Range")
            status, headers = 200, {"Content-Type": "application/octet-stream"}
            if rng and not reg.ignore_range:
                start = int(re.match(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            payload = data[start:]
            if (
                self.command == "GET"
                and reg.drop_blob_after is not None
                and reg.drops_left > 0
                and len(payload) > reg.drop_blob_after
            ):
                reg.drops_left -= 1
                reg.log[-1].status = status
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload[: reg.drop_blob_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self._reply(status, payload, headers)

        def _upload(self, repo: str, rest: str, query: dict[str, list[str]], body: bytes) -> None:
            if self.command == "POST":
                if "mount" in query:
                    digest = query["mount"][0]
                    source = query.get("from", [""])[0]
                    if digest in reg.repo_blobs.get(source, set()):
                        reg.repo_blobs.setdefault(repo, set()).add(digest)
                        self._reply(201, b"", {"Docker-Content-Digest": digest})
                        return
                session = uuid.uuid4().hex
                reg.uploads[session] = bytearray()
                reg.upload_repo[session] = repo
                self._reply(
                    202,
                    b"",
                    {"Location": f"/v2/{repo}/blobs/uploads/{session}?_state=x", "Range": "0-0"},
                )
                return
            session = rest
            if session not in reg.uploads:
                self._error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
                return
            data = reg.uploads[session]
            location = f"/v2/{repo}/blobs/uploads/{session}?_state=y"
            if self.command == "PATCH":
                crange = self.headers.get("Content-Range")
                if crange:
                    first = int(crange.split("-")[0])
                    if first != len(data):
                        self._reply(416, b"")
                        return
                data += body
                last = f"{'bytes=' if reg.old_range_form else ''}0-{len(data) - 1}"
                self._reply(202, b"", {"Location": location, "Range": last})
            elif self.command == "GET":
                last = f"{'bytes=' if reg.old_range_form else ''}0-{max(len(data) - 1, 0)}"
                self._reply(204, b"", {"Location": location, "Range": last})
            elif self.command == "DELETE":
                del reg.uploads[session]
                self._reply(204)
            elif self.command == "PUT":
                data += body
                digest = query.get("digest", [""])[0]
                if sha256(bytes(data)) != digest:
                    self._error(400, "DIGEST_INVALID", "digest mismatch")
                    return
                reg.blobs[digest] = bytes(data)
                reg.repo_blobs.setdefault(repo, set()).add(digest)
                del reg.uploads[session]
                self._reply(201, b"", {"Docker-Content-Digest": digest})

    return Handler


class BlobHost:
    """Another origin (object storage) serving blobs at /blob/<digest>; logs headers."""

    def __init__(self, registry: FakeRegistry) -> None:
        self.registry = registry
        self.log: list[Logged] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                host.log.append(Logged("GET", self.path, dict(self.headers.items())))
                digest = self.path.rsplit("/", 1)[-1]
                data = host.registry.blobs.get(digest)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # "localhost" is another origin than "127.0.0.1" for the client.
        self.url = f"http://localhost:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def running(**kw: Any) -> Iterator[FakeRegistry]:
    reg = FakeRegistry(**kw).start()
    try:
        yield reg
    finally:
        reg.stop()


def image_documents(
    layers: list[bytes],
    diff_ids: list[str],
    *,
    arch: str = "amd64",
    media_type: str = "application/vnd.docker.distribution.manifest.v2+json",
    extra_config: dict[str, Any] | None = None,
) -> tuple[bytes, bytes]:
    """(config, manifest) for gzipped ``layers`` with their ``diff_ids``."""
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
                for i in range(len(layers))
            ],
            **(extra_config or {}),
        },
        sort_keys=True,
    ).encode()
    oci = "oci" in media_type
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json"
                if oci
                else "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": sha256(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"
                    if oci
                    else "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(blob),
                    "digest": sha256(blob),
                }
                for blob in layers
            ],
        },
        indent=3,
    ).encode()
    return config, manifest


Sleeper = Callable[[float], None]
