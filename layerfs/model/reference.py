"""Docker image references: parsing, validation and name normalisation.

This module owns the grammar of ``[host[:port]/]path[:tag]`` and ``path@sha256:<hex>``,
the rules that turn a name into the local name the tag store keys on (``docker.io/library/x``
is stored as ``x``), and the derived names a registry client needs (remote name, registry
host, full name). Pure functions, no I/O; every rejection is an
:class:`~layerfs.errors.InvalidReferenceError` with a one-line message.

Semantics follow Docker 1.8's ``registry``/``parsers`` packages (see FORMATS §1.1); the
separator grammar of modern ``distribution/reference`` (``[_.]|__|[-]+``) is accepted too,
since it is a superset of the legacy ``[._-]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from layerfs.errors import InvalidReferenceError

DEFAULT_TAG = "latest"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_LEGACY = "index.docker.io"
# Every host name Docker Hub answers to: logins and credentials treat them as one.
DOCKER_HUB_ALIASES = (DOCKER_HUB, DOCKER_HUB_LEGACY, DOCKER_HUB_API, "registry.hub.docker.com")
NAME_TOTAL_LENGTH_MAX = 255

_OFFICIAL_PREFIX = "library/"
_RESERVED_NAMES = ("scratch",)
# A repository named after the digest algorithm makes ``sha256:<hex>`` ambiguous.
_DIGEST_ALGORITHM_NAMES = ("sha256",)

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_COMPONENT_PATTERN = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_COMPONENT = re.compile(_COMPONENT_PATTERN)
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
_HOST = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")
_SHORT_ID = re.compile(r"[a-z0-9]{12}")
_SHORT_ID_LENGTH = 12


def _shown(value: str) -> str:
    """The value as it may appear in a one-line message."""
    if value.isprintable() and len(value) <= 100:
        return value
    return repr(value[:100]) + ("..." if len(value) > 100 else "")


def parse_repository_tag(s: str) -> tuple[str, str]:
    """Split ``repo:tag`` or ``repo@digest`` into ``(repo, ref)``; ``ref`` is ``""`` if absent.

    ``@`` is split first. Otherwise the split is at the last ``:`` and only if what follows
    has no ``/``, so ``localhost:5000/foo`` has no tag. Nothing is validated.
    """
    repo, at, digest = s.partition("@")
    if at:
        return repo, digest
    n = s.rfind(":")
    if n < 0:
        return s, ""
    tag = s[n + 1 :]
    if "/" in tag:
        return s, ""
    return s[:n], tag


def _looks_like_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost"


def split_hostname(name: str) -> tuple[str, str]:
    """Split a repository name into ``(registry host, path)``; nothing is validated.

    The part before the first ``/`` is a host only if it contains ``.`` or ``:`` or is
    ``localhost``; otherwise the host is ``docker.io``. ``index.docker.io`` becomes
    ``docker.io``. The path is returned as written (``library/`` is not touched).
    """
    first, slash, rest = name.partition("/")
    if not slash or not _looks_like_host(first):
        return DOCKER_HUB, name
    if first == DOCKER_HUB_LEGACY:
        first = DOCKER_HUB
    return first, rest


def _check_path(path: str, name: str) -> None:
    if path == "":
        raise InvalidReferenceError(
            "invalid reference format: repository name must have at least one component"
        )
    if len(path) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReferenceError(
            "invalid reference format: repository name must not be more than "
            f"{NAME_TOTAL_LENGTH_MAX} characters"
        )
    components = path.split("/")
    if not all(_COMPONENT.fullmatch(c) for c in components):
        if all(_COMPONENT.fullmatch(c) for c in path.lower().split("/")):
            raise InvalidReferenceError(
                f"invalid reference format: repository name must be lowercase ({_shown(name)})"
            )
        bad = next(c for c in components if not _COMPONENT.fullmatch(c))
        raise InvalidReferenceError(
            f"invalid reference format: repository name component {_shown(bad)!r} of "
            f"{_shown(name)} must match {_COMPONENT_PATTERN}"
        )


def _parse_name(name: str) -> tuple[str, str]:
    """Validate a repository name; return ``(host, local path)``.

    For ``docker.io`` the local path has ``library/`` stripped.
    """
    if "://" in name:
        raise InvalidReferenceError(
            f"invalid reference format: repository name {_shown(name)} must not contain a scheme"
        )
    host, path = split_hostname(name)
    if host != DOCKER_HUB:
        if host.startswith("-") or host.endswith("-"):
            raise InvalidReferenceError(
                f"Invalid index name ({_shown(host)}). Cannot begin or end with a hyphen."
            )
        if not _HOST.fullmatch(host):
            raise InvalidReferenceError(
                f"invalid reference format: invalid registry host {_shown(host)}"
            )
    elif path.startswith(_OFFICIAL_PREFIX):
        path = path[len(_OFFICIAL_PREFIX) :]
    _check_path(path, name)
    if "/" not in path and _IMAGE_ID.fullmatch(path):
        raise InvalidReferenceError(
            f"invalid repository name ({path}), cannot specify 64-byte hexadecimal strings"
        )
    return host, path


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is 1-128 of ``[A-Za-z0-9_.-]`` not starting with ``.``/``-``."""
    if tag == "":
        raise InvalidReferenceError("tag name can't be empty")
    if not _TAG.fullmatch(tag):
        raise InvalidReferenceError(
            f"Illegal tag name ({_shown(tag)}): only [A-Za-z0-9_.-] are allowed "
            "('.' and '-' are NOT allowed in the initial), minimum 1, maximum 128 in length"
        )
    return tag


