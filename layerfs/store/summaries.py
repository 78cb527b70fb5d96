"""Node summaries: what listings need of every graph node, without opening every node.

``images``, the children of a node, the heads of chains and "is this layer used" are
questions about all nodes at once. Reading ``graph/<id>/json`` of 10,000 nodes for each
of them costs a second; ``index/graph`` keeps, per node, the facts that never change once
a node is published (parent, layer, the size of its own layer, created) and the size of
its whole chain, in one msgpack file::

    {"version": 2, "stamp": [ino, mtime_ns, ctime_ns, nlink] or None,
     "leaves": {"<id>": [parent, layer or "", size, created, inode, chain size]},
     "inner": <the same map for the other nodes, packed again: bytes>}

Leaves are the nodes no node names as parent: the heads of chains, the images that
``images`` lists even when they have no name. The rows of the others are unpacked only
when a question needs them, so ``images`` on a store of 1,000 images of 10 layers
unpacks 1,000 rows, not 10,000.

It is a cache, never the truth. A read lists ``graph/`` (one directory read, which also
gives each node directory's inode number), keeps the cached rows whose ID and inode still
match, loads the nodes it has no row for and leaves out rows of nodes that are gone; no
writer of the graph has to keep it up to date. A node deleted and registered again under
the same ID with other content (a legacy v1 ID) may get the same inode back, so a delete
also appends the ID to ``index/graph.deleted`` (fsync), and rows of IDs listed there are
not trusted. A reader that learned something rewrites the cache (fsync, rename) and then
removes ``graph.deleted``, both under the store lock, which it only takes when it is
free; otherwise it answers and leaves the rewrite to a later read. So a missing, stale
or damaged cache costs time, never a wrong answer. ``fsck`` compares the cache with the
nodes; ``fsck --repair`` writes it anew.

The listing of ``graph/`` is skipped when the cache's ``stamp`` (``graph/``'s inode,
modification and change times and link count, as the rewrite saw them before and after
it listed the directory) is what ``graph/`` shows now: a node is published by a rename
into ``graph/`` and deleted by a rename out of it, and either changes those times. As git
does with its index, a stamp is not recorded when ``graph/`` changed less than
:data:`RACY_NS` (50 ms; two seconds on a file system with whole-second times) before it
was taken, since a second change within one tick of the file system's clock could leave
the times as they were; nor is one of a graph with unreadable nodes (those are tried
again on every read).
On a store of 10,000 nodes this is what lets ``images`` read one file and nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, KeysView
from pathlib import Path
from typing import Any, NamedTuple

from layerfs.errors import IntegrityError, LayerfsError, StoreLockedError
from layerfs.model.digest import is_image_id
from layerfs.store import codec
from layerfs.store.files import atomic_write, locked

CACHE_VERSION = 2
# A stamp is recorded only when graph/ last changed this long before it was taken: more
# than a clock tick of the file system's timestamps (see the docstring), or two seconds
# where they are whole seconds.
RACY_NS = 50_000_000
COARSE_RACY_NS = 2_000_000_000


def _log(message: str, *args: object) -> None:
    import logging  # logging and what it imports are not on every command's way

    logging.getLogger(__name__).debug(message, *args)


def racy_margin(ctime_ns: int) -> int:
    """How long after its last change a stamp of graph/ can be trusted (see the docstring)."""
    return COARSE_RACY_NS if ctime_ns % 1_000_000_000 == 0 else RACY_NS


class NodeSummary(NamedTuple):
    """The facts of a graph node that listings need; they never change for a node."""

    id: str
    parent: str  # "" for a base image
    layer: str | None  # diff ID of the node's own layer
    size: int  # bytes of file content in that layer
    created: str  # RFC 3339, as in the node's JSON ("" when absent)


Loader = Callable[[str], "NodeSummary | None"]


def chain_sizes(images: dict[str, NodeSummary]) -> dict[str, int]:
    """Image ID → the size of its whole chain (its layer plus every parent's)."""
    sizes: dict[str, int] = {}
    for image_id in images:
        chain: list[str] = []
        current: str | None = image_id
        while current and current not in sizes and current in images and current not in chain:
            chain.append(current)
            current = images[current].parent or None
        total = sizes.get(current, 0) if current else 0
        for node in reversed(chain):
            total += images[node].size
            sizes[node] = total
    return sizes


class NodeIndex:
    """Nodes by parent and by layer, kept up to date as nodes come and go (a transaction's
    questions about children and layer users, without a pass over every node each)."""

    def __init__(self, nodes: Iterable[NodeSummary]) -> None:
        self.children: dict[str, set[str]] = {}
        self.users: dict[str, set[str]] = {}  # diff ID → the nodes naming it as their layer
        for node in nodes:
            self.add(node)

    def add(self, node: NodeSummary) -> None:
        if node.parent:
            self.children.setdefault(node.parent, set()).add(node.id)
        if node.layer:
            self.users.setdefault(node.layer, set()).add(node.id)

    def remove(self, node: NodeSummary) -> None:
        self.children.get(node.parent, set()).discard(node.id)
        self.users.get(node.layer or "", set()).discard(node.id)


Rows = dict[str, list[Any]]  # ID → [parent, layer or "", size, created, inode, chain size]


def _summary(image_id: str, row: list[Any]) -> NodeSummary:
    return NodeSummary(image_id, row[0], row[1] or None, row[2], row[3])


class GraphView:
    """Every readable node of one state of ``graph/``: its summary, its chain's size and
    whether it is a leaf (no node's parent). The rows of the nodes that are not leaves are
    asked for (``inner``) only when a question needs them; summaries are made one by one."""

    def __init__(self, leaves: Rows, inner: Rows | Callable[[], Rows]) -> None:
        self._leaves = leaves
        self._inner = inner

    @classmethod
    def of(
        cls, summaries: dict[str, NodeSummary], inodes: dict[str, int] | None = None
    ) -> GraphView:
        """The view of ``summaries``; ``inodes``: each node directory's, for the cache."""
        sizes = chain_sizes(summaries)
        parents = {s.parent for s in summaries.values()}
        leaves: Rows = {}
        inner: Rows = {}
        for i, s in summaries.items():
            inode = inodes[i] if inodes is not None else 0
            row = [s.parent, s.layer or "", s.size, s.created, inode, sizes[i]]
            (inner if i in parents else leaves)[i] = row
        return cls(leaves, inner)

    @property
    def leaves(self) -> KeysView[str]:
        return self._leaves.keys()

    def _inner_rows(self) -> Rows:
        if callable(self._inner):
            self._inner = self._inner()
        return self._inner

    def _row(self, image_id: str) -> list[Any]:
        row = self._leaves.get(image_id)
        return row if row is not None else self._inner_rows()[image_id]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._leaves or image_id in self._inner_rows()

    def __iter__(self) -> Iterator[str]:
        yield from self._leaves
        yield from self._inner_rows()

    def __len__(self) -> int:
        return len(self._leaves) + len(self._inner_rows())

    def summary(self, image_id: str) -> NodeSummary:
        return _summary(image_id, self._row(image_id))

    def chain_size(self, image_id: str) -> int:
        return int(self._row(image_id)[5])

    def is_parent(self, image_id: str) -> bool:
        return image_id not in self._leaves and image_id in self._inner_rows()


def _checked_rows(rows: object) -> Rows:
    if not isinstance(rows, dict) or not all(
        type(row) is list and len(row) == 6 for row in rows.values()
    ):
        raise IntegrityError("rows are no map of lists of 6")
    return rows


class SummaryCache:
    """``index/graph``: the summary of every node, checked against a listing of ``graph/``
    unless its stamp says ``graph/`` is as it was when the cache was written."""

    def __init__(
        self, path: Path, graph_root: Path, tmp_root: Path, lock_path: Path, load: Loader
    ) -> None:
        self.path = path
        self.deleted_path = path.with_name(path.name + ".deleted")
        self.graph_root = graph_root
        self.tmp_root = tmp_root
        self.lock_path = lock_path
        self._load = load  # a node's summary from its files; None when it cannot be read
        self._memo: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        self.unreadable: set[str] = set()  # nodes the last read could not summarise

    def _node_inodes(self) -> dict[str, int]:
        try:
            with os.scandir(self.graph_root) as entries:
                return {e.name: e.inode() for e in entries if is_image_id(e.name)}
        except FileNotFoundError:
            return {}

    def _stamp(self) -> list[int] | None:
        """``graph/``'s inode, modification and change times and link count; None if absent."""
        try:
            st = os.stat(self.graph_root)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return [st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink]

    def _doc(self) -> dict[str, Any] | None:
        """The cache file's document, its leaves checked; None when absent or unusable."""
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        try:
            doc = codec.unpack(self.path.read_bytes(), what=f"graph summaries {self.path}")
            if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
                raise IntegrityError("unknown version")
            _checked_rows(doc.get("leaves"))
            if not isinstance(doc.get("inner"), bytes):
                raise IntegrityError("no inner rows")
        except (OSError, LayerfsError) as exc:
            _log("ignoring the graph summaries %s: %s", self.path, exc)
            return None
        self._memo = (key, doc)
        return doc

    def _inner(self, doc: dict[str, Any]) -> Rows | None:
        """The rows of the nodes that are not leaves; None when they cannot be read."""
        if "inner rows" not in doc:  # unpacked once per version of the file
            try:
                inner = codec.unpack(doc["inner"], what=f"graph summaries {self.path}")
                doc["inner rows"] = _checked_rows(inner)
            except LayerfsError as exc:
                _log("ignoring the graph summaries %s: %s", self.path, exc)
                doc["inner rows"] = None
        rows: Rows | None = doc["inner rows"]
        return rows

    def _rows(self, doc: dict[str, Any] | None) -> Rows:
        """Every row of the cache document ``doc``; {} when there is no usable cache."""
        inner = self._inner(doc) if doc is not None else None
        if doc is None or inner is None:
            return {}
        return {**doc["leaves"], **inner}

    def _current(self) -> dict[str, Any] | None:
        """The cached document if its stamp says ``graph/`` has not changed since."""
        doc = self._doc()
        if doc is None:
            return None
        stamp = doc.get("stamp")
        if not stamp or stamp != self._stamp() or self.deleted_path.exists():
            return None
        return doc

    def _deleted(self) -> set[str]:
        try:
            return set(self.deleted_path.read_text().split())
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def forget(self, image_id: str) -> None:
        """A node is being deleted (store lock held): its row may no longer be trusted."""
        doc = self._doc()
        if doc is None:
            return  # no row to distrust
        if image_id not in doc["leaves"] and image_id not in (self._inner(doc) or {}):
            return
        fd = os.open(self.deleted_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{image_id}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> dict[str, NodeSummary]:
        """The summary of every node whose files can be read, keyed by image ID."""
        doc = self._current()
        inner = self._inner(doc) if doc is not None else None
        if doc is None or inner is None:
            return self._read_locked()[0]
        self.unreadable = set()
        return {i: _summary(i, r) for rows in (doc["leaves"], inner) for i, r in rows.items()}

    def view(self) -> GraphView:
        """Every node as a :class:`GraphView`; from the cache alone when its stamp holds."""
        doc = self._current()
        if doc is None:
            return self._full_view()
        self.unreadable = set()

        def inner() -> Rows:
            rows = self._inner(doc)
            if rows is None:  # damaged: what a full read says (and rewrites)
                full = self._full_view()
                rows = {i: full._row(i) for i in full if i not in doc["leaves"]}
            return rows

        return GraphView(doc["leaves"], inner)

    def _full_view(self) -> GraphView:
        """The view of a read that lists graph/: the one it wrote, else made from it."""
        result, written = self._read_locked()
        return written if written is not None else GraphView.of(result)

    def _read_locked(self) -> tuple[dict[str, NodeSummary], GraphView | None]:
        try:
            with locked(self.lock_path, timeout_message="busy"):
                return self._read(rewrite=True)
        except StoreLockedError:
            return self._read(rewrite=False)  # another process changes the store: no rewrite
        except OSError as exc:  # a store this process cannot lock (read-only)
            _log("reading the graph summaries without the store lock: %s", exc)
            return self._read(rewrite=False)

    def _read(self, *, rewrite: bool) -> tuple[dict[str, NodeSummary], GraphView | None]:
        """Every readable node (listing graph/), and the view it wrote the cache from if
        it wrote it (None otherwise)."""
        started = time.time_ns()
        stamp = self._stamp()
        inodes = self._node_inodes()
        doc = self._doc()
        rows = self._rows(doc)
        deleted = self._deleted()
        result: dict[str, NodeSummary] = {}
        learned = False
        self.unreadable = set()
        for image_id, inode in inodes.items():
            row = rows.get(image_id)
            if row is not None and row[4] == inode and image_id not in deleted:
                result[image_id] = _summary(image_id, row)
                continue
            summary = self._load(image_id)
            if summary is None:
                self.unreadable.add(image_id)  # left out, as Graph.map() leaves it out
                continue
            result[image_id] = summary
            learned = True
        if not rewrite:
            return result, None
        if stamp is not None and (
            stamp != self._stamp()  # graph/ changed while it was read
            or started - stamp[2] < racy_margin(stamp[2])
            or self.unreadable
        ):
            stamp = None
        cached_stamp = doc.get("stamp") if doc is not None else None
        if not (learned or deleted or len(rows) != len(result) or cached_stamp != stamp):
            return result, None
        view = GraphView.of(result, inodes)
        if self._write(view._leaves, view._inner_rows(), stamp):
            self.deleted_path.unlink(missing_ok=True)
        return result, view

    def _write(self, leaves: Rows, inner: Rows, stamp: list[int] | None) -> bool:
        doc = {
            "version": CACHE_VERSION,
            "stamp": stamp,
            "leaves": leaves,
            "inner": codec.pack(inner),
        }
        data = codec.pack(doc)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(self.path, data, self.tmp_root, 0o600)
        except (OSError, LayerfsError) as exc:  # a cache that cannot be written is only slower
            _log("cannot write the graph summaries %s: %s", self.path, exc)
            return False
        return True

    def check(self, load: Loader) -> list[str]:
        """Rows that disagree with their node (fsck); rows of nodes that are gone are fine."""
        inodes = self._node_inodes()
        deleted = self._deleted()
        rows = self._rows(self._doc())
        lines = []
        for image_id, row in sorted(rows.items()):
            if image_id not in inodes or row[4] != inodes[image_id]:
                continue  # not used: the next read drops or replaces it
            if image_id in deleted:
                continue
            summary = load(image_id)
            cached = _summary(image_id, row)
            if summary is not None and summary != cached:
                lines.append(f"graph summary of image {image_id[:12]} disagrees with its node")
        doc = self._current()
        if doc is not None:  # trusted without a listing of graph/: it must be all of graph/
            cached_view = GraphView.of({i: _summary(i, r) for i, r in rows.items()})
            if (
                set(rows) != set(inodes)
                or set(doc["leaves"]) != set(cached_view.leaves)
                or any(row[5] != cached_view.chain_size(i) for i, row in rows.items())
            ):
                lines.append(
                    "graph summary cache disagrees with graph/ (its nodes, leaves or chain sizes)"
                )
        return lines

    def rebuild(self) -> None:
        """Forget every row and summarise every node again (fsck --repair, lock held)."""
        self.path.unlink(missing_ok=True)
        self._memo = None
        self._read(rewrite=True)
