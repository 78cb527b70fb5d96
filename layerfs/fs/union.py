"""The merged view of a stack of layers: whiteouts, opaque dirs, hardlinks, init layer.

Layers are applied base first, the way Docker extracts them: a layer's
whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) remove entries
of the layers below it, never its own; a directory over a directory merges,
anything else replaces. The result is a flat dictionary from path to node, so
a lookup costs the same whatever layer a file came from.

This module knows nothing of pyfuse3: the mount, ``export`` and the tests all
use it directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from layerfs.store.initlayer import INIT_ENTRIES, INIT_PARENT_MODE, init_parents
from layerfs.store.tarindex import DIR, HARDLINK, OPAQUE_MARKER, REG, SYMLINK, Entry

WHITEOUT = b".wh."
AUFS_META = b".wh..wh."
INIT_LAYER = -1
"""Layer number of nodes that come from the init layer (they have no tar data)."""


@dataclass(slots=True)
class Node:
    """One path of the merged tree."""

    entry: Entry  # metadata; for a hardlink, the target's metadata and data offset
    layer: int  # index into the stack (base = 0), INIT_LAYER, or -2 for an implied dir
    link_key: tuple[int, bytes] | None = None  # (layer, first path) shared by a hardlink group
    children: dict[bytes, None] | None = field(default=None)  # ordered names, for directories


IMPLIED = -2


def is_whiteout(name: bytes) -> bool:
    return name.startswith(WHITEOUT) and not name.startswith(AUFS_META)


def _split(path: bytes) -> tuple[bytes, bytes]:
    slash = path.rfind(b"/")
    if slash < 0:
        return b"", path
    return path[:slash], path[slash + 1 :]


def _implied_dir(path: bytes, mtime_ns: int = 0) -> Entry:
    return Entry(path=path, type=DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=mtime_ns, offset=0)


class MergedTree:
    """Path → :class:`Node` for a whole image, with directory listings in order."""

    def __init__(self) -> None:
        root = Node(_implied_dir(b""), IMPLIED, children={})
        self.nodes: dict[bytes, Node] = {b"": root}

    # -- building ---------------------------------------------------------------

    @classmethod
    def build(cls, layers: Sequence[Sequence[Entry]], *, init: bool = False) -> MergedTree:
        tree = cls()
        for number, entries in enumerate(layers):
            tree.apply_layer(number, entries)
        if init:
            tree.apply_init_layer()
        return tree

    def _remove(self, path: bytes) -> None:
        """Drop ``path`` and everything below it."""
        node = self.nodes.pop(path, None)
        if node is None:
            return
        parent, name = _split(path)
        parent_node = self.nodes.get(parent)
        if parent_node is not None and parent_node.children is not None:
            parent_node.children.pop(name, None)
        stack = [(path, node)]
        while stack:
            current, current_node = stack.pop()
            for child in current_node.children or ():
                child_path = current + b"/" + child if current else child
                child_node = self.nodes.pop(child_path, None)
                if child_node is not None:
                    stack.append((child_path, child_node))

    def _clear_children(self, path: bytes) -> None:
        node = self.nodes.get(path)
        if node is None or node.children is None:
            return
        for name in list(node.children):
            self._remove(path + b"/" + name if path else name)

    def _ensure_dir(self, path: bytes, layer: int) -> Node:
        """The directory at ``path``, creating implied parents (and replacing non-dirs)."""
        node = self.nodes.get(path)
        if node is not None and node.children is not None:
            return node
        if node is not None:
            self._remove(path)
        parent, name = _split(path)
        parent_node = self._ensure_dir(parent, layer)
        node = Node(_implied_dir(path), IMPLIED, children={})
        self.nodes[path] = node
        assert parent_node.children is not None
        parent_node.children[name] = None
        return node

    def _put(self, path: bytes, node: Node) -> None:
        existing = self.nodes.get(path)
        if existing is not None and existing.children is not None and node.entry.type == DIR:
            existing.entry = node.entry  # dir over dir: merge, new metadata
            existing.layer = node.layer
            return
        if existing is not None:
            self._remove(path)
        if path == b"":
            return
        parent, name = _split(path)
        parent_node = self._ensure_dir(parent, node.layer)
        if node.entry.type == DIR:
            node.children = {}
        self.nodes[path] = node
        assert parent_node.children is not None
        parent_node.children[name] = None

    def apply_layer(self, number: int, entries: Sequence[Entry]) -> None:
        # Whiteouts and opaque markers act on the layers below, whatever their position.
        for entry in entries:
            parent, name = _split(entry.path)
            if name == OPAQUE_MARKER:
                self._clear_children(parent)
            elif is_whiteout(name):
                hidden = name[len(WHITEOUT) :]
                self._remove(parent + b"/" + hidden if parent else hidden)
        by_path: dict[bytes, Entry] = {}
        for entry in entries:
            parent, name = _split(entry.path)
            if name.startswith(WHITEOUT):
                continue  # whiteouts, opaque markers and AUFS metadata are never visible
            if parent.split(b"/")[0] == AUFS_META + b"plnk":
                continue
            if entry.path == b"":
                root = self.nodes[b""]
                root.entry = entry
                root.layer = number
                continue
            node = Node(entry, number)
            if entry.type == HARDLINK:
                target = by_path.get(entry.linkname)
                if target is None:
                    continue  # the tar indexer guarantees an earlier target; be safe
                first = target.linkname if target.type == HARDLINK else target.path
                data = by_path.get(first, target)
                node = Node(
                    Entry(
                        path=entry.path,
                        type=data.type,
                        mode=data.mode,
                        uid=data.uid,
                        gid=data.gid,
                        size=data.size,
                        mtime_ns=data.mtime_ns,
                        offset=data.offset,
                        linkname=data.linkname,
                        devmajor=data.devmajor,
                        devminor=data.devminor,
                        xattrs=data.xattrs,
                    ),
                    number,
                    link_key=(number, first),
                )
                target_node = self.nodes.get(first)
                if (
                    target_node is not None
                    and target_node.layer == number
                    and target_node.link_key is None
                ):
                    target_node.link_key = (number, first)
            by_path[entry.path] = entry
            self._put(entry.path, node)

    def apply_init_layer(self) -> None:
        for parent in init_parents():
            node = self.nodes.get(parent.encode())
            if node is None or node.children is None:
                self._put(
                    parent.encode(),
                    Node(
                        Entry(
                            path=parent.encode(),
                            type=DIR,
                            mode=INIT_PARENT_MODE,
                            uid=0,
                            gid=0,
                            size=0,
                            mtime_ns=0,
                            offset=0,
                        ),
                        INIT_LAYER,
                    ),
                )
        for init in INIT_ENTRIES:
            path = init.path.encode()
            existing = self.nodes.get(path)
            if init.type == "d" and existing is not None and existing.children is not None:
                continue  # existing directories are left untouched
            kind = {"d": DIR, "f": REG, "l": SYMLINK}[init.type]
            self._put(
                path,
                Node(
                    Entry(
                        path=path,
                        type=kind,
                        mode=init.mode,
                        uid=0,
                        gid=0,
                        size=0,
                        mtime_ns=0,
                        offset=0,
                        linkname=init.target.encode(),
                    ),
                    INIT_LAYER,
                ),
            )

    # -- reading ----------------------------------------------------------------

    def lookup(self, path: bytes) -> Node | None:
        return self.nodes.get(path)

    def listdir(self, path: bytes) -> list[bytes]:
        node = self.nodes.get(path)
        if node is None or node.children is None:
            return []
        return list(node.children)

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """Every path, parents before children, siblings in sorted order."""
        stack = [b""]
        while stack:
            path = stack.pop()
            node = self.nodes[path]
            yield path, node
            if node.children:
                names = sorted(node.children, reverse=True)
                stack.extend(path + b"/" + n if path else n for n in names)

    def link_counts(self) -> dict[tuple[int, bytes], int]:
        counts: dict[tuple[int, bytes], int] = {}
        for node in self.nodes.values():
            if node.link_key is not None:
                counts[node.link_key] = counts.get(node.link_key, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self.nodes)
