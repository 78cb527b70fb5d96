"""Manifests a registry serves and accepts: parse, check, convert, build.

Docker schema2 and OCI image manifests, Docker manifest lists and OCI indexes,
and schema1 (signed or not, read only) as old registries serve it. A schema1
manifest becomes a modern config the way Docker 1.10+ converts it on pull
(FORMATS §3.4), which needs the layers' diff IDs and so happens after they are
downloaded. Pure functions on bytes, no I/O.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from layerfs.errors import DigestMismatchError, FormatError
from layerfs.model.digest import is_sha256_digest, sha256_digest
from layerfs.model.image import decode_json_object
from layerfs.transports.base import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
)
from layerfs.transports.v1compat import marshal_v1_image

MEDIA_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
SCHEMA1_TYPES = (MEDIA_SCHEMA1_SIGNED, MEDIA_SCHEMA1)
# Every type we can parse, best first (FORMATS §8.4: leaving schema2 out makes
# distribution down-convert to schema1, with another digest).
ACCEPT = ", ".join((*INDEX_TYPES, *IMAGE_TYPES, *SCHEMA1_TYPES))

MAX_MANIFEST_SIZE = 4 << 20


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Any, what: str) -> Descriptor:
        if not isinstance(doc, dict):
            raise FormatError(f"{what}: descriptor is not an object")
        media_type, digest, size = doc.get("mediaType", ""), doc.get("digest"), doc.get("size")
        if not isinstance(media_type, str):
            raise FormatError(f"{what}: mediaType is not a string")
        if not is_sha256_digest(digest):
            raise FormatError(f"{what}: unsupported or malformed digest {str(digest)[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{what}: size is not a non-negative integer")
        urls = doc.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise FormatError(f"{what}: urls is not a list of strings")
        assert isinstance(digest, str)
        return cls(media_type, digest, size, urls, doc)


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
    manifests: list[dict[str, Any]]
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
    if not kind:
        # An OCI document may omit mediaType: tell an index from a manifest by shape.
        kind = MEDIA_OCI_INDEX if "manifests" in doc else MEDIA_OCI_MANIFEST
    digest = sha256_digest(raw)
    if kind in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise FormatError(f"{what}: index has no manifests list")
        for i, entry in enumerate(entries):
            Descriptor.from_json(entry, f"{what}: manifests[{i}]")
        return IndexManifest(kind, entries, raw, digest)
    if kind not in IMAGE_TYPES:
        raise FormatError(f"{what}: unsupported manifest type {kind}")
    config = Descriptor.from_json(doc.get("config"), f"{what}: config")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list):
        raise FormatError(f"{what}: manifest has no layers list")
    layers = [Descriptor.from_json(d, f"{what}: layers[{i}]") for i, d in enumerate(layers_doc)]
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


_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})$")


def go_time(value: Any) -> str:
    """A timestamp as Go's ``time.Time`` marshals it (RFC 3339, trimmed nanoseconds)."""
    if not isinstance(value, str):
        return "0001-01-01T00:00:00Z"
    m = _TIME.match(value)
    if not m:
        return value
    base, frac, zone = m.groups()
    frac = (frac or "")[:9].rstrip("0")
    zone = "Z" if zone in ("Z", "z", "+00:00", "-00:00") else zone
    return f"{base}{'.' + frac if frac else ''}{zone}"


def go_json(value: Any) -> str:
    """Compact JSON escaped the way Go's encoding/json escapes (HTML-safe)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def schema1_config(manifest: Schema1Manifest, diff_ids: list[str]) -> bytes:
    """The image config Docker 1.10+ makes of a schema1 manifest (FORMATS §3.4).

    ``diff_ids`` are those of the non-throwaway layers, base first.
    """
    history = []
    for v1 in manifest.v1_compatibility:
        doc = json.loads(v1)
        cmd = (doc.get("container_config") or {}).get("Cmd") or []
        entry: dict[str, Any] = {"created": go_time(doc.get("created"))}
        if doc.get("author"):
            entry["author"] = doc["author"]
        created_by = " ".join(c for c in cmd if isinstance(c, str))
        if created_by:
            entry["created_by"] = created_by
        if doc.get("comment"):
            entry["comment"] = doc["comment"]
        if doc.get("throwaway"):
            entry["empty_layer"] = True
        history.append(entry)
    top = json.loads(manifest.v1_compatibility[-1])
    if _version_less(str(top.get("docker_version") or ""), "1.8.3"):
        # Docker re-marshals old (or unversioned) v1 JSON through its V1Image struct first.
        top = json.loads(marshal_v1_image(top))
    for key in ("id", "parent", "Size", "parent_id", "layer_id", "throwaway"):
        top.pop(key, None)
    top["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    top["history"] = history
    parts = [f"{go_json(k)}:{go_json(top[k])}" for k in sorted(top)]
    return ("{" + ",".join(parts) + "}").encode()


def _version_less(version: str, other: str) -> bool:
    """Docker's ``versions.LessThan``: dot-separated integers, a non-number counts as 0."""

    def number(part: str) -> int:
        return int(part) if part.isdigit() else 0

    mine, theirs = version.split("."), other.split(".")
    for i in range(max(len(mine), len(theirs))):
        a = number(mine[i]) if i < len(mine) else 0
        b = number(theirs[i]) if i < len(theirs) else 0
        if a != b:
            return a < b
    return False


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
            {"mediaType": layer_media_type(d.media_type, fmt), "size": d.size, "digest": d.digest}
            for d in layers
        ],
    }
    # Docker writes schema2 with a three-space indent; the bytes are the identity.
    return json.dumps(doc, indent=3).encode(), media


def layer_media_type(media_type: str, fmt: str) -> str:
    """Map a layer type to the vocabulary of the manifest format being written."""
    gzip_types = (MEDIA_DOCKER_LAYER_GZIP, MEDIA_OCI_LAYER_GZIP)
    if fmt == "oci":
        return MEDIA_OCI_LAYER_GZIP if media_type in gzip_types else media_type
    return MEDIA_DOCKER_LAYER_GZIP if media_type in gzip_types else media_type


def verify_digest(raw: bytes, expected: str, what: str) -> None:
    actual = sha256_digest(raw)
    if actual != expected:
        raise DigestMismatchError(
            f"{what}: manifest digest mismatch: expected {expected}, got {actual}"
        )
