"""Builders of image archives for the load/save tests: docker-archive (every layout) and OCI.

An archive is first a :class:`Members` mapping (name -> bytes, or :class:`Link` for a
symlink), so a test can break one document before :func:`pack` turns it into tar bytes.
Layers are small tars made with ``tests.helpers.build_tar``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from tests.helpers import build_tar, tar_dir, tar_file


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass(frozen=True)
class Link:
    """A symlink member of an archive."""

    target: str


Members = dict[str, "bytes | Link"]


def pack(members: Members, *, mtime: int = 1_700_000_000) -> bytes:
    """The members as an uncompressed tar, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if isinstance(value, Link):
                info.type = tarfile.SYMTYPE
                info.linkname = value.target
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def write_dir(members: Members, root: Path) -> Path:
    """The members as files under ``root`` (an OCI layout or an extracted archive)."""
    for name, value in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Link):
            path.symlink_to(value.target)
        else:
            path.write_bytes(value)
    return root


def make_layer(seed: str, *files: tuple[str, bytes]) -> bytes:
    """A small layer tar: a directory named after ``seed`` and its files."""
    entries = [tar_dir(seed)]
    entries += [tar_file(f"{seed}/{name}", data) for name, data in files]
    if not files:
        entries.append(tar_file(f"{seed}/file", seed.encode() * 3))
    return build_tar(*entries)


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@dataclass
class BuiltImage:
    layers: list[bytes]  # uncompressed layer tars, base first
    tags: list[str] = field(default_factory=list)
    config_doc: dict[str, Any] = field(default_factory=dict)
    config: bytes = b""

    @property
    def diff_ids(self) -> list[str]:
        return [sha256(layer) for layer in self.layers]

    @property
    def image_id(self) -> str:
        return hex_of(sha256(self.config))


def make_image(
    layers: list[bytes],
    tags: list[str] | tuple[str, ...] = (),
    *,
    created: str | None = "2024-01-02T03:04:05.123456789Z",
    history: bool = True,
    **extra: Any,
) -> BuiltImage:
    """An image whose config lists the layers' diff IDs (``created``/history optional)."""
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
    }
    if created is not None:
        doc["created"] = created
    if history:
        doc["history"] = [
            {"created": created or "2024-01-01T00:00:00Z", "created_by": f"step {i}"}
            for i in range(len(layers))
        ]
    doc.update(extra)
    config = json.dumps(doc, sort_keys=True).encode()
    return BuiltImage(list(layers), list(tags), doc, config)


def docker_members(
    images: list[BuiltImage],
    *,
    layout: str = "docker",
    layer_compression: str = "none",
) -> Members:
    """A modern docker-archive.

    ``layout="docker"``: Docker 1.10-24 (``<hex>.json``, ``<id>/layer.tar``, a repeated
    layer as a symlink). ``layout="docker25"``: Docker 25+ (``blobs/sha256/``, index.json
    and oci-layout beside manifest.json). Layers may be gzip or zstd compressed (as
    containerd exports them).
    """
    members: Members = {}
    manifest = []
    first_path: dict[str, str] = {}
    for number, image in enumerate(images):
        if layout == "docker25":
            config_name = f"blobs/sha256/{image.image_id}"
        else:
            config_name = f"{image.image_id}.json"
        members[config_name] = image.config
        paths = []
        for index, layer in enumerate(image.layers):
            blob = compress(layer, layer_compression)
            diff = sha256(layer)
            if layout == "docker25":
                path = f"blobs/sha256/{hex_of(sha256(blob))}"
                members[path] = blob
            else:
                path = (
                    f"{hashlib.sha256(f'{number}/{index}/{diff}'.encode()).hexdigest()}/layer.tar"
                )
                if diff in first_path:
                    members[path] = Link(f"../{first_path[diff]}")
                else:
                    members[path] = blob
                    first_path[diff] = path
            paths.append(path)
        manifest.append({"Config": config_name, "RepoTags": image.tags or None, "Layers": paths})
    members["manifest.json"] = json.dumps(manifest).encode()
    if layout == "docker25":
        members["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
        members["index.json"] = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    return members


def legacy_members(
    nodes: list[tuple[str, dict[str, Any], bytes]], repositories: dict[str, dict[str, str]]
) -> Members:
    """A legacy (Docker <= 1.9) archive: ``<id>/VERSION``, ``json``, ``layer.tar``."""
    members: Members = {}
    for image_id, doc, layer in nodes:
        members[f"{image_id}/VERSION"] = b"1.0"
        members[f"{image_id}/json"] = json.dumps({"id": image_id, **doc}).encode()
        members[f"{image_id}/layer.tar"] = layer
    if repositories:
        members["repositories"] = json.dumps(repositories).encode()
    return members


def oci_manifest(image: BuiltImage, layer_compression: str = "gzip") -> tuple[bytes, Members]:
    """An OCI manifest for ``image`` and the blobs it needs."""
    media = {
        "none": "application/vnd.oci.image.layer.v1.tar",
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    }[layer_compression]
    blobs: Members = {f"blobs/sha256/{image.image_id}": image.config}
    layers = []
    for layer in image.layers:
        blob = compress(layer, layer_compression)
        blobs[f"blobs/sha256/{hex_of(sha256(blob))}"] = blob
        layers.append({"mediaType": media, "digest": sha256(blob), "size": len(blob)})
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(image.config),
                "size": len(image.config),
            },
            "layers": layers,
        }
    ).encode()
    blobs[f"blobs/sha256/{hex_of(sha256(manifest))}"] = manifest
    return manifest, blobs


def descriptor(data: bytes, media_type: str, **annotations: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"mediaType": media_type, "digest": sha256(data), "size": len(data)}
    if annotations:
        doc["annotations"] = annotations
    return doc


MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"


def oci_members(
    images: list[BuiltImage], *, layer_compression: str = "gzip", ref_names: bool = True
) -> Members:
    """An OCI layout: one index.json entry per image tag (containerd and OCI annotations)."""
    members: Members = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}
    entries = []
    for image in images:
        manifest, blobs = oci_manifest(image, layer_compression)
        members.update(blobs)
        for tag in image.tags or [""]:
            annotations = {}
            if tag and ref_names:
                name, _, version = tag.rpartition(":")
                annotations = {
                    "io.containerd.image.name": f"docker.io/library/{name}:{version}",
                    "org.opencontainers.image.ref.name": version,
                }
            entries.append(descriptor(manifest, MEDIA_MANIFEST, **annotations))
    members["index.json"] = json.dumps({"schemaVersion": 2, "manifests": entries}).encode()
    return members
