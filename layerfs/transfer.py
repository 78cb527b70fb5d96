"""pull and push as library calls (the CLI only parses and prints).

pull is ``copy(docker:// source → store)``, push is ``copy(store → docker://
destination)``, both through :func:`layerfs.copy.copy` like every other move of an
image. Around the copy a pull records what a later push reuses (each layer's blob,
:func:`~layerfs.transports.registry.record_pulled`) and the digest reference of the
manifest it pulled; a push reports the tags and digests the registry took.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from layerfs.copy import copy
from layerfs.errors import ConflictError, UsageError
from layerfs.model.platform import Platform
from layerfs.model.reference import Reference
from layerfs.progress import Progress
from layerfs.registry.client import RegistryOptions
from layerfs.store.store import Store
from layerfs.transports.local import StoreDestination, StoreSource
from layerfs.transports.registry import (
    open_registry_destination,
    open_registry_source,
    record_pulled,
)

log = logging.getLogger(__name__)


@dataclass
class PullResult:
    reference: Reference
    image_id: str
    digest: str
    layers_copied: int
    layers_skipped: int
    resumes: int = 0
    retries: int = 0


@dataclass
class PushResult:
    repository: str
    pushed: list[tuple[str, str, int]] = field(default_factory=list)  # (tag, digest, size)
    layers_uploaded: int = 0
    layers_skipped: int = 0
    layers_mounted: int = 0


def pull(
    store: Store,
    name: str,
    *,
    options: RegistryOptions | None = None,
    platform: Platform | None = None,
    max_concurrent: int = 3,
    progress: Progress | None = None,
) -> PullResult:
    reference = Reference.parse(name)
    source = open_registry_source(
        reference,
        options=options,
        platform=platform,
        progress=progress,
        store=store,
        max_concurrent=max_concurrent,
    )
    result = copy(
        source,
        StoreDestination(store),
        progress=progress,
        max_concurrent=max_concurrent,
        keep_going=False,
    )
    if result.failed:  # pragma: no cover - keep_going=False raises instead
        raise result.failed[0][1]
    image = result.copied[0]
    record_pulled(store, source, result.copied)
    if source.manifest_digest:
        try:
            store.tags.set_digest(reference.repository, source.manifest_digest, image.image_id)
        except ConflictError as exc:
            # Docker logs and keeps the first image (an index pulled for two platforms).
            log.warning("%s", exc)
    return PullResult(
        reference,
        image.image_id,
        source.manifest_digest or "",
        result.layers_copied,
        result.layers_skipped,
        source.resumes,
        source.client.stats["retries"],
    )


def push(
    store: Store,
    name: str,
    *,
    all_tags: bool = False,
    options: RegistryOptions | None = None,
    fmt: str = "docker",
    max_concurrent: int = 3,
    progress: Progress | None = None,
    level: int | None = None,
) -> PushResult:
    reference = Reference.parse(name, default_tag=None)
    if reference.digest:
        raise UsageError(f"cannot push to a digest reference: {name!r}; push a tag")
    if all_tags and reference.tag:
        raise UsageError("--all-tags cannot be used with a tag (give the repository only)")
    names = (
        [reference.repository]
        if all_tags
        else [f"{reference.repository}:{reference.tag or 'latest'}"]
    )
    if not all_tags:
        reference = Reference(reference.repository, reference.tag or "latest")
    destination = open_registry_destination(
        reference,
        options=options,
        store=store,
        fmt=fmt,
        level=level,
        progress=progress,
        max_concurrent=max_concurrent,
    )
    source = StoreSource(store, names)
    result = copy(
        source, destination, progress=progress, max_concurrent=max_concurrent, keep_going=False
    )
    return PushResult(
        f"{reference.registry}/{reference.remote_name}",
        destination.pushed,
        destination.uploaded,
        result.layers_skipped,
        destination.mounted,
    )
