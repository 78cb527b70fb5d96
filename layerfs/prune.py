"""``image prune``: remove dangling images, or every image nothing holds, as docker does.

Without ``all_images`` the candidates are the dangling images: heads of the graph with no
tag (an image known only by ``repo@digest`` counts). With it, every image that is tagged
or has no children. Filters narrow them: ``until=TIME`` (created before: a duration such as
``24h`` back from now, an RFC 3339 date or time, or Unix seconds), ``label=K[=V]`` and
``label!=K[=V]``. An image held by a mount, a pull or a load keeps its names and stays;
every other candidate goes through ``rmi`` without force, children first, so nothing is
ever forced. The report lists
what was untagged and deleted, in docker's words, and the bytes the store got back.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from layerfs.errors import LayerfsError, UsageError
from layerfs.listing import Filters, bool_filter, labels_of, match_labels
from layerfs.model.image import Image, parse_created
from layerfs.store.removal import remove_image
from layerfs.store.store import Store

PRUNE_FILTERS = ("dangling", "label", "label!", "until")


@dataclass
class PruneReport:
    records: list[tuple[str, str]] = field(default_factory=list)  # ("untagged"|"deleted", x)
    reclaimed: int = 0  # bytes freed on disk


def prune_images(
    store: Store, *, all_images: bool = False, filters: Filters | None = None
) -> PruneReport:
    filters = filters or {}
    dangling_only = not all_images
    if bool_filter(filters, "dangling") is False:
        dangling_only = False
    until = parse_until(filters["until"][-1]) if filters.get("until") else None
    images = store.graph.map()
    parents = {i.parent for i in images.values() if i.parent}
    names = store.tags.by_id()
    candidates: list[Image] = []
    for image_id, image in images.items():
        if dangling_only and image_id in parents:
            continue
        refs = names.get(image_id, [])
        if not refs and image_id in parents:
            continue  # an intermediate image goes with its child
        if until is not None:
            created = parse_created(image.created)
            if created is not None and created > until:
                continue
        if "config" in image.data and not _match_prune_labels(filters, labels_of(image)):
            continue
        if dangling_only and any("@" not in r for r in refs):
            continue  # only untagged images are dangling
        candidates.append(image)
    sizes = _layer_sizes(store, images, candidates)
    report = PruneReport()
    for image in sorted(candidates, key=lambda i: _depth(images, i.id), reverse=True):
        if not store.graph.exists(image.id):
            continue  # already gone as the parent of another candidate
        if store.graph.is_held(image.id) or (image.layer and store.graph.is_held(image.layer)):
            continue  # in use: not even a name of it goes
        refs = store.tags.references(image.id)
        for name in refs or [image.id]:
            try:
                removal = remove_image(store, name, force=False, prune=True)
            except LayerfsError:
                continue  # held, has children, ...: it stays, as docker leaves it
            for what, ident in removal.records:
                report.records.append((what.lower(), ident))
                if what == "Deleted" and ident in sizes:
                    report.reclaimed += sizes[ident]
    return report


def _match_prune_labels(filters: Filters, labels: dict[str, object]) -> bool:
    if not match_labels(filters, labels):
        return False
    return not (filters.get("label!") and match_labels(filters, labels, "label!"))


def _depth(images: dict[str, Image], image_id: str) -> int:
    depth = 0
    current = images.get(image_id)
    while current is not None and current.parent and depth <= len(images):
        depth += 1
        current = images.get(current.parent)
    return depth


def _layer_sizes(store: Store, images: dict[str, Image], candidates: list[Image]) -> dict[str, int]:
    """Bytes on disk of every layer a candidate's chain uses, by diff ID."""
    sizes: dict[str, int] = {}
    for image in candidates:
        current: Image | None = image
        while current is not None:
            if current.layer and current.layer not in sizes:
                sizes[current.layer] = directory_size(store.layers.path(current.layer))
            current = images.get(current.parent) if current.parent else None
    return sizes


def directory_size(path: Path) -> int:
    """Apparent size of the files under ``path`` (what removing it gives back)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += directory_size(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return total


_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_go_duration(text: str) -> float | None:
    """Go's time.ParseDuration in seconds (``1h30m``, ``90s``, ``-2h``), None if it is not one."""
    body = text.lstrip("+-")
    if not body or body == "0":
        return 0.0 if body == "0" else None
    pos = 0
    total = 0.0
    for match in _DURATION.finditer(body):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(body):
        return None
    return -total if text.startswith("-") else total


def parse_until(value: str, now: float | None = None) -> datetime:
    """docker's timestamp filters: a duration back from now, an RFC 3339 time or a date, or
    Unix seconds (``1700000000.5``); a time without a zone is local time."""
    now = time.time() if now is None else now
    duration = parse_go_duration(value)
    if duration is not None and value != "0":
        return datetime.fromtimestamp(now - duration, UTC)
    text = value.replace("z", "Z")
    if "-" in text:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"invalid until filter {value!r}: not a time or duration") from None
        return parsed if parsed.tzinfo else parsed.astimezone()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return datetime.fromtimestamp(float(value), UTC)
    raise UsageError(f"invalid until filter {value!r}: failed to parse value as time or duration")
