"""Registries that are out to hurt: drips, bodies past Content-Length, endless redirects,
documents of 100 MB or 10,000 levels, a token of 100 MB.

A small server here answers each request with exact bytes, at the pace a test asks
for. Each pull runs in this process with a short timeout; its memory is measured with
tracemalloc (the server's, in the same process, sends a few reused buffers). Docker
has no pace rule: its registry client (Go's net/http) waits for a dripping server as
long as bytes keep coming.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layerfs.errors import LayerfsError, RegistryError
from layerfs.registry.client import RegistryOptions
from layerfs.store.store import Store
from layerfs.transfer import pull
from tests.fake_registry import image_documents
from tests.unit.test_registry_client import make_layer

MiB = 1 << 20
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Answer:
    """What the server sends for one path: status, headers, a body, and how."""

    body: bytes | Callable[[], Iterator[bytes]] = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = -1  # Content-Length: -1 = len(body), None = none (close ends it)
    drip_headers: bool = False  # one byte a second from the status line on
    drip_body: bool = False  # headers at once, then the body one byte a second


class RawRegistry:
    """Answers GETs from a table of paths; anything else 404. Every connection closes."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {"/v2/": Answer(b"{}")}
        self.hits: dict[str, int] = {}
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.host = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk or request + chunk < b"A":
                        return  # closed, or a TLS hello (0x16): no https here
                    request += chunk
                parts = request.split(b" ", 2)
                path = parts[1].decode("latin-1").split("?")[0] if len(parts) > 2 else ""
                if not request.startswith(b"GET "):
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    return
                self.hits[path] = self.hits.get(path, 0) + 1
                answer = self.answers.get(path, Answer(b"", 404))
                self._send(conn, answer)
            except OSError:
                return  # the client went away: what a pace rule is for

    def _send(self, conn: socket.socket, answer: Answer) -> None:
        body = answer.body
        length = answer.length
        if length == -1:
            length = len(body) if isinstance(body, bytes) else None
        head = f"HTTP/1.1 {answer.status} X\r\nConnection: close\r\n"
        for key, value in answer.headers.items():
            head += f"{key}: {value}\r\n"
        if length is not None:
            head += f"Content-Length: {length}\r\n"
        head_bytes = (head + "\r\n").encode()
        if answer.drip_headers:
            for i in range(len(head_bytes)):
                if self._stop.is_set():
                    return
                conn.sendall(head_bytes[i : i + 1])
                time.sleep(1)
            return
        conn.sendall(head_bytes)
        pieces = [body] if isinstance(body, bytes) else body()
        for piece in pieces:
            if answer.drip_body:
                for i in range(len(piece)):
                    if self._stop.is_set():
                        return
                    conn.sendall(piece[i : i + 1])
                    time.sleep(1)
            else:
                conn.sendall(piece)


@pytest.fixture
def server() -> Iterator[RawRegistry]:
    raw = RawRegistry()
    try:
        yield raw
    finally:
        raw.close()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


FAST = RegistryOptions(timeout=1, retries=1, retry_delay=0.01, use_config=False)
DRIP = RegistryOptions(timeout=2.5, retries=1, retry_delay=0.01, use_config=False)


