"""pull, push, login and logout as library calls (the CLI only parses and prints).

pull is ``copy(RegistrySource → StoreDestination)``, push is ``copy(StoreSource
→ RegistryDestination)``; both through :func:`layerfs.copy.copy`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from layerfs.copy import copy
from layerfs.errors import AuthenticationError, ConflictError, UsageError
from layerfs.model.platform import Platform
from layerfs.model.reference import DOCKER_HUB, Reference, is_docker_hub
from layerfs.progress import Progress
from layerfs.registry.auth import Credentials
from layerfs.registry.client import RegistryClient, RegistryOptions
from layerfs.registry.credentials import DockerConfig, check_username
from layerfs.store.store import Store
from layerfs.transports.local import StoreDestination, StoreSource
from layerfs.transports.registry import (
    RegistryDestination,
    RegistrySource,
    config_from_store,
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
    client = RegistryClient(reference.registry, options, pool_size=max(10, max_concurrent + 2))
    try:
        source = RegistrySource(
            client,
            reference,
            platform=platform,
            progress=progress,
            known_config=config_from_store(store),
        )
        destination = StoreDestination(store)
        result = copy(
            source,
            destination,
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
            sum(getattr(r, "resumes", 0) for r in source.readers),
            client.stats["retries"],
        )
    finally:
        client.close()


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
    client = RegistryClient(reference.registry, options, pool_size=max(10, max_concurrent + 2))
    try:
        source = StoreSource(store, names)
        destination = RegistryDestination(
            client,
            reference,
            store=store,
            fmt=fmt,
            level=level,
            progress=progress,
        )
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
    finally:
        client.close()


def login(
    registry: str,
    username: str | None,
    password: str | None,
    *,
    options: RegistryOptions | None = None,
    config: DockerConfig | None = None,
) -> str:
    """Check the credentials against the registry, then store them. Returns the message."""
    config = config if config is not None else DockerConfig()
    registry = _registry_name(registry)
    if username is None and password is None:
        stored = config.get(registry)
        if stored is None:
            raise UsageError(f"no stored credentials for {registry}: give -u USER")
        creds = stored
    else:
        creds = Credentials(check_username(username or ""), password or "")
        if not creds.password:
            raise UsageError("a password is required (use --password-stdin)")
    client = RegistryClient(registry, options, credentials=creds)
    try:
        client.base_url()  # the ping records the challenge
        challenge = client.auth.challenge
        if challenge is None:
            log.info("%s asks for no authentication", registry)
        else:
            client.request("GET", "/v2/", what=f"login to {registry}", expected=(200,))
        if client.auth.refresh_token:
            creds = Credentials(creds.username, "", client.auth.refresh_token)
    except AuthenticationError as exc:
        raise AuthenticationError(
            f"login to {registry} failed: unauthorized (incorrect username or password)",
            status=exc.status,
        ) from None
    finally:
        client.close()
    config.store(registry, creds)
    return "Login Succeeded"


def logout(registry: str, *, config: DockerConfig | None = None) -> str:
    config = config if config is not None else DockerConfig()
    registry = _registry_name(registry)
    if config.erase(registry):
        return f"Removing login credentials for {registry}"
    return f"Not logged in to {registry}"


def _registry_name(text: str) -> str:
    """``https://host:5000/v1/`` or ``host:5000`` → ``host:5000``; Hub names → docker.io."""
    text = text.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0]
    if not text:
        raise UsageError("a registry name is required")
    if is_docker_hub(text):
        return DOCKER_HUB
    return text
