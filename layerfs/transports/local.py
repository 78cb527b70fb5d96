"""The store seen as an image source (save, push) and destination (load, pull).

How an image becomes graph nodes (the rule ``docs/store-format.md`` documents):

* A modern image with layers L1..Ln becomes n nodes. The top node's JSON is
  the image's config, byte for byte, so its ID is the image ID every other tool
  computes. Node k < n has a derived config: ``architecture``, ``os``,
  ``rootfs.diff_ids`` = L1..Lk, ``history`` up to and including the k-th
  entry that has a layer, and ``created`` of that entry, serialised compactly
  with sorted keys; its ID is the sha256 of those bytes. Images sharing a base
  therefore share base nodes, and every node is itself a valid image.
* An image whose source names its parent image (``SourceImage.parent``: manifest.json's
  ``Parent``), when that image is in the store and is a valid parent (its layers a
  prefix of this image's, its history this image's minus the last entry, as Docker's
  loader checks), is built on it: the nodes start above the parent's top node, so the
  parent is this image's parent in the graph and no extra node stands in for it.
* A legacy (v1) chain keeps its v1 IDs and JSON exactly.
* An image without layers is one node without a layer.
* A new image made here (``SourceImage.base``: import makes one on nothing, commit on the
  mounted image) is one node above that image, whatever kind of image it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from layerfs.errors import (
    DepthLimitError,
    DigestMismatchError,
    FormatError,
    ImageNotFoundError,
    LayerfsError,
)
from layerfs.model.config import config_from_chain, derived_config
from layerfs.model.digest import HashingReader, hex_of, is_sha256_digest, sha256_digest
from layerfs.model.image import MAX_IMAGE_DEPTH, Image, canonical_json
from layerfs.model.manifest import COMPRESSED_LAYER_TYPES, MEDIA_OCI_LAYER_TAR
from layerfs.model.reference import (
    Reference,
    familiar_name,
    image_reference,
    normalize_local_name,
    parse_repository_tag,
)
from layerfs.progress import ReportingReader
from layerfs.store.faults import fault
from layerfs.store.files import check_free_space
from layerfs.store.journal import CREATE, Record
from layerfs.store.layers import StagedLayer
from layerfs.store.store import Store
from layerfs.store.workers import MIN_SIZE, IngestWorkers
from layerfs.transports.base import (
    ImageDestination,
    ImageSource,
    LayerDesc,
    LegacyNode,
    ProgressFn,
    SourceImage,
)

log = logging.getLogger(__name__)


class StoreDestination(ImageDestination):
    """Loads images into the store: stage every layer, then publish nodes and tags at once."""

    def __init__(self, store: Store, *, tag: bool = True, command: str | None = None) -> None:
        self.store = store
        self.tag = tag
        self.command = command  # what the journal and messages call it; pull or load if None
        self.session = f"copy-{uuid.uuid4().hex}"
        self._staged: dict[str, StagedLayer] = {}
        self._mutex = threading.Lock()
        self.loaded: list[tuple[SourceImage, list[str]]] = []  # image, messages
        self.rename_messages: list[str] = []
        self._workers: IngestWorkers | None = None
        self._workers_tried = False

    def begin_image(self, image: SourceImage) -> None:
        """Refuse at once when the layers this image still needs cannot fit (known sizes);
        fork ingest workers (once) for an image of several big compressed layers."""
        needed = sum(
            layer.size or 0
            for layer in image.layers
            if not (layer.diff_id and self.store.layers.exists(layer.diff_id))
        )
        what = self._command(image)
        check_free_space(self.store.root, needed, f"cannot {what} {image.name or 'image'}")
        big = [layer for layer in image.layers if _for_workers(layer)]
        if len(big) > 1 and not self._workers_tried:
            self._workers_tried = True
            count = min(len(big), os.cpu_count() or 1)
            self._workers = IngestWorkers.start(self.store.layers, count) if count > 1 else None

    def has_layer(self, layer: LayerDesc) -> bool:
        diff_id = layer.diff_id
        if diff_id is None and layer.digest:
            diff_id = self.store.layers.find_by_blob_digest(layer.digest)
            if diff_id is not None:
                layer.diff_id = diff_id
        if diff_id is None or not is_sha256_digest(diff_id):
            return False
        with self._mutex:
            if diff_id in self._staged:
                return True
        if self.store.layers.exists(diff_id) and not self.store.layers.is_damaged(diff_id):
            # Hold it so that no rmi removes it before our nodes reference it.
            self.store.graph.retain(self.session, diff_id)
            if self.store.layers.exists(diff_id):
                return True
        return False

    @contextlib.contextmanager
    def claim_layer(
        self, layer: LayerDesc, on_wait: Callable[[], None] | None = None
    ) -> Iterator[bool]:
        """Hold the layer's download lock; yield True when the caller must stream it.

        False means another process fetched it meanwhile (this one waited for it, and
        ``on_wait`` was called when the wait began): it is in the store, held, or staged
        here from that process's verified copy. See :mod:`layerfs.store.downloads`.
        """
        key = layer.digest or layer.diff_id
        if not key:
            yield True
            return
        downloads = self.store.downloads
        with downloads.claim(key, on_wait) as claim:
            taken = False
            if claim.waited or claim.advertised:
                taken = self.has_layer(layer)
                if not taken:
                    staged = downloads.take(
                        claim, self.store.tmp, diff_id=layer.diff_id, blob_digest=layer.digest
                    )
                    if staged is not None:
                        self._keep_staged(staged)
                        layer.diff_id = staged.diff_id
                        taken = True
            yield not taken
            if not taken and layer.diff_id is not None:
                with self._mutex:
                    claim.fetched = self._staged.get(layer.diff_id)

    def _keep_staged(self, staged: StagedLayer) -> None:
        with self._mutex:
            previous = self._staged.get(staged.diff_id)
            self._staged[staged.diff_id] = staged
        if previous is not None:
            previous.discard()

    def put_layer(
        self, stream: BinaryIO, layer: LayerDesc, what: str, progress: ProgressFn | None = None
    ) -> None:
        # Without a blob digest to check, the diff ID (hashed by ingest) is the only hash.
        hashing = HashingReader(stream) if layer.digest else None
        reader: Any = hashing if hashing is not None else stream
        if progress is not None:
            reader = ReportingReader(reader, progress)
        if self._workers is not None and _for_workers(layer):
            staged = self._workers.ingest(reader, expected_diff_id=layer.diff_id, what=what)
        else:
            staged = self.store.layers.ingest(
                reader,
                expected_diff_id=layer.diff_id,
                what=what,
                progress=None,
                blob_digest=None,
                decompress=layer.may_be_compressed,
            )
        try:
            if hashing is not None and hashing.digest != layer.digest:
                raise DigestMismatchError(
                    f"{what}: blob digest mismatch: expected {layer.digest}, got {hashing.digest}"
                )
            if layer.digest and layer.digest != staged.diff_id:
                staged.info.blob_digests.append(layer.digest)
                (staged.staging / "info.json").write_bytes(staged.info.to_json())
        except BaseException:
            staged.discard()
            raise
        layer.diff_id = staged.diff_id
        self._keep_staged(staged)

    def _plan(self, image: SourceImage) -> list[tuple[str, bytes, str | None]]:
        """(id, json, diff id) per node, base first."""
        if image.legacy:
            if len(image.legacy) != len(image.layers):
                raise FormatError(f"{image.name}: legacy chain and layers differ in length")
            return [(n.id, n.json, image.layers[i].diff_id) for i, n in enumerate(image.legacy)]
        config = image.config_json()
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(is_sha256_digest(d) for d in diff_ids):
            raise FormatError(f"{image.name}: config has no valid rootfs.diff_ids")
        if len(diff_ids) != len(image.layers):
            raise FormatError(
                f"{image.name}: config lists {len(diff_ids)} diff_ids but the image has "
                f"{len(image.layers)} layers"
            )
        for index, (layer, diff_id) in enumerate(zip(image.layers, diff_ids, strict=True)):
            if layer.diff_id != diff_id:
                raise DigestMismatchError(
                    f"{image.name}: layer {index + 1} has diff ID {layer.diff_id}, "
                    f"the config says {diff_id}"
                )
        parent = self._parent_of(image, config, diff_ids)
        start = len(self.store.graph.layers_of(parent)) if parent is not None else 0
        if start == len(diff_ids):  # no layer, or an empty layer on its parent (a new CMD)
            return [(image.config_digest[7:], image.config, None)]
        nodes = []
        for count in range(start + 1, len(diff_ids)):
            raw = canonical_json(derived_config(config, count))
            nodes.append((hex_of(sha256_digest(raw)), raw, diff_ids[count - 1]))
        nodes.append((image.config_digest[7:], image.config, diff_ids[-1]))
        return nodes

    def _command(self, image: SourceImage) -> str:
        return self.command or ("pull" if image.manifest_digest else "load")

    def _parent_of(
        self, image: SourceImage, config: dict[str, Any], diff_ids: list[str]
    ) -> Image | None:
        """The image ``image.base`` or ``image.parent`` names, if it is stored and a valid
        parent: a base must be (its layers begin this image's), a parent may not be."""
        if image.base is not None:
            base = self.store.graph.get(image.base)
            base_layers = self.store.graph.layers_of(base)
            if diff_ids[: len(base_layers)] != base_layers or len(diff_ids) > len(base_layers) + 1:
                raise FormatError(
                    f"{image.name}: its layers are not those of {image.base[:12]} and one more"
                )
            return base
        if image.parent is None:
            return None
        try:
            parent = self.store.graph.get(image.parent[7:])
        except LayerfsError:
            return None  # not loaded (it failed, say): the image stands alone
        if parent.id != image.parent[7:] or not parent.is_config:
            return None
        history = [h for h in config.get("history") or [] if isinstance(h, dict)]
        if (history or parent.history) and (
            len(history) != len(parent.history) + 1 or history[:-1] != parent.history
        ):
            return None
        parent_layers = self.store.graph.layers_of(parent)
        if diff_ids[: len(parent_layers)] != parent_layers:
            return None
        return parent

    def _base(self, image: SourceImage) -> str:
        """The graph parent of the image's first node: its parent image's top, or none."""
        if image.legacy or (image.parent is None and image.base is None):
            return ""
        config = image.config_json()
        diff_ids = config.get("rootfs", {}).get("diff_ids") or []
        parent = self._parent_of(image, config, list(diff_ids))
        return parent.id if parent is not None else ""

    def put_image(self, image: SourceImage) -> None:
        nodes = self._plan(image)
        graph = self.store.graph
        with graph.transaction():
            parent = self._base(image)
            if image.legacy:
                first_parent = _legacy_parent(image.legacy[0].json)
                if first_parent:
                    if not graph.exists(first_parent):
                        raise ImageNotFoundError(
                            f"{image.name}: parent image {first_parent[:12]} is not loaded"
                        )
                    parent = first_parent
            base_depth = graph.depth(graph.get(parent)) if parent else 0
            if base_depth + len(nodes) > MAX_IMAGE_DEPTH:
                raise DepthLimitError(
                    f"max depth exceeded: {image.name or 'image'} has "
                    f"{base_depth + len(nodes)} layers, the limit is {MAX_IMAGE_DEPTH}"
                )
            top = nodes[-1][0]
            refs = self._refs(image, top) if self.tag else []
            known = self.store.tags.all()
            for ref in [r for r in refs if ":" in r[1]]:
                current = known.get(ref[0], {}).get(ref[1])
                if current is not None and current != top:
                    # As docker: the digest keeps naming the first image (an index pulled
                    # for two platforms); the tags still move.
                    log.warning("digest %s@%s already names image %s", *ref[:2], current[:12])
                    refs.remove(ref)
            record = Record(
                self._command(image),
                CREATE,
                [n for n, _, _ in nodes if not (graph.root / n / "json").is_file()],
                sorted({d for _, _, d in nodes if d and not self.store.layers.exists(d)}),
                refs,
            )
            with self.store.journal.pending(record):
                for depth, (node_id, raw, diff_id) in enumerate(nodes, base_depth):
                    layer: StagedLayer | str | None = diff_id
                    if diff_id is not None:
                        with self._mutex:
                            staged = self._staged.get(diff_id)
                        if staged is not None and (
                            not self.store.layers.exists(diff_id)
                            or self.store.layers.is_damaged(diff_id)
                        ):
                            layer = staged
                    graph.register(raw, node_id, parent=parent, layer=layer, parent_depth=depth)
                    parent = node_id
                for desc in image.layers:
                    if (
                        desc.diff_id
                        and desc.digest
                        and desc.digest != desc.diff_id
                        and self.store.layers.exists(desc.diff_id)
                    ):
                        self.store.layers.add_blob_digest(desc.diff_id, desc.digest)
                fault("publish.between-image-and-tag")
                messages = self.store.tags.set_refs(refs) if refs else []
        self.rename_messages.extend(messages)
        self.loaded.append((image, messages))

    @staticmethod
    def _refs(image: SourceImage, top: str) -> list[tuple[str, str, str]]:
        """(repository, tag or digest, image ID) for every name the image is loaded under."""
        refs: list[tuple[str, str, str]] = []
        for ref in image.references:
            repo, tag_or_digest = parse_repository_tag(ref)
            refs.append((familiar_name(repo), tag_or_digest or "latest", top))
            if image.manifest_digest:
                refs.append((familiar_name(repo), image.manifest_digest, top))
        digest_ref = image.extra.get("digest_ref")
        if digest_ref:
            refs.append((familiar_name(digest_ref[0]), digest_ref[1], top))
        return list(dict.fromkeys(refs))

    def commit(self) -> None:
        pass

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        with self._mutex:
            staged = list(self._staged.values())
            self._staged.clear()
        for layer in staged:
            layer.discard()  # published ones were moved away already
        self.store.graph.release(self.session)


def _for_workers(layer: LayerDesc) -> bool:
    """A layer worth an ingest worker: compressed and big (see layerfs.store.workers)."""
    return layer.media_type in COMPRESSED_LAYER_TYPES and (layer.size or 0) >= MIN_SIZE


def _legacy_parent(raw: bytes) -> str:
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    parent = doc.get("parent") if isinstance(doc, dict) else None
    return parent if isinstance(parent, str) else ""


class StoreSource(ImageSource):
    """Images of the store, by name, as a source for save and push."""

    def __init__(self, store: Store, names: list[str]) -> None:
        self.store = store
        self.names = names
        self.session = f"source-{uuid.uuid4().hex}"

    def images(self) -> list[SourceImage]:
        # Resolved and held in one locked section: an rmi comes wholly before (the name is
        # unknown) or after (the image is held and stays).
        with self.store.graph.transaction():
            return self._images()

    def _images(self) -> list[SourceImage]:
        result: list[SourceImage] = []
        by_id: dict[str, SourceImage] = {}
        for name in self.names:
            for image, references in self._resolve(name):
                if image.id in by_id:
                    known = by_id[image.id].references
                    known.extend(r for r in references if r not in known)
                    continue
                source_image = self._describe(image, references, name)
                by_id[image.id] = source_image
                result.append(source_image)
        return result

    def _describe(self, image: Image, references: list[str], name: str) -> SourceImage:
        chain = list(reversed(self.store.graph.walk_history(image)))
        # Held while the copy runs: no rmi in another process removes them under us.
        self.store.graph.retain(self.session, *(n.id for n in chain))
        diff_ids = [n.layer for n in chain if n.layer]
        layers = []
        for diff_id in diff_ids:
            info = self.store.layers.info(diff_id)
            layers.append(
                LayerDesc(
                    diff_id=diff_id,
                    digest=diff_id,
                    size=info.tar_size,
                    media_type=MEDIA_OCI_LAYER_TAR,
                    known_blob_digests=list(info.blob_digests),
                )
            )
        legacy = None
        if image.is_config:
            config = image.raw_json
        else:
            config = config_from_chain(chain, diff_ids)
            if all(n.layer for n in chain):
                legacy = [LegacyNode(n.id, n.raw_json) for n in chain]
        source_image = SourceImage(
            config=config, layers=layers, references=references, name=name, legacy=legacy
        )
        source_image.extra["image_id"] = image.id
        return source_image

    def _resolve(self, name: str) -> list[tuple[Image, list[str]]]:
        """Images named by ``name`` with the references to save them under.

        As with docker save: a bare repository name means every tag of it (a repository
        with digests only: its images, unnamed), a ``repo:tag`` that tag, an ID, prefix or
        ``repo@digest`` the image alone (no names).
        """
        tags = self.store.tags
        repo, ref = parse_repository_tag(name)
        if not ref:
            refs = tags.get(repo)
            if refs:
                local = normalize_local_name(repo)
                grouped: dict[str, list[str]] = {}
                for key, image_id in sorted(refs.items()):
                    if ":" not in key:  # digest keys are never written as names
                        grouped.setdefault(image_id, []).append(image_reference(local, key))
                if not grouped:
                    # A repository known only by digests: its images, without names.
                    grouped = {image_id: [] for image_id in sorted(set(refs.values()))}
                return [(self.store.graph.get(i), r) for i, r in grouped.items()]
        image = tags.lookup_image(name)
        try:
            parsed = Reference.parse(name)
        except LayerfsError:
            return [(image, [])]
        named = tags.get_image(parsed.repository, parsed.digest or parsed.tag or "latest")
        if (
            named is not None
            and named.id == image.id
            and parsed.digest is None
            and not image.id.startswith(name.removeprefix("sha256:"))
        ):
            return [(image, [str(parsed)])]
        return [(image, [])]

    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        diff_id = image.layers[index].diff_id
        assert diff_id is not None
        return self.store.layers.open_tar(diff_id)

    def close(self) -> None:
        self.store.graph.release(self.session)