def publish(server: RawRegistry, config: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """A one-layer image: (manifest, config, blob) answered at their paths."""
    _, blob, diff_id = make_layer("hostile")
    default_config, manifest = image_documents([blob], [diff_id])
    config = config if config is not None else default_config
    if config is not default_config:
        doc = json.loads(manifest)
        doc["config"].update(size=len(config), digest=digest(config))
        manifest = json.dumps(doc).encode()
    server.answers["/v2/app/manifests/v1"] = Answer(
        manifest, headers={"Content-Type": MANIFEST_TYPE}
    )
    server.answers[f"/v2/app/blobs/{digest(config)}"] = Answer(config)
    server.answers[f"/v2/app/blobs/{digest(blob)}"] = Answer(blob)
    return manifest, config, blob


def pull_peak(store: Store, server: RawRegistry, options: RegistryOptions = FAST) -> tuple[
    LayerfsError | None, int
]:  # fmt: skip
    """Pull app:v1; (the error or None, the peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        pull(store, f"{server.host}/app:v1", options=options)
        error = None
    except LayerfsError as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


def test_the_raw_registry_serves_a_pull(store: Store, server: RawRegistry) -> None:
    publish(server)
    error, _ = pull_peak(store, server)
    assert error is None
    assert store.tags.lookup_image(f"{server.host}/app:v1")


# -- a drip of one byte a second -------------------------------------------------------------


def test_headers_dripping_one_byte_a_second_time_out(store: Store, server: RawRegistry) -> None:
    publish(server)
    server.answers["/v2/app/manifests/v1"].drip_headers = True
    started = time.monotonic()
    error, peak = pull_peak(store, server)
    assert isinstance(error, RegistryError)
    assert "did not answer within 1 s (timeout)" in str(error), error
    assert server.hits["/v2/app/manifests/v1"] == 2  # the first try and one retry
    assert peak < 4 * MiB
    assert time.monotonic() - started < 60  # not the hours the drip would take


@pytest.mark.parametrize("what", ["manifest", "blob"])
def test_a_body_dripping_one_byte_a_second_is_given_up(
    what: str, store: Store, server: RawRegistry
) -> None:
    _, _, blob = publish(server)
    path = "/v2/app/manifests/v1" if what == "manifest" else f"/v2/app/blobs/{digest(blob)}"
    server.answers[path].drip_body = True
    # A timeout of two and a half drip periods: every window of waiting sees a byte even
    # when the server's thread runs late, so the rule that fires is always "too slowly".
    # (With a timeout of exactly one period, a byte a moment late made it "sent nothing".)
    error, peak = pull_peak(store, server, DRIP)
    assert isinstance(error, RegistryError)
    assert "the registry sends too slowly" in str(error), error
    assert peak < 4 * MiB
    assert store.graph.map() == {}
    assert list((store.root / "tmp").iterdir()) == []


# -- more than was announced ----------------------------------------------------------------


def test_bytes_past_content_length_are_never_read(store: Store, server: RawRegistry) -> None:
    publish(server)
    junk = b"\0" * MiB

    def with_junk(data: bytes) -> Callable[[], Iterator[bytes]]:
        def pieces() -> Iterator[bytes]:
            yield data
            for _ in range(64):  # 64 MiB the client was not told about
                yield junk

        return pieces

    for path, answer in list(server.answers.items()):
        if path != "/v2/":
            assert isinstance(answer.body, bytes)
            server.answers[path] = Answer(with_junk(answer.body), headers=answer.headers,
                                          length=len(answer.body))  # fmt: skip
    error, peak = pull_peak(store, server)
    assert error is None  # each body is what its Content-Length and digest say
    assert store.tags.lookup_image(f"{server.host}/app:v1")
    assert peak < 8 * MiB


def test_a_blob_longer_than_its_descriptor_is_refused(store: Store, server: RawRegistry) -> None:
    _, _, blob = publish(server)
    extra = blob + b"\0" * (16 * MiB)
    server.answers[f"/v2/app/blobs/{digest(blob)}"] = Answer(extra, length=None)
    error, peak = pull_peak(store, server)
    assert error is not None and "longer than the" in str(error), error
    assert peak < 8 * MiB
    assert store.graph.map() == {}


# -- redirects forever ------------------------------------------------------------------------


def test_a_blob_that_redirects_forever(store: Store, server: RawRegistry) -> None:
    _, _, blob = publish(server)
    path = f"/v2/app/blobs/{digest(blob)}"
    server.answers[path] = Answer(status=307, headers={"Location": path})
    error, peak = pull_peak(store, server)
    assert isinstance(error, RegistryError) and "too many redirects" in str(error), error
    assert server.hits[path] <= 2 * 11  # ten redirects, twice (one retry of the download)
    assert peak < 4 * MiB


# -- documents of 100 MB, of 10,000 levels ---------------------------------------------------


def _endless(piece: bytes, total: int) -> Callable[[], Iterator[bytes]]:
    def pieces() -> Iterator[bytes]:
        for _ in range(total // len(piece)):
            yield piece

    return pieces


@pytest.mark.parametrize("announced", [True, False])
def test_a_manifest_of_100_mb(announced: bool, store: Store, server: RawRegistry) -> None:
    # Docker's limit is the same 4 MiB (distribution's maxManifestBodySize).
    size = 100 * MiB
    server.answers["/v2/app/manifests/v1"] = Answer(
        _endless(b" " * MiB, size), headers={"Content-Type": MANIFEST_TYPE},
        length=size if announced else None,
    )  # fmt: skip
    error, peak = pull_peak(store, server)
    assert isinstance(error, RegistryError) and "larger than 4194304 bytes" in str(error), error
    assert peak < 16 * MiB


def test_a_config_of_100_mb(store: Store, server: RawRegistry) -> None:
    _, config, _ = publish(server)
    server.answers[f"/v2/app/blobs/{digest(config)}"] = Answer(_endless(b" " * MiB, 100 * MiB))
    error, peak = pull_peak(store, server)
    assert isinstance(error, RegistryError) and "larger than 8388608 bytes" in str(error), error
    assert peak < 32 * MiB


NESTED = b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"


def test_a_manifest_nested_10000_levels(store: Store, server: RawRegistry) -> None:
    server.answers["/v2/app/manifests/v1"] = Answer(NESTED, headers={"Content-Type": MANIFEST_TYPE})
    error, _ = pull_peak(store, server)
    assert error is not None and "JSON nested too deeply" in str(error), error


def test_a_config_nested_10000_levels(store: Store, server: RawRegistry) -> None:
    publish(server, config=NESTED)
    error, _ = pull_peak(store, server)
    assert error is not None and "JSON nested too deeply" in str(error), error


def test_a_token_of_100_mb(store: Store, server: RawRegistry) -> None:
    publish(server)
    realm = f"http://{server.host}/token"
    server.answers["/v2/"] = Answer(
        status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'}
    )
    server.answers["/token"] = Answer(_endless(b" " * MiB, 100 * MiB))
    error, peak = pull_peak(store, server)
    assert isinstance(error, RegistryError), error
    assert "more than 4194304 bytes" in str(error), error
    assert peak < 16 * MiB
