"""The image manifest vocabulary: media types, descriptors, manifests and indexes.

The one place that says what a manifest is, for every transport, the registry client and
the store: media types, :class:`Descriptor` (parsed strictly), Docker schema2 and OCI
image manifests, Docker manifest lists and OCI indexes (and the rule that tells one from
the other, :func:`manifest_kind`), schema1 manifests (signed or not, read only) as old
registries serve them, the layer media types and how they map between the Docker and
OCI vocabularies, the choice of one platform's entry in an index, and building the
manifest a push writes. What an image config holds is :mod:`layerfs.model.config`.
Pure functions on bytes, no I/O.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from layerfs.compression import detect
from layerfs.errors import DigestMismatchError, FormatError
from layerfs.model import platform
from layerfs.model.digest import is_sha256_digest, sha256_digest
from layerfs.model.documents import (
    expect_digest,
    expect_object,
    expect_size,
    expect_str,
    expect_str_list,
    expect_str_map,
)
from layerfs.model.image import decode_json_object

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
SCHEMA1_TYPES = (MEDIA_SCHEMA1_SIGNED, MEDIA_SCHEMA1)
CONFIG_TYPES = (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG)
# Every type we can parse, best first (FORMATS §8.4: leaving schema2 out makes
# distribution down-convert to schema1, with another digest).
ACCEPT = ", ".join((*INDEX_TYPES, *IMAGE_TYPES, *SCHEMA1_TYPES))

GZIP_LAYER_TYPES = (MEDIA_DOCKER_LAYER_GZIP, MEDIA_OCI_LAYER_GZIP)
COMPRESSED_LAYER_TYPES = (*GZIP_LAYER_TYPES, MEDIA_OCI_LAYER_ZSTD)
# Every layer type an image may list (OCI image-spec "Image Layer Filesystem Changeset").
LAYER_TYPES = (
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_LAYER_ZSTD,
    MEDIA_OCI_LAYER_TAR.replace(".layer.", ".layer.nondistributable."),
    MEDIA_OCI_LAYER_GZIP.replace(".layer.", ".layer.nondistributable."),
    MEDIA_OCI_LAYER_ZSTD.replace(".layer.", ".layer.nondistributable."),
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_DOCKER_LAYER_TAR,
    MEDIA_DOCKER_FOREIGN,
)

MAX_MANIFEST_SIZE = 4 << 20


@dataclass
class Descriptor:
    """An OCI content descriptor, checked."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    urls: list[str] = field(default_factory=list)


def parse_descriptor(value: Any, what: str) -> Descriptor:
    doc = expect_object(value, what)
    media_type = doc.get("mediaType", "")
    if media_type is None:
        media_type = ""
    expect_str(media_type, f"{what} mediaType")
    digest = expect_digest(doc.get("digest"), f"{what} digest")
    size = expect_size(doc.get("size"), f"{what} size")
    annotations = doc.get("annotations") or {}
    expect_str_map(annotations, f"{what} annotations")
    platform = doc.get("platform")
    if platform is not None:
        expect_object(platform, f"{what} platform")
    urls = doc.get("urls") or []
    expect_str_list(urls, f"{what} urls")
    return Descriptor(media_type, digest, size, annotations, platform, urls)


def manifest_kind(media_type: str, doc: dict[str, Any]) -> str | None:
    """``"index"``, ``"image"`` or None: what a schema 2 document is.

    Its media type decides; an OCI document may omit it, and then its shape does (a
    ``manifests`` list makes an index, a ``layers`` list an image manifest).
    """
    if media_type in INDEX_TYPES:
        return "index"
    if media_type in IMAGE_TYPES:
        return "image"
    if not media_type:
        if "manifests" in doc:
            return "index"
        if "layers" in doc:
            return "image"
    return None


def select_platform(
    descriptors: list[Descriptor], what: str, wanted: platform.Platform | None = None
) -> Descriptor:
    """The entry of an index for ``wanted`` (this host), by the rules of a registry pull."""
    entries = [{"platform": d.platform, "annotations": d.annotations} for d in descriptors]
    chosen = platform.select(entries, wanted or platform.host_platform(), what)
    return next(d for d, e in zip(descriptors, entries, strict=True) if e is chosen)


def blob_layer_type(head: bytes) -> str:
    """The OCI layer media type matching a layer blob's first bytes."""
    kind = detect(head)
    if kind == "gzip":
        return MEDIA_OCI_LAYER_GZIP
    if kind == "zstd":
        return MEDIA_OCI_LAYER_ZSTD
    return MEDIA_OCI_LAYER_TAR


