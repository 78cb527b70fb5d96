"""``assert_valid_image(source)``: is what a transport offers a well-formed image?

Like go-containerregistry's ``validate.Image``, written against the public source
contract (:mod:`layerfs.transports.base`) only, so that it checks any transport's
output the same way: an archive or OCI layout layerfs wrote, the store after a load or
an import, a registry after a push. For every image the source offers:

- the config is a JSON object whose ``rootfs`` is ``layers`` with one diff ID per layer;
- every layer blob, read through ``open_layer``, has the digest and size its descriptor
  names, a media type that agrees with its compression, and uncompresses to a tar whose
  sha256 is the layer's diff ID and the config's diff ID at the same place;
- the config's history has exactly one entry that is not ``empty_layer`` per layer;
- where the source offers the manifest: its digest is the one named, its config
  descriptor has the config's digest and size, and its layer descriptors are the layers.

The blobs are uncompressed with the standard library and ``zstandard``, not with
layerfs's own reader, so that the check does not share a bug with what it checks.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from typing import Any

import zstandard

from layerfs.model.manifest import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_DOCKER_LAYER_TAR,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_LAYER_ZSTD,
)
from layerfs.transports.base import ImageSource, LayerDesc, SourceImage

# What a blob of each layer media type must be compressed with ("tar": not at all, or,
# in a docker-archive, with bzip2 or xz, which no media type names).
_COMPRESSION = {
    MEDIA_DOCKER_LAYER_GZIP: "gzip",
    MEDIA_OCI_LAYER_GZIP: "gzip",
    MEDIA_OCI_LAYER_ZSTD: "zstd",
    MEDIA_DOCKER_LAYER_TAR: "tar",
    MEDIA_OCI_LAYER_TAR: "tar",
}
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}


def assert_valid_image(source: ImageSource) -> list[SourceImage]:
    """Check every image ``source`` offers (at least one); close it; return the images."""
    try:
        images = source.images()
        assert images, "the source offers no image"
        for image in images:
            _check_image(source, image)
        return images
    finally:
        source.close()


def _check_image(source: ImageSource, image: SourceImage) -> None:
    name = image.name or image.image_id[:12]
    assert image.manifest_media_type != "schema1", f"{name}: a schema1 image is not checked"
    config = _json_object(image.config, f"{name}: config")
    rootfs = config.get("rootfs")
    assert isinstance(rootfs, dict), f"{name}: config has no rootfs object"
    assert rootfs.get("type") == "layers", f"{name}: rootfs.type is {rootfs.get('type')!r}"
    diff_ids = rootfs.get("diff_ids")
    assert isinstance(diff_ids, list), f"{name}: rootfs.diff_ids is not a list"
    assert len(diff_ids) == len(image.layers), (
        f"{name}: {len(image.layers)} layers but {len(diff_ids)} diff IDs in the config"
    )
    for index, (layer, diff_id) in enumerate(zip(image.layers, diff_ids, strict=True)):
        what = f"{name}: layer {index + 1}"
        actual = _check_layer(source, image, index, layer, what)
        assert actual == diff_id, f"{what}: uncompressed digest {actual}, config says {diff_id}"
        if layer.diff_id is not None:
            assert actual == layer.diff_id, f"{what}: diff ID {actual}, described {layer.diff_id}"
    _check_history(config, len(image.layers), name)
    if image.manifest is not None:
        _check_manifest(image, name)


def _check_layer(
    source: ImageSource, image: SourceImage, index: int, layer: LayerDesc, what: str
) -> str:
    """The sha256 of the layer's uncompressed tar, after checking its blob."""
    assert layer.media_type in _COMPRESSION, f"{what}: unknown media type {layer.media_type!r}"
    stream = source.open_layer(image, index)
    try:
        blob = stream.read()
    finally:
        stream.close()
    if layer.digest is not None:
        assert _sha256(blob) == layer.digest, f"{what}: blob digest is not {layer.digest}"
    if layer.size is not None:
        assert len(blob) == layer.size, f"{what}: blob of {len(blob)} bytes, described {layer.size}"
    kind = next((k for magic, k in _MAGIC.items() if blob.startswith(magic)), "tar")
    wanted = _COMPRESSION[layer.media_type]
    assert kind == wanted or (wanted == "tar" and kind in ("bzip2", "xz")), (
        f"{what}: a {kind} blob described as {layer.media_type}"
    )
    tar = _uncompress(blob, kind)
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        archive.getmembers()  # a tar through to its end
    return _sha256(tar)


def _check_history(config: dict[str, Any], layers: int, name: str) -> None:
    history = config.get("history")
    if history is None:
        return  # optional in both formats
    assert isinstance(history, list), f"{name}: config history is not a list"
    assert all(isinstance(h, dict) for h in history), f"{name}: a history entry is no object"
    non_empty = sum(1 for h in history if not h.get("empty_layer"))
    assert non_empty == layers, (
        f"{name}: {non_empty} history entries that are not empty layers, {layers} layers"
    )


def _check_manifest(image: SourceImage, name: str) -> None:
    assert image.manifest is not None
    if image.manifest_digest is not None:
        assert _sha256(image.manifest) == image.manifest_digest, (
            f"{name}: manifest digest is not {image.manifest_digest}"
        )
    manifest = _json_object(image.manifest, f"{name}: manifest")
    assert manifest.get("schemaVersion") == 2, f"{name}: manifest schemaVersion is not 2"
    if "mediaType" in manifest and image.manifest_media_type:
        assert manifest["mediaType"] == image.manifest_media_type, (
            f"{name}: manifest says {manifest['mediaType']}, offered as {image.manifest_media_type}"
        )
    config = manifest.get("config")
    assert isinstance(config, dict), f"{name}: manifest has no config descriptor"
    assert config.get("mediaType") in (MEDIA_DOCKER_CONFIG, MEDIA_OCI_CONFIG), (
        f"{name}: config media type {config.get('mediaType')!r}"
    )
    assert config.get("digest") == _sha256(image.config), f"{name}: config digest differs"
    assert config.get("size") == len(image.config), f"{name}: config size differs"
    descriptors = manifest.get("layers")
    assert isinstance(descriptors, list), f"{name}: manifest has no layers list"
    assert len(descriptors) == len(image.layers), (
        f"{name}: the manifest lists {len(descriptors)} layers, the image has {len(image.layers)}"
    )
    for index, (desc, layer) in enumerate(zip(descriptors, image.layers, strict=True)):
        what = f"{name}: manifest layer {index + 1}"
        assert isinstance(desc, dict), f"{what} is not an object"
        assert desc.get("digest") == layer.digest, f"{what}: digest {desc.get('digest')}"
        assert desc.get("size") == layer.size, f"{what}: size {desc.get('size')}"
        assert desc.get("mediaType") == layer.media_type, f"{what}: {desc.get('mediaType')}"


def _uncompress(blob: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.decompress(blob)
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
        return reader.read()
    if kind == "bzip2":
        return bz2.decompress(blob)
    if kind == "xz":
        return lzma.decompress(blob)
    return blob


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    doc = json.loads(data)
    assert isinstance(doc, dict), f"{what} is not a JSON object"
    return doc


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
