"""pyfuse3 request handlers: translate the kernel's requests to the merged tree and back.

Nothing here decides file system semantics: attributes and names come from
the inode table (``inodes.py``, built by ``union.py``), changes go through
the writable layer (``upper.py``). Every handler returns data or raises
``pyfuse3.FUSEError``: an ``OSError`` becomes its errno, a ``LayerfsError``
EIO, anything else EIO with its traceback in the log; each is logged once,
here. No other exception may leave a handler: pyfuse3 would end the main
loop, and the mount with it.

Speed comes from requests the kernel never sends: entries, attributes and
negative lookups carry long timeouts, opened files keep their page cache,
and readdir answers with attributes (pyfuse3 always uses readdirplus). File
data is a ``pread`` on the layer tar at the indexed offset; a read that would
wait for the disk (``RWF_NOWAIT`` says so) moves to a worker thread when it
is big, so one cold read does not stall every other request.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3
import trio

from layerfs.errors import LayerfsError
from layerfs.fs.inodes import LAYER_UPPER, NAME_MAX, ROOT, InodeTable
from layerfs.fs.posix import Caller, get_xattr, listed_xattrs
from layerfs.fs.union import MergedTree
from layerfs.fs.upper import Upper

log = logging.getLogger(__name__)

FOREVER = 24 * 3600.0 * 365
"""Entry and attribute timeout for a tree only this mount changes."""
READ_BUFFER = 1 << 20
THREAD_READ_MIN = 64 << 10  # cold reads at least this big go to a worker thread
READ_AHEAD = 8 << 20  # ...and start reading this much of what follows
THREAD_COPY_MIN = 1 << 20  # copy-ups at least this big go to a worker thread
CONTROL_PREFIX = b"user.layerfs."

_QUIET_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENODATA,
        errno.EROFS,
        errno.EPERM,
        errno.EACCES,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EINVAL,
        errno.EXDEV,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.ERANGE,
        errno.EOPNOTSUPP,
    }
)

Control = Callable[[bytes], bytes]
"""Answers ``getxattr(mountpoint, "user.layerfs.<what>")``, the control channel."""


def fuse_error(exc: BaseException, what: str, *args: object) -> pyfuse3.FUSEError:
    """The FUSEError for an exception raised while handling ``what``; logged once."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError):
        code = exc.errno or errno.EIO
        if code in _QUIET_ERRNOS:
            log.debug("%s%r: %s", what, args, exc)
        else:
            log.warning("%s%r: %s", what, args, exc)
        return pyfuse3.FUSEError(code)
    if isinstance(exc, LayerfsError):
        log.error("%s%r: %s", what, args, exc)
        return pyfuse3.FUSEError(errno.EIO)
    log.error("internal error in %s%r", what, args, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


def _read_ahead(fd: int, size: int, pos: int, limit: int) -> bytes:
    ahead = min(READ_AHEAD, limit - pos - size)
    if ahead > 0:
        os.posix_fadvise(fd, pos + size, ahead, os.POSIX_FADV_WILLNEED)
    return os.pread(fd, size, pos)


class Operations(pyfuse3.Operations):
    """The handlers of one mount: ``upper`` is None for a read-only one."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        tree: MergedTree,
        tars: Sequence[int],
        *,
        upper: Upper | None = None,
        control: Control | None = None,
        timeout: float = FOREVER,
        data_size: int = 0,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.t: InodeTable = tree.table
        self.tars = list(tars)
        self.upper = upper
        self.control = control
        self.timeout = timeout
        self.data_size = data_size  # what statfs reports as used for a read-only mount
        self._next_fh = 1
        self._files: dict[int, int] = {}  # fh -> inode
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}  # fh -> names at opendir
        self._open: dict[int, int] = {}  # inode -> open handles (writable mounts)
        self._lookups: dict[int, int] = {}  # inode -> kernel references (writable mounts)
        self._copy_locks: dict[int, trio.Lock] = {}
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = timeout
        self.counts: dict[str, int] = {}  # requests per handler, when counting() made us

    # -- helpers ------------------------------------------------------------------------

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        t = self.t
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.entry_timeout = self.timeout
        attr.attr_timeout = self.timeout
        attr.st_mode = t.mode[ino]
        attr.st_nlink = t.nlink[ino]
        attr.st_uid = t.uid[ino]
        attr.st_gid = t.gid[ino]
        size = t.size[ino]
        attr.st_size = size
        attr.st_blksize = 65536
        attr.st_blocks = (size + 511) >> 9
        mtime = t.mtime[ino]
        attr.st_mtime_ns = mtime
        attr.st_atime_ns = t.atime.get(ino, mtime)
        attr.st_ctime_ns = t.ctime.get(ino, mtime)
        rdev = t.rdev.get(ino)
        if rdev:
            attr.st_rdev = rdev
        return attr

    def _alive(self, ino: int) -> None:
        if not self.t.alive(ino):
            raise pyfuse3.FUSEError(errno.ENOENT)

    def _writable(self) -> Upper:
        if self.upper is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.upper

    def _referenced(self, ino: int) -> None:
        if self.upper is not None:
            self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def _maybe_free(self, ino: int) -> None:
        """Drop an inode with no name, no kernel reference and no open handle."""
        t = self.t
        if (
            self.upper is None
            or not t.alive(ino)
            or t.nlink[ino]
            or self._lookups.get(ino)
            or self._open.get(ino)
        ):
            return
        self.upper.release_data(ino)
        t.drop(ino)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @staticmethod
    def _caller(ctx: pyfuse3.RequestContext) -> Caller:
        return Caller(ctx.uid, ctx.gid, ctx.umask)

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
        upper = self._writable()
        if not upper.needs_copy(ino):
            return
        lock = self._copy_locks.setdefault(ino, trio.Lock())
        try:
            async with lock:
                plan = upper.plan_copy(ino, keep)
                if plan is None:
                    return
                try:
                    if plan.count >= THREAD_COPY_MIN:
                        await trio.to_thread.run_sync(upper.run_copy, plan)
                    else:
                        upper.run_copy(plan)
                except BaseException:
                    upper.abort_copy(plan)
                    raise
                upper.finish_copy(plan)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._copy_locks.pop(ino, None)

    # -- looking up -------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            ino = self.t.lookup(parent_inode, name)
            if not ino:
                return self._negative
            self._referenced(ino)
            return self._attr(ino)
        except Exception as exc:
            raise fuse_error(exc, "lookup", parent_inode, name) from None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        if self.upper is None:
            return
        try:
            for ino, count in inode_list:
                left = self._lookups.get(ino, 0) - count
                if left > 0:
                    self._lookups[ino] = left
                else:
                    self._lookups.pop(ino, None)
                    self._maybe_free(ino)
        except Exception:
            log.exception("internal error in forget")

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            self._alive(inode)
            return self._attr(inode)
        except Exception as exc:
            raise fuse_error(exc, "getattr", inode) from None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            target = self.t.targets.get(inode)
            if target is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return target
        except Exception as exc:
            raise fuse_error(exc, "readlink", inode) from None

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks modes itself

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        try:
            data = pyfuse3.StatvfsData()
            if self.upper is not None:
                vfs = os.statvfs(self.upper.directory)
                data.f_bsize, data.f_frsize = vfs.f_bsize, vfs.f_frsize
                data.f_blocks, data.f_bfree, data.f_bavail = vfs.f_blocks, vfs.f_bfree, vfs.f_bavail
                data.f_ffree = data.f_favail = max(vfs.f_ffree, 1 << 20)
            else:
                data.f_bsize = data.f_frsize = 4096
                data.f_blocks = (self.data_size + 4095) // 4096
                data.f_bfree = data.f_bavail = 0
                data.f_ffree = data.f_favail = 0
            data.f_files = len(self.t) + data.f_ffree
            data.f_namemax = NAME_MAX
            return data
        except Exception as exc:
            raise fuse_error(exc, "statfs") from None

    # -- directories ---------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        try:
            names = self.t.children.get(inode)
            if names is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR if self.t.alive(inode) else errno.ENOENT)
            fh = self._new_fh()
            # A snapshot: offsets stay valid whatever changes while it is read.
            self._dirs[fh] = [(b".", inode), (b"..", self.t.parent[inode]), *names.items()]
            return fh
        except Exception as exc:
            raise fuse_error(exc, "opendir", inode) from None

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            entries = self._dirs[fh]
            mode = self.t.mode
            attr = self._attr
            counting = self.upper is not None
            reply = pyfuse3.readdir_reply
            for index in range(start_id, len(entries)):
                name, ino = entries[index]
                if not mode[ino]:
                    continue  # removed since opendir
                if not reply(token, name, attr(ino), index + 1):
                    break
                if counting and index > 1:  # never for "." and ".."
                    self._lookups[ino] = self._lookups.get(ino, 0) + 1
        except Exception as exc:
            raise fuse_error(exc, "readdir", fh, start_id) from None

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # -- file data ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            self._alive(inode)
            if self.upper is None:
                if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                    raise pyfuse3.FUSEError(errno.EROFS)
            else:
                # libfuse asks the kernel for atomic O_TRUNC: the truncation is ours.
                self.upper.open_file(inode, flags, self._caller(ctx))
            fh = self._new_fh()
            self._files[fh] = inode
            if self.upper is not None:
                self._open[inode] = self._open.get(inode, 0) + 1
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        except Exception as exc:
            raise fuse_error(exc, "open", inode, flags) from None

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        try:
            ino = self._files[fh]
            t = self.t
            end = t.size[ino]
            if off >= end:
                return b""
            layer = t.layer[ino]
            if layer >= 0:
                fd = self.tars[layer]
                pos = t.offset[ino] + off
            elif layer == LAYER_UPPER and self.upper is not None:
                fd = self.upper.fd(ino)
                pos = off
            else:
                return b""
            return await self._pread(fd, min(size, end - off), pos, pos - off + end)
        except Exception as exc:
            raise fuse_error(exc, "read", fh, off, size) from None

    async def flush(self, fh: int) -> None:
        # Nothing is buffered here: ENOSYS tells the kernel never to send FLUSH again,
        # which saves a round trip on every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        try:
            ino = self._files.pop(fh, 0)
            if self.upper is not None and ino:
                left = self._open.get(ino, 0) - 1
                if left > 0:
                    self._open[ino] = left
                else:
                    self._open.pop(ino, None)
                    self.upper.close_fd(ino)
                    self._maybe_free(ino)
        except Exception as exc:
            raise fuse_error(exc, "release", fh) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            upper = self._writable()
            ino = self._files[fh]
            await self._copy_up(ino)
            return upper.write(ino, off, buf)
        except Exception as exc:
            raise fuse_error(exc, "write", fh, off, len(buf)) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            ino = self._files[fh]
            if self.upper is not None and self.t.layer[ino] == LAYER_UPPER:
                fd = self.upper.fd(ino)
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
            self._alive(inode)
            upper = self._writable()
            if fields.update_size:
                await self._copy_up(inode, keep=attr.st_size)
            # pyfuse3 passes FATTR_CTIME (writeback caching only) as update_ctime: the
            # model moves ctime with every change anyway.
            upper.setattr(
                inode,
                self._caller(ctx),
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            )
            if fields.update_size and not self._open.get(inode):
                upper.close_fd(inode)
            return self._attr(inode)
        except Exception as exc:
            raise fuse_error(exc, "setattr", inode) from None

    async def _new_entry(
        self,
        what: str,
        parent: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        rdev: int = 0,
        target: bytes = b"",
    ) -> pyfuse3.EntryAttributes:
        upper = self._writable()
        ino = upper.make_node(parent, name, mode, self._caller(ctx), rdev=rdev, target=target)
        if stat.S_ISREG(mode):
            upper.close_fd(ino)  # reopened by open()
        self._referenced(ino)
        return self._attr(ino)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return await self._new_entry(
                "mkdir", parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx
            )
        except Exception as exc:
            raise fuse_error(exc, "mkdir", parent_inode, name) from None

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return await self._new_entry("mknod", parent_inode, name, mode, ctx, rdev=rdev)
        except Exception as exc:
            raise fuse_error(exc, "mknod", parent_inode, name) from None

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return await self._new_entry(
                "symlink", parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target
            )
        except Exception as exc:
            raise fuse_error(exc, "symlink", parent_inode, name) from None

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        try:
            upper = self._writable()
            ino = upper.create_file(parent_inode, name, mode, flags, self._caller(ctx))
            self._referenced(ino)
            fh = self._new_fh()
            self._files[fh] = ino
            self._open[ino] = self._open.get(ino, 0) + 1
            return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(ino)
        except Exception as exc:
            raise fuse_error(exc, "create", parent_inode, name) from None

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            self._writable().link(inode, new_parent_inode, new_name)
            self._referenced(inode)
            return self._attr(inode)
        except Exception as exc:
            raise fuse_error(exc, "link", inode, new_parent_inode, new_name) from None

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self._maybe_free(self._writable().unlink(parent_inode, name))
        except Exception as exc:
            raise fuse_error(exc, "unlink", parent_inode, name) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self._maybe_free(self._writable().rmdir(parent_inode, name))
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
            replaced = self._writable().rename(
                parent_inode_old, name_old, parent_inode_new, name_new, flags
            )
            if replaced:
                self._maybe_free(replaced)
        except Exception as exc:
            raise fuse_error(
                exc, "rename", parent_inode_old, name_old, parent_inode_new, name_new
            ) from None

    # -- extended attributes -----------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            if inode == ROOT and name.startswith(CONTROL_PREFIX) and self.control is not None:
                return self.control(name[len(CONTROL_PREFIX) :])
            return get_xattr(self.t, inode, name.decode("utf-8", "surrogateescape"))
        except Exception as exc:
            raise fuse_error(exc, "getxattr", inode, name) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        try:
            self._alive(inode)
            names = listed_xattrs(self.t, inode, self._caller(ctx))
            return [k.encode("utf-8", "surrogateescape") for k in names]
        except Exception as exc:
            raise fuse_error(exc, "listxattr", inode) from None

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        try:
            self._alive(inode)
            if name.startswith(CONTROL_PREFIX):
                raise pyfuse3.FUSEError(errno.EPERM)
            self._writable().set_xattr(inode, name.decode("utf-8", "surrogateescape"), value)
        except Exception as exc:
            raise fuse_error(exc, "setxattr", inode, name) from None

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self._alive(inode)
            self._writable().remove_xattr(inode, name.decode("utf-8", "surrogateescape"))
        except Exception as exc:
            raise fuse_error(exc, "removexattr", inode, name) from None


_COUNTED = ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
            "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release",
            "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr",
            "getxattr", "listxattr", "removexattr", "access", "create")


def counting(cls: type[Operations]) -> type[Operations]:
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
