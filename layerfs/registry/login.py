"""Logging in to and out of a registry: the credentials are checked, then stored.

``login`` pings the registry and, when it asks for authentication, makes one
authenticated request with the credentials (an identity token the registry hands back
replaces the password); ``logout`` erases what :mod:`layerfs.registry.credentials`
stored. Docker Hub's names all mean ``docker.io``.
"""

from __future__ import annotations

import logging

from layerfs.errors import AuthenticationError, UsageError
from layerfs.model.reference import DOCKER_HUB, is_docker_hub
from layerfs.registry.auth import Credentials
from layerfs.registry.client import RegistryClient, RegistryOptions
from layerfs.registry.credentials import DockerConfig, check_username

log = logging.getLogger(__name__)


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
