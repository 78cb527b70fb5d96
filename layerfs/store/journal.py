"""Pending records: one command's change to the store, all of it or none of it.

A command changes several things that no single rename can publish at once: an
import adds a layer, an image node and a tag; an rmi removes tags, nodes and
layers. Before the first of those changes, under the store lock, the command
writes a *pending record* to ``<root>/journal/`` (fsynced, renamed into place)
naming everything it will add or remove; it removes the record when the last
change is made. The store lock is held from the record's writing to its
removal, so whoever takes the lock next and finds a record knows its writer is
gone (or failed and could not clean up), and settles it before doing anything
else:

* a ``create`` record (import, load, pull, commit) is *completed* when all it
  names is visible: every image exists and every tag points at its image; the
  tag file is the last thing written, in one rename, so that means the command
  got through. Otherwise it is *discarded*: the images and layers it names that
  exist are removed (they did not exist when the record was written), and no
  tag of it was written.
* a ``remove`` record (fsck --repair) is *finished*: the tags it names that
  still point at their image are removed, then its images and the layers no
  image uses any more.
* an ``undo`` record (rmi, whose docker rules decide step by step what goes) holds
  the tag file as it was, and the nodes and layers the command removes are moved
  into ``<record>.d/`` beside it instead of being deleted. Found pending, it is
  *undone*: the tag file is put back and so is everything in ``.d/``. Once the
  command is done the record goes first, then ``.d/``.

This module knows the record format and how to settle one; the graph, tags and
layers do the work. ``docs/store-format.md`` describes the format.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfs.errors import IntegrityError
from layerfs.store.faults import fault
from layerfs.store.files import (
    atomic_write,
    fsync_dir,
    keeping_removed,
    owner_alive,
    owner_name,
    owner_of,
    remove_tree,
    trash,
)

if TYPE_CHECKING:
    from layerfs.store.store import Store


def _log(level: str, message: str, *args: object, **kw: object) -> None:
    import logging  # every command opens the journal; few have something to say

    getattr(logging.getLogger(__name__), level)(message, *args, **kw)


RECORD_VERSION = 1
CREATE = "create"
REMOVE = "remove"
UNDO = "undo"


@dataclass
class Record:
    """What one command adds (``create``) or removes (``remove``)."""

    command: str
    kind: str
    images: list[str] = field(default_factory=list)  # create: base first; remove: top first
    layers: list[str] = field(default_factory=list)  # diff IDs
    tags: list[tuple[str, str, str]] = field(default_factory=list)  # (repo, tag or digest, id)

    def to_json(self, owner: str) -> bytes:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "command": self.command,
                "kind": self.kind,
                "owner": owner,
                "images": self.images,
                "layers": self.layers,
                "tags": [list(t) for t in self.tags],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> tuple[Record, str]:
        try:
            doc: Any = json.loads(data)
            if doc.get("version") != RECORD_VERSION or doc["kind"] not in (CREATE, REMOVE):
                raise ValueError(f"unknown version or kind: {doc.get('version')!r}")
            record = cls(
                str(doc["command"]),
                doc["kind"],
                [str(i) for i in doc["images"]],
                [str(d) for d in doc["layers"]],
                [(str(r), str(t), str(i)) for r, t, i in doc["tags"]],
            )
            return record, str(doc.get("owner", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"unreadable pending record {where}: {exc}") from exc


class Journal:
    """The pending records of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root / "journal"

    def _paths(self) -> list[Path]:
        try:
            return sorted(self.root / n for n in os.listdir(self.root) if n.endswith(".json"))
        except (FileNotFoundError, PermissionError):  # no store yet, or not this user's
            return []

    def _kept_without_record(self) -> list[Path]:
        try:
            names = os.listdir(self.root)
        except (FileNotFoundError, PermissionError):
            return []
        return [self.root / n for n in names if n.endswith(".d") and f"{n[:-2]}.json" not in names]

    def has_dead_records(self) -> bool:
        """True when some record's writer is gone (checked without the store lock)."""
        for path in self._paths():
            owner = owner_of(path.name.removesuffix(".json"))
            if not owner or not owner_alive(self.store.tmp, owner):
                return True
        return False

    @contextlib.contextmanager
    def pending(self, record: Record) -> Iterator[None]:
        """Write ``record``, run the block, remove it; on an error settle it first.

        The caller holds the store lock for the whole block.
        """
        self.root.mkdir(mode=0o700, exist_ok=True)
        owner = owner_name(self.store.tmp)
        path = self.root / f"{record.command}-{owner}-{os.urandom(6).hex()}.json"
        atomic_write(path, record.to_json(owner), self.store.tmp)
        fault("record.written")
        try:
            yield
        except BaseException:
            try:
                self.settle(record)
            except Exception:  # the record stays for the next command to settle
                _log("warning", "cannot settle pending %s record", record.command, exc_info=True)
                raise
            path.unlink(missing_ok=True)
            raise
        fault("publish.before-record-removal")
        path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def undoable(self, command: str) -> Iterator[None]:
        """Run the block (store lock held) so that all of it happens, or none of it."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        owner = owner_name(self.store.tmp)
        base = f"{command}-{owner}-{os.urandom(6).hex()}"
        path, kept = self.root / f"{base}.json", self.root / f"{base}.d"
        kept.mkdir(mode=0o700)
        try:
            tags: str | None = self.store.tags.path.read_bytes().decode()
        except FileNotFoundError:
            tags = None
        doc = {"version": RECORD_VERSION, "command": command, "kind": UNDO, "owner": owner}
        atomic_write(path, json.dumps({**doc, "tags": tags}).encode(), self.store.tmp)
        fault("record.written")
        try:
            with keeping_removed(kept):
                yield
        except BaseException:
            self._undo(tags, kept)
            path.unlink(missing_ok=True)
            remove_tree(kept)
            raise
        fault("publish.before-record-removal")
        path.unlink()
        fsync_dir(self.root)
        self._drop(kept)

    def _undo(self, tags: str | None, kept: Path) -> None:
        if tags is None:
            self.store.tags.path.unlink(missing_ok=True)
        else:
            atomic_write(self.store.tags.path, tags.encode(), self.store.tmp, 0o600)
        for name in sorted(os.listdir(kept)) if kept.is_dir() else []:
            kind, _, entry = name.partition("-")
            if kind in ("graph", "layers") and not (self.store.root / kind / entry).exists():
                os.rename(kept / name, self.store.root / kind / entry)
        for kind in ("graph", "layers"):
            if (self.store.root / kind).is_dir():
                fsync_dir(self.store.root / kind)

    def _drop(self, kept: Path) -> None:
        """Delete what a finished command removed (a named step half way)."""
        names = sorted(os.listdir(kept)) if kept.is_dir() else []
        for number, name in enumerate(names):
            remove_tree(kept / name)
            if number == 0 and len(names) > 1:
                fault("remove.mid-unlink")
        remove_tree(kept)

    def recover(self) -> list[str]:
        """Settle every record left by a process that is gone (store lock held)."""
        settled = []
        for kept in self._kept_without_record():
            self._drop(kept)  # the command was done; only the deleting was left
        for path in self._paths():
            try:
                doc = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("kind") == UNDO:
                kept = path.with_suffix(".d")
                tags = doc.get("tags")
                self._undo(tags if isinstance(tags, str) else None, kept)
                path.unlink(missing_ok=True)
                fsync_dir(self.root)
                remove_tree(kept)
                settled.append(f"undid the interrupted {doc.get('command')}")
                continue
            try:
                record, _owner = Record.from_json(path.read_bytes(), str(path))
            except FileNotFoundError:
                continue
            except IntegrityError:
                # Written by atomic rename, so a record is never torn; this one was edited.
                _log("warning", "removing unreadable pending record %s", path)
                path.unlink(missing_ok=True)
                continue
            outcome = self.settle(record)
            path.unlink(missing_ok=True)
            settled.append(f"{outcome} the interrupted {record.command}")
            _log("info", "%s the interrupted %s (%s)", outcome, record.command, path.name)
        return settled

    def settle(self, record: Record) -> str:
        """Complete or undo ``record``; returns what was done."""
        if record.kind == CREATE:
            if self._visible(record):
                return "completed"
            self._discard(record)
            return "undid"
        self._finish_removal(record)
        return "finished"

    def _visible(self, record: Record) -> bool:
        graph = self.store.graph
        if not all((graph.root / i / "json").is_file() for i in record.images):
            return False
        if not all(self.store.layers.exists(d) for d in record.layers):
            return False
        repos = self.store.tags.all()
        return all(repos.get(repo, {}).get(ref) == image_id for repo, ref, image_id in record.tags)

    def _discard(self, record: Record) -> None:
        for image_id in reversed(record.images):
            self.store.graph.trash_node(image_id)
        self._drop_unused_layers(record.layers)

    def _finish_removal(self, record: Record) -> None:
        self.store.tags.delete_refs(record.tags)
        fault("remove.after-untag")
        for image_id in record.images:
            self.store.graph.trash_node(image_id)
            fault("remove.between-image-and-layer")
        self._drop_unused_layers(record.layers)

    def _drop_unused_layers(self, diff_ids: list[str]) -> None:
        graph = self.store.graph
        for diff_id in diff_ids:
            if self.store.layers.exists(diff_id) and not graph.layer_in_use(diff_id):
                self.store.layers.delete(diff_id)
            elif not self.store.layers.exists(diff_id):
                # A layer directory left half-published (no info.json) is not a layer.
                with contextlib.suppress(IntegrityError):
                    trash(self.store.layers.path(diff_id), self.store.tmp)
