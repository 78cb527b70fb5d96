"""Strict checks of values in untrusted JSON documents.

Everything an archive, a layout or a registry hands over is untrusted: manifest.json,
repositories, index.json, OCI manifests, image configs and legacy v1 JSON. A value of
the wrong type, a size out of range and a digest that is not ``sha256:`` + 64 lower-case
hex each become one :class:`~layerfs.errors.FormatError` naming the document. What the
documents mean is :mod:`layerfs.model.manifest`'s and :mod:`layerfs.model.config`'s.
"""

from __future__ import annotations

from typing import Any

from layerfs.errors import FormatError
from layerfs.model.digest import is_oci_digest, is_sha256_digest

MAX_SIZE = (1 << 63) - 1


def expect_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type_name(value)}")
    return value


def expect_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise FormatError(f"{what}: expected a JSON array, got {type_name(value)}")
    return value


def expect_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{what}: expected a string, got {type_name(value)}")
    return value


def expect_size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{what}: expected an integer size, got {type_name(value)}")
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


def type_name(value: Any) -> str:
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
