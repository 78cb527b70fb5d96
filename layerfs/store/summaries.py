"""Node summaries: what listings need of every graph node, without opening every node.

``images``, the children of a node, the heads of chains and "is this layer used" are
questions about all nodes at once. Reading ``graph/<id>/json`` of 10,000 nodes for each
of them costs a second; ``index/graph`` keeps, per node, the facts that never change once
a node is published (parent, layer, the size of its own layer, created) in one msgpack
file::

    {"version": 1, "nodes": {"<id>": [parent, layer or "", size, created, inode]}}

It is a cache, never the truth. Every read lists ``graph/`` (one directory read, which
also gives each node directory's inode number), keeps the cached rows whose ID and inode
still match, loads the nodes it has no row for and leaves out rows of nodes that are
gone; no writer of the graph has to keep it up to date. A node deleted and registered
again under the same ID with other content (a legacy v1 ID) may get the same inode
back, so a delete also appends the ID to ``index/graph.deleted`` (fsync), and rows of
IDs listed there are not trusted. A reader that learned something rewrites the cache
(fsync, rename) and then removes ``graph.deleted``, both under the store lock, which it
only takes when it is free; otherwise it answers and leaves the rewrite to a later read.
So a missing, stale or damaged cache costs time, never a wrong answer. ``fsck``
compares the cache with the nodes; ``fsck --repair`` writes it anew.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from layerfs.errors import IntegrityError, LayerfsError, StoreLockedError
from layerfs.model.digest import is_image_id
from layerfs.store import codec
from layerfs.store.files import atomic_write, locked

CACHE_VERSION = 1


def _log(message: str, *args: object) -> None:
    import logging  # logging and what it imports are not on every command's way

    logging.getLogger(__name__).debug(message, *args)


class NodeSummary(NamedTuple):
    """The facts of a graph node that listings need; they never change for a node."""

    id: str
    parent: str  # "" for a base image
    layer: str | None  # diff ID of the node's own layer
    size: int  # bytes of file content in that layer
    created: str  # RFC 3339, as in the node's JSON ("" when absent)


Loader = Callable[[str], "NodeSummary | None"]


class SummaryCache:
    """``index/graph``: the summary of every node, checked against ``graph/`` on each read."""

    def __init__(
        self, path: Path, graph_root: Path, tmp_root: Path, lock_path: Path, load: Loader
    ) -> None:
        self.path = path
        self.deleted_path = path.with_name(path.name + ".deleted")
        self.graph_root = graph_root
        self.tmp_root = tmp_root
        self.lock_path = lock_path
        self._load = load  # a node's summary from its files; None when it cannot be read
        self._memo: tuple[tuple[int, int, int], dict[str, list[Any]]] | None = None
        self.unreadable: set[str] = set()  # nodes the last read could not summarise

    def _node_inodes(self) -> dict[str, int]:
        try:
            with os.scandir(self.graph_root) as entries:
                return {e.name: e.inode() for e in entries if is_image_id(e.name)}
        except FileNotFoundError:
            return {}

    def _rows(self) -> dict[str, list[Any]]:
        """The cached rows (ID → [parent, layer, size, created, inode]); {} if unusable."""
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        try:
            doc = codec.unpack(self.path.read_bytes(), what=f"graph summaries {self.path}")
            if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
                raise IntegrityError("unknown version")
            rows = doc["nodes"]
            if not isinstance(rows, dict):
                raise IntegrityError("no nodes")
        except (OSError, LayerfsError, KeyError) as exc:
            _log("ignoring the graph summaries %s: %s", self.path, exc)
            return {}
        self._memo = (key, rows)
        return rows

    def _deleted(self) -> set[str]:
        try:
            return set(self.deleted_path.read_text().split())
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def forget(self, image_id: str) -> None:
        """A node is being deleted (store lock held): its row may no longer be trusted."""
        if image_id not in self._rows():
            return  # no row to distrust
        fd = os.open(self.deleted_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{image_id}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> dict[str, NodeSummary]:
        """The summary of every node whose files can be read, keyed by image ID."""
        try:
            with locked(self.lock_path, timeout_message="busy"):
                return self._read(rewrite=True)
        except StoreLockedError:
            return self._read(rewrite=False)  # another process changes the store: no rewrite
        except OSError as exc:  # a store this process cannot lock (read-only)
            _log("reading the graph summaries without the store lock: %s", exc)
            return self._read(rewrite=False)

    def _read(self, *, rewrite: bool) -> dict[str, NodeSummary]:
        inodes = self._node_inodes()
        rows = self._rows()
        deleted = self._deleted()
        result: dict[str, NodeSummary] = {}
        learned: dict[str, list[Any]] = {}
        self.unreadable = set()
        for image_id, inode in inodes.items():
            row = rows.get(image_id)
            if row is not None and len(row) == 5 and row[4] == inode and image_id not in deleted:
                result[image_id] = NodeSummary(image_id, row[0], row[1] or None, row[2], row[3])
                continue
            summary = self._load(image_id)
            if summary is None:
                self.unreadable.add(image_id)  # left out, as Graph.map() leaves it out
                continue
            result[image_id] = summary
            learned[image_id] = [
                summary.parent,
                summary.layer or "",
                summary.size,
                summary.created,
                inode,
            ]
        if rewrite and (learned or deleted or len(rows) != len(result)):
            kept = {i: r for i, r in rows.items() if i in result and i not in learned}
            if self._write({**kept, **learned}):
                self.deleted_path.unlink(missing_ok=True)
        return result

    def _write(self, rows: dict[str, list[Any]]) -> bool:
        data = codec.pack({"version": CACHE_VERSION, "nodes": rows})
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
        lines = []
        for image_id, row in sorted(self._rows().items()):
            if image_id not in inodes or len(row) != 5 or row[4] != inodes[image_id]:
                continue  # not used: the next read drops or replaces it
            if image_id in deleted:
                continue
            summary = load(image_id)
            cached = NodeSummary(image_id, row[0], row[1] or None, row[2], row[3])
            if summary is not None and summary != cached:
                lines.append(f"graph summary of image {image_id[:12]} disagrees with its node")
        return lines

    def rebuild(self) -> None:
        """Forget every row and summarise every node again (fsck --repair, lock held)."""
        self.path.unlink(missing_ok=True)
        self._memo = None
        self._read(rewrite=True)
