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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfs.errors import MountError, MountpointBusyError
from layerfs.fs import whiteout
from layerfs.fs.inodes import LAYER_UPPER, InodeTable
from layerfs.fs.union import MergedTree
from layerfs.store import codec
from layerfs.store.files import FileLock, atomic_write
from layerfs.store.tarindex import REG

log = logging.getLogger(__name__)

STATE_VERSION = 1
COPY_CHUNK = 1 << 30
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

Row = list[Any]
"""A layer index row (``Entry.to_row()``) plus a 13th column: where a file's data is.

``None``: the upper data file numbered by the offset column; a diff ID: that
lower layer's tar, at the offset.
"""


def _error(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


class Upper:
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
            source = row[12]
            if source is None:
                row[12] = LAYER_UPPER
            elif source in layer_of:
                row[12] = layer_of[source]
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
        return self.table.layer[ino] != LAYER_UPPER

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
            _copy_range(plan.src, plan.src_offset, plan.fd, plan.count)

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
        if t.layer[ino] == LAYER_UPPER and stat.S_ISREG(t.mode[ino]):
            try:
                os.unlink(self.data_path(t.offset[ino]))
            except FileNotFoundError:
                pass

    def write(self, ino: int, offset: int, data: bytes) -> int:
        fd = self.copy_up(ino)
        written = os.pwrite(fd, data, offset)
        t = self.table
        now = time.time_ns()
        end = offset + written
        t.set_attrs(ino, size=max(end, t.size[ino]), mtime_ns=now)
        return written

    def truncate(self, ino: int, size: int) -> None:
        t = self.table
        fd = self.copy_up(ino, keep=size)
        os.ftruncate(fd, size)
        t.set_attrs(ino, size=size)

    # -- names -------------------------------------------------------------------------

    def _check_dir(self, ino: int) -> dict[bytes, int]:
        t = self.table
        if not t.alive(ino):
            raise _error(errno.ENOENT)
        if not t.is_dir(ino):
            raise _error(errno.ENOTDIR)
        if t.nlink[ino] == 0:
            raise _error(errno.ENOENT, "directory was removed")
        return t.children[ino]

    def _check_new_name(self, parent: int, name: bytes) -> None:
        names = self._check_dir(parent)
        if name in names:
            raise _error(errno.EEXIST)
        if whiteout.is_reserved(name):
            raise _error(errno.EPERM, "names starting with .wh. are reserved for whiteouts")

    def _touch_ctime(self, ino: int) -> None:
        # A new ctime alone is not a change a layer can carry: the file is not marked.
        self.table.ctime[ino] = time.time_ns()

    def _dir_modified(self, *dirs: int) -> None:
        now = time.time_ns()
        for d in dirs:
            self.table.set_attrs(d, mtime_ns=now)

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> int:
        """A new entry; ``mode`` carries the type bits (S_IFREG, S_IFDIR, S_IFLNK...)."""
        self._check_new_name(parent, name)
        t = self.table
        kind_bits = stat.S_IFMT(mode)
        if kind_bits not in (
            stat.S_IFREG,
            stat.S_IFDIR,
            stat.S_IFLNK,
            stat.S_IFCHR,
            stat.S_IFBLK,
            stat.S_IFIFO,
            stat.S_IFSOCK,
        ):
            raise _error(errno.EINVAL)
        now = time.time_ns()
        perms = 0o777 if kind_bits == stat.S_IFLNK else mode & 0o7777
        offset = 0
        if kind_bits == stat.S_IFREG:
            offset = self.next_data
            self.next_data += 1
            fd = os.open(
                self.data_path(offset), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        ino = t.new(kind_bits | perms, uid, gid, len(target), now, offset, LAYER_UPPER)
        if kind_bits == stat.S_IFREG:
            self._fds[ino] = fd
        if kind_bits == stat.S_IFLNK:
            t.targets[ino] = target
        if kind_bits in (stat.S_IFCHR, stat.S_IFBLK):
            t.rdev[ino] = rdev
        t.add_name(parent, name, ino)
        self._dir_modified(parent)
        return ino

    def link(self, ino: int, parent: int, name: bytes) -> None:
        t = self.table
        if t.is_dir(ino):
            raise _error(errno.EPERM, "cannot hardlink a directory")
        if not t.alive(ino) or t.nlink[ino] == 0:
            raise _error(errno.ENOENT)
        self._check_new_name(parent, name)
        t.add_name(parent, name, ino)
        self._touch_ctime(ino)
        self._dir_modified(parent)

    def unlink(self, parent: int, name: bytes) -> int:
        """Remove a non-directory name; returns its inode (free it when unused)."""
        t = self.table
        ino = self._check_dir(parent).get(name, 0)
        if not ino:
            raise _error(errno.ENOENT)
        if t.is_dir(ino):
            raise _error(errno.EISDIR)
        t.remove_name(parent, name)
        if t.nlink[ino]:
            self._touch_ctime(ino)
        self._dir_modified(parent)
        return ino

    def rmdir(self, parent: int, name: bytes) -> int:
        t = self.table
        ino = self._check_dir(parent).get(name, 0)
        if not ino:
            raise _error(errno.ENOENT)
        if not t.is_dir(ino):
            raise _error(errno.ENOTDIR)
        if t.children[ino]:
            raise _error(errno.ENOTEMPTY)
        t.remove_name(parent, name)
        t.nlink[ino] = 0
        self._dir_modified(parent)
        return ino

    def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int = 0
    ) -> int:
        """Move a name (directories from lower layers too). Returns an inode that lost
        its last name because it was replaced, else 0."""
        t = self.table
        src = self._check_dir(parent_old).get(name_old, 0)
        if not src:
            raise _error(errno.ENOENT)
        new_names = self._check_dir(parent_new)
        if whiteout.is_reserved(name_new):
            raise _error(errno.EPERM, "names starting with .wh. are reserved for whiteouts")
        dst = new_names.get(name_new, 0)
        if t.is_dir(src) and t.is_ancestor(src, parent_new):
            raise _error(errno.EINVAL, "cannot move a directory into itself")
        if flags & RENAME_EXCHANGE:
            if not dst:
                raise _error(errno.ENOENT)
            if t.is_dir(dst) and t.is_ancestor(dst, parent_old):
                raise _error(errno.EINVAL)
            t.remove_name(parent_old, name_old)
            t.remove_name(parent_new, name_new)
            t.add_name(parent_old, name_old, dst)
            t.add_name(parent_new, name_new, src)
            self._touch_ctime(src)
            self._touch_ctime(dst)
            self._dir_modified(parent_old, parent_new)
            return 0
        if dst == src:
            return 0
        replaced = 0
        if dst:
            if flags & RENAME_NOREPLACE:
                raise _error(errno.EEXIST)
            if t.is_dir(src):
                if not t.is_dir(dst):
                    raise _error(errno.ENOTDIR)
                if t.children[dst]:
                    raise _error(errno.ENOTEMPTY)
            elif t.is_dir(dst):
                raise _error(errno.EISDIR)
            t.remove_name(parent_new, name_new)
            if t.is_dir(dst):
                t.nlink[dst] = 0
            if t.nlink[dst] == 0:
                replaced = dst
        t.remove_name(parent_old, name_old)
        t.add_name(parent_new, name_new, src)
        self._touch_ctime(src)
        self._dir_modified(*{parent_old, parent_new})
        return replaced

    # -- attributes --------------------------------------------------------------------------

    def set_xattr(self, ino: int, name: str, value: bytes) -> None:
        t = self.table
        xattrs = dict(t.xattrs.get(ino) or {})
        xattrs[name] = value
        t.set_attrs(ino, ctime_ns=time.time_ns())
        t.xattrs[ino] = xattrs

    def remove_xattr(self, ino: int, name: str) -> None:
        t = self.table
        current = t.xattrs.get(ino) or {}
        if name not in current:
            raise _error(errno.ENODATA)
        xattrs = {k: v for k, v in current.items() if k != name}
        t.set_attrs(ino, ctime_ns=time.time_ns())
        if xattrs:
            t.xattrs[ino] = xattrs
        else:
            t.xattrs.pop(ino, None)

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
        return [
            path,
            kind,
            t.mode[ino] & 0o7777,
            t.uid[ino],
            t.gid[ino],
            t.size[ino] if kind == REG else 0,
            t.mtime[ino],
            t.offset[ino] if kind == REG else 0,
            t.targets.get(ino, b""),
            os.major(rdev),
            os.minor(rdev),
            t.xattrs.get(ino),
            source,
        ]


@dataclass
class CopyPlan:
    ino: int
    number: int  # the upper data file
    fd: int
    src: int  # the layer tar, or -1 when nothing is copied
    src_offset: int
    count: int


def _copy_range(src: int, offset: int, dst: int, count: int) -> None:
    dst_offset = 0
    while count:
        try:
            copied = os.copy_file_range(src, dst, min(count, COPY_CHUNK), offset, dst_offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            copied = _copy_plain(src, offset, dst, dst_offset, count)
        if copied == 0:
            raise _error(errno.EIO, "layer tar is shorter than its index says")
        offset += copied
        dst_offset += copied
        count -= copied


def _copy_plain(src: int, offset: int, dst: int, dst_offset: int, count: int) -> int:
    data = os.pread(src, min(count, 1 << 20), offset)
    if data:
        os.pwrite(dst, data, dst_offset)
    return len(data)
