"""A v2 registry as an image source (pull) and destination (push).

pull = ``copy(RegistrySource → StoreDestination)``; push = ``copy(StoreSource →
RegistryDestination)``; the wire is in :mod:`layerfs.registry`.

The source resolves a tag or digest to one image manifest (choosing the
platform from an index), checks the manifest digest when pulling by digest, and
the config against its descriptor; each layer is then a resumable stream the
store decompresses, hashes and indexes in one pass. Schema1 manifests (old
registries) become a modern config once their layers' diff IDs are known
(:class:`Schema1Image`).

The destination gzips each layer at push time with the fastest compressor at
hand (ISA-L's igzip when installed, else zlib at level 1), uploads it, and
records the compressed digest in the store (the layer's ``blob_digests`` and
the node's ``checksum``) so the next push neither compresses nor uploads it
again: a HEAD finds it, or a cross-repository mount copies it inside the
registry. Before the layers, it builds the manifest it would push from those
records and asks the registry for the tag's digest (one HEAD): when it is the
same, the image is there and nothing else is sent; otherwise every layer's
blobs are checked at once, not one after the other.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from layerfs.errors import DigestMismatchError, FormatError, LayerfsError, RegistryError
from layerfs.model.config import schema1_config
from layerfs.model.digest import is_sha256_digest, sha256_digest
from layerfs.model.image import decode_json_object
from layerfs.model.manifest import (
    COMPRESSED_LAYER_TYPES,
    GZIP_LAYER_TYPES,
    MEDIA_DOCKER_LAYER_GZIP,
    Descriptor,
    ImageManifest,
    IndexManifest,
    Schema1Manifest,
    blob_layer_type,
    build_image_manifest,
    layer_type_for_format,
    parse,
    select_platform,
)
from layerfs.model.platform import Platform, host_platform
from layerfs.model.reference import Reference, remote_name
from layerfs.progress import Progress
from layerfs.registry.blobs import BlobReader, Repository
from layerfs.registry.client import RegistryClient, RegistryOptions
from layerfs.store.blobrecords import BlobRecord, BlobRecords
from layerfs.store.store import Store
from layerfs.transports.base import ImageDestination, ImageSource, LayerDesc, SourceImage

_fast_zlib: types.ModuleType
try:  # ISA-L's igzip: about 5x zlib's speed at level 1 here (docs/benchmarks.md)
    from isal import isal_zlib as _fast_zlib

    FAST_GZIP = "isal"
except ImportError:  # pragma: no cover - isal is a dependency, but keep working without
    _fast_zlib = zlib
    FAST_GZIP = "zlib"

log = logging.getLogger(__name__)

MAX_CONFIG_SIZE = 8 << 20
_READ = 1 << 20


class Schema1Image(SourceImage):
    """A schema1 image: its config exists only once its layers' diff IDs are known.

    Docker 1.10+ builds the config of a schema1 image from the v1 JSON and the
    diff IDs it computed while downloading (FORMATS §3.4). The copy pipeline
    reads ``config`` only after the layers are in (``put_image``), so the config
    is computed on first access after that; before, it is a placeholder.
    """

    schema1: Schema1Manifest | None = None
    _final: bytes | None = None
    _placeholder: bytes = b"{}"

    @property
    def config(self) -> bytes:
        if self._final is not None or self.schema1 is None:
            return self._final if self._final is not None else self._placeholder
        known = {layer.digest: layer.diff_id for layer in self.layers if layer.diff_id}
        for layer in self.layers:  # a repeated blob was copied once: share its diff ID
            if layer.diff_id is None and layer.digest in known:
                layer.diff_id = known[layer.digest]
        diff_ids = [layer.diff_id for layer in self.layers]
        if not all(diff_ids):
            return self._placeholder
        self._final = schema1_config(self.schema1, [d for d in diff_ids if d])
        return self._final

    @config.setter
    def config(self, value: bytes) -> None:
        self._placeholder = value


# -- pull ------------------------------------------------------------------------------------


class RegistrySource(ImageSource):
    """One image of a registry, by tag or digest, for the wanted platform."""

    def __init__(
        self,
        client: RegistryClient,
        reference: Reference,
        *,
        platform: Platform | None = None,
        progress: Progress | None = None,
        known_config: Callable[[str], bytes | None] | None = None,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.owns_client = owns_client  # close() closes the client too
        self.known_config = known_config  # config digest → bytes we already have
        self.reference = reference
        self.platform = platform or host_platform()
        self.progress = progress
        self.repository = Repository(client, reference.remote_name)
        self.manifest_digest: str | None = None
        self.readers: list[BlobReader] = []  # the downloads handed out
        self.description = f"docker://{reference}"

    @property
    def what(self) -> str:
        return str(self.reference)

    def want_platform(self, wanted: Platform) -> None:
        self.platform = wanted

    @property
    def resumes(self) -> int:
        """How many times a layer download was picked up again where it broke."""
        return sum(reader.resumes for reader in self.readers)

    def images(self) -> list[SourceImage]:
        ref = self.reference.ref
        raw, ctype, _ = self.repository.get_manifest(ref)
        manifest = parse(raw, ctype, f"manifest of {self.what}")
        if self.reference.digest and manifest.digest != self.reference.digest:
            raise DigestMismatchError(
                f"manifest of {self.what}: digest mismatch: got {manifest.digest}"
            )
        self.manifest_digest = manifest.digest
        if isinstance(manifest, IndexManifest):
            child = select_platform(manifest.manifests, self.what, self.platform).digest
            raw, ctype, _ = self.repository.get_manifest(child)
            inner = parse(raw, ctype, f"manifest {child[:19]} of {self.what}")
            if inner.digest != child:
                raise DigestMismatchError(
                    f"manifest {child} of {self.what}: digest mismatch: got {inner.digest}"
                )
            if isinstance(inner, IndexManifest):
                raise FormatError(f"{self.what}: nested indexes are not supported")
            manifest = inner
        # The digest reference is recorded by the caller after the copy: for an index it
        # can already name this platform's sibling, which docker reports and keeps.
        references = [str(self.reference)] if self.reference.tag else []
        if isinstance(manifest, Schema1Manifest):
            image = self._schema1_image(manifest, references)
        else:
            image = self._image(manifest, references)
        if self.manifest_digest:  # the store sets it with the tag, unless it names another
            image.extra["digest_ref"] = (self.reference.repository, self.manifest_digest)
        return [image]

    def _image(self, manifest: ImageManifest, references: list[str]) -> SourceImage:
        config = self.known_config(manifest.config.digest) if self.known_config else None
        if config is None:
            config = self.repository.get_blob(manifest.config.digest, MAX_CONFIG_SIZE)
        if sha256_digest(config) != manifest.config.digest:
            raise DigestMismatchError(
                f"config of {self.what}: digest mismatch: expected {manifest.config.digest}, "
                f"got {sha256_digest(config)}"
            )
        doc = decode_json_object(config, f"config of {self.what}")
        try:
            diff_ids = doc["rootfs"]["diff_ids"]
        except (KeyError, TypeError) as exc:
            raise FormatError(f"config of {self.what} has no rootfs.diff_ids: {exc}") from None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
            raise FormatError(
                f"{self.what}: the manifest lists {len(manifest.layers)} layers but the config "
                f"{len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff IDs"
            )
        layers = [
            LayerDesc(
                diff_id=diff_id if is_sha256_digest(diff_id) else None,
                digest=desc.digest,
                size=desc.size,
                media_type=desc.media_type,
                urls=list(desc.urls),
            )
            for desc, diff_id in zip(manifest.layers, diff_ids, strict=True)
        ]
        return SourceImage(
            config=config,
            layers=layers,
            references=references,
            name=self.what,
            manifest=manifest.raw,
            manifest_media_type=manifest.media_type,
        )

    def _schema1_image(self, manifest: Schema1Manifest, references: list[str]) -> SourceImage:
        layers = [
            LayerDesc(diff_id=None, digest=blob, size=None, media_type=MEDIA_DOCKER_LAYER_GZIP)
            for i, blob in enumerate(manifest.blob_sums)
            if not manifest.throwaway(i)
        ]
        image = Schema1Image(
            config=b"{}",
            layers=layers,
            references=references,
            name=self.what,
            manifest=manifest.raw,
            manifest_media_type="schema1",
        )
        image.schema1 = manifest
        return image

    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        layer = image.layers[index]
        assert layer.digest is not None
        key = layer.diff_id or layer.digest
        progress = self.progress

        def verifying() -> None:
            if progress is not None:
                progress.status(key, "Verifying Checksum")

        if progress is not None:
            progress.status(key, "Downloading")
        reader = self.repository.open_blob(layer.digest, layer.size, verifying)
        self.readers.append(reader)
        return reader  # type: ignore[return-value]

    def close(self) -> None:
        try:
            for reader in self.readers:
                reader.close()
        finally:
            if self.owns_client:
                self.client.close()


# -- push ------------------------------------------------------------------------------------


class _Compressed:
    """Gzip a layer tar on the fly, hashing and counting the output."""

    def __init__(self, stream: BinaryIO, level: int, progress: Callable[[int], None] | None):
        self.stream = stream
        self.level = level
        self.hash = hashlib.sha256()
        self.size = 0
        self.progress = progress

    def pieces(self) -> Iterator[bytes]:
        compressor = _fast_zlib.compressobj(self.level, zlib.DEFLATED, 31)
        while True:
            data = self.stream.read(_READ)
            if not data:
                break
            if self.progress is not None:
                self.progress(len(data))
            out = compressor.compress(data)
            if out:
                self.hash.update(out)
                self.size += len(out)
                yield out
        out = compressor.flush()
        self.hash.update(out)
        self.size += len(out)
        yield out

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class RegistryDestination(ImageDestination):
    """Pushes store images to one repository, under the tags their references name."""

    def __init__(
        self,
        client: RegistryClient,
        target: Reference,
        *,
        store: Store | None = None,
        tags: list[str] | None = None,
        fmt: str = "docker",
        level: int | None = None,
        progress: Progress | None = None,
        owns_client: bool = False,
    ) -> None:
        self.tags = tags
        self.owns_client = owns_client  # close() closes the client too
        if fmt not in ("docker", "oci"):
            raise LayerfsError(f"unknown manifest format {fmt!r}: use docker or oci")
        self.client = client
        self.target = target
        self.store = store
        self.fmt = fmt
        self.level = level if level is not None else 1
        self.progress = progress
        self.repository = Repository(client, target.remote_name, "pull,push")
        self.repo_key = f"{target.registry}/{target.remote_name}"
        self.records = BlobRecords(store) if store is not None else None
        self._blobs: dict[str, Descriptor] = {}  # diff ID → pushed blob
        self._mutex = threading.Lock()
        self.pushed: list[tuple[str, str, int]] = []  # (tag, digest, size)
        self.mounted = 0
        self.uploaded = 0
        self._checked: dict[str, bool] = {}  # layer key → has_layer, checked ahead
        self._present: dict[str, set[str]] = {}  # config digest → tags already pushed

    # -- before the layers ---------------------------------------------------------------

    def begin_image(self, image: SourceImage) -> None:
        """Is the image there already (one manifest HEAD)? Else check its blobs at once."""
        tags = self._tags(image)
        predicted = self._predict(image)
        if predicted is not None and tags:
            manifest, _ = build_image_manifest(image.config, predicted, self.fmt)
            digest = sha256_digest(manifest)
            present = {t for t in tags if self.repository.manifest_digest(t) == digest}
            if present:
                self._present[image.config_digest] = present
                for layer, desc in zip(image.layers, predicted, strict=True):
                    key = layer.diff_id or layer.digest or ""
                    self._found(layer, desc, "Layer already exists", key)
                    self._checked[key] = True
                return
        layers = {layer.diff_id or layer.digest or "": layer for layer in image.layers}
        layers.pop("", None)
        if len(layers) > 1:
            with ThreadPoolExecutor(min(len(layers), 8)) as pool:
                found = pool.map(self._lookup, layers.values())
                self._checked.update(zip(layers, found, strict=True))

    def _predict(self, image: SourceImage) -> list[Descriptor] | None:
        """The layer descriptors of the manifest a push would write, if the store knows them."""
        if self.records is None:
            return None
        descriptors = []
        for layer in image.layers:
            best: BlobRecord | None = None
            for digest in layer.known_blob_digests:
                record = self.records.get(digest) if digest != layer.diff_id else None
                if record is None or record.size < 0 or not self._usable(record.media_type):
                    continue
                if self.repo_key in record.repositories:
                    best = record
                    break
                best = best or record
            if best is None:
                return None
            descriptors.append(Descriptor(best.media_type, best.digest, best.size))
        return descriptors

    # -- layers --------------------------------------------------------------------------

    def _usable(self, media_type: str) -> bool:
        if self.fmt == "oci":
            return media_type in COMPRESSED_LAYER_TYPES
        return media_type in GZIP_LAYER_TYPES

    def has_layer(self, layer: LayerDesc) -> bool:
        checked = self._checked.pop(layer.diff_id or layer.digest or "", None)
        return checked if checked is not None else self._lookup(layer)

    def _lookup(self, layer: LayerDesc) -> bool:
        key = layer.diff_id or layer.digest or ""
        candidates = [d for d in layer.known_blob_digests if d != layer.diff_id]
        if layer.digest and layer.digest != layer.diff_id and layer.digest not in candidates:
            candidates.insert(0, layer.digest)
        for digest in candidates:
            record = self.records.get(digest) if self.records is not None else None
            media = record.media_type if record is not None else None
            if media is not None and not self._usable(media):
                continue
            size = self.repository.blob_size(digest)
            if size is not None:
                if media is None:
                    media = self._probe_media(digest)
                    if media is None or not self._usable(media):
                        continue
                if size < 0:
                    size = record.size if record is not None else -1
                if size >= 0:
                    self._found(layer, Descriptor(media, digest, size), "Layer already exists", key)
                    return True
            if record is None:
                continue
            for source in record.repositories:
                host, _, name = source.partition("/")
                if host != self.target.registry or name == self.repository.name:
                    continue
                if self.repository.mount_blob(digest, name):
                    with self._mutex:
                        self.mounted += 1
                    status = f"Mounted from {name}"
                    self._found(
                        layer, Descriptor(record.media_type, digest, record.size), status, key
                    )
                    return True
        return False

    def _found(self, layer: LayerDesc, desc: Descriptor, status: str, key: str) -> None:
        if layer.diff_id:
            with self._mutex:
                self._blobs[layer.diff_id] = desc
        if self.progress is not None:
            self.progress.note(key, status)  # shown instead of the pipeline's "Already exists"

    def _probe_media(self, digest: str) -> str | None:
        """The type of a blob we know only by digest: look at its first bytes."""
        try:
            reader = self.repository.open_blob(digest, None)
            head = reader.read(4)
            reader.close()
        except RegistryError:
            return None
        media = layer_type_for_format(blob_layer_type(head), "docker")
        return media if media in COMPRESSED_LAYER_TYPES else None

    def put_layer(
        self,
        stream: BinaryIO,
        layer: LayerDesc,
        what: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        compressed = _Compressed(stream, self.level, progress)
        digest = self.repository.upload_stream(compressed.pieces(), compressed.digest)
        desc = Descriptor(MEDIA_DOCKER_LAYER_GZIP, digest, compressed.size)
        with self._mutex:
            self.uploaded += 1
            if layer.diff_id:
                self._blobs[layer.diff_id] = desc
        if layer.diff_id:
            self._remember(layer.diff_id, desc)

    def _remember(self, diff_id: str, desc: Descriptor) -> None:
        """Record the compressed digest so the next push neither compresses nor uploads."""
        if self.store is None:
            return
        try:
            layers = self.store.layers
            if layers.exists(diff_id) and desc.digest not in layers.info(diff_id).blob_digests:
                with self.store.graph.transaction():
                    layers.add_blob_digest(diff_id, desc.digest)
            if self.records is not None:
                self.records.add(desc.digest, desc.size, desc.media_type, diff_id, self.repo_key)
        except LayerfsError:
            log.warning("cannot record the digest of layer %s", diff_id[:19], exc_info=True)

    # -- images --------------------------------------------------------------------------

    def put_image(self, image: SourceImage) -> None:
        descriptors = []
        for layer in image.layers:
            desc = self._blobs.get(layer.diff_id or "")
            if desc is None:
                raise RegistryError(f"{image.name}: layer {layer.diff_id} was not pushed")
            descriptors.append(desc)
        config_digest = sha256_digest(image.config)
        present = self._present.pop(config_digest, set())
        if not present and self.repository.blob_size(config_digest) is None:
            self.repository.upload_bytes(image.config, config_digest)
        manifest, media_type = build_image_manifest(image.config, descriptors, self.fmt)
        digest = sha256_digest(manifest)
        tags = self._tags(image)
        for tag in tags:
            if tag in present:  # the registry has this manifest under this tag
                self.pushed.append((tag, digest, len(manifest)))
                continue
            answered = self.repository.put_manifest(tag, manifest, media_type)
            if answered and answered != digest:
                log.warning("registry reports digest %s for %s, computed %s", answered, tag, digest)
            self.pushed.append((tag, digest, len(manifest)))
        if not tags:  # no tag: push by digest only
            self.repository.put_manifest(digest, manifest, media_type)
            self.pushed.append(("", digest, len(manifest)))
        self._set_layer_digests(image)
        for layer, desc in zip(image.layers, descriptors, strict=True):
            if layer.diff_id and self.records is not None:
                self._remember(layer.diff_id, desc)

    def _tags(self, image: SourceImage) -> list[str]:
        if self.tags is not None:
            return list(self.tags)
        tags = []
        for ref in image.references:
            try:
                parsed = Reference.parse(ref)
            except LayerfsError:
                continue
            if (
                parsed.tag
                and remote_name(parsed.repository) == self.repository.name
                and parsed.registry == self.target.registry
                and parsed.tag not in tags
            ):
                tags.append(parsed.tag)
        return tags

    def _set_layer_digests(self, image: SourceImage) -> None:
        """Docker's ``checksum`` per node: the registry digest of its compressed layer."""
        if self.store is None or "image_id" not in image.extra:
            return
        graph = self.store.graph
        try:
            for node in graph.walk_history(graph.get(image.extra["image_id"])):
                desc = self._blobs.get(node.layer or "")
                if desc is None:
                    continue
                try:
                    current = graph.get_layer_digest(node.id)
                except LayerfsError:
                    current = None
                if current != desc.digest:
                    graph.set_layer_digest(node.id, desc.digest)
        except LayerfsError:
            log.warning("cannot record layer digests of %s", image.name, exc_info=True)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        if self.owns_client:
            self.client.close()


