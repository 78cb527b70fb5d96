"""The changes of a writable mount as layer rows: one walk against the lower name maps.

An inode numbered below ``Upper.n_lower`` is the lower file of that number
unless ``Upper.changed`` holds it; a lower directory's original names are
``Upper.orig_children`` (or its current map, when it never changed). Walking
the tree from the root against those gives, parents before children:

- a whiteout ``.wh.NAME`` for each lower name that went (or that a socket, which no
  layer holds, took);
- every entry whose inode is not the lower one at that place, or changed;
- for a directory that is not the lower directory at its place, the directory,
  ``.wh..wh..opq`` if a lower entry had that name, and everything below it;
- the unchanged parents of what is written (once), and at the end the other
  names of a written hardlink group that the walk skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.fs import whiteout
from layerfs.fs.inodes import ROOT, SOCKET
from layerfs.store.rows import PATH, Row, new_row
from layerfs.store.tarindex import HARDLINK, REG

if TYPE_CHECKING:
    from layerfs.fs.upper import Upper


def changed_rows(upper: Upper) -> list[Row]:
    walk = _Diff(upper)
    walk.directory(b"", ROOT, ROOT)
    walk.missing_links()
    return walk.rows


class _Diff:
    """One walk of the tree against the lower name maps (see the module docstring)."""

    def __init__(self, upper: Upper) -> None:
        self.upper = upper
        self.t = upper.table
        self.rows: list[Row] = []
        self.first_path: dict[int, bytes] = {}  # non-directory inode -> first path written
        self.names_written: dict[int, int] = {}
        self.pending: list[tuple[bytes, int]] = []  # unchanged parents not written yet

    def _flush(self) -> None:
        for path, ino in self.pending:
            self.rows.append(self.upper.row(path, ino))
        self.pending.clear()

    def _orig(self, ino: int) -> dict[bytes, int]:
        names = self.upper.orig_children.get(ino)
        return names if names is not None else self.t.children[ino]

    def _emit(self, path: bytes, ino: int) -> None:
        self._flush()
        first = self.first_path.get(ino)
        if first is not None:
            self.rows.append(new_row(path, HARDLINK, mtime_ns=self.t.mtime[ino], linkname=first))
        else:
            self.rows.append(self.upper.row(path, ino))
            if not self.t.is_dir(ino):
                self.first_path[ino] = path
        if not self.t.is_dir(ino):
            self.names_written[ino] = self.names_written.get(ino, 0) + 1

    def directory(self, path: bytes, ino: int, lower: int) -> None:
        t = self.t
        upper = self.upper
        names = t.children[ino]
        prefix = path + b"/" if path else b""
        if ino == ROOT and ROOT in upper.changed:
            self._emit(b"", ROOT)
        lower_names = self._orig(lower) if lower else None
        if lower_names is not None and lower_names is not names:
            for name in lower_names:
                if name not in names:
                    self._flush()
                    self.rows.append(_marker(prefix + whiteout.whiteout_for(name)))
        for name, child in list(names.items()):
            child_path = prefix + name
            same = lower_names is not None and lower_names.get(name) == child
            if t.is_dir(child):
                if same:
                    self.pending.append((child_path, child))
                    if child in upper.changed:
                        self._flush()
                    self.directory(child_path, child, child)
                    if self.pending and self.pending[-1][1] == child:
                        self.pending.pop()
                else:
                    self._emit(child_path, child)
                    if lower_names is not None and name in lower_names:
                        self.rows.append(_marker(child_path + b"/" + whiteout.OPAQUE))
                    saved, self.pending = self.pending, []
                    self.directory(child_path, child, 0)
                    self.pending = saved
            elif t.kind(child) == SOCKET:
                # As Docker's diff: a socket lives only as long as its mount. What it
                # replaced is gone all the same.
                if lower_names is not None and name in lower_names:
                    self._flush()
                    self.rows.append(_marker(prefix + whiteout.whiteout_for(name)))
                continue
            elif not same or child in upper.changed or child >= upper.n_lower:
                self._emit(child_path, child)

    def missing_links(self) -> None:
        """Names of written inodes that the walk skipped (unchanged names of a group)."""
        t = self.t
        short = {ino for ino, count in self.names_written.items() if count < t.nlink[ino]}
        if not short:
            return
        for d, names in t.children.items():
            for name, ino in names.items():
                if ino not in short:
                    continue
                path = t.dir_path(d)
                full = path + b"/" + name if path else name
                if full != self.first_path[ino] and not self._written(full):
                    self._emit(full, ino)

    def _written(self, path: bytes) -> bool:
        return any(row[PATH] == path for row in self.rows)


def _marker(path: bytes) -> Row:
    """A whiteout or opaque marker: an empty regular file, all else zero (as Docker writes)."""
    return new_row(path, REG)
