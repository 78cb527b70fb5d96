"""The store: one directory shared by every layerfs tool, and how to find it.

```
<root>/layerfs-store.json   {"version": 1}: the layout version
<root>/lock                 flock taken while metadata changes (short sections)
<root>/tmp/                 staging: everything is written here first, then renamed
<root>/layers/<hex>/        layer.tar, index, info.json (see layers.py)
<root>/graph/<id>/          json, parent, layer, layersize, checksum, v1Compatibility
<root>/holds/<hex>          hold files: shared flocks of retain()
<root>/owners/<owner>       one per process staging in tmp/: an flock held while it lives
<root>/journal/<cmd>-<owner>-<random>.json  pending records (see journal.py)
<root>/repositories.json    the TagStore, in Docker's legacy format
<root>/index/               lookups that would otherwise read every layer or node:
                            blobs/<hex> (blob digest → diff ID), graph (node summaries)
<root>/downloads/<hex>      download locks: one process fetches a blob, the others wait
<root>/mounts/ upper/ logs/ live mounts, writable upper directories, server logs
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from layerfs.errors import LayerfsError, StoreError
from layerfs.store.downloads import DownloadLocks
from layerfs.store.files import atomic_write, locked, set_lock_hook, sweep_stale
from layerfs.store.graph import Graph
from layerfs.store.journal import Journal
from layerfs.store.layers import LayerStore
from layerfs.store.tags import TagStore


def _log(level: str, message: str, *args: object) -> None:
    import logging  # not on every command's way: only when there is something to say

    getattr(logging.getLogger(__name__), level)(message, *args)


STORE_VERSION = 1
_MARKER = "layerfs-store.json"
# Written once the indexes under index/ are complete; a store made before they existed
# gets them built by the first command that opens it.
INDEX_VERSION = 1
_INDEX_MARKER = "version"

_CLEANUP_FAILED = "cannot clean up after an interrupted command in %s: %s"
_SUBDIRS = ("tmp", "layers", "graph", "holds", "owners", "journal")


UID_MAP = Path("/proc/self/uid_map")


def in_user_namespace() -> bool:
    """True inside a user namespace (``unshare --map-root-user``): its root is a user."""
    try:
        return UID_MAP.read_text().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def default_root() -> Path:
    """``LAYERFS_ROOT``, else /var/lib/layerfs for root, else the XDG data directory.

    The root of a user namespace is the user who made it: it gets the user's store.
    """
    env = os.environ.get("LAYERFS_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0 and not in_user_namespace():
        return Path("/var/lib/layerfs")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "layerfs"


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.tmp = self.root / "tmp"
        self.lock_path = self.root / "lock"
        self.index = self.root / "index"
        self.layers = LayerStore(self.root / "layers", self.tmp, self.index / "blobs")
        self.graph = Graph(
            self.root / "graph",
            self.layers,
            self.tmp,
            self.lock_path,
            self.root / "holds",
            self.index / "graph",
        )
        self.tags = TagStore(self.root / "repositories.json", self.graph, self.tmp, self.lock_path)
        self.downloads = DownloadLocks(self.root / "downloads", self.layers)
        self.journal = Journal(self)
        set_lock_hook(self.lock_path, self._on_lock)

    def _on_lock(self) -> None:
        """Taking the store lock: settle dead commands' records, sweep dead staging."""
        try:
            self.journal.recover()
            for name in sweep_stale(self.tmp):
                _log("debug", "removed %s of a process that is gone", name)
        except (OSError, LayerfsError) as exc:
            _log(
                "warning", "cannot clean up after an interrupted command in %s: %s", self.root, exc
            )

    def recover(self) -> None:
        """Settle what dead processes left pending, if anything (takes the lock only then)."""
        try:
            if self.journal.has_dead_records():
                with locked(self.lock_path):
                    pass  # the lock hook does the work
        except (OSError, LayerfsError) as exc:
            _log(
                "warning", "cannot clean up after an interrupted command in %s: %s", self.root, exc
            )

    @classmethod
    def open(cls, root: Path | None = None, *, create: bool = True) -> Store:
        store = cls(root if root is not None else default_root())
        store._prepare(create)
        store.recover()
        return store

    def _prepare(self, create: bool) -> None:
        marker = self.root / _MARKER
        try:
            exists = marker.is_file()
        except OSError as exc:  # e.g. a parent directory this user may not enter
            raise StoreError(
                f"cannot use the store at {self.root}: {exc.strerror}",
                hint="use --root DIR or LAYERFS_ROOT to choose a directory you can write",
            ) from exc
        if exists:
            _make_private(self.root)
            try:
                version = json.loads(marker.read_bytes()).get("version")
            except (ValueError, AttributeError, OSError) as exc:
                raise StoreError(f"store {self.root}: unreadable {_MARKER}: {exc}") from exc
            if version != STORE_VERSION:
                raise StoreError(
                    f"store {self.root} has layout version {version!r}; this layerfs "
                    f"reads version {STORE_VERSION}"
                )
            if not (self.index / _INDEX_MARKER).is_file():
                self._build_indexes()
            return
        if not create:
            raise StoreError(f"no layerfs store at {self.root}")
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _make_private(self.root)
            for sub in _SUBDIRS:
                (self.root / sub).mkdir(mode=0o700, exist_ok=True)
            if any(p.name not in (*_SUBDIRS, "lock", "index") for p in self.root.iterdir()):
                raise StoreError(f"{self.root} is not empty and is not a layerfs store")
            (self.root / "index").mkdir(mode=0o700, exist_ok=True)
            self._write_index_marker()
            atomic_write(marker, json.dumps({"version": STORE_VERSION}).encode(), self.tmp)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store at {self.root}: {exc.strerror}",
                hint="use --root DIR or LAYERFS_ROOT to choose a directory you can write",
            ) from exc

    def _write_index_marker(self) -> None:
        data = json.dumps({"version": INDEX_VERSION}).encode()
        atomic_write(self.index / _INDEX_MARKER, data, self.tmp)

    def _build_indexes(self) -> None:
        """Index a store written before the indexes existed (once, under the store lock)."""
        try:
            with locked(self.lock_path):
                if (self.index / _INDEX_MARKER).is_file():
                    return
                self.index.mkdir(mode=0o700, exist_ok=True)
                self.layers.rebuild_blob_index()
                self._write_index_marker()
        except (OSError, LayerfsError) as exc:  # lookups still work, only slower or missing
            _log("warning", "cannot build the indexes of %s: %s", self.root, exc)

    def rebuild_indexes(self, *, summaries: bool) -> list[str]:
        """``fsck --repair``: the blob index set right, the graph summaries (if asked) anew.

        Returns what changed, one line each (store lock held).
        """
        self.index.mkdir(mode=0o700, exist_ok=True)
        removed, added = self.layers.rebuild_blob_index()
        if summaries:
            self.graph.rebuild_summaries()
        self._write_index_marker()
        return [
            *(f"removed the blob index entry of {d}: no layer lists it" for d in removed),
            *(f"indexed {d} in the blob index" for d in added),
            *(["wrote the graph summaries anew"] if summaries else []),
        ]

    def subdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path


def _make_private(root: Path) -> None:
    """The store's root is its owner's alone (0700); older stores were made 0711.

    Only the owner's own store is tightened, and only ever tightened: a store
    someone else owns is theirs to set, and this process cannot chmod it anyway.
    """
    try:
        st = root.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(root, st.st_mode & 0o700)
    except OSError:
        pass  # a read-only medium: the modes it has are the ones it keeps