def config_from_store(store: Store) -> Callable[[str], bytes | None]:
    """A config we already hold: the image whose ID is the config's digest."""

    def known(digest: str) -> bytes | None:
        try:
            if store.graph.exists(digest[7:]):
                raw = store.graph.get(digest[7:]).raw_json
                return raw if sha256_digest(raw) == digest else None
        except LayerfsError:
            pass
        return None

    return known


def record_pulled(store: Store, source: RegistrySource, images: list[SourceImage]) -> None:
    """After a pull: remember each layer's blob (type, size, repository) for later pushes."""
    records = BlobRecords(store)
    repo_key = f"{source.reference.registry}/{source.repository.name}"
    for image in images:
        for layer in image.layers:
            if layer.digest and layer.diff_id and layer.size is not None:
                try:
                    records.add(layer.digest, layer.size, layer.media_type, layer.diff_id, repo_key)
                except (OSError, LayerfsError):
                    log.debug("cannot record blob %s", layer.digest, exc_info=True)


# -- the docker:// transport -------------------------------------------------------------


def pool_size(max_concurrent: int) -> int:
    """Connections to keep per registry: one per parallel layer and a few for documents."""
    return max(10, max_concurrent + 2)


def open_registry_source(
    reference: Reference,
    *,
    options: RegistryOptions | None = None,
    platform: Platform | None = None,
    progress: Progress | None = None,
    store: Store | None = None,
    max_concurrent: int = 3,
) -> RegistrySource:
    """``docker://NAME`` as a source: the image ``reference`` names, with a client of its own.

    With ``store``, a config the store already holds is not downloaded again.
    """
    client = RegistryClient(reference.registry, options, pool_size=pool_size(max_concurrent))
    return RegistrySource(
        client,
        reference,
        platform=platform,
        progress=progress,
        known_config=config_from_store(store) if store is not None else None,
        owns_client=True,
    )


def open_registry_destination(
    reference: Reference,
    *,
    tags: list[str] | None = None,
    options: RegistryOptions | None = None,
    store: Store | None = None,
    fmt: str = "docker",
    level: int | None = None,
    progress: Progress | None = None,
    max_concurrent: int = 3,
) -> RegistryDestination:
    """``docker://NAME`` as a destination: pushes to ``reference``'s repository.

    ``tags`` None: each image under the tags its references give in that repository.
    With ``store`` (the images come from it), each layer's compressed digest is recorded
    so that the next push neither compresses nor uploads it again.
    """
    client = RegistryClient(reference.registry, options, pool_size=pool_size(max_concurrent))
    try:
        return RegistryDestination(
            client,
            reference,
            store=store,
            tags=tags,
            fmt=fmt,
            level=level,
            progress=progress,
            owns_client=True,
        )
    except BaseException:
        client.close()
        raise
