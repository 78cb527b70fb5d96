"""TagStore: repository → tag/digest → image ID, in Docker's legacy repositories file.

This module owns the one file ``{"Repositories":{"<local name>":{"<tag>":"<id>",
"sha256:<hex>":"<id>"}}}`` (FORMATS §1.3, §2): reading it, resolving names through it
(``repo:tag``, ``repo@digest``, an ID prefix within a repository, then a global ID prefix)
and changing it. It leaves images to the graph: it only asks ``graph.get(name)`` to turn an
ID or unique prefix into an image.

Every read re-reads the file, so several processes share one store. Every change takes the
store's exclusive lock, re-reads, changes and, only if something changed, writes the whole
file atomically (temp file, fsync, rename; mode 0600). The graph is consulted inside the
lock too, so an image cannot be deleted between being resolved and being tagged. The lock
is re-entrant within a process: an ``rmi`` that deletes from the graph and the tags in one
locked section calls these methods as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from layerfs.errors import ConflictError, ImageNotFoundError, IntegrityError, TagNotFoundError
from layerfs.model.reference import (
    DEFAULT_TAG,
    familiar_name,
    image_reference,
    is_short_id,
    normalize_local_name,
    parse_repository_tag,
    truncate_id,
    validate_digest_ref,
    validate_repo_name,
    validate_tag,
)
from layerfs.store.files import atomic_write, locked

Repositories = dict[str, dict[str, str]]


class HasID(Protocol):
    """Anything with a full image ID, as the graph returns it."""

    @property
    def id(self) -> str: ...


ImageT = TypeVar("ImageT", bound=HasID)
ImageT_co = TypeVar("ImageT_co", bound=HasID, covariant=True)
_R = TypeVar("_R")


class GraphLike(Protocol[ImageT_co]):
    """The part of the graph the tag store needs."""

    def get(self, name: str) -> ImageT_co:
        """Resolve a full image ID or unique prefix.

        Raises ImageNotFoundError (unknown), AmbiguousIDError (several matches) or
        UsageError (empty prefix).
        """
        ...


class TagStore(Generic[ImageT]):
    """Repositories of tags and digests naming images of one graph, kept in one file."""

    def __init__(
        self, path: Path, graph: GraphLike[ImageT], tmp_root: Path, lock_path: Path
    ) -> None:
        self.path = path
        self.graph = graph
        self.tmp_root = tmp_root
        self.lock_path = lock_path
        self._memo: tuple[bytes | None, Repositories] | None = None  # (file bytes, parsed)
        self._by_id: dict[str, list[str]] | None = None  # by_id() of the memo

    # -- the file ---------------------------------------------------------------------------

    def _parsed(self) -> Repositories:
        """The file as it is now, parsed; shared between calls, so never to be changed.

        The file is read on every call (another process may have changed it) but parsed
        only when its bytes differ from the last read: a store with thousands of tags
        does not pay a JSON parse per lookup.
        """
        try:
            data: bytes | None = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        if self._memo is not None and self._memo[0] == data:
            return self._memo[1]
        repos = self._parse(data) if data is not None else {}
        self._memo = (data, repos)
        self._by_id = None
        return repos

    def _parse(self, data: bytes) -> Repositories:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"cannot read tag store {self.path}: {exc}") from exc
        if not isinstance(doc, dict) or "Repositories" not in doc:
            raise IntegrityError(
                f"cannot read tag store {self.path}: expected an object with 'Repositories'"
            )
        repos = doc["Repositories"]
        if repos is None:  # Go marshals a nil map as null
            return {}
        if not isinstance(repos, dict):
            raise IntegrityError(f"cannot read tag store {self.path}: 'Repositories' is no object")
        result: Repositories = {}
        for name, refs in repos.items():
            if not isinstance(refs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in refs.items()
            ):
                raise IntegrityError(
                    f"cannot read tag store {self.path}: repository {name!r} is not a map of "
                    "strings"
                )
            result[name] = dict(refs)
        return result

    def _load(self) -> Repositories:
        """A copy of the file's repositories that the caller may change."""
        return {name: dict(refs) for name, refs in self._parsed().items()}

    def _save(self, repos: Repositories) -> None:
        # Go's json.Marshal: compact, map keys sorted, no trailing newline.
        data = json.dumps({"Repositories": repos}, separators=(",", ":"), sort_keys=True).encode()
        atomic_write(self.path, data, self.tmp_root, mode=0o600)
        self._memo = (data, repos)  # what the file now holds: the next read needs no parse
        self._by_id = None

    def _update(self, change: Callable[[Repositories], _R]) -> _R:
        """Run ``change`` on a fresh copy under the lock; write back only if it changed."""
        with locked(self.lock_path):
            repos = self._load()
            result = change(repos)
            if repos != self._parsed():
                self._save(repos)
            return result

    # -- changes ----------------------------------------------------------------------------

    def tag(self, repo: str, tag: str, image_name: str, force: bool = False) -> str | None:
        """Point ``repo:tag`` at the image ``image_name`` resolves to.

        An empty tag means ``latest``. Without ``force`` an existing tag is a conflict. When
        an existing tag moves to another image, returns Docker's rename message.
        """
        tag = tag or DEFAULT_TAG
        validate_repo_name(repo)
        validate_tag(tag)
        local = familiar_name(repo)

        def change(repos: Repositories) -> str | None:
            image_id = self.lookup_image(image_name).id
            refs = repos.setdefault(local, {})
            old = refs.get(tag)
            if old is not None and not force:
                raise ConflictError(
                    f"Conflict: Tag {local}:{tag} is already set to image {truncate_id(old)}, "
                    "if you want to replace it, please use -f option"
                )
            refs[tag] = image_id
            if old is not None and old != image_id:
                return (
                    f"The image {local}:{tag} already exists, renaming the old one with ID "
                    f"{truncate_id(old)} to empty string"
                )
            return None

        return self._update(change)

    def set_digest(self, repo: str, digest: str, image_name: str) -> None:
        """Record ``repo@digest`` for an image; a digest is never moved to another image."""
        validate_repo_name(repo)
        validate_digest_ref(digest)
        local = familiar_name(repo)

        def change(repos: Repositories) -> None:
            image_id = self.lookup_image(image_name).id
            refs = repos.setdefault(local, {})
            old = refs.get(digest)
            if old is not None and old != image_id:
                raise ConflictError(
                    f"Conflict: Digest {digest} is already set to image {truncate_id(old)}"
                )
            refs[digest] = image_id

        self._update(change)

    def set_refs(self, refs: list[tuple[str, str, str]]) -> list[str]:
        """Set several ``(repo, tag or digest, image ID)`` in one write; rename messages.

        Tags move (as ``tag -f``); a digest already naming another image is a conflict.
        The file is rewritten once, so the refs of one command appear together.
        """
        for repo, ref, _ in refs:
            validate_repo_name(repo)
            if ":" in ref:
                validate_digest_ref(ref)
            else:
                validate_tag(ref)

        def change(repos: Repositories) -> list[str]:
            messages: list[str] = []
            for repo, ref, image_name in refs:
                image_id = self.lookup_image(image_name).id
                local = familiar_name(repo)
                entries = repos.setdefault(local, {})
                old = entries.get(ref)
                if ":" in ref and old is not None and old != image_id:
                    raise ConflictError(
                        f"Conflict: Digest {ref} is already set to image {truncate_id(old)}"
                    )
                entries[ref] = image_id
                if ":" not in ref and old is not None and old != image_id:
                    messages.append(
                        f"The image {local}:{ref} already exists, renaming the old one with ID "
                        f"{truncate_id(old)} to empty string"
                    )
            return messages

        return self._update(change)

    def delete_refs(self, refs: list[tuple[str, str, str]]) -> list[str]:
        """Remove each ``(repo, tag or digest, image ID)`` still naming that image; one write."""

        def change(repos: Repositories) -> list[str]:
            removed = []
            for repo, ref, image_id in refs:
                local = normalize_local_name(repo)
                entries = repos.get(local)
                if entries is not None and entries.get(ref) == image_id:
                    del entries[ref]
                    removed.append(image_reference(local, ref))
                    if not entries:
                        del repos[local]
            return removed

        return self._update(change)

    def delete(self, repo: str, ref: str = "") -> bool:
        """Remove ``repo:ref`` (or the whole repository when ``ref`` is empty).

        Returns True when something was removed (always for a whole repository), False
        when the repository exists without ``ref``; an unknown repository is an error.
        """
        local = normalize_local_name(repo)

        def change(repos: Repositories) -> bool:
            if not ref:
                repos.pop(local, None)
                return True
            refs = repos.get(local)
            if refs is None:
                raise TagNotFoundError(f"No such repository: {local}")
            if ref not in refs:
                return False
            del refs[ref]
            if not refs:
                del repos[local]
            return True

        return self._update(change)

    def delete_all(self, image_id: str) -> list[str]:
        """Remove every tag and digest naming ``image_id``; return them, sorted."""

        def change(repos: Repositories) -> list[str]:
            removed: list[str] = []
            for name in list(repos):
                refs = repos[name]
                for ref in [r for r, i in refs.items() if i == image_id]:
                    del refs[ref]
                    removed.append(image_reference(name, ref))
                if not refs:
                    del repos[name]
            return sorted(removed)

        return self._update(change)

    # -- queries ----------------------------------------------------------------------------

    def all(self) -> Repositories:
        """A snapshot of every repository."""
        return self._load()

    def get(self, repo: str) -> dict[str, str] | None:
        """The refs of one repository (ref → image ID), or None."""
        refs = self._parsed().get(normalize_local_name(repo))
        return dict(refs) if refs is not None else None

    def get_image(self, repo: str, ref_or_id: str) -> ImageT | None:
        """The image ``repo`` names by tag, digest or (≥12-character) ID prefix, or None.

        An exact tag or digest wins; otherwise the first entry, in sorted ref order, whose
        ID starts with ``ref_or_id``. Errors from the graph propagate.
        """
        refs = self._parsed().get(normalize_local_name(repo))
        if refs is None:
            return None
        image_id = refs.get(ref_or_id)
        if image_id is not None:
            return self.graph.get(image_id)
        if is_short_id(truncate_id(ref_or_id)):
            for ref in sorted(refs):
                if refs[ref].startswith(ref_or_id):
                    return self.graph.get(refs[ref])
        return None

    def lookup_image(self, name: str) -> ImageT:
        """Resolve a user's name for an image.

        In order: ``repo:tag``/``repo@digest`` (no ref means ``latest``), an ID prefix of at
        least 12 characters within the repository, then the whole string as an ID prefix in
        the graph.
        """
        repo, ref = parse_repository_tag(name)
        image = self.get_image(repo, ref or DEFAULT_TAG)
        if image is not None:
            return image
        try:
            return self.graph.get(name)
        except ImageNotFoundError as exc:
            raise ImageNotFoundError(f"No such image: {name}") from exc

    def get_id(self, name: str) -> str:
        """The image ID of exactly ``repo:tag`` or ``repo@digest`` (no ID prefixes)."""
        repo, ref = parse_repository_tag(name)
        refs = self._parsed().get(normalize_local_name(repo), {})
        image_id = refs.get(ref or DEFAULT_TAG)
        if image_id is None:
            raise TagNotFoundError(f"image with specified name does not exist: {name}")
        return image_id

    def by_id(self) -> dict[str, list[str]]:
        """Image ID → sorted ``repo:tag`` / ``repo@digest`` references."""
        return {image_id: list(names) for image_id, names in self._references().items()}

    def _references(self) -> dict[str, list[str]]:
        """by_id() of the file as it is now, computed once per version of the file."""
        repos = self._parsed()
        if self._by_id is not None:
            return self._by_id
        result: dict[str, list[str]] = {}
        for name, refs in repos.items():
            for ref, image_id in refs.items():
                result.setdefault(image_id, []).append(image_reference(name, ref))
        for names in result.values():
            names.sort()
        self._by_id = result
        return result

    def references(self, image_id: str) -> list[str]:
        """Every reference naming ``image_id``, sorted."""
        return list(self._references().get(image_id, []))

    def has_references(self, image_id: str) -> bool:
        return bool(self.references(image_id))

    def image_name(self, image_id: str) -> str:
        """The first reference naming the image, else its short ID."""
        names = self.references(image_id)
        return names[0] if names else truncate_id(image_id)

    def get_repo_refs(self) -> dict[str, list[str]]:
        """Short ID → sorted references naming that image."""
        result: dict[str, list[str]] = {}
        for image_id, names in self.by_id().items():
            result.setdefault(truncate_id(image_id), []).extend(names)
        for names in result.values():
            names.sort()
        return result
