"""``rmi``: untag and delete images the way ``docker rmi`` does (the daemon's ImageDelete).

By name: the name is untagged (and, when it was the repository's last tag, the digests of
that repository with it); if the image has other names that is all. Otherwise the image
is deleted unless something stops it (children, a hold), in which case it quietly stays.
By ID (or a unique prefix): an image whose names are all in one repository loses them and
is deleted; names in several repositories need ``force``. Nothing deletes an image that
has children ("cannot be forced"), and an image held by a pull, a load or a mount in any
process is never deleted (like docker's running container: ``force`` on a name only
untags it). Deleted images take their untagged, childless, unheld parents with them
unless ``prune`` is off, and their layers when no other image uses them.

All of one ``rmi`` is one step: it runs under an undo record (:meth:`Journal.undoable`),
so a process killed half way leaves the store as it was before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerfs.errors import ConflictError, ImageHeldError, ImageNotFoundError
from layerfs.model.image import Image
from layerfs.model.reference import image_reference, normalize_local_name, parse_repository_tag
from layerfs.store.store import Store


@dataclass
class Removal:
    untagged: list[str]
    deleted: list[str]  # image IDs, top first
    # What docker prints, in order: ("Untagged", name) / ("Deleted", "sha256:...") for
    # images and, after each image, the layers deleted with it.
    records: list[tuple[str, str]] = field(default_factory=list, compare=False)


class _Conflict(ConflictError):
    used = False  # the image is in use (docker: by a running container)


class _HeldConflict(_Conflict, ImageHeldError):
    used = True


def _is_id_prefix(image_id: str, name: str) -> bool:
    """docker's isImageIDPrefix: ``name`` is the start of the ID (with or without sha256:)."""
    return ("sha256:" + image_id).startswith(name) or image_id.startswith(name)


def _is_single_reference(refs: list[str]) -> bool:
    """docker's isSingleReference: at most one tag, and all names in its repository."""
    if len(refs) <= 1:
        return len(refs) == 1
    tags = [r for r in refs if "@" not in r]
    if len(tags) > 1:
        return False
    repos = {r.partition("@")[0] for r in refs if "@" in r}
    single = _split_ref(tags[0] if tags else refs[0])[0]
    return len(repos) == 1 and single in repos


def _held(store: Store, image: Image) -> bool:
    return store.graph.is_held(image.id) or bool(image.layer and store.graph.is_held(image.layer))


def remove_image(store: Store, name: str, *, force: bool = False, prune: bool = True) -> Removal:
    removal = Removal([], [])
    with store.graph.transaction(), store.journal.undoable("rmi"):
        image = store.tags.lookup_image(name)
        refs = store.tags.references(image.id)
        quiet = False
        if not _is_id_prefix(image.id, name):
            if not force and _is_single_reference(refs) and _held(store, image):
                raise ImageHeldError(
                    f"conflict: unable to remove repository reference {name!r} (must force) - "
                    f"image {image.id[:12]} is held by an ongoing pull, load or mount"
                )
            repo, ref = _split_ref(_reference_of(name))
            _untag(store, repo, ref, removal)
            refs = store.tags.references(image.id)
            if "@" not in _reference_of(name):
                # The repository's last tag went: its digests go too.
                local = normalize_local_name(repo)
                if not any(_split_ref(r)[0] == local and "@" not in r for r in refs):
                    for other in refs:
                        if "@" in other and _split_ref(other)[0] == local:
                            _untag(store, *_split_ref(other), removal)
                    refs = store.tags.references(image.id)
            if refs:
                return removal
            quiet = True
        elif _is_single_reference(refs):
            conflict = _conflict(store, image, force=force, names=False)
            if conflict is not None:
                raise conflict
            for ref in refs:
                _untag(store, *_split_ref(ref), removal)
        _delete(store, image, force=force, prune=prune, quiet=quiet, removal=removal)
    return removal


def _reference_of(name: str) -> str:
    repo, ref = parse_repository_tag(name)
    return image_reference(normalize_local_name(repo), ref or "latest")


def _untag(store: Store, repo: str, ref: str, removal: Removal) -> None:
    store.tags.delete(repo, ref)
    name = image_reference(normalize_local_name(repo), ref)
    removal.untagged.append(name)
    removal.records.append(("Untagged", name))


def _conflict(store: Store, image: Image, *, force: bool, names: bool) -> _Conflict | None:
    """What stops deleting ``image``; with ``names``, its remaining names count (unless force)."""
    short = image.id[:12]
    children = store.graph.children(image.id)
    if children:
        return _Conflict(
            f"conflict: unable to delete {short} (cannot be forced) - image has dependent "
            f"child images ({', '.join(c[:12] for c in children)})"
        )
    if _held(store, image):
        return _HeldConflict(
            f"conflict: unable to delete {short} (cannot be forced) - image is held by an "
            "ongoing pull, load or mount"
        )
    if names and not force and store.tags.references(image.id):
        return _Conflict(
            f"conflict: unable to delete {short} (must be forced) - image is referenced in "
            "multiple repositories"
        )
    return None


def _delete(
    store: Store, image: Image, *, force: bool, prune: bool, quiet: bool, removal: Removal
) -> None:
    """docker's imageDeleteHelper: delete ``image``, then (quietly) its untagged parents."""
    while True:
        conflict = _conflict(store, image, force=force, names=True)
        if conflict is not None:
            dangling = not store.tags.references(image.id) and not store.graph.children(image.id)
            if quiet and (not dangling or conflict.used):
                return
            raise conflict
        for ref in store.tags.references(image.id):
            _untag(store, *_split_ref(ref), removal)
        layers = store.graph.delete(image.id)
        removal.deleted.append(image.id)
        removal.records.append(("Deleted", "sha256:" + image.id))
        removal.records.extend(("Deleted", diff_id) for diff_id in layers)
        if not prune or not image.parent:
            return
        try:
            image = store.graph.get(image.parent)
        except ImageNotFoundError:
            return
        force, quiet = False, True


def _split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` / ``repo@digest`` → (repo, tag or digest), hosts with ports kept."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, tag = parse_repository_tag(ref)
    return repo, tag
