"""A one-file FUSE file system whose reads can be made to hang, served in a thread.

Built on the native engine's session (``layerfs.fs.native``) as a library: it
serves ``/<name>`` with the given bytes, every read going to the server
(``FOPEN_DIRECT_IO``), and :meth:`BlockingFs.block` makes reads wait until
:meth:`BlockingFs.release`. A file of a layerfs mount whose data lives there
(an archive mounted in place) then has a read that waits for as long as the test
likes: the way to check what INTERRUPT does to a blocked read. Needs root.
"""

from __future__ import annotations

import errno
import stat
import threading
import time
from pathlib import Path

from layerfs.fs.native import device, protocol
from layerfs.fs.native.protocol import Request
from layerfs.fs.native.session import Dispatcher, Handler, Negotiated, Reply, Session, Wanted

_FILE = 2


class _Files(Dispatcher):
    def __init__(self, name: bytes, data: bytes) -> None:
        self.name = name
        self.data = data
        self.blocked = threading.Event()  # set: reads hang
        self.released = threading.Event()
        self.waiting = threading.Event()  # a read hangs now

    def wanted(self, kernel_minor: int, kernel_flags: int) -> Wanted:
        return Wanted(protocol.MAX_PAGES)

    def handlers(self, negotiated: Negotiated, session: Session) -> dict[int, Handler]:
        return {
            protocol.LOOKUP: self.lookup,
            protocol.GETATTR: self.getattr,
            protocol.OPEN: self.open,
            protocol.READ: self.read,
            protocol.RELEASE: lambda req: b"",
            protocol.FLUSH: lambda req: b"",
        }

    def _attr(self, ino: int) -> tuple[int, ...]:
        if ino == protocol.ROOT_ID:
            return (ino, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
        size = len(self.data)
        return (
            ino,
            size,
            (size + 511) // 512,
            0,
            0,
            0,
            0,
            0,
            0,
            stat.S_IFREG | 0o644,
            1,
            0,
            0,
            0,
            4096,
            0,
        )

    def lookup(self, req: Request) -> Reply:
        if req.nodeid != protocol.ROOT_ID or req.names[0] != self.name:
            raise OSError(errno.ENOENT, "no such file")
        return protocol.ENTRY_OUT.pack(_FILE, 0, 1, 1, 0, 0, *self._attr(_FILE))

    def getattr(self, req: Request) -> Reply:
        return protocol.ATTR_OUT.pack(1, 0, 0, *self._attr(req.nodeid))

    def open(self, req: Request) -> Reply:
        return protocol.OPEN_OUT.pack(0, protocol.FOPEN_DIRECT_IO, 0)

    def read(self, req: Request) -> Reply:
        _fh, offset, size = req.args[0], req.args[1], req.args[2]
        if self.blocked.is_set():
            self.waiting.set()
            self.released.wait()
        return self.data[offset : offset + size]


class BlockingFs:
    """``with BlockingFs(mountpoint, b"image.tar", data) as fs: ...`` (root only)."""

    def __init__(self, mountpoint: Path, name: bytes, data: bytes) -> None:
        self.mountpoint = mountpoint
        self.path = mountpoint / name.decode()
        self.files = _Files(name, data)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def __enter__(self) -> BlockingFs:
        conn = device.mount(str(self.mountpoint), device.MountOptions(fsname="blocking-test"))
        session = Session(conn, self.files, workers=2)
        session.negotiate()

        def serve() -> None:
            try:
                session.serve(self._ready.set)
            finally:
                conn.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the blocking file system did not start")
        return self

    def block(self) -> None:
        self.files.blocked.set()

    def release(self) -> None:
        self.files.released.set()

    def __exit__(self, *exc: object) -> None:
        self.release()
        device.unmount_lazily(str(self.mountpoint))
        if self._thread is not None:
            deadline = time.monotonic() + 30
            while self._thread.is_alive() and time.monotonic() < deadline:
                self._thread.join(0.1)
