"""The merged view of a stack of layers: whiteouts, opaque dirs, hardlinks, init layer.

Layers are applied base first, the way Docker extracts them: a layer's
whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) remove entries
of the layers below it, never its own, wherever they sit in the tar; a
directory over a directory merges, anything else replaces. Hardlinks of a
layer share the inode of their target. The result lives in an
:class:`~layerfs.fs.inodes.InodeTable`: one flat set of inodes with a name
map per directory, so a lookup costs the same whatever layer a file came
from, and the mount serves it as it is.

Rows are layer index rows (``store/rows.py``), consumed one at a time so that
a big index never sits in memory twice. A row's optional :data:`~layerfs.store.rows.SOURCE`
column overrides the layer an entry's data comes from (the writable layer's saved
state uses it).

This module knows nothing of pyfuse3: the mount, ``export`` and the tests all
use it directly.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from layerfs.fs import whiteout
from layerfs.fs.inodes import (
    KIND_BITS,
    LAYER_IMPLIED,
    LAYER_INIT,
    ROOT,
    InodeTable,
)
from layerfs.store.initlayer import INIT_ENTRIES, INIT_PARENT_MODE, init_parents
from layerfs.store.rows import (
    DEVMAJOR,
    DEVMINOR,
    GID,
    INDEX_COLUMNS,
    LINKNAME,
    MODE,
    MTIME_NS,
    OFFSET,
    PATH,
    SIZE,
    SOURCE,
    TYPE,
    UID,
    XATTRS,
    Row,
)
from layerfs.store.tarindex import BLOCKDEV, CHAR, DIR, HARDLINK, REG, SYMLINK, Entry

_S_IFDIR = stat.S_IFDIR
_IMPLIED_DIR_MODE = 0o755


@dataclass(slots=True)
class Node:
    """One path of the merged tree, as a snapshot (see :meth:`MergedTree.lookup`)."""

    entry: Entry  # metadata; for a hardlink, the shared inode's metadata and data offset
    layer: int  # index into the stack (base = 0), LAYER_INIT or LAYER_IMPLIED
    link_key: tuple[int, bytes] | None = None  # shared by the names of a hardlink group
    children: dict[bytes, None] | None = None  # ordered names, for directories
    ino: int = 0


class MergedTree:
    """The merged tree of an image; paths and inodes, built layer by layer."""

    def __init__(self, table: InodeTable | None = None) -> None:
        self.table = table if table is not None else InodeTable()
        self.link_first: dict[int, bytes] = {}  # hardlinked inode -> first path of the group
        self._cache_path: bytes | None = None
        self._cache_ino = 0

    # -- building ---------------------------------------------------------------

    @classmethod
    def build(cls, layers: Sequence[Sequence[Entry]], *, init: bool = False) -> MergedTree:
        tree = cls()
        for number, entries in enumerate(layers):
            tree.apply_layer(number, entries)
        if init:
            tree.apply_init_layer()
        return tree

    @classmethod
    def from_rows(cls, layers: Iterable[Iterable[Row]], *, init: bool = False) -> MergedTree:
        tree = cls()
        for number, rows in enumerate(layers):
            tree.apply_rows(number, rows)
        if init:
            tree.apply_init_layer()
        return tree

    def apply_layer(self, number: int, entries: Iterable[Entry]) -> None:
        self.apply_rows(number, (e.to_row() for e in entries))

    def apply_rows(self, number: int, rows: Iterable[Row]) -> None:
        """Lay one layer on top. Inodes numbered from here on belong to this layer."""
        t = self.table
        start = t.next_ino
        # Lower directories this layer put entries into: a whiteout or opaque marker
        # of this same layer must keep what the layer itself added there. The value
        # says whether the layer also gave the directory its own metadata.
        touched: dict[int, bool] = {}
        # Files stashed in the AUFS link dir: never visible, but a hardlink of this
        # layer to one of them takes its inode (Docker re-targets such links).
        aufs_links: dict[bytes, int] = {}
        self._cache_path = None
        for row in rows:
            path: bytes = row[PATH]
            slash = path.rfind(b"/")
            if slash >= 0:
                parent, name = path[:slash], path[slash + 1 :]
            else:
                parent, name = b"", path
            if name.startswith(whiteout.PREFIX):
                if name == whiteout.OPAQUE:
                    self._hide_lower(self._dir(parent, start, touched), start, touched)
                elif whiteout.is_whiteout(name):
                    self._whiteout(parent, whiteout.whited_out(name), start, touched)
                continue  # whiteouts, markers and AUFS metadata are never visible
            if path.startswith(whiteout.AUFS_LINK_DIR) and whiteout.in_aufs_link_dir(path):
                if row[TYPE] == REG:
                    aufs_links[path] = self._new_from_row(row, number)
                continue
            kind: str = row[TYPE]
            if not path:
                if kind == DIR:
                    self._set_from_row(ROOT, row, number)
                    touched[ROOT] = True
                continue
            d = self._cache_ino if parent == self._cache_path else self._dir(parent, start, touched)
            names = t.children[d]
            existing = names.get(name, 0)
            if kind == HARDLINK:
                target = aufs_links.get(row[LINKNAME]) or t.resolve(row[LINKNAME])
                if not target or t.is_dir(target) or existing == target:
                    continue  # the tar indexer guarantees an earlier target; be safe
                if existing:
                    self._remove(d, name)
                t.add_name(d, name, target)
                self.link_first.setdefault(target, row[LINKNAME])
                continue
            if existing:
                if kind == DIR and t.is_dir(existing):
                    self._set_from_row(existing, row, number)  # dir over dir: merge
                    if existing < start:
                        touched[existing] = True
                    continue
                self._remove(d, name)
            t.add_name(d, name, self._new_from_row(row, number))
            # Most tars list a directory's entries together: remember the last parent.
            self._cache_path, self._cache_ino = parent, d
        self._cache_path = None
        for ino in aufs_links.values():
            if not t.nlink[ino]:
                t.drop(ino)  # a stashed file no hardlink of this layer named

    def _new_from_row(self, row: Row, number: int) -> int:
        t = self.table
        kind = row[TYPE]
        if len(row) > INDEX_COLUMNS and row[SOURCE] is not None:
            number = row[SOURCE]
        # A symlink's size is the length of its target, as lstat reports it.
        size = row[SIZE] if kind == REG else len(row[LINKNAME]) if kind == SYMLINK else 0
        ino = t.new(
            KIND_BITS[kind] | (row[MODE] & 0o7777),
            row[UID],
            row[GID],
            size,
            row[MTIME_NS],
            row[OFFSET],
            number,
        )
        if kind == SYMLINK:
            t.targets[ino] = row[LINKNAME]
        elif kind in (CHAR, BLOCKDEV):
            t.rdev[ino] = os.makedev(row[DEVMAJOR], row[DEVMINOR])
        if row[XATTRS]:
            t.xattrs[ino] = row[XATTRS]
        return ino

    def _set_from_row(self, ino: int, row: Row, number: int) -> None:
        t = self.table
        t.set_attrs(
            ino,
            mode=row[MODE],
            uid=row[UID],
            gid=row[GID],
            atime_ns=row[MTIME_NS],  # a layer keeps no atime: it reads as the mtime
            mtime_ns=row[MTIME_NS],
            offset=row[OFFSET],
            layer=number,
        )
        if row[XATTRS]:
            t.xattrs[ino] = row[XATTRS]
        else:
            t.xattrs.pop(ino, None)

    def _dir(self, path: bytes, start: int, touched: dict[int, bool]) -> int:
        """The directory at ``path``, creating implied parents (and replacing non-dirs)."""
        t = self.table
        ino = ROOT
        if not path:
            return ino
        for part in path.split(b"/"):
            child = t.children[ino].get(part, 0)
            if not child or not t.is_dir(child):
                if child:
                    self._remove(ino, part)
                child = t.new(_S_IFDIR | _IMPLIED_DIR_MODE, 0, 0, 0, 0, 0, LAYER_IMPLIED)
                t.add_name(ino, part, child)
            elif child < start and child not in touched:
                touched[child] = False
            ino = child
        return ino

    def _remove(self, parent: int, name: bytes) -> None:
        """Drop ``name`` and everything below it (a hardlinked inode lives on in its others)."""
        self._cache_path = None
        for orphan in self.table.remove_tree(parent, name):
            self.table.drop(orphan)
            self.link_first.pop(orphan, None)

    def _whiteout(self, parent: bytes, name: bytes, start: int, touched: dict[int, bool]) -> None:
        t = self.table
        d = t.resolve(parent)
        if not d:
            # Docker creates the missing parents of every entry, a whiteout's too.
            self._dir(parent, start, touched)
            return
        if not t.is_dir(d):
            return
        victim = t.children[d].get(name, 0)
        if not victim or victim >= start:
            return  # nothing below, or this layer's own entry: a whiteout never hides those
        if victim in touched and t.is_dir(victim):
            # This layer wrote below a directory it also whites out: the lower
            # directory goes, what the layer put there stays.
            if not touched[victim]:
                self._reset_implied(victim)
            self._hide_lower(victim, start, touched)
            return
        self._remove(d, name)

    def _hide_lower(self, d: int, start: int, touched: dict[int, bool]) -> None:
        """Opaque: hide every lower child of ``d``, keeping this layer's entries."""
        t = self.table
        stack = [d]
        while stack:
            current = stack.pop()
            for name, child in list(t.children[current].items()):
                if child >= start:
                    continue
                if child in touched and t.is_dir(child):
                    if not touched[child]:
                        self._reset_implied(child)
                    stack.append(child)
                else:
                    self._remove(current, name)

    def _reset_implied(self, ino: int) -> None:
        self.table.set_attrs(
            ino,
            mode=_IMPLIED_DIR_MODE,
            uid=0,
            gid=0,
            atime_ns=0,
            mtime_ns=0,
            offset=0,
            layer=LAYER_IMPLIED,
        )
        self.table.xattrs.pop(ino, None)

    def apply_init_layer(self) -> None:
        """Docker's SetupInitLayer over the merged tree (FORMATS.md §4).

        A file or symlink at a listed path is replaced; an existing directory
        is left as it is, whatever type the init layer wants there.
        """
        t = self.table
        self._cache_path = None
        for parent in init_parents():
            head, _, name = parent.encode().rpartition(b"/")
            d = t.resolve(head)
            existing = t.children[d].get(name, 0)
            if existing and t.is_dir(existing):
                continue
            if existing:
                self._remove(d, name)
            t.add_name(d, name, t.new(_S_IFDIR | INIT_PARENT_MODE, 0, 0, 0, 0, 0, LAYER_INIT))
        for init in INIT_ENTRIES:
            head, _, name = init.path.encode().rpartition(b"/")
            d = t.resolve(head)
            existing = t.children[d].get(name, 0)
            if existing and t.is_dir(existing):
                continue
            if existing:
                self._remove(d, name)
            kind = {"d": DIR, "f": REG, "l": SYMLINK}[init.type]
            ino = t.new(KIND_BITS[kind] | init.mode, 0, 0, len(init.target), 0, 0, LAYER_INIT)
            if kind == SYMLINK:
                t.targets[ino] = init.target.encode()
            t.add_name(d, name, ino)

    # -- reading ----------------------------------------------------------------

    def entry_of(self, ino: int, path: bytes) -> Entry:
        """The metadata of an inode as an index :class:`Entry` named ``path``."""
        t = self.table
        kind = t.kind(ino)
        rdev = t.rdev.get(ino, 0)
        return Entry(
            path=path,
            type=kind,
            mode=t.mode[ino] & 0o7777,
            uid=t.uid[ino],
            gid=t.gid[ino],
            size=t.size[ino],
            mtime_ns=t.mtime[ino],
            offset=t.offset[ino],
            linkname=t.targets.get(ino, b""),
            devmajor=os.major(rdev) if rdev else 0,
            devminor=os.minor(rdev) if rdev else 0,
            xattrs=t.xattrs.get(ino),
        )

    def node(self, ino: int, path: bytes) -> Node:
        t = self.table
        first = self.link_first.get(ino)
        return Node(
            entry=self.entry_of(ino, path),
            layer=t.layer[ino],
            link_key=(t.layer[ino], first) if first is not None else None,
            children=dict.fromkeys(t.children[ino]) if t.is_dir(ino) else None,
            ino=ino,
        )

    def lookup(self, path: bytes) -> Node | None:
        ino = self.table.resolve(path)
        return self.node(ino, path) if ino else None

    def listdir(self, path: bytes) -> list[bytes]:
        ino = self.table.resolve(path)
        if not ino or not self.table.is_dir(ino):
            return []
        return list(self.table.children[ino])

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """Every path, parents before children, siblings in sorted order."""
        t = self.table
        stack: list[tuple[bytes, int]] = [(b"", ROOT)]
        while stack:
            path, ino = stack.pop()
            yield path, self.node(ino, path)
            names = t.children.get(ino)
            if names:
                for name in sorted(names, reverse=True):
                    stack.append((path + b"/" + name if path else name, names[name]))

    def link_counts(self) -> dict[tuple[int, bytes], int]:
        t = self.table
        return {
            (t.layer[ino], first): t.nlink[ino]
            for ino, first in self.link_first.items()
            if t.alive(ino)
        }

    @property
    def nodes(self) -> dict[bytes, Node]:
        """Path → :class:`Node` for every path (a snapshot; costly on big trees)."""
        return dict(self.walk())

    def __len__(self) -> int:
        """The number of paths, the root included (a hardlink group counts each name)."""
        return 1 + sum(len(names) for names in self.table.children.values())
