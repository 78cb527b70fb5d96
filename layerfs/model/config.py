"""What an image config holds: checks, diff IDs, and configs made for other shapes.

An image config is checked the way Docker's Go decoder would take it
(:func:`check_config`); its ``rootfs.diff_ids`` name the layers (:func:`config_diff_ids`).
Three kinds of image have no config of their own and get one made here: each node of a
modern image's chain in the store (:func:`derived_config`), a legacy v1 chain
(:func:`config_from_chain`, as Docker's v1 migration), and a schema1 manifest pulled from
an old registry (:func:`schema1_config`, as Docker 1.10+ converts it, FORMATS §3.4).
Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

from layerfs.errors import FormatError
from layerfs.model.documents import expect_digest, expect_list, expect_object, type_name
from layerfs.model.image import Image, canonical_json, parse_created
from layerfs.model.manifest import Schema1Manifest
from layerfs.model.v1compat import marshal_v1_image

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
            wanted = type_name(allowed[0]())  # the name of an empty value of that type
            raise FormatError(f"{what}: {key} must be {wanted}, not {type_name(value)}")


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


def derived_config(config: dict[str, Any], count: int) -> dict[str, Any]:
    """The config of the node holding the first ``count`` layers of ``config``."""
    diff_ids = config["rootfs"]["diff_ids"][:count]
    history: list[Any] = []
    created = config.get("created")
    seen_layers = 0
    for entry in config.get("history") or []:
        if not isinstance(entry, dict):
            continue
        history.append(entry)
        if not entry.get("empty_layer"):
            seen_layers += 1
            if seen_layers == count:
                created = entry.get("created", created)
                break
    doc: dict[str, Any] = {
        "architecture": config.get("architecture", ""),
        "os": config.get("os", "linux"),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if history:
        doc["history"] = history
    if created:
        doc["created"] = created
    return doc


def config_from_chain(chain: list[Image], diff_ids: list[str]) -> bytes:
    """A modern config for a legacy chain (base first), like Docker's v1 migration."""
    top = chain[-1]
    doc = {
        k: v
        for k, v in top.data.items()
        if k not in ("id", "parent", "Size", "parent_id", "layer_id", "checksum")
    }
    history = []
    for node in chain:
        entry: dict[str, Any] = {"created": node.created or "1970-01-01T00:00:00Z"}
        if node.author:
            entry["author"] = node.author
        created_by = node.created_by()
        if created_by:
            entry["created_by"] = created_by
        if node.comment:
            entry["comment"] = node.comment
        if not node.layer:
            entry["empty_layer"] = True
        history.append(entry)
    doc["history"] = history
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    doc.setdefault("os", "linux")
    return canonical_json(doc)


_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})\Z")


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
