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
from layerfs.model.image import Image
from layerfs.model.reference import image_reference, parse_repository_tag
from layerfs.store.journal import REMOVE, Record
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
    """Untag and delete as ``docker rmi`` does, in one step (see :mod:`layerfs.store.journal`)."""
    graph = store.graph
    with graph.transaction():
        image = store.tags.lookup_image(name)
        refs = store.tags.references(image.id)
        by_reference = _is_reference(store, name)
        if by_reference:
            repo, ref = parse_repository_tag(name)
            target = image_reference(repo, ref or "latest")
            if len(refs) > 1:
                _remove(store, image.id, [target], [], [])
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
        children = graph.children(image.id)
        if children:
            # As docker does: removing a name untags; the image stays for its children.
            # By ID it is a conflict that -f turns into untagging every name.
            if (force or by_reference) and to_untag:
                _remove(store, image.id, list(to_untag), [], [])
                return Removal(list(to_untag), [])
            raise ConflictError(
                f"conflict: unable to delete {image.id[:12]} (cannot be forced) - image has "
                f"dependent child images ({', '.join(c[:12] for c in children)})"
            )
        if graph.is_held(image.id) or (image.layer and graph.is_held(image.layer)):
            raise ImageHeldError(
                f"conflict: unable to delete {image.id[:12]} - image is held by an ongoing "
                "pull, load or mount"
            )
        doomed = [image]
        parent = image.parent
        while prune and parent:
            try:
                parent_image = graph.get(parent)
            except ImageNotFoundError:
                break
            others = set(graph.children(parent)) - {i.id for i in doomed}
            if (
                store.tags.references(parent)
                or others
                or graph.is_held(parent)
                or (parent_image.layer and graph.is_held(parent_image.layer))
            ):
                break
            doomed.append(parent_image)
            parent = parent_image.parent
        ids = [i.id for i in doomed]
        _remove(store, image.id, list(to_untag), ids, _unused_layers_after(store, doomed))
        return Removal(list(to_untag), ids)


def _unused_layers_after(store: Store, doomed: list[Image]) -> list[str]:
    """Layers of ``doomed`` that no other image uses and nobody holds."""
    gone = {i.id for i in doomed}
    kept = {
        layer
        for image_id in store.graph.ids()
        if image_id not in gone
        for layer in [store.graph.layer_of(image_id)]
        if layer
    }
    layers = []
    for image in doomed:
        layer = image.layer
        if layer and layer not in kept and layer not in layers and not store.graph.is_held(layer):
            layers.append(layer)
    return layers


def _remove(
    store: Store, image_id: str, untag: list[str], images: list[str], layers: list[str]
) -> None:
    """Untag, then delete images (top first) and layers, as one pending record."""
    tags = [(*_split_ref(ref), image_id) for ref in untag]
    record = Record("rmi", REMOVE, images, layers, tags)
    with store.journal.pending(record):
        store.journal.settle(record)


def _split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` / ``repo@digest`` → (repo, tag or digest), hosts with ports kept."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, tag = parse_repository_tag(ref)
    return repo, tag
