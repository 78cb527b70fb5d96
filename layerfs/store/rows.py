"""A layer index row: one tar entry as a plain list, and the names of its columns.

A layer's index (``index`` in its store directory, see docs/store-format.md) holds one
row per tar entry, in tar order: :meth:`~layerfs.store.tarindex.Entry.to_row` makes
one, :meth:`~layerfs.store.tarindex.Entry.from_row` reads one back, and the columns
are :class:`~layerfs.store.tarindex.Entry`'s fields in order. The merged tree
(``fs/union.py``) consumes rows one at a time as msgpack decodes them; the writable
layer (``fs/upper.py``) keeps its changes as rows with a thirteenth column,
:data:`SOURCE`; the commit (``fs/commit.py``) writes those as a tar. Code reads and
writes a column by its name: ``row[SIZE]``, never ``row[5]``.

Why plain lists with named columns rather than a NamedTuple or a slotted class:
rows arrive from msgpack as lists, and the merged tree reads each one once and keeps
none (it keeps its own columns: 158 bytes per merged entry, ``fs/inodes.py``).
Measured with ``tools/bench/bench_tree.py`` on the index rows of a 127-layer image
(52,101 merged entries; section "Merged tree" of docs/benchmarks.md): a row costs about the
same memory whatever holds it, since its path and numbers are most of it (303 bytes
per row with every row held as a list or a NamedTuple, 287 as a slotted class; the
object alone 152, 144 and 136 bytes), while making a NamedTuple or an object of each
decoded list took 1.4 and 2.5 µs per row decoded and read, against 0.7 µs for the
list itself: a slower merge for every mount, for no memory the merge keeps.
"""

from __future__ import annotations

from typing import Any

Row = list[Any]
"""A layer index row (:data:`INDEX_COLUMNS` columns) or a writable layer's (one more)."""

PATH = 0
"""bytes: relative, normalised, no ``.`` or empty components; ``b""`` is the root."""
TYPE = 1
"""str: one of ``tarindex``'s REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO."""
MODE = 2
"""int: permission bits with setuid, setgid and sticky (``0o7777``)."""
UID = 3
GID = 4
SIZE = 5
"""int: a regular file's data size; 0 for everything else."""
MTIME_NS = 6
OFFSET = 7
"""int: where the data starts in the layer tar (a writable layer's own file: its
data file number)."""
LINKNAME = 8
"""bytes: a symlink's target as written; a hardlink's target path, normalised."""
DEVMAJOR = 9
DEVMINOR = 10
XATTRS = 11
"""dict[str, bytes] or None."""

INDEX_COLUMNS = 12
"""The columns of a stored layer index row."""

SOURCE = 12
"""A writable layer's rows only: where a regular file's data is.

In its saved state and in a commit: ``None`` for the upper's own data file
(numbered by :data:`OFFSET`), or the diff ID of the lower layer whose tar holds
it. In rows handed to ``MergedTree.apply_rows``: the layer number the data comes
from, which then overrides the number of the layer being applied.
"""


def new_row(
    path: bytes,
    kind: str,
    *,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime_ns: int = 0,
    offset: int = 0,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: dict[str, bytes] | None = None,
    source: Any = None,
) -> Row:
    """A writable layer's row (:data:`SOURCE` included), columns by name."""
    return [
        path,
        kind,
        mode,
        uid,
        gid,
        size,
        mtime_ns,
        offset,
        linkname,
        devmajor,
        devminor,
        xattrs,
        source,
    ]
