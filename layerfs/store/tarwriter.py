"""Index entries written back as tar members: one TarInfo per entry, data in bounded ranges.

``export`` (``rootfs.py``) writes a merged tree as one tar and ``commit``
(``fs/commit.py``) writes a writable layer's changes as a layer tar; both turn an
:class:`~layerfs.store.tarindex.Entry` into its header with :func:`tar_info` and
hand ``tarfile`` the entry's data as a :class:`DataRange` of a layer tar or of an
upper data file. Where the stream goes and which entries are written is theirs;
the writer itself is ``tarindex.open_pax_writer`` (PAX, names as raw bytes).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from layerfs.store.tarindex import BLOCKDEV, CHAR, HARDLINK, REG, SYMLINK, TARFILE_TYPES, Entry


def tar_info(entry: Entry) -> tarfile.TarInfo:
    """The tar header of ``entry`` as Docker writes layers: no user or group names,
    xattrs as ``SCHILY.xattr.*`` PAX records, a regular file's size (its data is the
    caller's: see :class:`DataRange`)."""
    info = tarfile.TarInfo(os.fsdecode(entry.path) if entry.path else ".")
    kind = entry.type
    info.type = TARFILE_TYPES[kind]
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime_ns // 1_000_000_000
    if kind in (SYMLINK, HARDLINK):
        info.linkname = os.fsdecode(entry.linkname)
    elif kind in (CHAR, BLOCKDEV):
        info.devmajor, info.devminor = entry.devmajor, entry.devminor
    elif kind == REG:
        info.size = entry.size
    if entry.xattrs:
        info.pax_headers = {
            "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
            for k, v in entry.xattrs.items()
        }
    return info


@dataclass(slots=True)
class DataRange:
    """``size`` bytes of ``handle`` from ``offset``, as a file object for ``tarfile``.

    Every read seeks first, so several ranges of one layer tar can be read with one
    handle; ``offset`` and ``size`` move on as it reads. Data that ends early ends the
    range early (``tarfile`` then refuses the member: a cut layer tar), or with ``pad``
    is made up with zeros (an upper data file shorter than the size its mount
    recorded). ``owned``: the handle is closed once the range is read.
    """

    handle: BinaryIO
    offset: int
    size: int
    pad: bool = False
    owned: bool = False

    def read(self, n: int = -1) -> bytes:
        if self.size <= 0:
            self._close()
            return b""
        if n < 0 or n > self.size:
            n = self.size
        self.handle.seek(self.offset)
        data = self.handle.read(n)
        if self.pad and len(data) < n:
            data += bytes(n - len(data))
        self.offset += len(data)
        self.size -= len(data)
        if self.size <= 0 or not data:
            self._close()
        return data

    def _close(self) -> None:
        if self.owned and not self.handle.closed:
            self.handle.close()
