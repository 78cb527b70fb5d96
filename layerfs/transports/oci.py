"""OCI image layouts (FORMATS §6) as a source and a destination, as a directory or a tar.

Reading (:class:`OciLayoutSource`): ``oci-layout`` must say version ``1.0.0``; every
descriptor of ``index.json`` is an image, an index inside it (a multi-platform image,
nested to any depth) is resolved to the manifest for this host's platform. Manifests and
configs are checked against their descriptors' digests and sizes before ``images()``
returns; layers are checked while they stream (by the destination). Names come from the
``io.containerd.image.name`` annotation, else from ``org.opencontainers.image.ref.name``
when it is a full reference (``name:tag``); a ref name that is only a tag names no
repository, and the image loads untagged. ``oci:DIR:REF`` selects the images whose ref
name (or containerd name) is REF.

Writing (:class:`OciLayoutDestination`): what Docker 25+ writes: uncompressed layers as
blobs named by their diff IDs, the config, an OCI manifest, ``index.json`` with one
descriptor per tag (annotations ``io.containerd.image.name`` and
``org.opencontainers.image.ref.name``; an untagged image gets one without), ``oci-layout``
and, beside them, Docker's ``manifest.json`` and ``repositories`` so that ``docker load``
of any version reads it. Writing into an existing layout directory adds to its index
(replacing descriptors with the same ref name), as skopeo does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.errors import FormatError, LayerfsError, UsageError
from layerfs.model.config import config_diff_ids
from layerfs.model.digest import hex_of, sha256_digest
from layerfs.model.documents import expect_list, expect_object
from layerfs.model.image import decode_json
from layerfs.model.manifest import (
    CONFIG_TYPES,
    IMAGE_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    build_layout_manifest,
    layout_descriptor,
    manifest_kind,
    parse_descriptor,
    select_platform,
)
from layerfs.model.platform import Platform
from layerfs.model.reference import Reference
from layerfs.transports.archive import DockerManifest, containerd_name
from layerfs.transports.base import ImageSource, LayerDesc, SourceImage
from layerfs.transports.files import MAX_DOCUMENT, ArchiveFiles
from layerfs.transports.writer import ImagePlan, LayoutDestination, LayoutWriter, WrittenLayer

log = logging.getLogger(__name__)

LAYOUT_VERSION = "1.0.0"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
_MAX_NESTING = 8


def blob_path(digest: str) -> str:
    return f"blobs/sha256/{hex_of(digest)}"


def descriptor_references(desc: Descriptor, what: str) -> list[str]:
    """The image names a top-level index descriptor carries (see the module docstring)."""
    full = desc.annotations.get(ANNOTATION_IMAGE_NAME)
    if full:
        return [str(Reference.parse(full))]
    ref_name = desc.annotations.get(ANNOTATION_REF_NAME, "")
    if "/" in ref_name or ":" in ref_name:
        parsed = Reference.parse(ref_name)
        if parsed.digest is None:
            return [str(parsed)]
    return []


class OciLayoutSource(ImageSource):
    """Images of an OCI layout (a directory or a tar), read in place."""

    def __init__(self, files: ArchiveFiles, *, reference: str | None = None) -> None:
        self.files = files
        self.description = files.description
        self.reference = reference
        self.platform: Platform | None = None  # the entry an index gives (None: this host)
        self.rejected: list[tuple[str, LayerfsError]] = []
        self._images: list[SourceImage] | None = None

    def images(self) -> list[SourceImage]:
        if self._images is None:
            self._images = self._read()
        return self._images

    def want_platform(self, wanted: Platform) -> None:
        self.platform = wanted

    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        digest = image.layers[index].digest
        assert digest is not None
        return self.files.open(blob_path(digest), f"{image.name}: layer {index + 1}")

    def close(self) -> None:
        self.files.close()

    def _read(self) -> list[SourceImage]:
        layout = expect_object(
            decode_json(self.files.read("oci-layout", "oci-layout"), "oci-layout"), "oci-layout"
        )
        version = layout.get("imageLayoutVersion")
        if version != LAYOUT_VERSION:
            raise FormatError(
                f"unsupported OCI layout version {str(version)[:40]!r} (expected {LAYOUT_VERSION})"
            )
        index = expect_object(
            decode_json(self.files.read("index.json", "index.json"), "index.json"), "index.json"
        )
        entries = expect_list(index.get("manifests"), "index.json manifests")
        by_digest: dict[str, SourceImage] = {}
        images: list[SourceImage] = []
        selected = 0
        for number, entry in enumerate(entries, 1):
            name = f"image {number} of index.json"
            try:
                desc = parse_descriptor(entry, f"index.json manifests[{number - 1}]")
                if self.reference is not None and self.reference not in (
                    desc.annotations.get(ANNOTATION_REF_NAME),
                    desc.annotations.get(ANNOTATION_IMAGE_NAME),
                ):
                    continue
                selected += 1
                references = descriptor_references(desc, name)
                name = references[0] if references else name
                known = by_digest.get(desc.digest)
                if known is not None:
                    known.references.extend(r for r in references if r not in known.references)
                    continue
                image = self._image(desc, name, references)
            except LayerfsError as exc:
                log.debug("rejecting %s", name, exc_info=exc)
                self.rejected.append((name, exc))
                continue
            if image is not None:
                by_digest[desc.digest] = image
                images.append(image)
        if self.reference is not None and not selected:
            raise FormatError(f"the layout has no image named {self.reference!r}")
        return images

    def _blob(self, desc: Descriptor, what: str, limit: int = MAX_DOCUMENT) -> bytes:
        if desc.size > limit:
            raise FormatError(f"{what}: {desc.size} bytes is more than {limit} allowed")
        data = self.files.read(blob_path(desc.digest), what, limit)
        if len(data) != desc.size:
            raise FormatError(
                f"{what}: size mismatch: descriptor says {desc.size}, blob has {len(data)}"
            )
        if sha256_digest(data) != desc.digest:
            raise FormatError(
                f"{what}: digest mismatch: expected {desc.digest}, got {sha256_digest(data)}"
            )
        return data

    def _manifest(self, desc: Descriptor, what: str) -> tuple[Descriptor, dict[str, Any], bytes]:
        for _ in range(_MAX_NESTING):
            raw = self._blob(desc, f"{what}: manifest {desc.digest[:19]}")
            doc = expect_object(decode_json(raw, f"{what}: manifest"), f"{what}: manifest")
            media = doc.get("mediaType") or desc.media_type
            if desc.media_type and doc.get("mediaType") and doc["mediaType"] != desc.media_type:
                raise FormatError(
                    f"{what}: manifest says mediaType {str(doc['mediaType'])[:80]!r}, its "
                    f"descriptor {desc.media_type!r}"
                )
            if doc.get("schemaVersion") != 2:
                raise FormatError(f"{what}: manifest schemaVersion must be 2")
            kind = manifest_kind(media, doc)
            if kind == "index":
                children = [
                    parse_descriptor(m, f"{what}: index manifests")
                    for m in expect_list(doc.get("manifests"), f"{what}: index manifests")
                ]
                desc = select_platform(children, what, self.platform)
                continue
            if kind == "image":
                return desc, doc, raw
            raise FormatError(f"{what}: unsupported manifest media type {str(media)[:80]!r}")
        raise FormatError(f"{what}: indexes nested more than {_MAX_NESTING} deep")

    def _image(self, desc: Descriptor, name: str, references: list[str]) -> SourceImage | None:
        if desc.media_type and desc.media_type not in INDEX_TYPES + IMAGE_TYPES:
            log.info("%s: skipping %s of media type %s", self.description, name, desc.media_type)
            return None
        desc, manifest, raw = self._manifest(desc, name)
        config_desc = parse_descriptor(manifest.get("config"), f"{name}: manifest config")
        if config_desc.media_type not in ("", *CONFIG_TYPES):
            raise FormatError(f"{name}: not an image: config media type {config_desc.media_type!r}")
        config = self._blob(config_desc, f"{name}: config")
        doc = expect_object(decode_json(config, f"{name}: config"), f"{name}: config")
        diff_ids = config_diff_ids(doc, f"{name}: config")
        descs = [
            parse_descriptor(d, f"{name}: manifest layers")
            for d in expect_list(manifest.get("layers"), f"{name}: manifest layers")
        ]
        if len(descs) != len(diff_ids):
            raise FormatError(
                f"{name}: the manifest lists {len(descs)} layers but the config has "
                f"{len(diff_ids)} diff_ids"
            )
        layers = []
        for index, (layer, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
            what = f"{name}: layer {index + 1}"
            if layer.media_type not in LAYER_TYPES:
                raise FormatError(f"{what}: unsupported layer media type {layer.media_type[:80]!r}")
            size = self.files.size(blob_path(layer.digest), what)
            if size != layer.size:
                raise FormatError(
                    f"{what}: size mismatch: descriptor says {layer.size}, blob has {size}"
                )
            layers.append(
                LayerDesc(
                    diff_id=diff_id,
                    digest=layer.digest,
                    size=layer.size,
                    media_type=layer.media_type,
                    urls=list(layer.urls),
                )
            )
        return SourceImage(
            config=config,
            layers=layers,
            references=list(references),
            name=name,
            manifest=raw,
            manifest_media_type=desc.media_type or MEDIA_OCI_MANIFEST,
        )


class OciLayoutDestination(LayoutDestination):
    """Writes an OCI layout (plus Docker's manifest.json) through a :class:`LayoutWriter`."""

    kind = "OCI"

    def __init__(
        self,
        writer: LayoutWriter,
        *,
        tmp_dir: Path | None = None,
        reference: str | None = None,
        docker_compat: bool = True,
        existing_index: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(writer, tmp_dir=tmp_dir, reference=reference)
        self.docker_compat = docker_compat
        self.docker = DockerManifest()
        self._existing = existing_index or []
        self._descriptors: list[dict[str, Any]] = []
        self._sizes: dict[str, int] = {}  # diff ID -> size of the written blob
        self._started = False

    def _start_image(self, plan: ImagePlan | None) -> None:
        if not self._started:
            self.writer.add_dir("blobs", 0)
            self.writer.add_dir("blobs/sha256", 0)
            self._started = True

    def has_layer(self, layer: LayerDesc) -> bool:
        if layer.diff_id is None:
            return False
        if layer.diff_id in self._sizes:
            return True
        size = self.writer.existing_size(blob_path(layer.diff_id))
        if size is not None:
            self._sizes[layer.diff_id] = size
            return True
        return False

    def _layer_name(self, plan: ImagePlan, index: int, diff_id: str) -> str:
        return blob_path(diff_id)

    def _layer_written(self, plan: ImagePlan, index: int, written: WrittenLayer) -> None:
        self._sizes[written.diff_id] = written.size

    def put_image(self, image: SourceImage) -> None:
        plan = self._current(image)
        config_name = blob_path(image.config_digest)
        if self.writer.existing_size(config_name) is None:
            self.writer.add_bytes(config_name, image.config, plan.mtime)
        layers = []
        for diff_id in plan.diff_ids:
            if diff_id not in self._sizes:
                raise FormatError(f"{image.name}: layer {diff_id} was never written")
            layers.append(Descriptor(MEDIA_OCI_LAYER_TAR, diff_id, self._sizes[diff_id]))
        manifest = build_layout_manifest(image.config, layers)
        digest = sha256_digest(manifest)
        if self.writer.existing_size(blob_path(digest)) is None:
            self.writer.add_bytes(blob_path(digest), manifest, 0)
        base = layout_descriptor(MEDIA_OCI_MANIFEST, digest, len(manifest))
        if self.reference is not None:
            self._descriptors.append({**base, "annotations": {ANNOTATION_REF_NAME: self.reference}})
        elif plan.tags:
            for tag in plan.tags:
                annotations = {
                    ANNOTATION_IMAGE_NAME: containerd_name(tag),
                    ANNOTATION_REF_NAME: tag.tag or "latest",
                }
                self._descriptors.append({**base, "annotations": annotations})
        else:
            self._descriptors.append(base)
        if self.docker_compat:
            top = hex_of(plan.diff_ids[-1]) if plan.diff_ids else None
            layer_paths = [blob_path(d) for d in plan.diff_ids]
            self.docker.add(image, config_name, plan.tags, layer_paths, top)
        self._plan = None

    def _finish(self) -> None:
        self._start_image(None)  # the blobs directories even when no image was written
        replaced = {
            d.get("annotations", {}).get(ANNOTATION_REF_NAME)
            for d in self._descriptors
            if d.get("annotations")
        }
        kept = [
            d
            for d in self._existing
            if not (
                isinstance(d.get("annotations"), dict)
                and d["annotations"].get(ANNOTATION_REF_NAME) in replaced
            )
        ]
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": kept + self._descriptors,
        }
        self.writer.add_bytes("index.json", json.dumps(index, separators=(",", ":")).encode(), 0)
        if self.docker_compat:
            self.writer.add_bytes("manifest.json", self.docker.manifest_bytes(), 0)
            repositories = self.docker.repositories_bytes()
            if repositories is not None:
                self.writer.add_bytes("repositories", repositories, 0)
        self.writer.add_bytes(
            "oci-layout", json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode(), 0
        )


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_DOCUMENT + 1)
    if len(data) > MAX_DOCUMENT:
        raise FormatError(f"{path} is larger than {MAX_DOCUMENT} bytes")
    return data


def existing_index(root: Path) -> list[dict[str, Any]] | None:
    """The descriptors of a layout already in ``root`` (to add to), or None if there is none."""
    if not (root / "index.json").is_file():
        if root.is_dir() and any(root.iterdir()):
            raise UsageError(f"{root} is not empty and is not an OCI layout")
        return None
    try:
        layout = decode_json(_read_small(root / "oci-layout"), f"{root}/oci-layout")
        index = decode_json(_read_small(root / "index.json"), f"{root}/index.json")
    except OSError as exc:
        raise FormatError(f"{root} is not a usable OCI layout: {exc}") from exc
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise FormatError(f"{root}: unsupported OCI layout version")
    manifests = expect_list(expect_object(index, "index.json").get("manifests", []), "index.json")
    return [expect_object(m, "index.json manifests") for m in manifests]
