"""What the store remembers about compressed blobs it has seen in registries.

``<store>/registry/blobs/<hex>.json`` per blob digest: its size, media type, the diff ID
of the layer it compresses and the repositories (``host/remote-name``, the latest first)
that hold it. A push reads it to skip compressing and uploading a layer a registry
already has (or can mount from another repository); a pull writes it; ``fsck --repair``
reads it to fetch a damaged layer again (:mod:`layerfs.transports.refetch`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from layerfs.model.digest import is_sha256_digest
from layerfs.store.files import atomic_write
from layerfs.store.store import Store


@dataclass
class BlobRecord:
    digest: str
    size: int
    media_type: str
    diff_id: str = ""
    repositories: list[str] = field(default_factory=list)  # "host/remote-name"


class BlobRecords:
    """``<store>/registry/blobs/<hex>.json``: size, type and where a compressed blob lives.

    The diff ID → blob digest map itself is the layer's ``blob_digests``; this adds
    what a push needs to reuse a blob: its media type, size, and the repositories
    that hold it (for cross-repository mounts).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root / "registry" / "blobs"
        self._lock = threading.Lock()

    def get(self, digest: str) -> BlobRecord | None:
        if not is_sha256_digest(digest):
            return None
        try:
            doc = json.loads((self.root / f"{digest[7:]}.json").read_bytes())
            return BlobRecord(
                doc["digest"],
                int(doc["size"]),
                str(doc["media_type"]),
                str(doc.get("diff_id", "")),
                [str(r) for r in doc.get("repositories", [])],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def add(self, digest: str, size: int, media_type: str, diff_id: str, repository: str) -> None:
        if not is_sha256_digest(digest):
            return
        with self._lock:
            record = self.get(digest)
            if (
                record is not None
                and (record.size, record.media_type) == (size, media_type)
                and record.diff_id == (diff_id or record.diff_id)
                and repository in record.repositories
            ):
                return  # nothing new: no write, no fsync
            record = record or BlobRecord(digest, size, media_type, diff_id)
            record.size, record.media_type = size, media_type
            record.diff_id = diff_id or record.diff_id
            if repository in record.repositories:
                record.repositories.remove(repository)
            record.repositories.insert(0, repository)  # the latest first
            del record.repositories[20:]
            self.root.parent.mkdir(mode=0o700, exist_ok=True)
            self.root.mkdir(mode=0o700, exist_ok=True)
            atomic_write(
                self.root / f"{digest[7:]}.json",
                json.dumps(record.__dict__, sort_keys=True).encode(),
                self.store.tmp,
            )
