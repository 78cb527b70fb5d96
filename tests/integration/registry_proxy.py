"""A small HTTP proxy in front of a real registry that injects faults (tests only).

It forwards every request to the upstream registry and streams the answer back,
unless told otherwise: answer a status a few times (500s, 429 with Retry-After),
drop the connection in the middle of a blob, serve a blob with flipped bytes,
redirect blob downloads to another origin, demand Basic credentials itself, or
hold a blob download until the test releases it. Every request is logged with
its headers.
"""

from __future__ import annotations

import base64
import http.client
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Rule:
    method: str
    path_regex: str
    times: int = 1
    status: int = 0  # answer this instead of forwarding
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None  # forward, but close after this many body bytes
    corrupt: bool = False  # forward with every byte flipped
    redirect_to: str | None = None  # 307 to this base URL + the same path
    gate: threading.Event | None = None  # wait for it before sending the body

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times > 0
            and method == self.method
            and re.search(self.path_regex, path) is not None
        )


class FaultProxy:
    def __init__(self, upstream: str, *, hostname: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rules: list[Rule] = []
        self.log: list[Seen] = []
        self.basic: tuple[str, str] | None = None
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.host = f"{hostname}:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        for rule in self.rules:
            if rule.gate is not None:
                rule.gate.set()
        self._server.shutdown()
        self._server.server_close()

    def seen(self, method: str, contains: str = "") -> list[Seen]:
        return [s for s in self.log if s.method == method and contains in s.path]

    def _take(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.times -= 1
                    return rule
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _plain(self, status: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in {"Content-Length": "0", **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()

            def _any(self) -> None:
                proxy.log.append(Seen(self.command, self.path, dict(self.headers.items())))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.basic is not None:
                    expected = "Basic " + base64.b64encode(":".join(proxy.basic).encode()).decode()
                    if self.headers.get("Authorization") != expected:
                        self._plain(401, {"WWW-Authenticate": 'Basic realm="proxy"'})
                        return
                rule = proxy._take(self.command, self.path)
                if rule is not None and rule.status:
                    self._plain(rule.status, rule.headers)
                    return
                if rule is not None and rule.redirect_to:
                    self._plain(307, {"Location": rule.redirect_to + self.path})
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "authorization", "connection")
                }
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=60
                )
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    self.send_response(answer.status)
                    for k, v in answer.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding"):
                            self.send_header(k, v)
                    data = answer.read()
                    if "Content-Length" not in answer.headers:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if rule is not None and rule.gate is not None:
                        rule.gate.wait(60)
                    if rule is not None and rule.corrupt:
                        data = bytes(b ^ 0xFF for b in data)
                    if rule is not None and rule.drop_after is not None:
                        self.wfile.write(data[: rule.drop_after])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        return Handler
