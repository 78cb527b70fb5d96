"""fsck and gc: check everything the store holds; remove what nobody uses.

fsck first takes the store lock once, which settles what interrupted commands
left pending and sweeps the staging of processes that are gone (see
:mod:`layerfs.store.journal`), so a store is clean right after a ``kill -9``.
It then checks every layer's files and sizes, every image's json, parent and
layer, that a modern config hashes to its ID and its ``rootfs.diff_ids`` match
its chain, every tag's target, and the indexes under index/ against what they
index (``repair`` rebuilds one that disagrees). Every node and every layer's
info is read once. The checks run under the store lock, so they see one state of
the store while other commands work. ``verify`` re-hashes every layer tar (without
the lock; what it finds is confirmed under it)
against its diff ID and rebuilds every index to compare it with the stored
one, naming the images that use a damaged layer; the damaged layer is marked
so that a pull fetches it again. ``repair`` removes unused layers and released
hold files, and drops the images of damaged layers (a remove record, like rmi).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import DepthLimitError, ImageNotFoundError, LayerfsError, StoreError
from layerfs.model.digest import hex_of, sha256_digest
from layerfs.model.image import MAX_IMAGE_DEPTH, Image
from layerfs.progress import Progress
from layerfs.store.faults import fault
from layerfs.store.files import locked, remove_tree, stale_entries
from layerfs.store.journal import REMOVE, Record
from layerfs.store.layers import LayerInfo
from layerfs.store.store import Store

_MAX_NAMED = 8


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # removable with --repair
    repaired: list[str] = field(default_factory=list)
    damaged_layers: list[str] = field(default_factory=list)
    stale_indexes: list[str] = field(default_factory=list)  # rebuilt by --repair
    checked_layers: int = 0
    checked_images: int = 0
    checked_tags: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems and not self.leftovers and not self.stale_indexes


def stale_tmp_entries(store: Store) -> list[Path]:
    """Entries of tmp/ whose writing process no longer exists."""
    return stale_entries(store.tmp)


def _settle(store: Store) -> bool:
    """Take the lock once (settling dead commands); False when this user cannot."""
    try:
        with locked(store.lock_path):
            return True
    except StoreError:
        return False


def _layer_files(store: Store, diff_id: str, infos: dict[str, LayerInfo]) -> str | None:
    """The cheap check of a layer: its files exist and the tar has the recorded size.

    The info read is left in ``infos`` for the index check.
    """
    path = store.layers.path(diff_id)
    try:
        info = infos[diff_id] = store.layers.info(diff_id)
        size = (path / "layer.tar").stat().st_size
        index_size = (path / "index").stat().st_size
    except FileNotFoundError as exc:
        return f"layer {diff_id}: {Path(exc.filename or '').name or 'a file'} is missing"
    except LayerfsError as exc:
        return f"layer {diff_id}: {exc}"
    if size != info.tar_size:
        return f"layer {diff_id}: layer.tar has {size} bytes, info.json records {info.tar_size}"
    if index_size == 0:
        return f"layer {diff_id}: the index is empty"
    return None


def _users(store: Store, images: dict[str, Image], diff_id: str) -> list[str]:
    """Names of the images whose chain holds ``diff_id`` (tags first, else short IDs)."""
    children: dict[str, list[str]] = {}
    for image in images.values():
        if image.parent:
            children.setdefault(image.parent, []).append(image.id)
    todo = [i.id for i in images.values() if i.layer == diff_id]
    users: set[str] = set()
    while todo:
        image_id = todo.pop()
        if image_id not in users:
            users.add(image_id)
            todo.extend(children.get(image_id, []))
    by_id = store.tags.by_id()
    names: list[str] = []
    for image_id in sorted(users):
        names.extend(by_id.get(image_id) or [image_id[:12]])
    return sorted(names, key=lambda n: (len(n) == 12 and ":" not in n, n))


def _named(names: list[str]) -> str:
    if not names:
        return "used by no image"
    shown = ", ".join(names[:_MAX_NAMED])
    more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
    return f"used by {shown}{more}"


def fsck(
    store: Store,
    *,
    repair: bool = False,
    verify: bool = False,
    progress: Progress | None = None,
    refetch: Callable[[str], str | None] | None = None,
) -> Report:
    """Check the store; ``refetch(diff_id)`` fetches a damaged layer again (its source)."""
    report = Report()
    can_lock = _settle(store)
    if not can_lock:
        for path in stale_tmp_entries(store):
            report.leftovers.append(f"unpublished staging leftover tmp/{path.name}")
    # Re-hashing takes as long as reading every layer: it runs without the lock, and
    # what it finds is looked at again under the lock (a layer may go or come meanwhile).
    verified, suspects = _verify_layers(store, progress) if verify else (set(), set())
    # Every command that changes the store does so under its lock: holding it while the
    # metadata is read and checked gives one state of the store, not a mix of two.
    with locked(store.lock_path) if can_lock else contextlib.nullcontext():
        _check(store, report, verify, verified, suspects, progress)
    if repair:
        _repair(store, report, refetch)
    return report


def _verify_layers(store: Store, progress: Progress | None) -> tuple[set[str], set[str]]:
    """(the layers verified, those whose re-hash or rebuilt index found a problem)."""
    diff_ids = store.layers.diff_ids()
    if progress is not None:
        progress.start("fsck", "Verifying layers", len(diff_ids))
    suspects: set[str] = set()
    for diff_id in diff_ids:
        if any(True for _ in store.layers.verify(diff_id)):
            suspects.add(diff_id)
        if progress is not None:
            progress.advance("fsck", 1)
    return set(diff_ids), suspects


def _check(
    store: Store,
    report: Report,
    verify: bool,
    verified: set[str],
    suspects: set[str],
    progress: Progress | None,
) -> None:
    """The checks of :func:`fsck`, on a store nobody changes meanwhile."""
    images = store.graph.map()  # every node read once: parents and chains are found here
    diff_ids = store.layers.diff_ids()
    infos: dict[str, LayerInfo] = {}
    if progress is not None and not verify:
        progress.start("fsck", "Checking layers", len(diff_ids))
    for diff_id in diff_ids:
        if verify:
            # A suspect is confirmed, a layer stored since the re-hashing verified, now.
            again = diff_id in suspects or diff_id not in verified
            found = list(store.layers.verify(diff_id)) if again else []
        else:
            problem = _layer_files(store, diff_id, infos)
            found = [problem] if problem else []
        if found:
            report.damaged_layers.append(diff_id)
            users = _named(_users(store, images, diff_id))
            report.problems.extend(f"{line} ({users})" for line in found)
            if verify:
                store.layers.mark_damaged(diff_id, found[0])
        elif verify:
            store.layers.clear_damaged(diff_id)
        report.checked_layers += 1
        if progress is not None and not verify:
            progress.advance("fsck", 1)
    used_layers: set[str] = set()
    broken_images: set[str] = set()
    named = store.tags.by_id()
    layers = set(diff_ids)
    chains: dict[str, list[str]] = {}  # image ID → its chain's diff IDs, base first
    for image_id in store.graph.ids():
        report.checked_images += 1
        problems = _check_image(store, images, image_id, layers, used_layers, chains)
        if problems:
            broken_images.add(image_id)
            suffix = f" (tagged {', '.join(named[image_id])})" if image_id in named else ""
            report.problems.extend(p + suffix for p in problems)
    for repo, refs in store.tags.all().items():
        for ref, image_id in refs.items():
            report.checked_tags += 1
            # A tag to a broken image was named with the image's problem: once is enough.
            if image_id not in broken_images and image_id not in images:
                report.problems.append(f"tag {repo}:{ref} points to missing image {image_id[:12]}")
    for diff_id in diff_ids:
        if diff_id not in used_layers and not store.graph.is_held(diff_id):
            report.leftovers.append(f"layer {diff_id} is used by no image")
    report.stale_indexes.extend(store.layers.check_blob_index(infos))
    report.stale_indexes.extend(store.graph.check_summaries(images))


def _check_image(
    store: Store,
    images: dict[str, Image],
    image_id: str,
    layers: set[str],
    used_layers: set[str],
    chains: dict[str, list[str]],
) -> list[str]:
    image = images.get(image_id)
    if image is None:  # it did not load: read it again for the reason
        try:
            store.graph.get(image_id)
        except LayerfsError as exc:
            return [f"image {image_id[:12]}: {exc}"]
        return [f"image {image_id[:12]}: cannot be read"]
    problems = []
    if image.layer:
        used_layers.add(image.layer)
        if image.layer not in layers:
            problems.append(f"image {image_id[:12]}: layer {image.layer} is missing")
    if image.parent and image.parent not in images:
        return [*problems, f"image {image_id[:12]}: parent {image.parent[:12]} is missing"]
    if image.is_config:
        if "id" not in image.data and hex_of(sha256_digest(image.raw_json)) != image_id:
            problems.append(f"image {image_id[:12]}: config does not hash to its ID")
        try:
            chain = _chain_diff_ids(images, image_id, chains)
        except LayerfsError as exc:
            return [*problems, f"image {image_id[:12]}: {exc}"]
        if image.diff_ids and chain != image.diff_ids:
            problems.append(
                f"image {image_id[:12]}: rootfs.diff_ids do not match its chain's layers"
            )
    return problems


def _chain_diff_ids(
    images: dict[str, Image], image_id: str, known: dict[str, list[str]]
) -> list[str]:
    """The diff IDs of an image's chain, base first, reusing the chains already walked."""
    walked: list[Image] = []
    current: str = image_id
    while current not in known:
        image = images.get(current)
        if image is None:
            raise ImageNotFoundError(f"no such id: {current}")
        walked.append(image)
        if len(walked) > MAX_IMAGE_DEPTH + 8:
            raise DepthLimitError(f"image {image_id[:12]} has a parent chain that never ends")
        if not image.parent:
            break
        current = image.parent
    below = known.get(current, []) if walked and walked[-1].parent else []
    for image in reversed(walked):
        below = [*below, image.layer] if image.layer else below
        known[image.id] = below
    return known[image_id]


