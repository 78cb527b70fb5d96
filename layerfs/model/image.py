"""Images as plain data: the stored JSON, its parent link, its layer; no I/O.

An image node of the graph is either a modern image config (it has
``rootfs``; its ID is the sha256 of its exact bytes) or a legacy v1 image JSON
(it has ``id``; its ID is that field). Both kinds carry the same legacy fields
(created, author, comment, config, container_config, architecture, os).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from layerfs.errors import FormatError

MAX_IMAGE_DEPTH = 127
"""Docker's MaxImageDepth: an image chain holds at most this many images."""

_GOARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_architecture() -> str:
    import platform  # only images made here need it; its import is not free

    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def now_rfc3339() -> str:
    """The current UTC time in RFC 3339 with nanoseconds, as Go marshals time.Time."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}000Z"


def parse_created(value: object) -> datetime | None:
    """RFC 3339 (nanosecond precision allowed) → aware datetime; None when absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    main, dot, rest = text.partition(".")
    if dot:
        digits = ""
        for ch in rest:
            if not ch.isdigit():
                break
            digits += ch
        text = main + "." + digits[:6].ljust(6, "0") + rest[len(digits) :]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def canonical_json(doc: Any) -> bytes:
    """JSON as Go's encoding/json writes it for our documents: compact, keys sorted."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decode_json(data: bytes, what: str) -> Any:
    """Parse JSON strictly: duplicate keys, NaN/Infinity and out-of-range numbers are errors."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise FormatError(f"{what}: duplicate key {key!r}")
            result[key] = value
        return result

    def no_constants(name: str) -> Any:
        raise FormatError(f"{what}: {name} is not valid JSON")

    def finite(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise FormatError(f"{what}: number {text[:30]} is out of range")
        return value

    try:
        return json.loads(
            data, object_pairs_hook=no_duplicates, parse_constant=no_constants, parse_float=finite
        )
    except RecursionError:
        # Python's parser recurses once per level and stops near 1000 (Go's, Docker's,
        # at 10000); image documents nest a handful of levels deep.
        raise FormatError(
            f"{what}: JSON nested too deeply (arrays or objects about 1000 levels deep)"
        ) from None
    except ValueError as exc:
        raise FormatError(f"{what}: malformed JSON: {str(exc)[:200]}") from exc


def decode_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object strictly: duplicate keys, NaN and non-objects are errors."""
    doc = decode_json(data, what)
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


@dataclass(frozen=True)
class Image:
    """One node of the graph."""

    id: str
    parent: str  # "" for a base image
    layer: str | None  # diff ID of this node's own layer; None for an empty layer
    raw_json: bytes
    data: dict[str, Any] = field(repr=False)
    size: int = 0  # bytes of file content in this node's own layer

    @property
    def is_config(self) -> bool:
        """True when the JSON is a modern image config (its ID is its digest)."""
        return "rootfs" in self.data

    @property
    def created(self) -> str:
        value = self.data.get("created")
        return value if isinstance(value, str) else ""

    def _text(self, key: str) -> str:
        value = self.data.get(key)
        return value if isinstance(value, str) else ""

    @property
    def author(self) -> str:
        return self._text("author")

    @property
    def comment(self) -> str:
        return self._text("comment")

    @property
    def os(self) -> str:
        return self._text("os") or "linux"

    @property
    def architecture(self) -> str:
        return self._text("architecture")

    @property
    def config(self) -> dict[str, Any]:
        value = self.data.get("config")
        return value if isinstance(value, dict) else {}

    @property
    def container_config(self) -> dict[str, Any]:
        value = self.data.get("container_config")
        return value if isinstance(value, dict) else {}

    @property
    def history(self) -> list[dict[str, Any]]:
        value = self.data.get("history")
        return [h for h in value if isinstance(h, dict)] if isinstance(value, list) else []

    @property
    def diff_ids(self) -> list[str]:
        rootfs = self.data.get("rootfs")
        if not isinstance(rootfs, dict):
            return []
        ids = rootfs.get("diff_ids")
        return [d for d in ids if isinstance(d, str)] if isinstance(ids, list) else []

    def created_by(self) -> str:
        """What made this node's layer: the last non-empty history entry, or the v1 Cmd."""
        if self.is_config:
            layered = [h for h in self.history if not h.get("empty_layer")]
            if layered:
                value = layered[-1].get("created_by")
                return value if isinstance(value, str) else ""
            return ""
        cmd = self.container_config.get("Cmd")
        if isinstance(cmd, list):
            return " ".join(str(c) for c in cmd)
        return ""


def build_config(
    *,
    parent: Image | None,
    parent_diff_ids: list[str],
    diff_id: str | None,
    config: dict[str, Any] | None,
    comment: str = "",
    author: str = "",
    created_by: str = "",
    created: str | None = None,
    platform: tuple[str, str, str] | None = None,
) -> dict[str, Any]:
    """A modern image config for a new image on top of ``parent``.

    ``rootfs.diff_ids`` and ``history`` continue the parent's, so the config
    describes the whole chain and its digest is the image ID Docker computes.
    ``platform`` (os, architecture, variant) overrides the parent's or this host's.
    """
    created = created or now_rfc3339()
    history: list[dict[str, Any]] = list(parent.history) if parent and parent.is_config else []
    entry: dict[str, Any] = {"created": created}
    if author:
        entry["author"] = author
    if created_by:
        entry["created_by"] = created_by
    if comment:
        entry["comment"] = comment
    if diff_id is None:
        entry["empty_layer"] = True
    history.append(entry)
    diff_ids = [*parent_diff_ids, *([diff_id] if diff_id else [])]
    doc: dict[str, Any] = {
        "architecture": parent.architecture
        if parent and parent.architecture
        else host_architecture(),
        "os": parent.os if parent else "linux",
        "created": created,
        "config": config if config is not None else (dict(parent.config) if parent else {}),
        "history": history,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if platform is not None:
        doc["os"], doc["architecture"] = platform[0], platform[1]
        if platform[2]:
            doc["variant"] = platform[2]
    if author:
        doc["author"] = author
    if comment:
        doc["comment"] = comment
    return doc