def layer_type_for_format(media_type: str, fmt: str) -> str:
    """A layer type in the vocabulary of the manifest format being written (docker, oci)."""
    if fmt == "oci":
        return MEDIA_OCI_LAYER_GZIP if media_type in GZIP_LAYER_TYPES else media_type
    return MEDIA_DOCKER_LAYER_GZIP if media_type in GZIP_LAYER_TYPES else media_type


@dataclass
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]  # base first
    raw: bytes
    digest: str


@dataclass
class IndexManifest:
    media_type: str
    manifests: list[Descriptor]
    raw: bytes
    digest: str


@dataclass
class Schema1Manifest:
    name: str
    tag: str
    architecture: str
    blob_sums: list[str]  # base first
    v1_compatibility: list[str]  # base first, the exact strings
    raw: bytes
    digest: str  # of the payload, signatures removed

    def throwaway(self, index: int) -> bool:
        doc = json.loads(self.v1_compatibility[index])
        return bool(isinstance(doc, dict) and doc.get("throwaway"))


Manifest = ImageManifest | IndexManifest | Schema1Manifest


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse(raw: bytes, content_type: str | None, what: str) -> Manifest:
    """Parse a manifest, dispatching on Content-Type; the body's mediaType must agree."""
    if len(raw) > MAX_MANIFEST_SIZE:
        raise FormatError(f"{what}: manifest larger than {MAX_MANIFEST_SIZE} bytes")
    doc = decode_json_object(raw, what)
    declared = doc.get("mediaType")
    ctype = _base_type(content_type)
    schema = doc.get("schemaVersion")
    if schema == 1 or ctype in SCHEMA1_TYPES:
        return parse_schema1(raw, doc, what)
    if schema != 2:
        raise FormatError(f"{what}: unsupported schemaVersion {schema!r}")
    if declared is not None and not isinstance(declared, str):
        raise FormatError(f"{what}: mediaType is not a string")
    kind = declared or (ctype if ctype in (*IMAGE_TYPES, *INDEX_TYPES) else "")
    if declared and ctype in (*IMAGE_TYPES, *INDEX_TYPES) and ctype != declared:
        raise FormatError(f"{what}: served as {ctype} but its mediaType says {declared}")
    found = manifest_kind(kind, doc)
    if found is None and kind:
        raise FormatError(f"{what}: unsupported manifest type {kind}")
    if not kind:  # no type and no shape either: checked as an image manifest below
        kind = MEDIA_OCI_INDEX if found == "index" else MEDIA_OCI_MANIFEST
    digest = sha256_digest(raw)
    if found == "index":
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise FormatError(f"{what}: index has no manifests list")
        children = [parse_descriptor(e, f"{what}: manifests[{i}]") for i, e in enumerate(entries)]
        return IndexManifest(kind, children, raw, digest)
    config = parse_descriptor(doc.get("config"), f"{what}: config")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list):
        raise FormatError(f"{what}: manifest has no layers list")
    layers = [parse_descriptor(d, f"{what}: layers[{i}]") for i, d in enumerate(layers_doc)]
    return ImageManifest(kind, config, layers, raw, digest)


# -- schema1 ---------------------------------------------------------------------------


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def schema1_payload(raw: bytes, doc: dict[str, Any], what: str) -> bytes:
    """The signed content of a schema1 manifest: the bytes its digest is taken of."""
    signatures = doc.get("signatures")
    if not signatures:
        return raw
    if not isinstance(signatures, list) or not isinstance(signatures[0], dict):
        raise FormatError(f"{what}: malformed signatures")
    try:
        protected = json.loads(_b64url(signatures[0]["protected"]))
        length = int(protected["formatLength"])
        tail = _b64url(protected["formatTail"])
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise FormatError(f"{what}: malformed JWS protected header: {str(exc)[:80]}") from None
    if not 0 < length <= len(raw):
        raise FormatError(f"{what}: JWS formatLength out of range")
    return raw[:length] + tail


