"""The inode table: compact attributes, directory maps, link counts, lookup counts.

An inode number is an index into parallel :mod:`array` columns (mode, uid,
gid, size, mtime, data offset, layer, parent, nlink), so an entry of a merged
tree costs about fifty bytes of attributes plus its name in its directory's
``dict``; symlink targets, device numbers and xattrs live in small side
dictionaries keyed by inode, and so do access and change times where they
differ from the modification time (a lower file's atime and ctime read as its
mtime: layers keep no other time, and reads change no atime, as under
``noatime``). Numbers are handed out in order and never reused while the
table lives: a build from the same layers gives every path the same number,
readdir and lookup report the same number, and the names of a hardlink group
all refer to one inode.

This module knows no layer semantics (``union.py``) and no FUSE (``operations.py``).
Mutations call an optional :class:`ChangeWatch` first, which is how the
writable layer (``upper.py``) learns what to copy before a change.
"""

from __future__ import annotations

import errno
import os
import stat
from array import array
from collections.abc import Iterator
from typing import Protocol

from layerfs.store.tarindex import BLOCKDEV, CHAR, DIR, FIFO, REG, SYMLINK

ROOT = 1
"""FUSE's root inode number."""

LAYER_INIT = -1  # the init layer: placeholders without data
LAYER_IMPLIED = -2  # a parent directory no layer listed
LAYER_UPPER = -3  # the writable layer; the offset column holds the data file number

KIND_BITS = {
    REG: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHAR: stat.S_IFCHR,
    BLOCKDEV: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
}
SOCKET = "s"
"""A socket bound in a writable mount: served while mounted, never part of a layer."""
BITS_KIND = {bits: kind for kind, bits in KIND_BITS.items()} | {stat.S_IFSOCK: SOCKET}
_UINT32 = 0xFFFFFFFF

NAME_MAX = 255
"""The longest name a mount takes or finds, in bytes, as on ext4 (statfs reports it)."""
PATH_MAX = 4096
"""The longest path, with its NUL: a symlink target is at most ``PATH_MAX - 1`` bytes."""


def check_name(name: bytes) -> None:
    """ENAMETOOLONG for a name longer than :data:`NAME_MAX`, as ext4 answers for any call."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))


class ChangeWatch(Protocol):
    def dir_changing(self, ino: int) -> None:
        """``ino``'s name map is about to change."""

    def meta_changing(self, ino: int) -> None:
        """``ino``'s attributes are about to change."""


