"""What a mount does for each kernel request, whatever engine carries it.

Both engines (the native one in ``native/`` and pyfuse3 in ``pyfuse3_engine.py``)
translate requests into calls of :class:`Operations` and its results back;
nothing here knows either of them. This module owns what sits between the
kernel and the merged tree:

- inode lifetime: the kernel's lookup counts and open handles of a writable
  mount, so that an unlinked file lives on while it is used;
- attributes as one plain tuple (:data:`Attr`) each engine encodes its way;
- handle tables (open files, directory snapshots);
- where file data is (a layer tar at an offset, or an upper data file), while
  the engine does the reading its own way;
- :func:`errno_of`, the one place an exception becomes an errno (a bug becomes
  EIO and a traceback in the log).

Semantics live in the model: names and attributes in the inode table
(``inodes.py``, built by ``union.py``), every change in the writable layer
(``upper.py``, its POSIX rules in ``posix.py``). A change names its
:class:`~layerfs.fs.posix.Caller` (uid, gid, umask), which the engine reads from
the request. Methods raise ``OSError`` with the errno a file system would
return. None of them blocks for long except the copy-up they may start
(:meth:`Operations.plan_copy` lets an engine run a big one elsewhere).

A writable mount served by several threads calls everything while holding
:attr:`Operations.lock`; a read-only mount changes nothing and needs no lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from layerfs.errors import LayerfsError
from layerfs.fs import datafile
from layerfs.fs.datafile import CopyPlan
from layerfs.fs.inodes import LAYER_UPPER, NAME_MAX, ROOT, InodeTable
from layerfs.fs.posix import Caller, get_xattr, listed_xattrs
from layerfs.fs.union import MergedTree
from layerfs.fs.upper import Upper

log = logging.getLogger(__name__)

FOREVER = 24 * 3600.0 * 365
"""Entry and attribute timeout for a tree only this mount changes."""
BLKSIZE = 65536
CONTROL_PREFIX = b"user.layerfs."
_LISTINGS_KEPT = 8

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
        errno.ENXIO,
        errno.EINTR,
        errno.ENAMETOOLONG,
        errno.EOPNOTSUPP,
        errno.ERANGE,
        errno.ELOOP,
        errno.E2BIG,
    }
)

Control = Callable[[bytes], bytes]
"""Answers ``getxattr(mountpoint, "user.layerfs.<what>")``, the control channel."""


Attr = tuple[int, int, int, int, int, int, int, int, int, int, int]
"""An inode's attributes as the kernel wants them, in this order: ino, mode, nlink, uid,
gid, rdev, size, blocks (512 bytes), atime, mtime, ctime (nanoseconds). A plain tuple:
the kernel asks for one on almost every request, and a NamedTuple costs several times
as much to make."""


class Statfs(NamedTuple):
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


def oserror(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


def errno_of(exc: BaseException, what: str, *args: object) -> int:
    """The errno to answer for an exception raised while handling ``what``; logged once.

    An ``OSError`` is its errno (quiet ones at debug level), a ``LayerfsError``
    EIO with its message, anything else a bug: EIO and the traceback.
    """
    if isinstance(exc, OSError) and exc.errno:
        code = exc.errno
        if code in _QUIET_ERRNOS:
            log.debug("%s%r: %s", what, args, exc)
        else:
            log.warning("%s%r: %s", what, args, exc)
        return code
    if isinstance(exc, LayerfsError):
        log.error("%s%r: %s", what, args, exc)
        return errno.EIO
    log.error("internal error in %s%r", what, args, exc_info=exc)
    return errno.EIO


class Operations:
    """The requests of one mount, engine-independent: ``upper`` is None when read-only."""

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
        self.tree = tree
        self.t: InodeTable = tree.table
        self.tars = list(tars)
        self.upper = upper
        self.control = control
        self.timeout = timeout
        self.data_size = data_size  # what statfs reports as used for a read-only mount
        self.lock = threading.RLock()
        self._next_fh = 1
        self._files: dict[int, int] = {}  # fh -> inode
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}  # fh -> names at opendir
        self._listings: dict[int, list[tuple[bytes, int]]] = {}  # see listing()
        self._open: dict[int, int] = {}  # inode -> open handles (writable mounts)
        self._lookups: dict[int, int] = {}  # inode -> kernel references (writable mounts)
        # Upper files the kernel writes itself (passthrough): inode -> the data file's
        # mtime when its size and mtime were last taken over into the table.
        self._written_outside: dict[int, int] = {}

    @property
    def writable(self) -> bool:
        return self.upper is not None

    # -- attributes and lifetime ------------------------------------------------------------

    def attr(self, ino: int) -> Attr:
        t = self.t
        if not t.alive(ino):
            raise oserror(errno.ENOENT)
        if ino in self._written_outside:
            self._take_over_data_changes(ino)
        size = t.size[ino]
        mtime = t.mtime[ino]
        return (
            ino,
            t.mode[ino],
            t.nlink[ino],
            t.uid[ino],
            t.gid[ino],
            t.rdev.get(ino, 0),
            size,
            (size + 511) >> 9,
            t.atime.get(ino, mtime),
            mtime,
            t.ctime.get(ino, mtime),
        )

    def alive(self, ino: int) -> None:
        if not self.t.alive(ino):
            raise oserror(errno.ENOENT)

    def _writable(self) -> Upper:
        if self.upper is None:
            raise oserror(errno.EROFS)
        return self.upper

    def referenced(self, ino: int) -> None:
        """The kernel took one more reference to ``ino`` (a lookup, a readdirplus entry)."""
        if self.upper is not None:
            self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        if self.upper is None:
            return
        for ino, count in items:
            left = self._lookups.get(ino, 0) - count
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                self._maybe_free(ino)

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
        self._written_outside.pop(ino, None)
        self.upper.release_data(ino)
        t.drop(ino)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- looking up ---------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int:
        """The inode of ``name`` in ``parent`` (referenced), or 0 when there is none."""
        ino = self.t.lookup(parent, name)
        if ino:
            self.referenced(ino)
        return ino

    def readlink(self, ino: int) -> bytes:
        target = self.t.targets.get(ino)
        if target is None:
            raise oserror(errno.EINVAL if self.t.alive(ino) else errno.ENOENT)
        return target

    def statfs(self) -> Statfs:
        if self.upper is not None:
            vfs = os.statvfs(self.upper.directory)
            ffree = max(vfs.f_ffree, 1 << 20)
            return Statfs(
                vfs.f_bsize,
                vfs.f_frsize,
                vfs.f_blocks,
                vfs.f_bfree,
                vfs.f_bavail,
                len(self.t) + ffree,
                ffree,
                NAME_MAX,
            )
        return Statfs(4096, 4096, (self.data_size + 4095) // 4096, 0, 0, len(self.t), 0, NAME_MAX)

    # -- directories --------------------------------------------------------------------------

    def _names(self, ino: int) -> dict[bytes, int]:
        names = self.t.children.get(ino)
        if names is None:
            raise oserror(errno.ENOTDIR if self.t.alive(ino) else errno.ENOENT)
        return names

    def opendir(self, ino: int) -> int:
        names = self._names(ino)
        fh = self._new_fh()
        # A snapshot: offsets stay valid whatever changes while it is read.
        self._dirs[fh] = [(b".", ino), (b"..", self.t.parent[ino]), *names.items()]
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[int, bytes, int]]:
        """(offset of the next entry, name, inode) from ``start`` of an opened directory."""
        entries = self._dirs.get(fh)
        if entries is None:
            raise oserror(errno.EBADF)
        mode = self.t.mode
        for index in range(start, len(entries)):
            name, ino = entries[index]
            if mode[ino]:  # else removed since opendir
                yield index + 1, name, ino

    def listing(self, ino: int, start: int) -> Iterator[tuple[int, bytes, int]]:
        """The same without a handle, for a tree that never changes (a read-only mount).

        A listing read in several requests is indexed once (the few most recent stay),
        so that each request starts where the last one ended without walking to it.
        """
        names = self._names(ino)
        if start == 0:
            yield 1, b".", ino
        if start <= 1:
            yield 2, b"..", self.t.parent[ino]
        if start <= 2:
            index = 2
            for name, child in names.items():
                index += 1
                yield index, name, child
            return
        entries = self._listings.get(ino)
        if entries is None:
            entries = self._listings[ino] = list(names.items())
            while len(self._listings) > _LISTINGS_KEPT:
                self._listings.pop(next(iter(self._listings)), None)
        for index in range(start - 2, len(entries)):
            name, child = entries[index]
            yield index + 3, name, child

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- file data ----------------------------------------------------------------------------

    def open(self, ino: int, flags: int, caller: Caller) -> int:
        """A handle for ``ino``; what opening does to the inode (``O_TRUNC``...) is the
        model's (a lower file truncated on open is copied up with nothing to copy)."""
        self.alive(ino)
        if self.upper is None:
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                raise oserror(errno.EROFS)
        else:
            with self._data_changing(ino):
                self.upper.open_file(ino, flags, caller)
        return self._handle(ino)

    def _handle(self, ino: int) -> int:
        fh = self._new_fh()
        self._files[fh] = ino
        if self.upper is not None:
            self._open[ino] = self._open.get(ino, 0) + 1
        return fh

    def inode_of(self, fh: int) -> int:
        ino = self._files.get(fh)
        if ino is None:
            raise oserror(errno.EBADF)
        return ino

    def extent(self, ino: int, offset: int, size: int) -> tuple[int, int, int, int]:
        """Where ``size`` bytes at ``offset`` of a file are: (descriptor, position, count,
        position where the file's data ends). count is 0 at or past the end."""
        t = self.t
        end = t.size[ino]
        if offset >= end or not stat.S_ISREG(t.mode[ino]):
            return -1, 0, 0, 0
        layer = t.layer[ino]
        if layer >= 0:
            base = t.offset[ino]
            return self.tars[layer], base + offset, min(size, end - offset), base + end
        if layer == LAYER_UPPER and self.upper is not None:
            return self.upper.fd(ino), offset, min(size, end - offset), end
        return -1, 0, 0, 0  # the init layer's placeholders hold no data

    def release(self, fh: int) -> int:
        """Close a handle; returns its inode (0 if unknown)."""
        ino = self._files.pop(fh, 0)
        if self.upper is not None and ino:
            left = self._open.get(ino, 0) - 1
            if left > 0:
                self._open[ino] = left
            else:
                self._open.pop(ino, None)
                if ino in self._written_outside:
                    self._take_over_data_changes(ino)
                    del self._written_outside[ino]
                self.upper.close_fd(ino)
                self._maybe_free(ino)
        return ino

    def needs_copy(self, ino: int) -> bool:
        """True if changing the data of ``ino`` first needs a copy-up."""
        return (
            self.upper is not None and stat.S_ISREG(self.t.mode[ino]) and self.upper.needs_copy(ino)
        )

    def plan_copy(self, ino: int, keep: int | None = None) -> CopyPlan | None:
        """Start a copy-up: run ``Upper.run_copy(plan)`` anywhere, then :meth:`finish_copy`
        (or :meth:`abort_copy`) here. None when there is nothing to copy."""
        return self._writable().plan_copy(ino, keep)

    def finish_copy(self, plan: CopyPlan) -> None:
        self._writable().finish_copy(plan)

    def abort_copy(self, plan: CopyPlan) -> None:
        self._writable().abort_copy(plan)

    def write(
        self, ino: int, offset: int, data: bytes | memoryview, *, kill_privs: bool = False
    ) -> int:
        upper = self._writable()
        return upper.write(ino, offset, data, kill_privs=kill_privs)  # copies up, if need be

    def data_fd(self, ino: int) -> int | None:
        """The upper data file of ``ino`` (to fsync, or to let the kernel use), if it has one."""
        if (
            self.upper is None
            or self.t.layer[ino] != LAYER_UPPER
            or not stat.S_ISREG(self.t.mode[ino])
        ):
            return None
        return self.upper.fd(ino)

    def written_outside(self, ino: int) -> None:
        """The kernel writes ``ino``'s data file itself from now on (passthrough): its size
        and mtime are read back from the file (:meth:`take_over_data_changes`)."""
        if ino not in self._written_outside:
            fd = self.data_fd(ino)
            if fd is not None:
                self._written_outside[ino] = os.fstat(fd).st_mtime_ns

    def take_over_data_changes(self) -> None:
        """Bring the sizes and mtimes of files written by the kernel into the table."""
        for ino in list(self._written_outside):
            self._take_over_data_changes(ino)

    def _take_over_data_changes(self, ino: int) -> None:
        upper = self.upper
        if upper is None or not self.t.alive(ino):
            return
        st = os.fstat(upper.fd(ino))
        t = self.t
        if st.st_mtime_ns != self._written_outside[ino] or st.st_size != t.size[ino]:
            self._written_outside[ino] = st.st_mtime_ns
            t.set_attrs(ino, size=st.st_size, mtime_ns=st.st_mtime_ns)

    @contextlib.contextmanager
    def _data_changing(self, ino: int) -> Iterator[None]:
        """Around a change of a file's data by the server: what the kernel wrote to it
        first comes into the table, and only what it writes later counts after."""
        if ino in self._written_outside:
            self._take_over_data_changes(ino)
        yield
        self._data_seen(ino)

    def _data_seen(self, ino: int) -> None:
        """The table now says what the data file says: only later writes count."""
        fd = self.data_fd(ino)
        if fd is not None and ino in self._written_outside:
            self._written_outside[ino] = os.fstat(fd).st_mtime_ns

    # -- changes ------------------------------------------------------------------------------

    def setattr(
        self,
        ino: int,
        caller: Caller,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """Change what is given (the caller resolves "now" for times)."""
        self.alive(ino)
        upper = self._writable()
        with self._data_changing(ino):
            upper.setattr(
                ino,
                caller,
                mode=mode,
                uid=uid,
                gid=gid,
                size=size,
                atime_ns=atime_ns,
                mtime_ns=mtime_ns,
            )
        if size is not None and not self._open.get(ino):
            upper.close_fd(ino)

    def make(
        self,
        parent: int,
        name: bytes,
        mode: int,
        caller: Caller,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> int:
        """A new directory, node, symlink or (closed) file; ``mode`` has the type bits."""
        upper = self._writable()
        ino = upper.make_node(parent, name, mode, caller, rdev=rdev, target=target)
        if stat.S_ISREG(mode):
            upper.close_fd(ino)  # reopened by open()
        self.referenced(ino)
        return ino

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, int]:
        """``open(O_CREAT)`` of a name: (handle, inode), the file new or (without
        ``O_EXCL``) the one that is there."""
        upper = self._writable()
        ino = upper.create_file(parent, name, mode, flags, caller)
        self.referenced(ino)
        return self._handle(ino), ino

    def tmpfile(self, parent: int, mode: int, flags: int, caller: Caller) -> tuple[int, int]:
        """``open(dir, O_TMPFILE)``: (handle, inode) of a new file with no name."""
        ino = self._writable().make_unnamed(parent, mode, flags, caller)
        self.referenced(ino)
        return self._handle(ino), ino

    def link(self, ino: int, parent: int, name: bytes) -> None:
        self._writable().link(ino, parent, name)
        self.referenced(ino)

    def unlink(self, parent: int, name: bytes) -> None:
        self._maybe_free(self._writable().unlink(parent, name))

    def rmdir(self, parent: int, name: bytes) -> None:
        self._maybe_free(self._writable().rmdir(parent, name))

    def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        replaced = self._writable().rename(parent, name, new_parent, new_name, flags)
        if replaced:
            self._maybe_free(replaced)

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        upper = self._writable()
        with self._data_changing(ino):
            upper.fallocate(ino, mode, offset, length)

    def lseek(self, ino: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE: an upper file asks its data file; a lower one is data."""
        if self.upper is not None:
            return self.upper.seek(ino, offset, whence)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise oserror(errno.EINVAL)
        return datafile.seek_contiguous(self.t.size[ino], offset, whence)

    def copy_range(
        self, ino_in: int, offset_in: int, ino_out: int, offset_out: int, length: int
    ) -> int:
        """copy_file_range between two files of the mount: data moves in the kernel."""
        upper = self._writable()
        if not stat.S_ISREG(self.t.mode[ino_out]) or not stat.S_ISREG(self.t.mode[ino_in]):
            raise oserror(errno.EINVAL)
        with self._data_changing(ino_out):
            dst = upper.copy_up(ino_out)
            src, pos, count, _ = self.extent(ino_in, offset_in, length)
            if not count:
                return 0
            copied = os.copy_file_range(src, dst, count, pos, offset_out)
            t = self.t
            t.set_attrs(
                ino_out, size=max(t.size[ino_out], offset_out + copied), mtime_ns=time.time_ns()
            )
        return copied

    # -- extended attributes ------------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT and name.startswith(CONTROL_PREFIX) and self.control is not None:
            return self.control(name[len(CONTROL_PREFIX) :])
        return get_xattr(self.t, ino, name.decode("utf-8", "surrogateescape"))

    def listxattr(self, ino: int, caller: Caller) -> list[bytes]:
        self.alive(ino)
        return [k.encode("utf-8", "surrogateescape") for k in listed_xattrs(self.t, ino, caller)]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self.alive(ino)
        if name.startswith(CONTROL_PREFIX):
            raise oserror(errno.EPERM)
        self._writable().set_xattr(ino, name.decode("utf-8", "surrogateescape"), value, flags)

    def removexattr(self, ino: int, name: bytes) -> None:
        self.alive(ino)
        self._writable().remove_xattr(ino, name.decode("utf-8", "surrogateescape"))
