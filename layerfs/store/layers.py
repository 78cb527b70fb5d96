"""Content-addressed layers: the exact uncompressed tar and its entry index.

A layer lives in ``layers/<diff-id hex>/`` as ``layer.tar`` (the bytes it
arrived as, after decompression: its sha256 is the directory's name), ``index``
(msgpack, see :data:`INDEX_VERSION`) and ``info.json`` (sizes and the
compressed digests this layer is known under). A layer shared by several images
is stored once.

The blob index, ``index/blobs/<blob hex>`` (the diff ID as text, one small file
per compressed digest), answers "which layer is this blob?" without reading every
layer's ``info.json``. An entry is written (fsync, rename) before the
``info.json`` that lists its digest and removed after the layer is gone, so a
crash can leave an entry naming a layer that does not list it (a lookup checks
and ignores it), never a listed digest without an entry. ``fsck`` reports both
kinds of disagreement and ``fsck --repair`` rebuilds the index from the layers.

Ingest is one streaming pass into a private staging directory under tmp/;
:meth:`StagedLayer.publish` renames it into place. The caller holds the store
lock around publication and decides what to do with the layer afterwards; this
module knows nothing of images.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from layerfs.errors import (
    CorruptIndexError,
    DigestMismatchError,
    IntegrityError,
    LayerNotFoundError,
)
from layerfs.model.digest import hex_of, is_sha256_digest, validate_digest
from layerfs.store import codec
from layerfs.store.faults import fault
from layerfs.store.files import (
    SpaceGuard,
    atomic_write,
    fsync_dir,
    make_temp_dir,
    open_private,
    publish_dir,
    remove_tree,
    reporting_no_space,
    trash,
)
from layerfs.store.rows import INDEX_COLUMNS, Row

if TYPE_CHECKING:
    from layerfs.compression import ReadAheadReader
    from layerfs.store.tarindex import Entry, IndexResult

# Decompression (zstandard, isal, bz2, lzma) and the tar parser are imported where a layer
# is read or written, so that commands which only look at the store start fast.

INDEX_VERSION = 1
DAMAGED = "damaged"  # a layer's mark: fsck --verify found its bytes wrong


@dataclass
class LayerInfo:
    diff_id: str
    tar_size: int
    content_size: int
    entries: int
    blob_digests: list[str]  # compressed digests this exact layer was seen as

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "diff_id": self.diff_id,
                "tar_size": self.tar_size,
                "content_size": self.content_size,
                "entries": self.entries,
                "blob_digests": sorted(set(self.blob_digests)),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> LayerInfo:
        try:
            doc = json.loads(data)
            return cls(
                doc["diff_id"],
                int(doc["tar_size"]),
                int(doc["content_size"]),
                int(doc["entries"]),
                list(doc.get("blob_digests", [])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"corrupt layer info {where}: {exc}") from exc


def write_index(out: Any, result: IndexResult) -> None:
    """The index of an indexed layer, streamed row by row (see docs/store-format.md)."""
    codec.pack_streaming(
        out,
        {"version": INDEX_VERSION, "diff_id": result.diff_id},
        "entries",
        (e.to_row() for e in result.entries),
        len(result.entries),
    )


class _HalfThenFault:
    """Passes writes on; the named step ``stage.mid-index`` falls half way into the first."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._first = True

    def write(self, data: bytes | memoryview) -> int:
        if self._first:
            self._first = False
            half = len(data) // 2
            self._out.write(data[:half])
            fault("stage.mid-index")
            self._out.write(data[half:])
            return len(data)
        return int(self._out.write(data))