class InodeTable:
    """Inode number → attributes; directory inode → {name: inode}."""

    def __init__(self) -> None:
        # Index 0 is never an inode: FUSE reserves it for "no entry".
        self.mode = array("I", [0])  # st_mode: type bits and permissions; 0 = free
        self.uid = array("I", [0])
        self.gid = array("I", [0])
        self.size = array("Q", [0])
        self.mtime = array("q", [0])  # nanoseconds
        self.offset = array("Q", [0])  # data offset in the layer tar (upper: data file number)
        self.layer = array("h", [0])  # layer index, or LAYER_INIT / LAYER_IMPLIED / LAYER_UPPER
        self.parent = array("I", [0])  # directories: the parent; others: the first one
        self.nlink = array("I", [0])
        self.children: dict[int, dict[bytes, int]] = {}
        self.targets: dict[int, bytes] = {}  # symlink targets
        self.rdev: dict[int, int] = {}
        self.xattrs: dict[int, dict[str, bytes]] = {}
        self.ctime: dict[int, int] = {}  # only where it differs from mtime
        self.atime: dict[int, int] = {}  # only where it differs from mtime
        self.watch: ChangeWatch | None = None
        self.live = 0
        root = self.new(stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, LAYER_IMPLIED)
        assert root == ROOT
        self.parent[ROOT] = ROOT

    # -- allocation ---------------------------------------------------------------

    @property
    def next_ino(self) -> int:
        return len(self.mode)

    def new(
        self, mode: int, uid: int, gid: int, size: int, mtime_ns: int, offset: int, layer: int
    ) -> int:
        ino = len(self.mode)
        self.mode.append(mode)
        self.uid.append(min(uid, _UINT32))
        self.gid.append(min(gid, _UINT32))
        self.size.append(size)
        self.mtime.append(mtime_ns)
        self.offset.append(offset)
        self.layer.append(layer)
        self.parent.append(0)
        self.nlink.append(2 if stat.S_ISDIR(mode) else 0)
        if stat.S_ISDIR(mode):
            self.children[ino] = {}
        self.live += 1
        return ino

    def drop(self, ino: int) -> None:
        """Forget an inode that no name and no user refers to any more."""
        if not self.mode[ino]:
            return
        self.mode[ino] = 0
        self.nlink[ino] = 0
        self.children.pop(ino, None)
        self.targets.pop(ino, None)
        self.rdev.pop(ino, None)
        self.xattrs.pop(ino, None)
        self.ctime.pop(ino, None)
        self.atime.pop(ino, None)
        self.live -= 1

    def alive(self, ino: int) -> bool:
        return 0 < ino < len(self.mode) and self.mode[ino] != 0

    # -- names ----------------------------------------------------------------------

    def is_dir(self, ino: int) -> bool:
        return self.mode[ino] & 0o170000 == stat.S_IFDIR

    def kind(self, ino: int) -> str:
        return BITS_KIND[self.mode[ino] & 0o170000]

    def child(self, parent: int, name: bytes) -> int:
        """The inode of ``name`` in directory ``parent``, or 0."""
        names = self.children.get(parent)
        if names is None:
            return 0
        return names.get(name, 0)

    def lookup(self, parent: int, name: bytes) -> int:
        """The inode of ``name`` in ``parent`` (``.`` and ``..`` too), or 0 if it has none.

        OSError ENOENT/ENOTDIR for a parent that is gone or no directory, and
        ENAMETOOLONG for a name longer than NAME_MAX (checked only when the name is
        not there: no layer holds one, the tar index refuses them).
        """
        if name == b".":
            return parent
        if name == b"..":
            return self.parent[parent]
        names = self.children.get(parent)
        if names is None:
            code = errno.ENOTDIR if self.alive(parent) else errno.ENOENT
            raise OSError(code, os.strerror(code))
        ino = names.get(name, 0)
        if not ino and len(name) > NAME_MAX:
            check_name(name)
        return ino

    def add_name(self, parent: int, name: bytes, ino: int) -> None:
        if self.watch is not None:
            self.watch.dir_changing(parent)
        self.children[parent][name] = ino
        if self.is_dir(ino):
            self.parent[ino] = parent
            self.nlink[parent] += 1
        else:
            self.nlink[ino] += 1
            if not self.parent[ino]:
                self.parent[ino] = parent

    def remove_name(self, parent: int, name: bytes) -> int:
        """Take ``name`` out of ``parent``; returns its inode (not dropped)."""
        if self.watch is not None:
            self.watch.dir_changing(parent)
        ino = self.children[parent].pop(name)
        if self.is_dir(ino):
            self.nlink[parent] -= 1
        else:
            self.nlink[ino] -= 1
        return ino

    def remove_tree(self, parent: int, name: bytes) -> list[int]:
        """Remove ``name`` and, for a directory, everything below it.

        Directories are dropped at once; returns the non-directory inodes whose
        last name went, for the caller to drop (or keep while they are in use).
        """
        orphans: list[int] = []
        ino = self.remove_name(parent, name)
        stack = [ino]
        while stack:
            current = stack.pop()
            if not self.is_dir(current):
                if self.nlink[current] == 0:
                    orphans.append(current)
                continue
            for child_name in list(self.children[current]):
                stack.append(self.remove_name(current, child_name))
            self.drop(current)
        return orphans

    def resolve(self, path: bytes) -> int:
        """Inode of a relative path (``b""`` is the root), or 0."""
        ino = ROOT
        if not path:
            return ino
        for part in path.split(b"/"):
            names = self.children.get(ino)
            if names is None:
                return 0
            ino = names.get(part, 0)
            if not ino:
                return 0
        return ino

    def dir_path(self, ino: int) -> bytes:
        """The path of a directory (directories have exactly one parent)."""
        parts: list[bytes] = []
        while ino != ROOT:
            parent = self.parent[ino]
            for name, child in self.children[parent].items():
                if child == ino:
                    parts.append(name)
                    break
            else:
                raise KeyError(ino)
            ino = parent
        return b"/".join(reversed(parts))

    def is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True if directory ``ancestor`` is ``ino`` or contains it."""
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT:
                return False
            ino = self.parent[ino]

    def names(self, parent: int) -> Iterator[tuple[bytes, int]]:
        return iter(self.children[parent].items())

    # -- attributes ---------------------------------------------------------------

    def set_attrs(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        offset: int | None = None,
        layer: int | None = None,
    ) -> None:
        """Change attributes; a time left out keeps its value (ctime: see below).

        A new mtime without a ctime is also the new ctime (a change of data or of a
        directory's names); atime stays what it was.
        """
        if self.watch is not None:
            self.watch.meta_changing(ino)
        if mode is not None:
            self.mode[ino] = (self.mode[ino] & 0o170000) | (mode & 0o7777)
        if uid is not None:
            self.uid[ino] = min(uid, _UINT32)
        if gid is not None:
            self.gid[ino] = min(gid, _UINT32)
        if size is not None:
            self.size[ino] = size
        if mtime_ns is not None:
            old = self.mtime[ino]
            if atime_ns is None and ino not in self.atime and old != mtime_ns:
                self.atime[ino] = old
            self.mtime[ino] = mtime_ns
            if ctime_ns is None:
                self.ctime.pop(ino, None)
            if self.atime.get(ino) == mtime_ns:
                del self.atime[ino]
        if atime_ns is not None:
            if atime_ns == self.mtime[ino]:
                self.atime.pop(ino, None)
            else:
                self.atime[ino] = atime_ns
        if ctime_ns is not None:
            if ctime_ns == self.mtime[ino]:
                self.ctime.pop(ino, None)
            else:
                self.ctime[ino] = ctime_ns
        if offset is not None:
            self.offset[ino] = offset
        if layer is not None:
            self.layer[ino] = layer

    def __len__(self) -> int:
        return self.live