def parse_schema1(raw: bytes, doc: dict[str, Any], what: str) -> Schema1Manifest:
    payload = schema1_payload(raw, doc, what)
    fs_layers, history = doc.get("fsLayers"), doc.get("history")
    if not isinstance(fs_layers, list) or not isinstance(history, list):
        raise FormatError(f"{what}: schema1 manifest without fsLayers/history")
    if not fs_layers or len(fs_layers) != len(history):
        raise FormatError(
            f"{what}: length of history ({len(history)}) does not match number of layers "
            f"({len(fs_layers)})"
        )
    sums: list[str] = []
    compat: list[str] = []
    for i, (layer, entry) in enumerate(zip(fs_layers, history, strict=True)):
        blob = layer.get("blobSum") if isinstance(layer, dict) else None
        v1 = entry.get("v1Compatibility") if isinstance(entry, dict) else None
        if not is_sha256_digest(blob) or not isinstance(v1, str):
            raise FormatError(f"{what}: fsLayers[{i}]/history[{i}] malformed")
        assert isinstance(blob, str)
        sums.append(blob)
        compat.append(v1)
    sums, compat = _fix_layers(sums, compat, what)
    sums.reverse()
    compat.reverse()
    return Schema1Manifest(
        str(doc.get("name", "")),
        str(doc.get("tag", "")),
        str(doc.get("architecture", "")),
        sums,
        compat,
        raw,
        sha256_digest(payload),
    )


def _fix_layers(sums: list[str], compat: list[str], what: str) -> tuple[list[str], list[str]]:
    """Docker's ``fixManifestLayers``: check the v1 chain (top first), drop adjacent repeats."""
    images = []
    for v1 in compat:
        doc = decode_json_object(v1.encode(), f"{what}: v1Compatibility")
        image_id = doc.get("id")
        if not isinstance(image_id, str) or not re.fullmatch(r"[a-f0-9]{64}", image_id):
            raise FormatError(f"{what}: invalid v1 image ID {str(image_id)[:80]!r}")
        parent = doc.get("parent") or ""
        images.append((image_id, parent if isinstance(parent, str) else ""))
    if images[-1][1]:
        raise FormatError(f"{what}: invalid parent ID in the base layer of the image")
    seen: set[str] = set()
    last = ""
    for image_id, _ in images:
        if image_id != last and image_id in seen:
            raise FormatError(f"{what}: ID {image_id} appears multiple times in manifest")
        last = image_id
        seen.add(image_id)
    sums, compat = list(sums), list(compat)
    for i in range(len(images) - 2, -1, -1):
        if images[i][0] == images[i + 1][0]:
            del sums[i], compat[i], images[i]
        elif images[i][1] != images[i + 1][0]:
            raise FormatError(
                f"{what}: invalid parent ID. Expected {images[i + 1][0]}, got {images[i][1]}"
            )
    return sums, compat


# -- building --------------------------------------------------------------------------


def build_image_manifest(
    config: bytes, layers: list[Descriptor], fmt: str = "docker"
) -> tuple[bytes, str]:
    """A schema2 (``docker``) or OCI (``oci``) manifest for ``config`` and ``layers``."""
    if fmt == "oci":
        media, config_media = MEDIA_OCI_MANIFEST, MEDIA_OCI_CONFIG
    else:
        media, config_media = MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_CONFIG
    doc = {
        "schemaVersion": 2,
        "mediaType": media,
        "config": {"mediaType": config_media, "size": len(config), "digest": sha256_digest(config)},
        "layers": [
            {
                "mediaType": layer_type_for_format(d.media_type, fmt),
                "size": d.size,
                "digest": d.digest,
            }
            for d in layers
        ],
    }
    # Docker writes schema2 with a three-space indent; the bytes are the identity.
    return json.dumps(doc, indent=3).encode(), media


def layout_descriptor(media_type: str, digest: str, size: int) -> dict[str, Any]:
    """A descriptor with its keys in the OCI order (mediaType, digest, size)."""
    return {"mediaType": media_type, "digest": digest, "size": size}


def build_layout_manifest(config: bytes, layers: list[Descriptor]) -> bytes:
    """The OCI image manifest ``docker save`` writes into a layout: compact JSON, the
    descriptors' keys in the OCI order (a push writes distribution's, see above)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": layout_descriptor(MEDIA_OCI_CONFIG, sha256_digest(config), len(config)),
        "layers": [layout_descriptor(d.media_type, d.digest, d.size) for d in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def verify_digest(raw: bytes, expected: str, what: str) -> None:
    actual = sha256_digest(raw)
    if actual != expected:
        raise DigestMismatchError(
            f"{what}: manifest digest mismatch: expected {expected}, got {actual}"
        )