def validate_digest_ref(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:`` followed by 64 lower-case hex digits."""
    if not _DIGEST.fullmatch(digest):
        raise InvalidReferenceError(
            f"invalid reference format: digest {_shown(digest)} must be sha256: "
            "followed by 64 lower-case hex digits"
        )
    return digest


def validate_repo_name(name: str) -> str:
    """Return ``name`` if images may be tagged into it, else raise.

    Checks the grammar (host, components, length, no 64-hex single component) and
    refuses the reserved ``scratch`` and the digest algorithm name ``sha256``.
    """
    if name == "":
        raise InvalidReferenceError("Repository name can't be empty")
    local = familiar_name(name)
    if local in _RESERVED_NAMES:
        raise InvalidReferenceError(f"'{local}' is a reserved name")
    if local in _DIGEST_ALGORITHM_NAMES:
        raise InvalidReferenceError(
            f"refusing to create an ambiguous tag using digest algorithm as name: '{local}'"
        )
    return name


def familiar_name(name: str) -> str:
    """The validated local name: ``docker.io/library/x`` → ``x``; other hosts keep theirs."""
    host, path = _parse_name(name)
    return path if host == DOCKER_HUB else f"{host}/{path}"


def normalize_local_name(name: str) -> str:
    """Docker's ``NormalizeLocalName``: the local name, or ``name`` unchanged if it is invalid.

    Returning invalid input unchanged is what lets image IDs pass through lookups.
    """
    try:
        return familiar_name(name)
    except InvalidReferenceError:
        return name


def remote_name(name: str) -> str:
    """The path used on the registry: a single-component docker.io name gets ``library/``."""
    host, path = _parse_name(name)
    if host == DOCKER_HUB and "/" not in path:
        return _OFFICIAL_PREFIX + path
    return path


def registry_host(name: str) -> str:
    """The registry a name lives on: ``docker.io`` unless the name starts with a host."""
    host, _ = _parse_name(name)
    return host


def registry_api_host(registry: str) -> str:
    """The host to send API requests to: docker.io's is ``registry-1.docker.io``."""
    if registry in (DOCKER_HUB, DOCKER_HUB_LEGACY):
        return DOCKER_HUB_API
    return registry


def full_name(name: str) -> str:
    """The fully qualified name: ``busybox`` → ``docker.io/library/busybox``."""
    return f"{registry_host(name)}/{remote_name(name)}"


def image_reference(repo: str, ref: str) -> str:
    """``repo@ref`` when ``ref`` is a digest (contains ``:``), else ``repo:ref``."""
    if ":" in ref:
        return f"{repo}@{ref}"
    return f"{repo}:{ref}"


def truncate_id(image_id: str) -> str:
    """The 12-character short form of an ID (an ``alg:`` prefix is dropped first)."""
    _, colon, rest = image_id.partition(":")
    if colon:
        image_id = rest
    return image_id[:_SHORT_ID_LENGTH]


def is_short_id(s: str) -> bool:
    """Whether ``s`` is exactly 12 characters of ``[a-z0-9]``."""
    return _SHORT_ID.fullmatch(s) is not None


@dataclass(frozen=True)
class Reference:
    """A parsed reference: a normalised local repository name plus a tag or a digest."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, s: str, default_tag: str | None = DEFAULT_TAG) -> Reference:
        """Parse ``name``, ``name:tag`` or ``name@sha256:<hex>``, validating every part.

        A name without tag or digest gets ``default_tag`` (``None`` leaves it bare).
        """
        repo, ref = parse_repository_tag(s)
        if repo == "":
            raise InvalidReferenceError(
                f"invalid reference format: {_shown(s)} has no repository name"
            )
        repository = familiar_name(repo)
        if "@" in s:
            return cls(repository, None, validate_digest_ref(ref))
        if ref:
            return cls(repository, validate_tag(ref), None)
        if default_tag:
            return cls(repository, validate_tag(default_tag), None)
        return cls(repository, None, None)

    @property
    def ref(self) -> str:
        """The digest if there is one, else the tag, else ``""``."""
        return self.digest or self.tag or ""

    @property
    def registry(self) -> str:
        return registry_host(self.repository)

    @property
    def remote_name(self) -> str:
        return remote_name(self.repository)

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        if self.tag:
            return f"{self.repository}:{self.tag}"
        return self.repository


def is_docker_hub(host: str) -> bool:
    """True for any of the names Docker Hub goes by (:data:`DOCKER_HUB_ALIASES`)."""
    return host in DOCKER_HUB_ALIASES
