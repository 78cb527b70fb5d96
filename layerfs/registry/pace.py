"""Registries that answer too slowly: a deadline for headers, a floor for bodies.

A socket timeout bounds each ``recv`` alone, so a server that drips one byte a
second never trips it: a status line and headers could take days, a 4 MiB
manifest weeks. Every connection the registry client opens is made by
:func:`paced_connection_classes`, whose connections hand ``http.client`` a
:class:`PacedSocket` for each response: the status line and headers must be
complete within the client's timeout, and the body, once it flows, must bring
at least :data:`MIN_BYTES` per timeout's worth of waiting. Only time spent
waiting in ``recv`` counts, so a consumer that pauses (a full disk queue, a
lock) is never taken for a slow server. Breaking a rule raises
:class:`StalledError`, a ``socket.timeout``: requests and urllib3 report it as a
read timeout, and the client's retries and resumes take over.
"""

from __future__ import annotations

import io
import socket
import time
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

MIN_BYTES = 1024  # a body must bring at least this much per timeout's worth of waiting


class StalledError(socket.timeout):
    """The server is too slow: headers past the deadline, or a body below the floor."""


class PacedSocket:
    """The socket of one response, as ``http.client`` reads it (``makefile("rb")``)."""

    def __init__(self, sock: Any, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._op_timeout: float | None = sock.gettimeout()
        self._deadline = time.monotonic() + timeout  # for the status line and headers
        self.in_body = False
        self._waited = 0.0  # seconds spent in recv in the current window of the body
        self._got = 0  # bytes received in that window

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, value: float | None) -> None:
        self._op_timeout = value
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._op_timeout

    def makefile(self, mode: str = "rb", buffering: int | None = None, **kw: Any) -> Any:
        if mode != "rb":
            return self._sock.makefile(mode, buffering, **kw)
        self._sock._io_refs += 1  # as socket.makefile counts its streams
        return io.BufferedReader(socket.SocketIO(self, "rb"), io.DEFAULT_BUFFER_SIZE)  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()

    def _limit(self, left: float) -> None:
        op = self._op_timeout
        self._sock.settimeout(max(0.001, left if op is None else min(op, left)))

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        start = time.monotonic()
        late = f"no complete status line and headers within {self._timeout:g} s"
        if not self.in_body:
            left = self._deadline - start
            if left <= 0:
                raise StalledError(late)
            self._limit(left)
        else:
            self._limit(self._timeout - self._waited + 0.001)
        try:
            n: int = self._sock.recv_into(buffer, nbytes, flags)
        except TimeoutError:
            if not self.in_body:
                if time.monotonic() >= self._deadline:
                    raise StalledError(late) from None
                raise
            self._waited += time.monotonic() - start
            if self._waited >= self._timeout:
                raise StalledError(self._too_slow()) from None
            raise
        if self.in_body:
            self._waited += time.monotonic() - start
            self._got += n
            if self._waited >= self._timeout:
                if self._got < MIN_BYTES and n:
                    raise StalledError(self._too_slow())
                self._waited, self._got = 0.0, 0
        return n

    def _too_slow(self) -> str:
        if not self._got:
            return f"the registry sent nothing for {self._waited:.0f} s"
        return (
            f"the registry sends too slowly: {self._got} bytes in {self._waited:.0f} s "
            f"(fewer than {MIN_BYTES} per {self._timeout:g} s)"
        )

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        buffer = bytearray(bufsize)
        n = self.recv_into(buffer, bufsize, flags)
        return bytes(buffer[:n])


class _Paced:
    """Mixed into urllib3's connections: each response reads through a PacedSocket."""

    pace_timeout = 30.0
    sock: Any

    def getresponse(self) -> Any:
        real = self.sock
        paced = PacedSocket(real, self.pace_timeout)
        self.sock = paced
        try:
            response = super().getresponse()  # type: ignore[misc]
        finally:
            if self.sock is paced:  # http.client sets it to None when it closes
                self.sock = real
        paced.in_body = True
        return response


def paced_connection_classes(timeout: float) -> dict[str, type[HTTPConnectionPool]]:
    """Connection pool classes (for a PoolManager's ``pool_classes_by_scheme``)."""
    http = type("PacedHTTPConnection", (_Paced, HTTPConnection), {"pace_timeout": timeout})
    https = type("PacedHTTPSConnection", (_Paced, HTTPSConnection), {"pace_timeout": timeout})
    return {
        "http": type("PacedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type("PacedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
    }