class StagedLayer:
    """A layer written and verified under tmp/, not yet visible in the store."""

    def __init__(self, store: LayerStore, staging: Path, info: LayerInfo) -> None:
        self._store = store
        self.staging = staging
        self.info = info

    @property
    def diff_id(self) -> str:
        return self.info.diff_id

    def publish(self) -> bool:
        """Make the layer visible (caller holds the store lock). False if already stored.

        A stored copy that ``fsck --verify`` marked damaged is replaced file by file
        (each a rename of verified bytes); its mark goes last.
        """
        final = self._store.path(self.diff_id)
        damaged = final.exists() and self._store.is_damaged(self.diff_id)
        if final.exists() and not damaged:
            remove_tree(self.staging)
            return False
        if damaged:  # the same bytes under every compressed digest it was known by
            try:
                known = self._store.info(self.diff_id).blob_digests
            except (LayerNotFoundError, IntegrityError):
                known = []
            extra = [d for d in known if d not in self.info.blob_digests]
            if extra:
                self.info.blob_digests.extend(extra)
                (self.staging / "info.json").write_bytes(self.info.to_json())
        for blob_digest in self.info.blob_digests:  # the index first (see the module)
            self._store.index_blob(blob_digest, self.diff_id)
        if damaged:
            self._replace(final)
            return True
        return publish_dir(self.staging, final)

    def _replace(self, final: Path) -> None:
        for name in ("layer.tar", "index", "info.json"):
            fd = os.open(self.staging / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fault("publish.before-rename")
            os.rename(self.staging / name, final / name)
            fsync_dir(final)
        (final / DAMAGED).unlink(missing_ok=True)
        fsync_dir(final)
        remove_tree(self.staging)

    def discard(self) -> None:
        remove_tree(self.staging)


class LayerStore:
    def __init__(self, root: Path, tmp_root: Path, blob_index: Path | None = None) -> None:
        self.root = root
        self.tmp_root = tmp_root
        self.blob_index = blob_index if blob_index is not None else root.parent / "index" / "blobs"

    def path(self, diff_id: str) -> Path:
        return self.root / hex_of(validate_digest(diff_id, "diff ID"))

    def exists(self, diff_id: str) -> bool:
        return is_sha256_digest(diff_id) and (self.path(diff_id) / "info.json").is_file()

    def is_damaged(self, diff_id: str) -> bool:
        """True when ``fsck --verify`` found this layer's bytes wrong (a pull fetches it again)."""
        return is_sha256_digest(diff_id) and (self.path(diff_id) / DAMAGED).is_file()

    def mark_damaged(self, diff_id: str, reason: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to mark
            atomic_write(self.path(diff_id) / DAMAGED, reason.encode(), self.tmp_root, 0o644)

    def clear_damaged(self, diff_id: str) -> None:
        (self.path(diff_id) / DAMAGED).unlink(missing_ok=True)

    def diff_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted("sha256:" + p.name for p in self.root.iterdir() if len(p.name) == 64)

    def ingest(
        self,
        stream: BinaryIO | Any,
        *,
        expected_diff_id: str | None = None,
        blob_digest: str | None = None,
        what: str = "layer",
        progress: Callable[[int], None] | None = None,
        decompress: bool = True,
        staging: Path | None = None,
    ) -> StagedLayer:
        """Stream a (possibly compressed) layer tar into tmp/: copy, hash, index, verify.

        ``staging`` is an empty directory under tmp/ to use (an ingest worker process
        writes into its puller's, whose owner names it); by default a new one.
        """
        from layerfs.compression import ReadAheadReader, open_decompressed
        from layerfs.store.tarindex import index_tar

        with reporting_no_space(self.tmp_root.parent, what):
            if staging is None:
                staging = make_temp_dir(self.tmp_root, "layer")
        read_ahead: ReadAheadReader | None = None
        try:
            with reporting_no_space(self.tmp_root.parent, what):
                reader, kind = open_decompressed(stream, what) if decompress else (stream, "none")
                if kind != "none":  # inflate on one core while this one parses and hashes
                    reader = read_ahead = ReadAheadReader(reader)
                with open_private(staging / "layer.tar") as out:
                    guard = SpaceGuard(out, self.tmp_root, what)
                    result = index_tar(reader, guard, progress=progress)
                    out.flush()
                    os.fsync(out.fileno())
                fault("stage.layer-written")
                if expected_diff_id is not None and result.diff_id != expected_diff_id:
                    raise DigestMismatchError(
                        f"{what}: diff ID mismatch: expected {expected_diff_id}, "
                        f"got {result.diff_id}"
                    )
                with open_private(staging / "index") as out:
                    write_index(_HalfThenFault(SpaceGuard(out, self.tmp_root, what)), result)
                info = LayerInfo(
                    result.diff_id,
                    result.tar_size,
                    result.content_size,
                    len(result.entries),
                    [blob_digest] if blob_digest else [],
                )
                with open_private(staging / "info.json") as out:
                    out.write(info.to_json())
            fault("stage.done")
        except BaseException:
            remove_tree(staging)
            raise
        finally:
            if read_ahead is not None:
                read_ahead.close()
        return StagedLayer(self, staging, info)

    def info(self, diff_id: str) -> LayerInfo:
        path = self.path(diff_id) / "info.json"
        try:
            return LayerInfo.from_json(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise LayerNotFoundError(f"layer {diff_id} is not in the store") from None

    def add_blob_digest(self, diff_id: str, blob_digest: str) -> None:
        """Remember that ``diff_id`` is also known by a compressed digest (store lock held)."""
        info = self.info(diff_id)
        if blob_digest not in info.blob_digests:
            self.index_blob(blob_digest, diff_id)
            info.blob_digests.append(blob_digest)
            atomic_write(self.path(diff_id) / "info.json", info.to_json(), self.tmp_root)
        elif self._indexed(blob_digest) != diff_id:
            self.index_blob(blob_digest, diff_id)

    def find_by_blob_digest(self, blob_digest: str) -> str | None:
        """The layer stored for a compressed blob, from the blob index (no scan)."""
        diff_id = self._indexed(blob_digest)
        if diff_id is None:
            return None
        try:
            listed = blob_digest in self.info(diff_id).blob_digests
        except (LayerNotFoundError, IntegrityError):
            return None
        return diff_id if listed else None  # an entry a crash left behind

    # -- the blob index ------------------------------------------------------------------------

    def _index_entry(self, blob_digest: str) -> Path | None:
        if not is_sha256_digest(blob_digest):
            return None
        return self.blob_index / hex_of(blob_digest)

    def _indexed(self, blob_digest: str) -> str | None:
        path = self._index_entry(blob_digest)
        if path is None:
            return None
        try:
            text = path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text if is_sha256_digest(text) else None

    def index_blob(self, blob_digest: str, diff_id: str) -> None:
        """Record ``blob_digest`` → ``diff_id`` (store lock held; written before info.json)."""
        path = self._index_entry(blob_digest)
        if path is None or blob_digest == diff_id or self._indexed(blob_digest) == diff_id:
            return
        self.blob_index.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, diff_id.encode(), self.tmp_root)

    def _unindex_blob(self, blob_digest: str, diff_id: str) -> None:
        path = self._index_entry(blob_digest)
        if path is not None and self._indexed(blob_digest) == diff_id:
            path.unlink(missing_ok=True)

    def blob_index_entries(self) -> dict[str, str]:
        """Every entry of the blob index: blob digest → the diff ID it names."""
        try:
            names = os.listdir(self.blob_index)
        except FileNotFoundError:
            return {}
        entries = {}
        for name in names:
            diff_id = self._indexed("sha256:" + name)
            if diff_id is not None:
                entries["sha256:" + name] = diff_id
        return entries

    def check_blob_index(self, infos: dict[str, LayerInfo] | None = None) -> list[str]:
        """Digests the layers list that the blob index lacks, one line each.

        An entry naming a layer that does not list it is no disagreement: a crash between
        writing the entry and publishing the layer leaves one, lookups ignore it, and
        ``fsck --repair`` and ``gc`` remove it. ``infos``: layer infos already read.
        """
        wanted: dict[str, str] = {}
        for diff_id in self.diff_ids():
            try:
                info = infos[diff_id] if infos and diff_id in infos else self.info(diff_id)
                for blob_digest in info.blob_digests:
                    if is_sha256_digest(blob_digest) and blob_digest != diff_id:
                        wanted[blob_digest] = diff_id
            except (LayerNotFoundError, IntegrityError):
                continue  # the layer check reports it
        found = self.blob_index_entries()
        return [
            f"blob index lacks {blob} (layer {diff_id})"
            for blob, diff_id in sorted(wanted.items())
            if found.get(blob) != diff_id
        ]

    def rebuild_blob_index(self) -> tuple[list[str], list[str]]:
        """Make the blob index what the layers' ``blob_digests`` say (store lock held).

        Returns the blob digests whose stray entries were removed and those indexed anew.
        """
        wanted: dict[str, str] = {}
        for diff_id in self.diff_ids():
            try:
                for blob_digest in self.info(diff_id).blob_digests:
                    if is_sha256_digest(blob_digest) and blob_digest != diff_id:
                        wanted[hex_of(blob_digest)] = diff_id
            except (LayerNotFoundError, IntegrityError):
                continue
        self.blob_index.mkdir(mode=0o700, parents=True, exist_ok=True)
        removed, added = [], []
        for name in sorted(os.listdir(self.blob_index)):
            if name not in wanted:
                remove_tree(self.blob_index / name)
                removed.append("sha256:" + name)
        for name, diff_id in sorted(wanted.items()):
            if self._indexed("sha256:" + name) != diff_id:
                self.index_blob("sha256:" + name, diff_id)
                added.append("sha256:" + name)
        return removed, added

    def tar_path(self, diff_id: str) -> Path:
        path = self.path(diff_id) / "layer.tar"
        if not path.is_file():
            raise LayerNotFoundError(f"layer {diff_id} is not in the store")
        return path

    def open_tar(self, diff_id: str) -> BinaryIO:
        return open(self.tar_path(diff_id), "rb")

    def entries(self, diff_id: str) -> list[Entry]:
        from layerfs.store.tarindex import Entry

        path = self.path(diff_id) / "index"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LayerNotFoundError(f"layer {diff_id} is not in the store") from None
        doc = codec.unpack(data, what=f"index of layer {diff_id}")
        if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
            version = doc.get("version") if isinstance(doc, dict) else None
            raise CorruptIndexError(
                f"index of layer {diff_id} has version {version!r}, expected {INDEX_VERSION}"
            )
        try:
            return [Entry.from_row(row) for row in doc["entries"]]
        except (KeyError, TypeError) as exc:
            raise CorruptIndexError(f"index of layer {diff_id} is malformed: {exc}") from exc

    def index_rows(self, diff_id: str) -> Iterator[Row]:
        """The index rows of a layer (``store/rows.py``), read one at a time."""
        path = self.path(diff_id) / "index"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LayerNotFoundError(f"layer {diff_id} is not in the store") from None
        what = f"index of layer {diff_id}"
        version = None
        for key, value in codec.iter_map_items(data, what=what, stream_key="entries"):
            if key == "version":
                version = value
            elif key == "entries":
                if version != INDEX_VERSION:
                    raise CorruptIndexError(
                        f"{what} has version {version!r}, expected {INDEX_VERSION}"
                    )
                if not isinstance(value, list) or len(value) != INDEX_COLUMNS:
                    raise CorruptIndexError(f"{what} is malformed: bad row {value!r:.80}")
                yield value

    def delete(self, diff_id: str) -> None:
        """Remove a layer (caller holds the store lock and has checked it is unused)."""
        try:
            blob_digests = self.info(diff_id).blob_digests
        except (LayerNotFoundError, IntegrityError):
            blob_digests = []
        trash(self.path(diff_id), self.tmp_root)
        for blob_digest in blob_digests:
            self._unindex_blob(blob_digest, diff_id)

    def check(self, diff_id: str, infos: dict[str, LayerInfo] | None = None) -> Iterator[str]:
        """What can be seen without reading the tar: info, tar size, index present.

        The info read is left in ``infos`` for the checks that follow.
        """
        try:
            info = self.info(diff_id)
        except (IntegrityError, LayerNotFoundError) as exc:
            yield f"layer {diff_id}: {exc}"
            return
        if infos is not None:
            infos[diff_id] = info
        if info.diff_id != diff_id:
            yield f"layer {diff_id}: info names {info.diff_id}"
        try:
            size = (self.path(diff_id) / "layer.tar").stat().st_size
        except FileNotFoundError:
            yield f"layer {diff_id}: layer.tar is missing"
            return
        if size != info.tar_size:
            yield f"layer {diff_id}: info records {info.tar_size} bytes, tar has {size}"
        try:
            if (self.path(diff_id) / "index").stat().st_size == 0:
                yield f"layer {diff_id}: the index is empty"
        except FileNotFoundError:
            yield f"layer {diff_id}: the index is missing"

    def verify(self, diff_id: str) -> Iterator[str]:
        """Re-hash the tar and rebuild its index; yield a line per problem found."""
        from layerfs.store.tarindex import index_tar

        try:
            info = self.info(diff_id)
            with self.open_tar(diff_id) as tar:
                result = index_tar(tar)
        except (IntegrityError, LayerNotFoundError) as exc:
            yield f"layer {diff_id}: {exc}"
            return
        except Exception as exc:  # a malformed stored tar is a finding, not a crash
            yield f"layer {diff_id}: cannot be read: {exc}"
            return
        if result.diff_id != diff_id:
            yield f"layer {diff_id}: content hashes to {result.diff_id}"
            return
        if info.tar_size != result.tar_size:
            yield f"layer {diff_id}: info records {info.tar_size} bytes, tar has {result.tar_size}"
        try:
            stored = self.entries(diff_id)
        except IntegrityError as exc:
            yield f"layer {diff_id}: {exc}"
            return
        if [e.to_row() for e in stored] != [e.to_row() for e in result.entries]:
            yield f"layer {diff_id}: index does not match the tar"
