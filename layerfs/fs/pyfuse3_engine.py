"""The pyfuse3 engine: libfuse through pyfuse3 and trio, the portable reference.

:class:`Pyfuse3Operations` translates pyfuse3's handler calls into
:class:`~layerfs.fs.operations.Operations` and back, nothing more: every
handler returns data or raises ``pyfuse3.FUSEError`` with the errno
:func:`~layerfs.fs.operations.errno_of` chose. No other exception may leave
a handler: pyfuse3 would end the main loop, and the mount with it.

What trio adds: a big copy-up or a read that would wait for the disk
(``RWF_NOWAIT`` says so) runs in a worker thread, so that one of them does
not stall every other request. :func:`serve` runs the session: pyfuse3's
workers, a signal watcher and, for a writable mount, the saver of the
upper's state. This is the only module that imports pyfuse3 and trio.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3
import trio

from layerfs.fs.operations import BLKSIZE, Operations, errno_of
from layerfs.fs.posix import Caller
from layerfs.fs.upper import Upper

log = logging.getLogger(__name__)

READ_BUFFER = 1 << 20
THREAD_READ_MIN = 64 << 10  # cold reads at least this big go to a worker thread
READ_AHEAD = 8 << 20  # ...and start reading this much of what follows
THREAD_COPY_MIN = 1 << 20  # copy-ups at least this big go to a worker thread
# pyfuse3.main's worker tasks. Its default pool hands every request from one task to
# the next through a lock, which makes each round trip dearer (docs/benchmarks.md,
# Mount: the two pyfuse3 floor columns). One worker is enough where the only handler
# that waits is a big cold read (in a worker thread; sequential reads lose nothing);
# a writable mount keeps the pool so that one copy-up or fsync never holds up every
# other request.
WORKERS_READ_ONLY = 1
WORKERS_WRITABLE = 99  # pyfuse3's default


def fuse_error(exc: BaseException, what: str, *args: object) -> pyfuse3.FUSEError:
    """The FUSEError for an exception raised while handling ``what``; logged once."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    return pyfuse3.FUSEError(errno_of(exc, what, *args))


def _read_ahead(fd: int, size: int, pos: int, limit: int) -> bytes:
    ahead = min(READ_AHEAD, limit - pos - size)
    if ahead > 0:
        os.posix_fadvise(fd, pos + size, ahead, os.POSIX_FADV_WILLNEED)
    return os.pread(fd, size, pos)


