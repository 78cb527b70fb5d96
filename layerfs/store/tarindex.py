"""One streaming pass over a layer tar: copy it byte for byte, hash it, index it.

The tar's headers are read by ``layerfs.store.tarheaders`` (ustar, PAX, GNU long
names, their fields checked, names kept as bytes with the offset of their data). The
indexer here applies the rules a container runtime needs across the entries of one
layer: no entry written through a link of the same layer, hardlinks only to an earlier
entry of the same layer, names Linux can create. Like Docker it takes ``/etc/passwd``
for ``etc/passwd``; like Docker's extractor and containerd (not ``docker load``, whose
tar-split record refuses a path seen twice) it lets the last of several entries of one
path win.

What this module leaves to others: decompression (``layerfs.compression``),
where the bytes go (the caller's sink), and layer semantics across layers
(whiteouts are kept as plain entries here; ``layerfs.fs.union`` applies them).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from layerfs.errors import FormatError, UnsafePathError
from layerfs.model.whiteout import PREFIX as WHITEOUT_PREFIX
from layerfs.store.tarheaders import (
    BLOCKDEV,
    CHAR,
    DIR,
    FIFO,
    HARDLINK,
    REG,
    SYMLINK,
    Header,
    Sink,
    TarStream,
    read_headers,
    show_name,
)

# What the index's users import from here (the entry types are the header reader's).
__all__ = [
    "BLOCKDEV",
    "CHAR",
    "DIR",
    "FIFO",
    "HARDLINK",
    "REG",
    "SYMLINK",
    "TARFILE_TYPES",
    "Entry",
    "IndexResult",
    "Sink",
    "index_tar",
    "open_pax_writer",
]

# What Linux can create (PATH_MAX, NAME_MAX): Docker's extraction fails past these.
MAX_PATH = 4095
MAX_NAME = 255

# Index types back to tarfile's, for the writers (export, commit).
TARFILE_TYPES = {
    REG: tarfile.REGTYPE,
    DIR: tarfile.DIRTYPE,
    SYMLINK: tarfile.SYMTYPE,
    HARDLINK: tarfile.LNKTYPE,
    CHAR: tarfile.CHRTYPE,
    BLOCKDEV: tarfile.BLKTYPE,
    FIFO: tarfile.FIFOTYPE,
}


def open_pax_writer(out: BinaryIO) -> tarfile.TarFile:
    """A streaming tar writer as Docker writes layers: PAX, names kept as raw bytes."""
    return tarfile.open(
        fileobj=out,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    )


@dataclass(slots=True)
class Entry(Header):
    """One entry of a layer tar, as the union mount and export need it."""

    def to_row(self) -> list[Any]:
        return [
            self.path,
            self.type,
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.mtime_ns,
            self.offset,
            self.linkname,
            self.devmajor,
            self.devminor,
            self.xattrs,
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> Entry:
        return cls(*row)


@dataclass
class IndexResult:
    diff_id: str
    tar_size: int
    # Docker's layer "Size" as overlay2 measures the unpacked layer: the bytes of every
    # regular file plus the length of every symlink's target (what lstat reports).
    content_size: int
    entries: list[Entry] = field(default_factory=list)


def _check_name(path: bytes, what: str = "entry", *, parts: bool = True) -> None:
    if len(path) <= MAX_NAME:
        return  # no part of it can be too long either
    if len(path) > MAX_PATH:
        raise FormatError(
            f"{what} name of {len(path)} bytes ({show_name(path[:60])}) is longer than the "
            f"{MAX_PATH} bytes Linux allows in a path"
        )
    for part in path.split(b"/") if parts else ():
        # A whiteout names a file of up to MAX_NAME bytes: its own name may be 4 longer.
        limit = MAX_NAME + len(WHITEOUT_PREFIX) if part.startswith(WHITEOUT_PREFIX) else MAX_NAME
        if len(part) > limit:
            raise FormatError(
                f"{what} {show_name(path)} has a name of {len(part)} bytes; Linux allows {MAX_NAME}"
            )


class _Validator:
    """Per-layer rules: no writes through links, hardlinks to earlier entries, last one wins.

    Entries of one path after the first replace it, in tar order, as Docker's
    extraction does (a directory over a directory merges); the union mount
    applies them in that order. The index keeps a repeated directory as one
    entry (its last header) and every other repeat as an entry of its own.
    """

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries  # the layer's entries so far, in index order
        # Where each path's current entry is: one dict, its type read from the entry
        # (a layer of a million entries keeps a million of these).
        self.positions: dict[bytes, int] = {}
        self.replaced: dict[bytes, int] = {}  # directory → entry count when a non-dir replaced it

    def _type(self, path: bytes) -> str | None:
        position = self.positions.get(path)
        return None if position is None else self.entries[position].type

    def _ancestors(self, path: bytes) -> Iterator[bytes]:
        slash = path.find(b"/")
        while slash >= 0:
            yield path[:slash]
            slash = path.find(b"/", slash + 1)

    def check(self, entry: Entry, entries: list[Entry]) -> bool:
        """True if the entry is new; False if it merged into an earlier directory entry."""
        path = entry.path
        if path == b"" and entry.type != DIR:
            raise UnsafePathError("an entry that is not a directory resolves to the root")
        base = path.rsplit(b"/", 1)[-1]
        if base == WHITEOUT_PREFIX:
            raise FormatError(f"entry {show_name(path)} is a bare whiteout '.wh.'")
        _check_name(path)
        # Every ancestor must be a directory (or not in this layer at all).
        for ancestor in self._ancestors(path):
            kind = self._type(ancestor)
            if kind is not None and kind != DIR:
                raise UnsafePathError(
                    f"entry {show_name(path)} would be written through {show_name(ancestor)}, "
                    "which is not a directory in this layer"
                )
        if entry.type == HARDLINK:
            self._check_hardlink(path, entry.linkname)
        elif entry.type == SYMLINK:
            _check_name(entry.linkname, f"symlink {show_name(path)}: target", parts=False)
        previous = self._type(path)
        if previous is not None:
            if previous == DIR and entry.type == DIR:
                entries[self.positions[path]] = entry  # repeated directory: last one wins
                return False
            if previous == DIR:
                self.replaced[path] = len(entries)  # its subtree goes with it
        self.positions[path] = len(entries)
        return True

    def _check_hardlink(self, path: bytes, target: bytes) -> None:
        if target == path:
            raise UnsafePathError(f"hardlink {show_name(path)} points to itself")
        kind = self._type(target)
        if kind is None:
            raise UnsafePathError(
                f"hardlink {show_name(path)} points to {show_name(target)}, "
                "which is not an earlier entry of this layer"
            )
        if kind == DIR:
            raise UnsafePathError(f"hardlink {show_name(path)} points to a directory")
        if target.rsplit(b"/", 1)[-1].startswith(WHITEOUT_PREFIX):
            # A whiteout or opaque marker is never created: there is nothing to link to.
            raise UnsafePathError(
                f"hardlink {show_name(path)} points to the whiteout {show_name(target)}"
            )
        position = self.positions[target]
        for ancestor in self._ancestors(target):
            if self.replaced.get(ancestor, -1) > position:
                raise UnsafePathError(
                    f"hardlink {show_name(path)} points to {show_name(target)}, which went with "
                    f"{show_name(ancestor)} when a later entry replaced that directory"
                )


def index_tar(
    src: BinaryIO | Any,
    sink: Sink | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> IndexResult:
    """Read a whole tar stream once: copy it to ``sink``, hash it and index it.

    The diff ID covers every byte of the stream, end-of-archive blocks and any
    trailing padding included, exactly as Docker computes it.
    """
    stream = TarStream(src, sink, progress)
    entries: list[Entry] = []
    validator = _Validator(entries)
    content_size = 0
    for entry in read_headers(stream, Entry):
        if validator.check(entry, entries):
            entries.append(entry)
        if entry.type == REG:
            content_size += entry.size
        elif entry.type == SYMLINK:
            content_size += len(entry.linkname)
    stream.drain()
    return IndexResult(
        diff_id=stream.digest, tar_size=stream.total, content_size=content_size, entries=entries
    )
