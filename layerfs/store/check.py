"""fsck and gc: re-verify everything the store holds; remove what nobody uses.

fsck re-hashes every layer against its diff ID, rebuilds and compares every
index, checks every image's json, parent and layer, every tag's target and the
diff IDs of modern configs against their chain. Staging leftovers in tmp/ whose
process is gone are reported as removable; ``repair`` removes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.model.digest import hex_of, sha256_digest
from layerfs.progress import Progress
from layerfs.store.files import locked, remove_tree
from layerfs.store.store import Store


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # removable with --repair
    repaired: list[str] = field(default_factory=list)
    checked_layers: int = 0
    checked_images: int = 0
    checked_tags: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems and not self.leftovers


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


def fsck(store: Store, *, repair: bool = False, progress: Progress | None = None) -> Report:
    report = Report()
    for path in stale_tmp_entries(store):
        report.leftovers.append(f"unpublished staging leftover tmp/{path.name}")
    diff_ids = store.layers.diff_ids()
    if progress is not None:
        progress.start("fsck", "Checking layers", len(diff_ids))
    for diff_id in diff_ids:
        report.problems.extend(store.layers.verify(diff_id))
        report.checked_layers += 1
        if progress is not None:
            progress.advance("fsck", 1)
    used_layers: set[str] = set()
    for image_id in store.graph.ids():
        report.checked_images += 1
        try:
            image = store.graph.get(image_id)
        except LayerfsError as exc:
            report.problems.append(f"image {image_id[:12]}: {exc}")
            continue
        if image.layer:
            used_layers.add(image.layer)
            if not store.layers.exists(image.layer):
                report.problems.append(f"image {image_id[:12]}: layer {image.layer} is missing")
        if image.parent and not store.graph.exists(image.parent):
            report.problems.append(f"image {image_id[:12]}: parent {image.parent[:12]} is missing")
            continue
        if image.is_config:
            if "id" not in image.data and hex_of(sha256_digest(image.raw_json)) != image_id:
                report.problems.append(f"image {image_id[:12]}: config does not hash to its ID")
            try:
                chain = store.graph.layers_of(image)
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
            if not store.graph.exists(image_id):
                report.problems.append(f"tag {repo}:{ref} points to missing image {image_id[:12]}")
    for diff_id in store.layers.diff_ids():
        if diff_id not in used_layers and not store.graph.is_held(diff_id):
            report.leftovers.append(f"layer {diff_id} is used by no image")
    if repair:
        with locked(store.lock_path):
            for path in stale_tmp_entries(store):
                remove_tree(path)
                report.repaired.append(f"removed tmp/{path.name}")
            for diff_id in store.graph.unused_layers():
                store.layers.delete(diff_id)
                report.repaired.append(f"removed unused layer {diff_id}")
            store.graph.prune_hold_files()
        report.leftovers = []
    return report


def gc(store: Store) -> list[str]:
    """Remove unused layers, stale staging and released hold files."""
    removed: list[str] = []
    with locked(store.lock_path):
        for path in stale_tmp_entries(store):
            remove_tree(path)
            removed.append(f"tmp/{path.name}")
        for diff_id in store.graph.unused_layers():
            store.layers.delete(diff_id)
            removed.append(diff_id)
        store.graph.prune_hold_files()
    return removed