class Pyfuse3Operations(pyfuse3.Operations):
    """pyfuse3's handlers over one mount's :class:`Operations`."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, ops: Operations) -> None:
        super().__init__()
        self.ops = ops
        self.t = ops.t
        self._copy_locks: dict[int, trio.Lock] = {}
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = ops.timeout
        self.counts: dict[str, int] = {}  # requests per handler, when counting() made us

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _caller(ctx: pyfuse3.RequestContext) -> Caller:
        return Caller(ctx.uid, ctx.gid, ctx.umask)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        _, mode, nlink, uid, gid, rdev, size, blocks, atime, mtime, ctime = self.ops.attr(ino)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.entry_timeout = attr.attr_timeout = self.ops.timeout
        attr.st_mode = mode
        attr.st_nlink = nlink
        attr.st_uid = uid
        attr.st_gid = gid
        attr.st_size = size
        attr.st_blksize = BLKSIZE
        attr.st_blocks = blocks
        attr.st_mtime_ns = mtime
        attr.st_atime_ns = atime
        attr.st_ctime_ns = ctime
        if rdev:
            attr.st_rdev = rdev
        return attr

    async def _pread(self, fd: int, size: int, pos: int, limit: int) -> bytes | memoryview:
        """``size`` bytes at ``pos`` of ``fd``, whose file's data ends at ``limit``."""
        if self._nowait and size <= READ_BUFFER:
            view = self._view[:size]
            try:
                got = os.preadv(fd, [view], pos, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False
                got = 0
            if got == size:
                # Returned without a checkpoint: pyfuse3 replies before any other
                # handler can run and reuse the buffer.
                return view
            if got:
                head = bytes(view[:got])
                return head + await self._pread_wait(fd, size - got, pos + got, limit)
        return await self._pread_wait(fd, size, pos, limit)

    @staticmethod
    async def _pread_wait(fd: int, size: int, pos: int, limit: int) -> bytes:
        if size >= THREAD_READ_MIN:
            # A big read that misses the cache is a sequential read: ask for what comes
            # next too, so that the following requests find it in the page cache.
            return await trio.to_thread.run_sync(_read_ahead, fd, size, pos, limit)
        return os.pread(fd, size, pos)

    async def _copy_up(self, ino: int, keep: int | None = None) -> None:
        ops = self.ops
        if not ops.needs_copy(ino):
            return
        lock = self._copy_locks.setdefault(ino, trio.Lock())
        try:
            async with lock:
                plan = ops.plan_copy(ino, keep)
                if plan is None:
                    return
                try:
                    if plan.count >= THREAD_COPY_MIN:
                        await trio.to_thread.run_sync(Upper.run_copy, plan)
                    else:
                        Upper.run_copy(plan)
                except BaseException:
                    ops.abort_copy(plan)
                    raise
                ops.finish_copy(plan)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._copy_locks.pop(ino, None)

    # -- looking up -------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            ino = self.ops.lookup(parent_inode, name)
            return self._attr(ino) if ino else self._negative
        except Exception as exc:
            raise fuse_error(exc, "lookup", parent_inode, name) from None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self.ops.forget(inode_list)
        except Exception:
            log.exception("internal error in forget")

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return self._attr(inode)
        except Exception as exc:
            raise fuse_error(exc, "getattr", inode) from None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self.ops.readlink(inode)
        except Exception as exc:
            raise fuse_error(exc, "readlink", inode) from None

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks modes itself

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        try:
            s = self.ops.statfs()
            data = pyfuse3.StatvfsData()
            data.f_bsize, data.f_frsize = s.bsize, s.frsize
            data.f_blocks, data.f_bfree, data.f_bavail = s.blocks, s.bfree, s.bavail
            data.f_files, data.f_ffree, data.f_favail = s.files, s.ffree, s.ffree
            data.f_namemax = s.namemax
            return data
        except Exception as exc:
            raise fuse_error(exc, "statfs") from None

    # -- directories --------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        try:
            return self.ops.opendir(inode)
        except Exception as exc:
            raise fuse_error(exc, "opendir", inode) from None

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            attr = self._attr
            referenced = self.ops.referenced
            reply = pyfuse3.readdir_reply
            for next_id, name, ino in self.ops.readdir(fh, start_id):
                if not reply(token, name, attr(ino), next_id):
                    break
                if next_id > 2:  # pyfuse3 answers READDIRPLUS: a reference, but not . and ..
                    referenced(ino)
        except Exception as exc:
            raise fuse_error(exc, "readdir", fh, start_id) from None

    async def releasedir(self, fh: int) -> None:
        self.ops.releasedir(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # -- file data ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            # libfuse asks the kernel for atomic O_TRUNC: the truncation is ours.
            if flags & os.O_TRUNC and self.ops.writable and self.ops.needs_copy(inode):
                await self._copy_up(inode, keep=0)
            fh = self.ops.open(inode, flags, self._caller(ctx))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        except Exception as exc:
            raise fuse_error(exc, "open", inode, flags) from None

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        try:
            ops = self.ops
            fd, pos, count, limit = ops.extent(ops.inode_of(fh), off, size)
            if not count:
                return b""
            return await self._pread(fd, count, pos, limit)
        except Exception as exc:
            raise fuse_error(exc, "read", fh, off, size) from None

    async def flush(self, fh: int) -> None:
        # Nothing is buffered here: ENOSYS tells the kernel never to send FLUSH again,
        # which saves a round trip on every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        try:
            self.ops.release(fh)
        except Exception as exc:
            raise fuse_error(exc, "release", fh) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            ino = self.ops.inode_of(fh)
            await self._copy_up(ino)
            return self.ops.write(ino, off, buf)
        except Exception as exc:
            raise fuse_error(exc, "write", fh, off, len(buf)) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            fd = self.ops.data_fd(self.ops.inode_of(fh))
            if fd is not None:
                await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        except Exception as exc:
            raise fuse_error(exc, "fsync", fh) from None

    # -- changes ------------------------------------------------------------------------------

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        try:
            ops = self.ops
            size = attr.st_size if fields.update_size else None
            if size is not None and ops.writable and ops.needs_copy(inode):
                await self._copy_up(inode, keep=size)
            # pyfuse3 passes FATTR_CTIME (writeback caching only) as update_ctime: the
            # model moves ctime with every change anyway.
            ops.setattr(
                inode,
                self._caller(ctx),
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=size,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            )
            return self._attr(inode)
        except Exception as exc:
            raise fuse_error(exc, "setattr", inode) from None

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._attr(
                self.ops.make(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), self._caller(ctx))
            )
        except Exception as exc:
            raise fuse_error(exc, "mkdir", parent_inode, name) from None

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._attr(self.ops.make(parent_inode, name, mode, self._caller(ctx), rdev=rdev))
        except Exception as exc:
            raise fuse_error(exc, "mknod", parent_inode, name) from None

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._attr(
                self.ops.make(
                    parent_inode, name, stat.S_IFLNK | 0o777, self._caller(ctx), target=target
                )
            )
        except Exception as exc:
            raise fuse_error(exc, "symlink", parent_inode, name) from None

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        try:
            fh, ino = self.ops.create(parent_inode, name, mode, flags, self._caller(ctx))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(ino)
        except Exception as exc:
            raise fuse_error(exc, "create", parent_inode, name) from None

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            self.ops.link(inode, new_parent_inode, new_name)
            return self._attr(inode)
        except Exception as exc:
            raise fuse_error(exc, "link", inode, new_parent_inode, new_name) from None

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self.ops.unlink(parent_inode, name)
        except Exception as exc:
            raise fuse_error(exc, "unlink", parent_inode, name) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self.ops.rmdir(parent_inode, name)
        except Exception as exc:
            raise fuse_error(exc, "rmdir", parent_inode, name) from None

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        try:
            self.ops.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        except Exception as exc:
            raise fuse_error(
                exc, "rename", parent_inode_old, name_old, parent_inode_new, name_new
            ) from None

    # -- extended attributes -----------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self.ops.getxattr(inode, name)
        except Exception as exc:
            raise fuse_error(exc, "getxattr", inode, name) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        try:
            return self.ops.listxattr(inode, self._caller(ctx))
        except Exception as exc:
            raise fuse_error(exc, "listxattr", inode) from None

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        try:
            self.ops.setxattr(inode, name, value)
        except Exception as exc:
            raise fuse_error(exc, "setxattr", inode, name) from None

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self.ops.removexattr(inode, name)
        except Exception as exc:
            raise fuse_error(exc, "removexattr", inode, name) from None


_COUNTED = (
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
)


def counting(cls: type[Pyfuse3Operations]) -> type[Pyfuse3Operations]:
    """A subclass that counts requests per handler in ``self.counts`` (for benchmarks)."""

    def wrap(name: str) -> Any:
        original = getattr(cls, name)

        async def handler(self: Any, *args: Any) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            return await original(self, *args)

        handler.__name__ = name
        return handler

    namespace: dict[str, Any] = {name: wrap(name) for name in _COUNTED}
    return type("Counting" + cls.__name__, (cls,), namespace)


# -- the session -----------------------------------------------------------------------------


class Pyfuse3Session:
    """A pyfuse3 mount: :meth:`mount` in the calling process, :meth:`serve` in the server."""

    name = "pyfuse3"

    def __init__(self, ops: Operations, *, count: bool = False) -> None:
        cls = counting(Pyfuse3Operations) if count else Pyfuse3Operations
        self.handlers = cls(ops)
        self.ops = ops

    def mount(self, mountpoint: str, options: set[str]) -> None:
        try:
            pyfuse3.init(self.handlers, mountpoint, options)
        except RuntimeError as exc:
            from layerfs.errors import MountError

            raise MountError(
                f"cannot mount on {mountpoint}: {exc} (the FUSE library printed why above)"
            ) from None

    def counts(self) -> dict[str, int]:
        return dict(self.handlers.counts)

    def info(self) -> dict[str, Any]:
        return {
            "pyfuse3": getattr(pyfuse3, "__version__", "unknown"),
            "workers": WORKERS_WRITABLE if self.ops.writable else WORKERS_READ_ONLY,
        }

    def serve(self, ready: Callable[[], None], tick: Callable[[], None] | None) -> None:
        """Serve until unmounted or signalled; ``ready`` runs once requests are answered,
        ``tick`` every second (the writable mount's saver)."""
        try:
            trio.run(_main, ready, tick, self.ops.writable)
        finally:
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                log.exception("closing the FUSE session")


async def _main(ready: Callable[[], None], tick: Callable[[], None] | None, writable: bool) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals)
        if tick is not None:
            nursery.start_soon(_every_second, tick)
        nursery.start_soon(_announce, ready)
        workers = WORKERS_WRITABLE if writable else WORKERS_READ_ONLY
        await pyfuse3.main(min_tasks=1, max_tasks=workers)
        nursery.cancel_scope.cancel()


async def _announce(ready: Callable[[], None]) -> None:
    await trio.sleep(0)  # the session loop is scheduled first
    # ready() may stat the mountpoint, a request to this very loop: never call it from here.
    await trio.to_thread.run_sync(ready)


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _every_second(tick: Callable[[], None]) -> None:
    while True:
        await trio.sleep(1.0)
        try:
            tick()
        except Exception:
            log.exception("internal error in the periodic task")
