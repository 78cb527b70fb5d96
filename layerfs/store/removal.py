"""``rmi``: untag and delete images the way ``docker rmi`` does.

Removing by reference untags; the image goes once no reference is left. Its
parents follow when they are untagged, childless and not held. An image with
children is never deleted: removing one of its names only untags it, removing
it by ID is a conflict that ``-f`` turns into untagging it. An image held by a
pull, a load or a mount in any process is never deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerfs.errors import ConflictError, ImageHeldError, ImageNotFoundError
from layerfs.model.reference import image_reference, parse_repository_tag
from layerfs.store.store import Store


@dataclass
class Removal:
    untagged: list[str]
    deleted: list[str]  # image IDs, top first


def _is_reference(store: Store, name: str) -> bool:
    """True if ``name`` names a tag or digest (not an ID prefix)."""
    repo, ref = parse_repository_tag(name)
    try:
        refs = store.tags.get(repo)
    except Exception:
        return False
    return refs is not None and (ref or "latest") in refs


def remove_image(store: Store, name: str, *, force: bool = False, prune: bool = True) -> Removal:
    with store.graph.transaction():
        image = store.tags.lookup_image(name)
        refs = store.tags.references(image.id)
        untagged: list[str] = []
        if _is_reference(store, name):
            repo, ref = parse_repository_tag(name)
            target = image_reference(repo, ref or "latest")
            if len(refs) > 1:
                store.tags.delete(*_split_ref(target))
                return Removal([target], [])
            to_untag = [target]
        else:
            repos = {_split_ref(r)[0] for r in refs}
            if len(repos) > 1 and not force:
                raise ConflictError(
                    f"conflict: unable to delete {image.id[:12]} (must be forced) - image is "
                    f"referenced in multiple repositories ({', '.join(sorted(repos))})"
                )
            to_untag = refs
        children = store.graph.children(image.id)
        by_reference = _is_reference(store, name)
        if children:
            # As docker does: removing a name untags; the image stays for its children.
            # By ID it is a conflict that -f turns into untagging every name.
            if (force or by_reference) and to_untag:
                for ref in to_untag:
                    store.tags.delete(*_split_ref(ref))
                return Removal(list(to_untag), [])
            raise ConflictError(
                f"conflict: unable to delete {image.id[:12]} (cannot be forced) - image has "
                f"dependent child images ({', '.join(c[:12] for c in children)})"
            )
        if store.graph.is_held(image.id) or (image.layer and store.graph.is_held(image.layer)):
            raise ImageHeldError(
                f"conflict: unable to delete {image.id[:12]} - image is held by an ongoing "
                "pull, load or mount"
            )
        for ref in to_untag:
            store.tags.delete(*_split_ref(ref))
            untagged.append(ref)
        deleted = [image.id]
        store.graph.delete(image.id)
        parent = image.parent
        while prune and parent:
            try:
                parent_image = store.graph.get(parent)
            except ImageNotFoundError:
                break
            if (
                store.tags.references(parent)
                or store.graph.children(parent)
                or store.graph.is_held(parent)
            ):
                break
            try:
                store.graph.delete(parent)
            except ImageHeldError:
                break
            deleted.append(parent)
            parent = parent_image.parent
        return Removal(untagged, deleted)


def _split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` / ``repo@digest`` → (repo, tag or digest), hosts with ports kept."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, tag = parse_repository_tag(ref)
    return repo, tag
