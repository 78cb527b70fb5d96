"""The writable layer of a mount: copy-up, changes, their saved state and the commit tar.

A writable mount changes its merged tree in place (``inodes.py``). What it
must remember is how the tree now differs from the lower layers it was built
from, and that is computed, not logged: an inode numbered below
:attr:`Upper.n_lower` *is* the lower file of that number until
:meth:`Upper.meta_changing` marks it changed, and every lower directory's
name map is copied before its first change. Walking the tree against those
copies yields the changes as layer rows: new and changed entries (data from
an upper data file or still from a lower tar), ``.wh.NAME`` whiteouts for
names that went, and ``.wh..wh..opq`` for a directory that replaced a lower
one. Those rows are

- the saved state (``upper/<name>/state``, msgpack): a later mount with the
  same upper lays them on the lower layers like one more layer;
- the commit: ``commit.write_layer_tar`` turns them into a layer tar.

On disk an upper is ``upper/<name>/``: ``state``, ``lock`` (held by the mount
using it), and ``data/<n>``: the contents of files written through the
mount. Ownership, modes, devices and xattrs are metadata in ``state``, so a
mount run by a normal user can present root-owned files and device nodes.
File data is copied up with ``copy_file_range`` on the first write; chmod,
chown, utimens and setxattr of a lower file change metadata only.

Errors are ``OSError`` with the errno a file system would return; the FUSE
layer passes them on.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from layerfs.errors import MountError, MountpointBusyError
from layerfs.fs import datafile
from layerfs.fs.datafile import CopyPlan
from layerfs.fs.inodes import LAYER_UPPER, InodeTable
from layerfs.fs.posix import (
    PosixRules,
)
from layerfs.fs.union import MergedTree
from layerfs.store import codec
from layerfs.store.files import FileLock, atomic_write
from layerfs.store.rows import SOURCE, Row, new_row
from layerfs.store.tarindex import REG

log = logging.getLogger(__name__)

STATE_VERSION = 1

_error = datafile.error


class Upper(PosixRules):
    """The writable layer over a merged tree: every change goes through here."""

    def __init__(
        self,
        tree: MergedTree,
        directory: Path,
        *,
        image_id: str,
        diff_ids: Sequence[str],
        tars: Sequence[int],
        init: bool,
        tmp_root: Path,
    ) -> None:
        self.tree = tree
        self.table: InodeTable = tree.table
        self.directory = directory
        self.data_dir = directory / "data"
        self.image_id = image_id
        self.diff_ids = list(diff_ids)
        self.tars = tars
        self.init = init
        self.tmp_root = tmp_root
        self.n_lower = self.table.next_ino
        self.orig_children: dict[int, dict[bytes, int]] = {}
        self.changed: set[int] = set()
        self.next_data = 0
        self.dirty = False
        self.generation = 0  # bumped by every change; a save records the one it saw
        self._fds: dict[int, int] = {}
        self.linkable: set[int] = set()
        self._lock = FileLock(directory / "lock") if directory else None

    # -- opening and saving ---------------------------------------------------------

    @classmethod
    def open(
        cls,
        tree: MergedTree,
        directory: Path,
        *,
        image_id: str,
        diff_ids: Sequence[str],
        tars: Sequence[int],
        init: bool,
        tmp_root: Path,
    ) -> Upper:
        """Take the upper at ``directory`` (made if new) and lay its saved state on ``tree``."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / "data").mkdir(exist_ok=True, mode=0o700)
        upper = cls(
            tree,
            directory,
            image_id=image_id,
            diff_ids=diff_ids,
            tars=tars,
            init=init,
            tmp_root=tmp_root,
        )
        assert upper._lock is not None
        if not upper._lock.acquire(exclusive=True, blocking=False):
            raise MountpointBusyError(
                f"the upper directory {directory.name!r} is in use by another mount"
            )
        try:
            upper._load()
        except BaseException:
            upper._lock.release()
            raise
        upper.table.watch = upper
        return upper

    def _load(self) -> None:
        state_path = self.directory / "state"
        try:
            data = state_path.read_bytes()
        except FileNotFoundError:
            self._collect_garbage()
            return
        doc = codec.unpack(data, what=f"upper state {state_path}")
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise MountError(f"upper {self.directory.name!r}: unknown state format")
        if doc.get("image") != self.image_id:
            raise MountError(
                f"upper {self.directory.name!r} belongs to image {str(doc.get('image'))[:12]}, "
                f"not {self.image_id[:12]}; use another --upper name"
            )
        if bool(doc.get("init")) != self.init:
            made = "with" if doc.get("init") else "without"
            raise MountError(
                f"upper {self.directory.name!r} was made {made} the init layer; "
                f"mount it {made} the init layer too (--no-init)"
            )
        layer_of = {d: i for i, d in reversed(list(enumerate(self.diff_ids)))}
        rows = []
        for row in doc["rows"]:
            source = row[SOURCE]
            if source is None:
                row[SOURCE] = LAYER_UPPER
            elif source in layer_of:
                row[SOURCE] = layer_of[source]
            else:
                raise MountError(
                    f"upper {self.directory.name!r} refers to layer {source}, "
                    "which is not in the image"
                )
            rows.append(row)
        self.table.watch = self  # the saved changes are changes of this mount too
        self.tree.apply_rows(LAYER_UPPER, rows)
        self.table.watch = None
        self.next_data = int(doc.get("next_data", 0))
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Remove data files no inode refers to (left by a crash or a deleted file)."""
        t = self.table
        used = {
            t.offset[i]
            for i in range(1, t.next_ino)
            if t.mode[i] and t.layer[i] == LAYER_UPPER and stat.S_ISREG(t.mode[i])
        }
        for entry in os.scandir(self.data_dir):
            if entry.name.isdigit():
                number = int(entry.name)
                self.next_data = max(self.next_data, number + 1)
                if number not in used:
                    os.unlink(entry.path)

    def save(self) -> Path:
        """Write the changes as the upper's state (atomically); returns its path."""
        generation = self.generation
        doc = {
            "version": STATE_VERSION,
            "image": self.image_id,
            "init": self.init,
            "diff_ids": self.diff_ids,
            "next_data": self.next_data,
            "rows": self.rows(),
        }
        path = self.directory / "state"
        atomic_write(path, codec.pack(doc), self.tmp_root)
        if generation == self.generation:
            self.dirty = False
        return path

    def close(self) -> None:
        try:
            if self.dirty or not (self.directory / "state").exists():
                self.save()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self.table.watch = None
            if self._lock is not None:
                self._lock.release()

    # -- change tracking (the table calls these before it changes anything) ---------------

    def dir_changing(self, ino: int) -> None:
        if ino < self.n_lower and ino not in self.orig_children:
            self.orig_children[ino] = dict(self.table.children[ino])
        self._touch()

    def meta_changing(self, ino: int) -> None:
        self.changed.add(ino)
        self._touch()

    def _touch(self) -> None:
        self.dirty = True
        self.generation += 1

    # -- data --------------------------------------------------------------------------

    def data_path(self, number: int) -> Path:
        return self.data_dir / str(number)

    def _new_data_file(self) -> tuple[int, int]:
        number = self.next_data
        self.next_data += 1
        fd = os.open(
            self.data_path(number), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        return number, fd

    def _data_file_taken(self, ino: int, fd: int) -> None:
        self._fds[ino] = fd

    def fd(self, ino: int) -> int:
        """A read-write descriptor of an upper file's data (opened once, kept while in use)."""
        fd = self._fds.get(ino)
        if fd is None:
            fd = os.open(self.data_path(self.table.offset[ino]), os.O_RDWR | os.O_CLOEXEC)
            self._fds[ino] = fd
        return fd

    def close_fd(self, ino: int) -> None:
        fd = self._fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def needs_copy(self, ino: int) -> bool:
        """True for a regular file whose data is still in a lower layer."""
        t = self.table
        return t.layer[ino] != LAYER_UPPER and stat.S_ISREG(t.mode[ino])

    def plan_copy(self, ino: int, keep: int | None = None) -> CopyPlan | None:
        """Reserve an upper data file for a lower file (None if it already has one).

        :meth:`run_copy` moves the bytes and may run in a worker thread;
        :meth:`finish_copy` or :meth:`abort_copy` then runs on the owner's thread.
        """
        t = self.table
        if t.layer[ino] == LAYER_UPPER:
            return None
        if not stat.S_ISREG(t.mode[ino]):
            raise _error(errno.EINVAL, "only regular files have data")
        number = self.next_data
        self.next_data += 1
        fd = os.open(
            self.data_path(number), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        size = t.size[ino]
        layer = t.layer[ino]
        count = (size if keep is None else min(keep, size)) if layer >= 0 else 0
        return CopyPlan(ino, number, fd, self.tars[layer] if count else -1, t.offset[ino], count)

    @staticmethod
    def run_copy(plan: CopyPlan) -> None:
        if plan.count:
            datafile.copy_range(plan.src, plan.src_offset, plan.fd, plan.count)

    def finish_copy(self, plan: CopyPlan) -> int:
        self.table.set_attrs(plan.ino, layer=LAYER_UPPER, offset=plan.number)
        old = self._fds.pop(plan.ino, None)
        if old is not None:
            os.close(old)
        self._fds[plan.ino] = plan.fd
        return plan.fd

    def abort_copy(self, plan: CopyPlan) -> None:
        os.close(plan.fd)
        try:
            os.unlink(self.data_path(plan.number))
        except FileNotFoundError:
            pass

    def copy_up(self, ino: int, keep: int | None = None) -> int:
        """Give a file an upper data file holding its first ``keep`` bytes (all by default).

        Data moves with ``copy_file_range`` from the layer tar. Returns the descriptor.
        """
        plan = self.plan_copy(ino, keep)
        if plan is None:
            return self.fd(ino)
        try:
            self.run_copy(plan)
        except BaseException:
            self.abort_copy(plan)
            raise
        return self.finish_copy(plan)

    def release_data(self, ino: int) -> None:
        """An inode is gone for good: close and delete its data file."""
        t = self.table
        self.close_fd(ino)
        self.linkable.discard(ino)
        if t.layer[ino] == LAYER_UPPER and stat.S_ISREG(t.mode[ino]):
            try:
                os.unlink(self.data_path(t.offset[ino]))
            except FileNotFoundError:
                pass

    def write(
        self, ino: int, offset: int, data: bytes | memoryview, *, kill_privs: bool = False
    ) -> int:
        """Write ``data`` at ``offset``; mtime and ctime move, atime stays.

        The kernel has already put an ``O_APPEND`` descriptor's writes at the end of
        the file. ``kill_privs``: the writer may not keep setuid/setgid bits (an
        engine that learns so from the request says it here; pyfuse3's kernel asks
        with an empty setattr instead, see :meth:`setattr`). Writing nothing
        changes nothing.
        """
        if not data:
            return 0
        fd = self.copy_up(ino)
        written = os.pwrite(fd, data, offset)
        t = self.table
        t.set_attrs(ino, size=max(offset + written, t.size[ino]), mtime_ns=time.time_ns())
        if kill_privs:
            self._drop_privs(ino, t.mtime[ino])
        return written

    def truncate(self, ino: int, size: int, now: int = 0) -> None:
        """Cut or extend a regular file to ``size`` (a lower one is copied up to that size).

        mtime and ctime move even when the size stays, as on ext4.
        """
        t = self.table
        self._check_regular(ino)
        if size < 0:
            raise _error(errno.EINVAL)
        fd = self.copy_up(ino, keep=size)
        os.ftruncate(fd, size)
        t.set_attrs(ino, size=size, mtime_ns=now or time.time_ns())

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with any mode the store's file system offers for the data file.

        The size afterwards is the data file's; mtime and ctime move when it
        succeeds (ext4 moves them even for some refused ranges).
        """
        t = self.table
        self._check_regular(ino)
        fd = self.copy_up(ino)
        datafile.fallocate(fd, mode, offset, length)
        t.set_attrs(ino, size=os.fstat(fd).st_size, mtime_ns=time.time_ns())

    def seek(self, ino: int, offset: int, whence: int) -> int:
        """lseek's ``SEEK_DATA`` and ``SEEK_HOLE``: holes exist only in upper data files."""
        t = self.table
        self._check_regular(ino)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _error(errno.EINVAL)
        if t.layer[ino] == LAYER_UPPER:
            return datafile.seek(self.fd(ino), offset, whence)
        return datafile.seek_contiguous(t.size[ino], offset, whence)

    def _check_regular(self, ino: int) -> None:
        t = self.table
        if not t.alive(ino):
            raise _error(errno.ENOENT)
        if t.is_dir(ino):
            raise _error(errno.EISDIR)
        if not stat.S_ISREG(t.mode[ino]):
            raise _error(errno.EINVAL)

    # -- the changes as rows ------------------------------------------------------------------

    def rows(self) -> list[Row]:
        """The changes against the lower layers, parents before children."""
        from layerfs.fs.changes import changed_rows

        return changed_rows(self)

    def row(self, path: bytes, ino: int) -> Row:
        t = self.table
        kind = t.kind(ino)
        layer = t.layer[ino]
        source = None
        if kind == REG and layer >= 0:
            source = self.diff_ids[layer]
        rdev = t.rdev.get(ino, 0)
        return new_row(
            path,
            kind,
            mode=t.mode[ino] & 0o7777,
            uid=t.uid[ino],
            gid=t.gid[ino],
            size=t.size[ino] if kind == REG else 0,
            mtime_ns=t.mtime[ino],
            offset=t.offset[ino] if kind == REG else 0,
            linkname=t.targets.get(ino, b""),
            devmajor=os.major(rdev),
            devminor=os.minor(rdev),
            xattrs=t.xattrs.get(ino),
            source=source,
        )
