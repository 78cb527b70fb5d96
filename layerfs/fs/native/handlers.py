"""The native engine's requests: decoded protocol in, :class:`Operations` calls, replies out.

What is negotiated, and why (docs/guide.md, "The mount engines", says it for users):

- every mount: readdirplus always (a listing brings every entry's attributes and
  lookup with it), symlink targets cached by the kernel (a symlink's target never
  changes: a new one is a new inode), entry and attribute timeouts of a year (only
  this mount changes the tree), parallel lookups and directory reads, 1 MiB requests
  (``max_pages`` 256), the largest readahead the kernel offers, ``.``/``..`` lookups
  (export support);
- a read-only mount: no OPEN and no OPENDIR. The first of each is answered ENOSYS,
  after which the kernel opens every file with keep-cache and every directory with
  its listing cached, and never sends them (nor RELEASE) again; READ and READDIR
  name the inode in their header. A warm tree then costs the server nothing.
- a writable mount: real handles (an unlinked file lives while open), ``O_TRUNC``
  in OPEN (so that truncating a lower file copies nothing up), and, where the kernel
  has it and the server is root, passthrough: an upper file's descriptor is
  registered with the kernel (``FUSE_DEV_IOC_BACKING_OPEN``) and reads and writes
  of it never reach the server. The kernel refuses to mix passthrough and cached
  opens of one inode, so an inode already open through the page cache (a lower file
  being read while it is copied up) gets cached opens until those close; lower files
  are opened with keep-cache (their data never changes while they are lower).

A writable mount runs every handler under ``Operations.lock``, except the parts that
wait: reading file data, a copy-up's copying, fsync.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

from layerfs.fs.inodes import LAYER_UPPER
from layerfs.fs.native import device, protocol
from layerfs.fs.native.protocol import Request
from layerfs.fs.native.session import Dispatcher, Handler, Negotiated, Reply, Session, Wanted
from layerfs.fs.operations import BLKSIZE, Attr, Operations
from layerfs.fs.posix import Caller
from layerfs.fs.upper import Upper

log = logging.getLogger(__name__)

READ_AHEAD = 8 << 20  # a cold big read also asks the disk for this much of what follows
OVERLAYFS_MAGIC = 0x794C7630

EVERY_MOUNT = (
    protocol.ASYNC_READ
    | protocol.EXPORT_SUPPORT
    | protocol.BIG_WRITES
    | protocol.DO_READDIRPLUS
    | protocol.PARALLEL_DIROPS
    | protocol.MAX_PAGES
    | protocol.CACHE_SYMLINKS
    | protocol.ABORT_ERROR
)
READ_ONLY = EVERY_MOUNT | protocol.NO_OPEN_SUPPORT | protocol.NO_OPENDIR_SUPPORT
WRITABLE = EVERY_MOUNT | protocol.ATOMIC_O_TRUNC


_NS = 1_000_000_000
_U64 = 0xFFFFFFFFFFFFFFFF


def _split(ns: float | int) -> tuple[int, int]:
    """Seconds (as the kernel's u64, before 1970 wrapping) and nanoseconds."""
    sec, nsec = divmod(int(ns), _NS)
    return sec & _U64, nsec


def _read_ahead(fd: int, size: int, pos: int, limit: int) -> bytes:
    ahead = min(READ_AHEAD, limit - pos - size)
    if size >= 64 << 10 and ahead > 0:
        os.posix_fadvise(fd, pos + size, ahead, os.POSIX_FADV_WILLNEED)
    return os.pread(fd, size, pos)


class NativeDispatcher(Dispatcher):
    """The handlers of one mount over its :class:`Operations`."""

    def __init__(self, ops: Operations, *, passthrough: bool | None = None) -> None:
        self.ops = ops
        self.writable = ops.writable
        if passthrough is None:
            passthrough = self.writable and os.geteuid() == 0 and not _in_user_namespace()
        self.passthrough = passthrough
        self.session: Session | None = None
        self.negotiated: Negotiated | None = None
        valid, nsec = _split(ops.timeout * 1e9)
        self._valid = (valid, nsec)
        self._negative = protocol.ENTRY_OUT.pack(0, 0, valid, 0, nsec, 0, *([0] * 16))
        self._no_open = False
        self._no_opendir = False
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._local = threading.local()
        # Writable mounts: copy-ups in progress, and the io mode of open inodes.
        self._copying: dict[int, threading.Event] = {}
        self._cached_opens: dict[int, int] = {}  # inode -> opens through the page cache
        self._fh_cached: dict[int, int] = {}  # fh -> inode, for those
        self._backing: dict[int, list[int]] = {}  # inode -> [backing id, opens]
        self._fh_backing: dict[int, int] = {}  # fh -> inode, for passthrough opens
        self.passthrough_opens = 0

    # -- INIT ---------------------------------------------------------------------------------

    def wanted(self, kernel_minor: int, kernel_flags: int) -> Wanted:
        if not self.writable:
            return Wanted(READ_ONLY)
        flags = WRITABLE
        depth = 0
        if self.passthrough:
            flags |= protocol.PASSTHROUGH
            depth = 1
            upper = self.ops.upper
            if upper is not None and _fs_magic(str(upper.directory)) == OVERLAYFS_MAGIC:
                depth = 2  # the upper's files are themselves on a stacked file system
        return Wanted(flags, max_stack_depth=depth)

    def handlers(self, negotiated: Negotiated, session: Session) -> dict[int, Handler]:
        self.session = session
        self.negotiated = negotiated
        self._no_open = negotiated.has(protocol.NO_OPEN_SUPPORT)
        self._no_opendir = negotiated.has(protocol.NO_OPENDIR_SUPPORT)
        if not negotiated.has(protocol.PASSTHROUGH):
            self.passthrough = False
        table: dict[int, Handler] = {
            protocol.LOOKUP: self.lookup,
            protocol.FORGET: self.forget,
            protocol.BATCH_FORGET: self.batch_forget,
            protocol.GETATTR: self.getattr,
            protocol.READLINK: self.readlink,
            protocol.STATFS: self.statfs,
            protocol.OPEN: self.open,
            protocol.READ: self.read,
            protocol.FLUSH: self.flush,
            protocol.RELEASE: self.release,
            protocol.OPENDIR: self.opendir,
            protocol.READDIR: self.readdir,
            protocol.READDIRPLUS: self.readdirplus,
            protocol.RELEASEDIR: self.releasedir,
            protocol.FSYNCDIR: self.nothing,
            protocol.ACCESS: self.nothing,
            protocol.GETXATTR: self.getxattr,
            protocol.LISTXATTR: self.listxattr,
            protocol.LSEEK: self.lseek,
            protocol.SETATTR: self.setattr,
            protocol.SYMLINK: self.symlink,
            protocol.MKNOD: self.mknod,
            protocol.MKDIR: self.mkdir,
            protocol.UNLINK: self.unlink,
            protocol.RMDIR: self.rmdir,
            protocol.RENAME: self.rename,
            protocol.RENAME2: self.rename,
            protocol.LINK: self.link,
            protocol.WRITE: self.write,
            protocol.FSYNC: self.fsync,
            protocol.SETXATTR: self.setxattr,
            protocol.REMOVEXATTR: self.removexattr,
            protocol.CREATE: self.create,
            protocol.TMPFILE: self.tmpfile,
            protocol.FALLOCATE: self.fallocate,
            protocol.COPY_FILE_RANGE: self.copy_file_range,
        }
        if self.writable:
            # Everything under the lock but what waits; those take it themselves.
            unlocked = {
                protocol.READ,
                protocol.WRITE,
                protocol.FSYNC,
                protocol.OPEN,
                protocol.CREATE,
                protocol.TMPFILE,
                protocol.SETATTR,
                protocol.FALLOCATE,
                protocol.COPY_FILE_RANGE,
            }
            for opcode, handler in list(table.items()):
                if opcode not in unlocked:
                    table[opcode] = self._locked(handler)
        return table

    def _locked(self, handler: Handler) -> Handler:
        lock = self.ops.lock

        def locked(req: Request) -> Reply:
            with lock:
                return handler(req)

        return locked

    # -- encoding ----------------------------------------------------------------------------

    @staticmethod
    def _attr_fields(a: Attr) -> tuple[int, ...]:
        """``fuse_attr``'s fields in its order (times split into seconds, nanoseconds)."""
        ino, mode, nlink, uid, gid, rdev, size, blocks, atime, mtime, ctime = a
        msec, mnsec = divmod(mtime, _NS)
        if msec < 0:
            msec &= _U64
        # Most inodes have one time for all three: split it once.
        asec, ansec = (msec, mnsec) if atime == mtime else _split(atime)
        csec, cnsec = (msec, mnsec) if ctime == mtime else _split(ctime)
        return (
            ino,
            size,
            blocks,
            asec,
            msec,
            csec,
            ansec,
            mnsec,
            cnsec,
            mode,
            nlink,
            uid,
            gid,
            _encode_dev(rdev) if rdev else 0,
            BLKSIZE,
            0,
        )

    def _entry(self, ino: int) -> bytes:
        valid, nsec = self._valid
        return protocol.ENTRY_OUT.pack(
            ino, 0, valid, valid, nsec, nsec, *self._attr_fields(self.ops.attr(ino))
        )

    def _attr_out(self, ino: int) -> bytes:
        valid, nsec = self._valid
        return protocol.ATTR_OUT.pack(valid, nsec, 0, *self._attr_fields(self.ops.attr(ino)))

    # -- looking up ---------------------------------------------------------------------------

    def lookup(self, req: Request) -> Reply:
        ino = self.ops.lookup(req.nodeid, req.names[0])
        return self._entry(ino) if ino else self._negative

    def forget(self, req: Request) -> Reply:
        if self.writable:
            self.ops.forget([(req.nodeid, req.args[0])])
        return None

    def batch_forget(self, req: Request) -> Reply:
        if self.writable:
            count = req.args[0]
            data = req.data
            size = protocol.FORGET_ONE.size
            count = min(count, len(data) // size)
            self.ops.forget([protocol.FORGET_ONE.unpack_from(data, i * size) for i in range(count)])
        return None

    def getattr(self, req: Request) -> Reply:
        return self._attr_out(req.nodeid)

    def readlink(self, req: Request) -> Reply:
        return self.ops.readlink(req.nodeid)

    def statfs(self, req: Request) -> Reply:
        s = self.ops.statfs()
        return protocol.STATFS_OUT.pack(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namemax, s.frsize, 0
        )

    def nothing(self, req: Request) -> Reply:
        return b""

    # -- directories -------------------------------------------------------------------------

    def opendir(self, req: Request) -> Reply:
        if not self.writable:
            if self._no_opendir:
                raise OSError(errno.ENOSYS, "no opendir")  # from now on the kernel never asks
            self.ops.alive(req.nodeid)
            return protocol.OPEN_OUT.pack(
                0, protocol.FOPEN_CACHE_DIR | protocol.FOPEN_KEEP_CACHE, 0
            )
        fh = self.ops.opendir(req.nodeid)
        # The kernel caches the listing; every change to it goes through the kernel,
        # which then drops what it cached.
        return protocol.OPEN_OUT.pack(fh, protocol.FOPEN_CACHE_DIR, 0)

    def releasedir(self, req: Request) -> Reply:
        if self.writable:
            self.ops.releasedir(req.args[0])
        return b""

    def _entries(self, req: Request) -> Iterator[tuple[int, bytes, int]]:
        fh, offset = req.args[0], req.args[1]
        if self.writable:
            return self.ops.readdir(fh, offset)
        return self.ops.listing(req.nodeid, offset)

    def readdir(self, req: Request) -> Reply:
        size = req.args[2]
        buf = bytearray(size)
        pos = 0
        mode = self.ops.t.mode
        for next_off, name, ino in self._entries(req):
            end = pos + protocol.dirent_size(name, False)
            if end > size:
                break
            protocol.pack_dirent(buf, pos, ino, next_off, (mode[ino] >> 12) & 0xF, name)
            pos = end
        return memoryview(buf)[:pos]

    def readdirplus(self, req: Request) -> Reply:
        size = req.args[2]
        buf = bytearray(size)
        pos = 0
        ops = self.ops
        entry_size = protocol.ENTRY_OUT.size
        valid, nsec = self._valid
        pack_entry = protocol.ENTRY_OUT.pack_into
        fields = self._attr_fields
        for next_off, name, ino in self._entries(req):
            end = pos + protocol.dirent_size(name, True)
            if end > size:
                break
            a = ops.attr(ino)
            kind = (a[1] >> 12) & 0xF
            if name == b"." or name == b"..":
                # The kernel links neither: no reference is taken.
                pack_entry(buf, pos, 0, 0, 0, 0, 0, 0, *fields(a))
            else:
                pack_entry(buf, pos, ino, 0, valid, valid, nsec, nsec, *fields(a))
                ops.referenced(ino)
            protocol.pack_dirent(buf, pos + entry_size, ino, next_off, kind, name)
            pos = end
        return memoryview(buf)[:pos]

    # -- file data ---------------------------------------------------------------------------

    def open(self, req: Request) -> Reply:
        ops = self.ops
        if not self.writable:
            if self._no_open:
                raise OSError(errno.ENOSYS, "no open")  # from now on the kernel never asks
            flags = req.args[0]
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise OSError(errno.EROFS, "read-only")
            ops.alive(req.nodeid)
            return protocol.OPEN_OUT.pack(0, protocol.FOPEN_KEEP_CACHE, 0)
        ino = req.nodeid
        flags = req.args[0]
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        truncating = bool(flags & os.O_TRUNC)
        with ops.lock:
            ops.alive(ino)
            copy = (truncating or (writing and self.passthrough)) and ops.needs_copy(ino)
        if copy:
            self._copy_up(ino, keep=0 if truncating else None)
        with ops.lock:
            fh = ops.open(ino, flags, Caller(req.uid, req.gid))
            open_flags, backing = self._io_mode(ino, fh, writing)
        return protocol.OPEN_OUT.pack(fh, open_flags, backing)

    def _io_mode(self, ino: int, fh: int, writing: bool) -> tuple[int, int]:
        """Passthrough or the page cache for a new open of ``ino`` (under the lock)."""
        ops = self.ops
        if self.passthrough and not self._cached_opens.get(ino):
            fd = ops.data_fd(ino)
            if fd is not None:
                backing = self._backing.get(ino)
                if backing is None:
                    assert self.session is not None
                    try:
                        backing = [device.backing_open(self.session.fd, fd), 0]
                    except OSError as exc:
                        log.warning(
                            "passthrough refused (%s): serving file data without it", exc.strerror
                        )
                        self.passthrough = False
                if backing is not None:
                    self._backing[ino] = backing
                    backing[1] += 1
                    self._fh_backing[fh] = ino
                    self.passthrough_opens += 1
                    if writing:
                        ops.written_outside(ino)
                    return protocol.FOPEN_PASSTHROUGH, backing[0]
        self._cached_opens[ino] = self._cached_opens.get(ino, 0) + 1
        self._fh_cached[fh] = ino
        lower = ops.t.layer[ino] != LAYER_UPPER
        return (protocol.FOPEN_KEEP_CACHE if lower else 0), 0

    def read(self, req: Request) -> Reply:
        _fh, offset, size = req.args[0], req.args[1], req.args[2]
        ops = self.ops
        if self.writable:
            with ops.lock:
                fd, pos, count, limit = ops.extent(req.nodeid, offset, size)
        else:
            fd, pos, count, limit = ops.extent(req.nodeid, offset, size)
        if not count:
            return b""
        got = 0
        view = self._buffer()[:count]
        if self._nowait:
            try:
                got = os.preadv(fd, [view], pos, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False
            if got == count:
                return view
        # Not all in the page cache: wait for the disk in the I/O pool, where an
        # INTERRUPT can leave it behind.
        assert self.session is not None
        rest = self.session.run_blocking(req, _read_ahead, fd, count - got, pos + got, limit)
        return [view[:got], rest] if got else rest

    def _buffer(self) -> memoryview:
        view: memoryview | None = getattr(self._local, "view", None)
        if view is None:
            assert self.negotiated is not None
            view = memoryview(bytearray(self.negotiated.max_write))
            self._local.view = view
        return view

    def flush(self, req: Request) -> Reply:
        # Nothing is buffered here: ENOSYS tells the kernel never to send FLUSH again,
        # which saves a round trip on every close().
        raise OSError(errno.ENOSYS, "no flush")

    def release(self, req: Request) -> Reply:
        if not self.writable:
            return b""
        fh = req.args[0]
        with self.ops.lock:
            self.ops.release(fh)
            ino = self._fh_cached.pop(fh, 0)
            if ino:
                left = self._cached_opens[ino] - 1
                if left:
                    self._cached_opens[ino] = left
                else:
                    del self._cached_opens[ino]
            ino = self._fh_backing.pop(fh, 0)
            if ino:
                backing = self._backing[ino]
                backing[1] -= 1
                if not backing[1]:
                    del self._backing[ino]
                    assert self.session is not None
                    try:
                        device.backing_close(self.session.fd, backing[0])
                    except OSError as exc:
                        log.warning("cannot close backing file %d: %s", backing[0], exc)
        return b""

    def write(self, req: Request) -> Reply:
        _fh, offset = req.args[0], req.args[1]
        ino = req.nodeid
        self._copy_up(ino)
        with self.ops.lock:
            written = self.ops.write(ino, offset, req.data)
        return protocol.WRITE_OUT.pack(written, 0)

    def fsync(self, req: Request) -> Reply:
        datasync = req.args[1] & protocol.FSYNC_FDATASYNC
        with self.ops.lock:
            fd = self.ops.data_fd(req.nodeid)
        if fd is not None:
            assert self.session is not None
            self.session.run_blocking(req, os.fdatasync if datasync else os.fsync, fd)
        return b""

    def lseek(self, req: Request) -> Reply:
        _fh, offset, whence = req.args[0], req.args[1], req.args[2]
        return protocol.LSEEK_OUT.pack(self.ops.lseek(req.nodeid, offset, whence))

    # -- changes ------------------------------------------------------------------------------

    def _copy_up(self, ino: int, keep: int | None = None) -> None:
        """Copy a lower file up (unless done) without holding the lock while bytes move."""
        ops = self.ops
        with ops.lock:
            if not ops.needs_copy(ino):
                return
        assert self.session is not None
        self.session.step_aside()  # copying (or waiting for a copy) may take a while
        while True:
            with ops.lock:
                if not ops.needs_copy(ino):
                    return
                running = self._copying.get(ino)
                if running is None:
                    plan = ops.plan_copy(ino, keep)
                    if plan is None:
                        return
                    done = self._copying[ino] = threading.Event()
                    break
            running.wait()
        try:
            Upper.run_copy(plan)
        except BaseException:
            with ops.lock:
                ops.abort_copy(plan)
                del self._copying[ino]
            done.set()
            raise
        with ops.lock:
            ops.finish_copy(plan)
            del self._copying[ino]
        done.set()

    def setattr(self, req: Request) -> Reply:
        (
            valid,
            _pad,
            _fh,
            size,
            _owner,
            atime,
            mtime,
            _ctime,
            atime_nsec,
            mtime_nsec,
            _cnsec,
            mode,
            _u4,
            uid,
            gid,
            _u5,
        ) = req.args
        ops = self.ops
        ino = req.nodeid
        new_size = size if valid & protocol.FATTR_SIZE else None
        if new_size is not None:
            with ops.lock:
                copy = ops.writable and ops.needs_copy(ino)
            if copy:
                self._copy_up(ino, keep=new_size)
        now = time.time_ns()
        mtime_ns: int | None = None
        if valid & protocol.FATTR_MTIME_NOW:
            mtime_ns = now
        elif valid & protocol.FATTR_MTIME:
            mtime_ns = _signed(mtime) * _NS + mtime_nsec
        atime_ns: int | None = None
        if valid & protocol.FATTR_ATIME_NOW:
            atime_ns = now
        elif valid & protocol.FATTR_ATIME:
            atime_ns = _signed(atime) * _NS + atime_nsec
        with ops.lock:
            if ops.writable:
                # Every request changes something: one that asks nothing is how a chown
                # to (-1, -1) reaches the server (the model moves ctime, drops setuid).
                ops.setattr(
                    ino,
                    Caller(req.uid, req.gid),
                    mode=mode if valid & protocol.FATTR_MODE else None,
                    uid=uid if valid & protocol.FATTR_UID else None,
                    gid=gid if valid & protocol.FATTR_GID else None,
                    size=new_size,
                    atime_ns=atime_ns,
                    mtime_ns=mtime_ns,
                )
            elif valid & ~(protocol.FATTR_FH | protocol.FATTR_LOCKOWNER):
                raise OSError(errno.EROFS, "read-only")
            return self._attr_out(ino)

    def mknod(self, req: Request) -> Reply:
        mode, rdev, umask, _pad = req.args
        return self._entry(
            self.ops.make(
                req.nodeid,
                req.names[0],
                mode,
                Caller(req.uid, req.gid, umask),
                rdev=_decode_dev(rdev),
            )
        )

    def mkdir(self, req: Request) -> Reply:
        mode, umask = req.args
        return self._entry(
            self.ops.make(
                req.nodeid,
                req.names[0],
                stat.S_IFDIR | (mode & 0o7777),
                Caller(req.uid, req.gid, umask),
            )
        )

    def symlink(self, req: Request) -> Reply:
        name, target = req.names
        return self._entry(
            self.ops.make(
                req.nodeid, name, stat.S_IFLNK | 0o777, Caller(req.uid, req.gid), target=target
            )
        )

    def link(self, req: Request) -> Reply:
        (old,) = req.args
        self.ops.link(old, req.nodeid, req.names[0])
        return self._entry(old)

    def unlink(self, req: Request) -> Reply:
        self.ops.unlink(req.nodeid, req.names[0])
        return b""

    def rmdir(self, req: Request) -> Reply:
        self.ops.rmdir(req.nodeid, req.names[0])
        return b""

    def rename(self, req: Request) -> Reply:
        new_parent = req.args[0]
        flags = req.args[1] if req.opcode == protocol.RENAME2 else 0
        old, new = req.names
        self.ops.rename(req.nodeid, old, new_parent, new, flags)
        return b""

    def create(self, req: Request) -> Reply:
        flags, mode, umask, _open_flags = req.args
        ops = self.ops
        with ops.lock:
            fh, ino = ops.create(
                req.nodeid, req.names[0], mode, flags, Caller(req.uid, req.gid, umask)
            )
            open_flags, backing = self._io_mode(ino, fh, True)
            return [self._entry(ino), protocol.OPEN_OUT.pack(fh, open_flags, backing)]

    def tmpfile(self, req: Request) -> Reply:
        flags, mode, umask, _open_flags = req.args
        ops = self.ops
        with ops.lock:
            fh, ino = ops.tmpfile(req.nodeid, mode, flags, Caller(req.uid, req.gid, umask))
            open_flags, backing = self._io_mode(ino, fh, True)
            return [self._entry(ino), protocol.OPEN_OUT.pack(fh, open_flags, backing)]

    def fallocate(self, req: Request) -> Reply:
        _fh, offset, length, mode, _pad = req.args
        self._copy_up(req.nodeid)
        with self.ops.lock:
            self.ops.fallocate(req.nodeid, mode, offset, length)
        return b""

    def copy_file_range(self, req: Request) -> Reply:
        _fh_in, off_in, ino_out, _fh_out, off_out, length, _flags = req.args
        self._copy_up(ino_out)
        with self.ops.lock:
            copied = self.ops.copy_range(req.nodeid, off_in, ino_out, off_out, length)
        return protocol.WRITE_OUT.pack(copied, 0)

    # -- extended attributes ------------------------------------------------------------------

    @staticmethod
    def _sized(value: bytes, size: int) -> Reply:
        if size == 0:
            return protocol.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def getxattr(self, req: Request) -> Reply:
        return self._sized(self.ops.getxattr(req.nodeid, req.names[0]), req.args[0])

    def listxattr(self, req: Request) -> Reply:
        names = self.ops.listxattr(req.nodeid, Caller(req.uid, req.gid))
        return self._sized(b"".join(name + b"\0" for name in names), req.args[0])

    def setxattr(self, req: Request) -> Reply:
        size, flags = req.args[0], req.args[1]
        value = bytes(req.data[:size])
        self.ops.setxattr(req.nodeid, req.names[0], value, flags)
        return b""

    def removexattr(self, req: Request) -> Reply:
        self.ops.removexattr(req.nodeid, req.names[0])
        return b""


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _encode_dev(rdev: int) -> int:
    """The kernel's new_encode_dev: what fuse_attr.rdev holds (32 bits)."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _decode_dev(value: int) -> int:
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _fs_magic(path: str) -> int:
    import ctypes

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = _Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as handle:
            return handle.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def describe(negotiated: Negotiated | None, dispatcher: NativeDispatcher) -> dict[str, Any]:
    """What the engine negotiated, for ``user.layerfs.info``."""
    if negotiated is None:
        return {}
    return {
        "protocol": f"{negotiated.major}.{negotiated.minor}",
        "kernel_protocol": f"{negotiated.major}.{negotiated.kernel_minor}",
        "flags": protocol.flag_names(negotiated.flags),
        "max_write": negotiated.max_write,
        "max_readahead": negotiated.max_readahead,
        "passthrough": dispatcher.passthrough,
    }
