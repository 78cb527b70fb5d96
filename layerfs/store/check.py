"""fsck and gc: check everything the store holds; remove what nobody uses.

fsck checks every layer's info, tar size and index, every image's json, parent
and layer, every tag's target, the diff IDs of modern configs against their
chain, and the indexes under index/ against what they index; with ``verify``
it also re-hashes every layer against its diff ID and rebuilds and compares
every entry index. Staging leftovers in tmp/ whose process is gone are reported
as removable; ``repair`` removes them and rebuilds indexes that disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import DepthLimitError, ImageNotFoundError, LayerfsError
from layerfs.model.digest import hex_of, sha256_digest
from layerfs.model.image import MAX_IMAGE_DEPTH, Image
from layerfs.progress import Progress
from layerfs.store.files import locked, remove_tree
from layerfs.store.layers import LayerInfo
from layerfs.store.store import Store


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # removable with --repair
    repaired: list[str] = field(default_factory=list)
    stale_indexes: list[str] = field(default_factory=list)  # rebuilt by --repair
    checked_layers: int = 0
    checked_images: int = 0
    checked_tags: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems and not self.leftovers and not self.stale_indexes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_tmp_entries(store: Store) -> list[Path]:
    """Entries of tmp/ whose writing process no longer exists."""
    stale = []
    if not store.tmp.is_dir():
        return []
    for path in store.tmp.iterdir():
        parts = path.name.split("-")
        pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
        if pid is None or not _pid_alive(pid):
            stale.append(path)
    return stale


def fsck(
    store: Store, *, repair: bool = False, verify: bool = False, progress: Progress | None = None
) -> Report:
    report = Report()
    for path in stale_tmp_entries(store):
        report.leftovers.append(f"unpublished staging leftover tmp/{path.name}")
    diff_ids = set(store.layers.diff_ids())
    if progress is not None:
        progress.start("fsck", "Verifying layers" if verify else "Checking layers", len(diff_ids))
    infos: dict[str, LayerInfo] = {}
    for diff_id in sorted(diff_ids):
        if verify:
            report.problems.extend(store.layers.verify(diff_id))
        else:
            report.problems.extend(store.layers.check(diff_id, infos))
        report.checked_layers += 1
        if progress is not None:
            progress.advance("fsck", 1)
    used_layers: set[str] = set()
    images: dict[str, Image] = {}  # every node is read once, its parent found here
    for image_id in store.graph.ids():
        report.checked_images += 1
        try:
            images[image_id] = store.graph.get(image_id)
        except LayerfsError as exc:
            report.problems.append(f"image {image_id[:12]}: {exc}")
    chains: dict[str, list[str]] = {}  # image ID → its chain's diff IDs, base first
    for image_id, image in images.items():
        if image.layer:
            used_layers.add(image.layer)
            if image.layer not in diff_ids:
                report.problems.append(f"image {image_id[:12]}: layer {image.layer} is missing")
        if image.parent and image.parent not in images:
            report.problems.append(f"image {image_id[:12]}: parent {image.parent[:12]} is missing")
            continue
        if image.is_config:
            if "id" not in image.data and hex_of(sha256_digest(image.raw_json)) != image_id:
                report.problems.append(f"image {image_id[:12]}: config does not hash to its ID")
            try:
                chain = _chain_diff_ids(images, image_id, chains)
            except LayerfsError as exc:
                report.problems.append(f"image {image_id[:12]}: {exc}")
                continue
            if image.diff_ids and chain != image.diff_ids:
                report.problems.append(
                    f"image {image_id[:12]}: rootfs.diff_ids do not match its chain's layers"
                )
    for repo, refs in store.tags.all().items():
        for ref, image_id in refs.items():
            report.checked_tags += 1
            if image_id not in images:
                report.problems.append(f"tag {repo}:{ref} points to missing image {image_id[:12]}")
    for diff_id in sorted(diff_ids):
        if diff_id not in used_layers and not store.graph.is_held(diff_id):
            report.leftovers.append(f"layer {diff_id} is used by no image")
    report.stale_indexes.extend(store.layers.check_blob_index(infos))
    report.stale_indexes.extend(store.graph.check_summaries(images))
    if repair:
        with locked(store.lock_path):
            for path in stale_tmp_entries(store):
                remove_tree(path)
                report.repaired.append(f"removed tmp/{path.name}")
            for diff_id in store.graph.unused_layers():
                store.layers.delete(diff_id)
                report.repaired.append(f"removed unused layer {diff_id}")
            store.graph.prune_hold_files()
            store.downloads.prune()
            if report.stale_indexes:
                store.rebuild_indexes()
                report.repaired.extend(f"rebuilt the index: {s}" for s in report.stale_indexes)
        report.leftovers = []
        report.stale_indexes = []
    return report


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


def gc(store: Store) -> list[str]:
    """Remove unused layers, stale staging, released hold files and download locks."""
    removed: list[str] = []
    with locked(store.lock_path):
        for path in stale_tmp_entries(store):
            remove_tree(path)
            removed.append(f"tmp/{path.name}")
        for diff_id in store.graph.unused_layers():
            store.layers.delete(diff_id)
            removed.append(diff_id)
        store.graph.prune_hold_files()
        store.downloads.prune()
    return removed
