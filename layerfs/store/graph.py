"""The Graph: images as nodes with parent links, each owning at most one layer.

A node lives in ``graph/<id>/``: ``json`` (the exact image JSON bytes),
``parent`` (the parent's ID; absent for a base), ``layer`` (the diff ID of its
own layer; absent for an empty layer), ``layersize``, and optionally
``checksum`` (registry digest of the compressed layer) and ``v1Compatibility``.
A node is staged under tmp/ and renamed into place while the store lock is
held, so it appears whole or not at all.

Holds (retain/release/is_held) are shared ``flock`` locks on files under
``holds/``: they hold across processes and vanish with the process that took
them. The function names and semantics follow Docker's legacy graph package.

Questions about all nodes (children, heads, which nodes use a layer) are answered
from the node summaries (:mod:`layerfs.store.summaries`), not by opening every node.
Inside :meth:`Graph.transaction` nobody else can add or remove a node, so the
summaries are read once and kept up to date by this graph's own changes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.errors import (
    AmbiguousIDError,
    DepthLimitError,
    DigestNotSetError,
    ImageHeldError,
    ImageNotFoundError,
    IntegrityError,
    LayerNotFoundError,
    StoreError,
    UsageError,
)
from layerfs.model.digest import (
    hex_of,
    is_image_id,
    sha256_digest,
    validate_digest,
)
from layerfs.model.image import (
    MAX_IMAGE_DEPTH,
    Image,
    build_config,
    canonical_json,
    decode_json_object,
)
from layerfs.store.faults import fault
from layerfs.store.files import (
    FileLock,
    atomic_write,
    is_locked,
    locked,
    make_temp_dir,
    publish_dir,
    remove_tree,
    remove_unheld_lock_files,
    temp_path,
    trash,
)
from layerfs.store.layers import LayerStore, StagedLayer
from layerfs.store.summaries import GraphView, NodeIndex, NodeSummary, SummaryCache

EMPTY_TAR = bytes(1024)
_HOLD_NAME = re.compile(r"^[a-f0-9]{64}\Z")


def chain_layers(chain: list[Image]) -> list[str]:
    """The diff IDs of a chain as walk_history gives it (image first), base first."""
    return [node.layer for node in reversed(chain) if node.layer]


class Graph:
    def __init__(
        self,
        root: Path,
        layers: LayerStore,
        tmp_root: Path,
        lock_path: Path,
        holds_root: Path,
        summary_path: Path | None = None,
    ) -> None:
        self.root = root
        self.layers = layers
        self.tmp_root = tmp_root
        self.lock_path = lock_path
        self.holds_root = holds_root
        self._holds: dict[str, dict[str, FileLock]] = {}
        self._holds_mutex = threading.Lock()
        self._summaries = SummaryCache(
            summary_path if summary_path is not None else root.parent / "index" / "graph",
            root,
            tmp_root,
            lock_path,
            self._summary_of,
        )
        self._txn_depth = 0
        self._view: dict[str, NodeSummary] | None = None  # summaries inside a transaction
        self._index: NodeIndex | None = None  # the same by parent and by layer, when asked

    # -- lookup -----------------------------------------------------------------

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_image_id(n))

    def resolve(self, name: str) -> str:
        """A full image ID or unique prefix (``sha256:`` allowed) → the full ID."""
        prefix = name[7:] if name.startswith("sha256:") else name
        if not prefix:
            raise UsageError("Prefix can't be empty")
        if " " in prefix:
            raise ImageNotFoundError(f"no such id: {name}")
        if is_image_id(prefix) and (self.root / prefix / "json").is_file():
            return prefix
        matches = [i for i in self.ids() if i.startswith(prefix)]
        if not matches:
            raise ImageNotFoundError(f"no such id: {name}")
        if len(matches) > 1:
            raise AmbiguousIDError(f"Multiple IDs found with provided prefix: {name}")
        return matches[0]

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except (ImageNotFoundError, UsageError, IntegrityError):
            return False
        return True

    def get(self, name: str) -> Image:
        return self._load(self.resolve(name))

    def _load(self, image_id: str) -> Image:
        node = self.root / image_id
        try:
            raw = (node / "json").read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"no such id: {image_id}") from None
        try:
            data = decode_json_object(raw, f"image {image_id[:12]} json")
        except Exception as exc:
            raise IntegrityError(f"image {image_id[:12]} has corrupt json: {exc}") from exc
        stored_id = data.get("id")
        if (
            isinstance(stored_id, str)
            and stored_id
            and stored_id != image_id
            and "rootfs" not in data
        ):
            raise IntegrityError(f"Image stored at '{node}' has wrong id '{stored_id}'")
        parent = _read_text(node / "parent")
        layer = _read_text(node / "layer") or None
        size_text = _read_text(node / "layersize")
        size = int(size_text) if size_text.isdigit() else -1
        if size < 0 and layer is not None:
            size = self.layers.info(layer).content_size
        return Image(
            id=image_id, parent=parent, layer=layer, raw_json=raw, data=data, size=max(size, 0)
        )

    def get_parent(self, image: Image) -> Image | None:
        if not image.parent:
            return None
        return self._load(image.parent)

    def get_parents_size(self, image: Image) -> int:
        total = 0
        current = image
        while current.parent:
            try:
                current = self._load(current.parent)
            except (ImageNotFoundError, IntegrityError):
                break
            total += current.size
        return total

    def walk_history(
        self, image: Image, handler: Callable[[Image], None] | None = None
    ) -> list[Image]:
        """The chain from ``image`` down to its base (image first)."""
        chain: list[Image] = []
        seen: set[str] = set()
        current: Image | None = image
        while current is not None:
            if current.id in seen:
                raise IntegrityError(f"image {image.id[:12]} has a cycle in its parent chain")
            seen.add(current.id)
            chain.append(current)
            if handler is not None:
                handler(current)
            if len(chain) > MAX_IMAGE_DEPTH + 8:
                raise DepthLimitError(f"image {image.id[:12]} has a parent chain that never ends")
            current = self.get_parent(current)
        return chain

    def depth(self, image: Image) -> int:
        """Images in the chain, the image itself included (a base image has depth 1)."""
        return len(self.walk_history(image))

    def layers_of(self, image: Image) -> list[str]:
        """The diff IDs of the image's chain, base first."""
        return chain_layers(self.walk_history(image))

    def check_depth(self, image: Image) -> None:
        """Docker's container-create rule: the chain plus init and rw layers stays below 127."""
        depth = self.depth(image)
        if depth + 2 >= MAX_IMAGE_DEPTH:
            raise DepthLimitError(
                f"Cannot create container with more than {MAX_IMAGE_DEPTH} parents "
                f"(image {image.id[:12]} has {depth} layers)"
            )

    def map(self) -> dict[str, Image]:
        images: dict[str, Image] = {}
        for image_id in self.ids():
            try:
                images[image_id] = self._load(image_id)
            except (ImageNotFoundError, IntegrityError):
                continue  # unloadable images are skipped, as Docker does
        return images

    def summaries(self) -> dict[str, NodeSummary]:
        """Parent, layer, size and created of every readable node, without opening each."""
        if self._view is not None:
            return self._view
        view = self._summaries.read()
        if self._txn_depth:
            self._view = view
        return view

    def view(self) -> GraphView:
        """summaries() as a :class:`GraphView`: with chain sizes and leaves, lazily made."""
        if self._txn_depth:  # the transaction's own summaries, which it keeps up to date
            return GraphView.of(self.summaries())
        return self._summaries.view()

    def _summary_of(self, image_id: str) -> NodeSummary | None:
        try:
            return _summary(self._load(image_id))
        except (ImageNotFoundError, IntegrityError, LayerNotFoundError):
            return None

    def check_summaries(self, images: dict[str, Image] | None = None) -> list[str]:
        """Cached summaries that disagree with their node (``images``: nodes already read)."""
        if images is None:
            return self._summaries.check(self._summary_of)
        return self._summaries.check(
            lambda i: _summary(images[i]) if i in images else self._summary_of(i)
        )

    def rebuild_summaries(self) -> None:
        self._summaries.rebuild()

    def by_parent(self) -> dict[str, list[NodeSummary]]:
        nodes = self.summaries()
        children: dict[str, list[NodeSummary]] = {}
        for node in nodes.values():
            if node.parent and node.parent in nodes:
                children.setdefault(node.parent, []).append(node)
        return children

    def heads(self) -> dict[str, NodeSummary]:
        nodes = self.summaries()
        parents = {n.parent for n in nodes.values() if n.parent}
        return {k: v for k, v in nodes.items() if k not in parents}

    def children(self, image_id: str) -> list[str]:
        index = self._transaction_index()
        if index is not None:
            return sorted(index.children.get(image_id, ()))
        return sorted(n.id for n in self.summaries().values() if n.parent == image_id)

    def _transaction_index(self) -> NodeIndex | None:
        """Inside a transaction, the summaries by parent and by layer (made once)."""
        if not self._txn_depth:
            return None
        if self._index is None:
            self._index = NodeIndex(self.summaries().values())
        return self._index

    # -- creation ---------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store lock: a batch of registrations, tags and deletions in one go."""
        with locked(self.lock_path):
            self._txn_depth += 1
            try:
                yield
            finally:
                self._txn_depth -= 1
                if not self._txn_depth:
                    self._view = None
                    self._index = None

    def register(
        self,
        raw_json: bytes,
        image_id: str,
        *,
        parent: str = "",
        layer: StagedLayer | str | None = None,
        layer_digest: str | None = None,
        v1_compatibility: bytes | None = None,
        parent_depth: int | None = None,
    ) -> bool:
        """Publish a node (and its staged layer). Returns False if the image already existed.

        As in Docker 1.9, registering an existing ID is a no-op. ``parent_depth`` is the
        parent's depth when the caller knows it (a chain registered base first), which
        spares walking the parent's chain again for every node.
        """
        if not is_image_id(image_id):
            raise UsageError(f"invalid image ID {image_id!r}: expected 64 lower-case hex")
        with locked(self.lock_path):
            return self._register_locked(
                raw_json, image_id, parent, layer, layer_digest, v1_compatibility, parent_depth
            )

    def _register_locked(
        self,
        raw_json: bytes,
        image_id: str,
        parent: str,
        layer: StagedLayer | str | None,
        layer_digest: str | None,
        v1_compatibility: bytes | None,
        parent_depth: int | None = None,
    ) -> bool:
        node = self.root / image_id
        if (node / "json").is_file():
            if isinstance(layer, StagedLayer):
                layer.publish()  # the layer may still be wanted by the caller's next node
            return False
        if parent:
            if parent_depth is None or not (self.root / parent / "json").is_file():
                parent_depth = self.depth(self._load(parent))
            depth = parent_depth + 1
            if depth > MAX_IMAGE_DEPTH:
                raise DepthLimitError(
                    f"max depth exceeded: image {image_id[:12]} would be {depth} layers deep, "
                    f"the limit is {MAX_IMAGE_DEPTH}"
                )
        diff_id: str | None
        if isinstance(layer, StagedLayer):
            diff_id = layer.diff_id
            layer.publish()
        else:
            diff_id = layer
        if diff_id is not None and not self.layers.exists(diff_id):
            raise IntegrityError(
                f"cannot register image {image_id[:12]}: layer {diff_id} is not in the store"
            )
        size = self.layers.info(diff_id).content_size if diff_id else 0
        if node.exists():
            remove_tree(node)  # a stale directory without json is a leftover
        staging = make_temp_dir(self.tmp_root, "image")
        try:
            (staging / "json").write_bytes(raw_json)
            if parent:
                (staging / "parent").write_text(parent)
            if diff_id:
                (staging / "layer").write_text(diff_id)
            (staging / "layersize").write_text(str(size))
            if layer_digest:
                (staging / "checksum").write_text(validate_digest(layer_digest, "layer digest"))
            if v1_compatibility is not None:
                (staging / "v1Compatibility").write_bytes(v1_compatibility)
            for child in staging.iterdir():
                child.chmod(0o600)
            publish_dir(staging, node)
        except BaseException:
            remove_tree(staging)
            raise
        if self._view is not None:
            summary = self._summary_of(image_id)
            if summary is not None:
                self._view[image_id] = summary
                if self._index is not None:
                    self._index.add(summary)
            else:
                self._summaries.unreadable.add(image_id)
        return True

    def create(
        self,
        layer: StagedLayer | str | None,
        *,
        parent: str = "",
        comment: str = "",
        author: str = "",
        config: dict[str, Any] | None = None,
        created_by: str = "",
        created: str | None = None,
        platform: tuple[str, str, str] | None = None,
    ) -> Image:
        """A new image on top of ``parent`` (or a base image): its config, ID and node.

        The ID is the sha256 of the new config, which describes the whole chain,
        so it is the same image ID Docker computes for this image.
        """
        with locked(self.lock_path):
            raw, image_id, parent_id = self.new_config(
                layer.diff_id if isinstance(layer, StagedLayer) else layer,
                parent=parent,
                comment=comment,
                author=author,
                config=config,
                created_by=created_by,
                created=created,
                platform=platform,
            )
            self._register_locked(raw, image_id, parent_id, layer, None, None)
            return self._load(image_id)

    def new_config(
        self,
        diff_id: str | None,
        *,
        parent: str = "",
        comment: str = "",
        author: str = "",
        config: dict[str, Any] | None = None,
        created_by: str = "",
        created: str | None = None,
        platform: tuple[str, str, str] | None = None,
    ) -> tuple[bytes, str, str]:
        """(config bytes, image ID, parent ID) of a new image, registering nothing."""
        parent_image = self._load(self.resolve(parent)) if parent else None
        parent_diff_ids = self.layers_of(parent_image) if parent_image else []
        doc = build_config(
            parent=parent_image,
            parent_diff_ids=parent_diff_ids,
            diff_id=diff_id,
            config=config,
            comment=comment,
            author=author,
            created_by=created_by,
            created=created,
            platform=platform,
        )
        raw = canonical_json(doc)
        return raw, hex_of(sha256_digest(raw)), parent_image.id if parent_image else ""

    # -- deletion ---------------------------------------------------------------

    def delete(self, name: str) -> list[str]:
        """Remove a node; its layer goes too when no other node uses it and nobody holds it.

        Like Docker's Graph.Delete this checks neither children nor tags: callers do.
        Returns the diff IDs of the layers removed.
        """
        with locked(self.lock_path):
            return self._delete_locked(name)

    def _delete_locked(self, name: str) -> list[str]:
        image_id = self.resolve(name)
        if self.is_held(image_id):
            raise ImageHeldError(
                f"Conflict, cannot delete because {image_id[:12]} is held by an ongoing "
                "pull, load or mount"
            )
        image = self._load(image_id)
        if image.layer and self.is_held(hex_of(image.layer)):
            raise ImageHeldError(
                f"Conflict, cannot delete because the layer of {image_id[:12]} is held by an "
                "ongoing pull, load or mount"
            )
        self.trash_node(image_id)
        fault("remove.between-image-and-layer")
        removed: list[str] = []
        if image.layer and not self.layer_in_use(image.layer, deleted=image_id):
            self.layers.delete(image.layer)
            removed.append(image.layer)
        return removed

    def trash_node(self, image_id: str) -> None:
        """Remove a node's directory (store lock held); the summaries learn that it is gone.

        Every removal of a node goes through here (``delete``, the journal's undo and
        removal records), so that no cached summary outlives its node.
        """
        self._summaries.forget(image_id)
        trash(self.root / image_id, self.tmp_root)
        if self._view is not None:
            gone = self._view.pop(image_id, None)
            if gone is not None and self._index is not None:
                self._index.remove(gone)

    def layer_of(self, image_id: str) -> str:
        """The diff ID an image node names as its own layer ("" for none), unparsed."""
        return _read_text(self.root / image_id / "layer")

    def layer_in_use(self, diff_id: str, deleted: str = "") -> bool:
        """True when an image (but deleted) names the layer or some process holds it."""
        index = self._transaction_index()
        if index is not None:
            if index.users.get(diff_id, set()) - {deleted}:
                return True
        elif any(n.layer == diff_id and n.id != deleted for n in self.summaries().values()):
            return True
        for image_id in self._summaries.unreadable:  # a damaged node still keeps its layer
            if image_id != deleted and _read_text(self.root / image_id / "layer") == diff_id:
                return True
        return self.is_held(hex_of(diff_id))

    def unused_layers(self) -> list[str]:
        used = {n.layer for n in self.summaries().values() if n.layer}
        used.update(_read_text(self.root / i / "layer") for i in self._summaries.unreadable)
        return [d for d in self.layers.diff_ids() if d not in used and not self.is_held(hex_of(d))]

    # -- holds ------------------------------------------------------------------

    def retain(self, session: str, *ids: str) -> None:
        """Hold image IDs or layer IDs (hex) for ``session``, visible to every process."""
        self.holds_root.mkdir(mode=0o700, exist_ok=True)
        with locked(self.lock_path):
            for raw_id in ids:
                key = hex_of(raw_id)
                if not _HOLD_NAME.match(key):
                    raise UsageError(f"cannot hold {raw_id!r}: not an image or layer ID")
                with self._holds_mutex:
                    session_holds = self._holds.setdefault(session, {})
                    if key in session_holds:
                        continue
                    lock = FileLock(self.holds_root / key)
                    lock.acquire(exclusive=False)
                    session_holds[key] = lock

    def release(self, session: str, *ids: str) -> None:
        with self._holds_mutex:
            session_holds = self._holds.get(session, {})
            keys = [hex_of(i) for i in ids] if ids else list(session_holds)
            for key in keys:
                lock = session_holds.pop(key, None)
                if lock is not None:
                    lock.release()
            if not session_holds:
                self._holds.pop(session, None)

    def is_held(self, raw_id: str) -> bool:
        return is_locked(self.holds_root / hex_of(raw_id))

    def prune_hold_files(self) -> int:
        """Remove hold files nobody holds (store lock held by the caller)."""
        return remove_unheld_lock_files(self.holds_root)

    # -- per-node metadata --------------------------------------------------------

    def set_layer_digest(self, image_id: str, digest: str) -> None:
        validate_digest(digest, "layer digest")
        image_id = self.resolve(image_id)
        with locked(self.lock_path):
            atomic_write(self.root / image_id / "checksum", digest.encode(), self.tmp_root)

    def get_layer_digest(self, image_id: str) -> str:
        image_id = self.resolve(image_id)
        path = self.root / image_id / "checksum"
        try:
            value = path.read_text()
        except FileNotFoundError:
            raise DigestNotSetError("digest is not set for layer") from None
        return validate_digest(value, f"layer digest of {image_id[:12]}")

    def set_v1_compatibility_config(self, image_id: str, data: bytes) -> None:
        image_id = self.resolve(image_id)
        atomic_write(self.root / image_id / "v1Compatibility", data, self.tmp_root)

    def get_v1_compatibility_config(self, image_id: str) -> bytes:
        image_id = self.resolve(image_id)
        try:
            return (self.root / image_id / "v1Compatibility").read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(
                f"no v1Compatibility config is stored for {image_id[:12]}"
            ) from None

    def raw_json(self, image_id: str) -> bytes:
        return self.get(image_id).raw_json

    def generate_v1_compatibility_chain(self, image_id: str) -> bytes:
        """The v1 JSON of an image, its parent chain generated first (Docker 1.9)."""
        image = self.get(image_id)
        path = self.root / image.id / "v1Compatibility"
        if path.is_file():
            return path.read_bytes()
        doc: dict[str, Any] = {
            k: v for k, v in image.data.items() if k not in ("rootfs", "history")
        }
        doc["id"] = image.id
        if image.parent:
            parent_json = json.loads(self.generate_v1_compatibility_chain(image.parent))
            doc["parent"] = parent_json["id"]
        else:
            doc.pop("parent", None)
        data = canonical_json(doc)
        with contextlib.suppress(OSError, StoreError):
            atomic_write(path, data, self.tmp_root)
        return data

    # -- layer data ---------------------------------------------------------------

    def tar_layer(self, image: Image) -> BinaryIO:
        """The node's layer, byte for byte as it was stored (an empty tar if it has none)."""
        if image.layer is None:
            return io.BytesIO(EMPTY_TAR)
        return self.layers.open_tar(image.layer)

    def temp_layer_archive(
        self, image_id: str, progress: Callable[[int], None] | None = None
    ) -> TempArchive:
        """Copy the layer to a temp file under tmp/ ("Buffering to disk"); gone when closed."""
        image = self.get(image_id)
        path = temp_path(self.tmp_root, "archive")
        with self.tar_layer(image) as src, open(path, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        return TempArchive(path)


class TempArchive(io.BufferedReader):
    """A file under tmp/ that deletes itself when read to the end or closed."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.path = path

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data:
            self.close()
        return data

    def close(self) -> None:
        if not self.closed:
            super().close()
        self.path.unlink(missing_ok=True)


def _summary(image: Image) -> NodeSummary:
    return NodeSummary(image.id, image.parent, image.layer, image.size, image.created)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