def _repair(store: Store, report: Report, refetch: Callable[[str], str | None] | None) -> None:
    for diff_id in list(report.damaged_layers):
        source = refetch(diff_id) if refetch is not None else None  # outside the lock
        if source is not None and not list(store.layers.verify(diff_id)):
            store.layers.clear_damaged(diff_id)
            report.damaged_layers.remove(diff_id)
            report.repaired.append(f"fetched layer {diff_id} again from {source}")
            report.problems = [p for p in report.problems if not _about(p, set(), [diff_id])]
    with locked(store.lock_path):
        for path in stale_tmp_entries(store):
            remove_tree(path)
            report.repaired.append(f"removed tmp/{path.name}")
        if report.damaged_layers:
            _drop_damaged(store, report)
        for diff_id in store.graph.unused_layers():
            store.layers.delete(diff_id)
            report.repaired.append(f"removed unused layer {diff_id}")
            fault("gc.between-layers")
        store.graph.prune_hold_files()
        store.downloads.prune()
        stale_summaries = any(s.startswith("graph summary") for s in report.stale_indexes)
        report.repaired.extend(store.rebuild_indexes(summaries=stale_summaries))
    report.leftovers = []
    report.stale_indexes = []


def _drop_damaged(store: Store, report: Report) -> None:
    """Remove every image whose chain holds a damaged layer, with its tags, then the layer."""
    images = store.graph.map()
    doomed: set[str] = set()
    for diff_id in report.damaged_layers:
        for image in images.values():
            if image.layer == diff_id:
                doomed.add(image.id)
    children: dict[str, list[str]] = {}
    for image in images.values():
        if image.parent:
            children.setdefault(image.parent, []).append(image.id)
    todo = list(doomed)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in doomed:
                doomed.add(child)
                todo.append(child)
    held = sorted(i for i in doomed if store.graph.is_held(i))
    if held:
        report.problems.append(
            f"cannot drop images of damaged layers while they are in use: "
            f"{', '.join(i[:12] for i in held)}"
        )
        return
    depth = {i: len(_chain(images, i)) for i in doomed}
    order = sorted(doomed, key=lambda i: -depth[i])  # top first
    tags = [
        (repo, ref, image_id)
        for repo, refs in store.tags.all().items()
        for ref, image_id in refs.items()
        if image_id in doomed
    ]
    record = Record("fsck", REMOVE, order, list(report.damaged_layers), tags)
    with store.journal.pending(record):
        store.journal.settle(record)
    for repo, ref, _ in tags:
        report.repaired.append(f"untagged {repo}{'@' if ':' in ref else ':'}{ref}")
    for image_id in order:
        report.repaired.append(f"removed image {image_id[:12]} (its chain has a damaged layer)")
    for diff_id in report.damaged_layers:
        report.repaired.append(f"removed damaged layer {diff_id}")
    report.problems = [p for p in report.problems if not _about(p, doomed, report.damaged_layers)]


def _chain(images: dict[str, Image], image_id: str) -> list[str]:
    chain = []
    current: str | None = image_id
    while current and current in images and current not in chain:
        chain.append(current)
        current = images[current].parent or None
    return chain


def _about(problem: str, images: set[str], layers: list[str]) -> bool:
    """True when a problem line is about one of the removed images or layers."""
    return any(problem.startswith(f"layer {d}:") for d in layers) or any(
        problem.startswith(f"image {i[:12]}:") for i in images
    )


def gc(store: Store) -> list[str]:
    """Remove unused layers, stale staging, released hold files, download locks and the
    blob index entries of layers no longer there."""
    removed: list[str] = []
    with locked(store.lock_path):
        for path in stale_tmp_entries(store):
            remove_tree(path)
            removed.append(f"tmp/{path.name}")
        for diff_id in store.graph.unused_layers():
            store.layers.delete(diff_id)
            removed.append(diff_id)
            fault("gc.between-layers")
        store.graph.prune_hold_files()
        store.downloads.prune()
        stray, _ = store.layers.rebuild_blob_index()
        removed.extend(f"the blob index entry of {digest}" for digest in stray)
    return removed
