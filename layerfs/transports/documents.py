"""The JSON documents of image archives and layouts, parsed strictly.

Everything an archive holds is untrusted: manifest.json, repositories, index.json, OCI
manifests, image configs and legacy v1 JSON. Malformed JSON, duplicate keys, NaN, a value
of the wrong type, a size out of range and a digest that is not ``sha256:`` + 64 lower-case
hex each become one :class:`~layerfs.errors.FormatError` naming the document. Shared by
``archive.py`` and ``oci.py``; what the documents mean is theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layerfs.compression import detect
from layerfs.errors import FormatError
from layerfs.model import platform
from layerfs.model.digest import is_oci_digest, is_sha256_digest
from layerfs.model.image import parse_created
from layerfs.transports.base import (
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_LAYER_ZSTD,
)

MAX_SIZE = (1 << 63) - 1


def expect_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what}: expected a JSON object, got {_type_name(value)}")
    return value


def expect_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise FormatError(f"{what}: expected a JSON array, got {_type_name(value)}")
    return value


def expect_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{what}: expected a string, got {_type_name(value)}")
    return value


def expect_size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{what}: expected an integer size, got {_type_name(value)}")
    if not 0 <= value <= MAX_SIZE:
        raise FormatError(f"{what}: size {str(value)[:30]} is out of range")
    return value


def expect_str_list(value: Any, what: str) -> list[str]:
    items = expect_list(value, what)
    for item in items:
        expect_str(item, what)
    return items


def expect_str_map(value: Any, what: str) -> dict[str, str]:
    doc = expect_object(value, what)
    for item in doc.values():
        expect_str(item, what)
    return doc


def expect_digest(value: Any, what: str) -> str:
    """A ``sha256:`` digest; other well-formed algorithms are unsupported, not malformed."""
    text = expect_str(value, what)
    if is_sha256_digest(text):
        return text
    shown = text if len(text) <= 80 else text[:77] + "..."
    if is_oci_digest(text) and not text.startswith("sha256:"):
        raise FormatError(f"{what}: unsupported digest algorithm in {shown!r}; only sha256")
    raise FormatError(f"{what}: invalid digest {shown!r}: expected sha256: and 64 lower-case hex")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


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


# Types Go's decoder insists on when Docker reads a config (null is always allowed).
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "created": (str,),
    "author": (str,),
    "architecture": (str,),
    "os": (str,),
    "variant": (str,),
    "os.version": (str,),
    "os.features": (list,),
    "comment": (str,),
    "container": (str,),
    "docker_version": (str,),
    "config": (dict,),
    "container_config": (dict,),
    "history": (list,),
}
_HISTORY_TYPES: dict[str, tuple[type, ...]] = {
    "created": (str,),
    "created_by": (str,),
    "author": (str,),
    "comment": (str,),
    "empty_layer": (bool,),
}


def _check_types(doc: dict[str, Any], types: dict[str, tuple[type, ...]], what: str) -> None:
    for key, allowed in types.items():
        value = doc.get(key)
        if value is not None and not isinstance(value, allowed):
            wanted = _type_name(allowed[0]())  # the name of an empty value of that type
            raise FormatError(f"{what}: {key} must be {wanted}, not {_type_name(value)}")


def check_config(config: dict[str, Any], what: str) -> None:
    """Refuse a config Docker could not decode: wrong types, a ``created`` that is no time."""
    _check_types(config, _CONFIG_TYPES, what)
    for key in ("created",):
        value = config.get(key)
        if isinstance(value, str) and parse_created(value) is None:
            raise FormatError(f"{what}: {key} {value[:40]!r} is not an RFC 3339 time")
    for entry in config.get("history") or []:
        _check_types(expect_object(entry, f"{what} history"), _HISTORY_TYPES, f"{what} history")


def config_diff_ids(config: dict[str, Any], what: str) -> list[str]:
    """``rootfs.diff_ids`` of an image config, each a valid sha256 digest."""
    check_config(config, what)
    rootfs = expect_object(config.get("rootfs"), f"{what} rootfs")
    diff_ids = expect_list(rootfs.get("diff_ids", []), f"{what} rootfs.diff_ids")
    return [expect_digest(d, f"{what} rootfs.diff_ids") for d in diff_ids]


def layer_media_type(head: bytes) -> str:
    """The OCI media type matching a layer blob's first bytes."""
    kind = detect(head)
    if kind == "gzip":
        return MEDIA_OCI_LAYER_GZIP
    if kind == "zstd":
        return MEDIA_OCI_LAYER_ZSTD
    return MEDIA_OCI_LAYER_TAR


def select_platform(
    descriptors: list[Descriptor], what: str, wanted: platform.Platform | None = None
) -> Descriptor:
    """The entry of an index for ``wanted`` (this host), by the rules of a registry pull."""
    entries = [{"platform": d.platform, "annotations": d.annotations} for d in descriptors]
    chosen = platform.select(entries, wanted or platform.host_platform(), what)
    return next(d for d, e in zip(descriptors, entries, strict=True) if e is chosen)
