"""The native engine as ``mount.py`` uses it: mount in the caller, serve in the server.

:meth:`NativeEngine.mount` makes the mount in the calling process (so that
every error is the caller's to report); :meth:`NativeEngine.serve`, in the
server process, answers INIT and runs the session's workers until the mount
ends. Worker threads are started only there, after the server has forked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from layerfs.fs.native import device
from layerfs.fs.native.handlers import NativeDispatcher, describe
from layerfs.fs.native.session import WORKERS, Session
from layerfs.fs.operations import Operations

log = logging.getLogger(__name__)


class NativeEngine:
    name = "native"

    def __init__(self, ops: Operations, *, workers: int = WORKERS) -> None:
        self.ops = ops
        self.dispatcher = NativeDispatcher(ops)
        self.workers = workers
        self.conn: device.Connection | None = None
        self.session: Session | None = None

    def mount(self, mountpoint: str, options: device.MountOptions) -> None:
        self.conn = device.mount(mountpoint, options)

    def counts(self) -> dict[str, int]:
        return self.session.counts() if self.session is not None else {}

    def info(self) -> dict[str, Any]:
        negotiated = self.session.negotiated if self.session is not None else None
        info = describe(negotiated, self.dispatcher)
        info["via"] = self.conn.via if self.conn is not None else ""
        return info

    def serve(self, ready: Callable[[], None], tick: Callable[[], None] | None) -> None:
        """Answer INIT, then serve until the mount ends (raises UnsupportedKernelError)."""
        assert self.conn is not None
        self.session = Session(self.conn, self.dispatcher, workers=self.workers)
        try:
            self.session.negotiate()
            self.session.serve(ready, tick)
        finally:
            self.conn.close()

    def close_in_parent(self) -> None:
        """The caller's copies of the descriptors, once the server has them."""
        if self.conn is not None:
            try:
                os.close(self.conn.fd)
            except OSError:
                pass
            if self.conn.comm is not None:
                self.conn.comm.close()
