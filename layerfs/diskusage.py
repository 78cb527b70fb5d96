"""``system df``: what the store holds on disk and what could be given back.

Four rows, each ``TOTAL``, ``ACTIVE``, ``SIZE`` and ``RECLAIMABLE`` (bytes on disk):

- Images: the images ``images`` lists; active = mounted by a live mount; size = the
  layers they use; reclaimable = those layers no live mount uses (``image prune -a``
  and ``gc`` give them back).
- Layers: every stored layer; active = used by some image; size = all of them;
  reclaimable = the layers no image uses (``gc``).
- Mounts: the live mounts; active = served; size = their upper directories;
  reclaimable = the upper directories of mounts whose server is gone.
- Upper directories: ``STORE/upper/*``; active = in use by a live mount; reclaimable =
  the others (kept for ``mount --upper NAME``; removing one drops its changes).
"""

from __future__ import annotations

from dataclasses import dataclass

from layerfs.listing import list_images
from layerfs.prune import directory_size
from layerfs.store.store import Store
from layerfs.store.summaries import NodeSummary


@dataclass
class UsageRow:
    kind: str
    total: int
    active: int
    size: int
    reclaimable: int


@dataclass
class LiveMount:
    image_id: str
    upper: str | None
    running: bool


def live_mounts(store: Store) -> list[LiveMount]:
    """The store's mount records that are still mounted or served."""
    from layerfs.fs.host import Records, is_mounted

    records = Records(store.root / "mounts", store.tmp)
    found = []
    for record in records.all():
        alive = records.alive(record.id)
        mounted = is_mounted(record.mountpoint)
        if alive or mounted:
            found.append(LiveMount(record.image, record.upper, alive and mounted))
    return found


def _chain_layers(images: dict[str, NodeSummary], image_id: str) -> set[str]:
    layers: set[str] = set()
    current = images.get(image_id)
    seen: set[str] = set()
    while current is not None and current.id not in seen:
        seen.add(current.id)
        if current.layer:
            layers.add(current.layer)
        current = images.get(current.parent) if current.parent else None
    return layers


def disk_usage(store: Store) -> list[UsageRow]:
    images = store.graph.summaries()
    listed = list_images(store)
    mounts = live_mounts(store)
    layer_bytes = {d: directory_size(store.layers.path(d)) for d in store.layers.diff_ids()}

    mounted_ids = {m.image_id for m in mounts}
    in_use: set[str] = set()
    for image_id in mounted_ids:
        in_use |= _chain_layers(images, image_id)
    image_layers: set[str] = set()
    for summary in listed:
        image_layers |= _chain_layers(images, summary.image.id)
    used_by_images = {i.layer for i in images.values() if i.layer}

    def total(layers: set[str]) -> int:
        return sum(layer_bytes.get(d, 0) for d in layers)

    upper_root = store.root / "upper"
    uppers = sorted(p.name for p in upper_root.iterdir()) if upper_root.is_dir() else []
    upper_bytes = {name: directory_size(upper_root / name) for name in uppers}
    mount_uppers = [m for m in mounts if m.upper]
    busy_uppers = {m.upper for m in mount_uppers}
    return [
        UsageRow(
            "Images",
            len(listed),
            sum(1 for s in listed if s.image.id in mounted_ids),
            total(image_layers),
            total(image_layers - in_use),
        ),
        UsageRow(
            "Layers",
            len(layer_bytes),
            len(used_by_images & set(layer_bytes)),
            sum(layer_bytes.values()),
            total(set(layer_bytes) - used_by_images),
        ),
        UsageRow(
            "Mounts",
            len(mounts),
            sum(1 for m in mounts if m.running),
            sum(upper_bytes.get(m.upper or "", 0) for m in mount_uppers),
            sum(upper_bytes.get(m.upper or "", 0) for m in mount_uppers if not m.running),
        ),
        UsageRow(
            "Upper directories",
            len(uppers),
            len(busy_uppers & set(uppers)),
            sum(upper_bytes.values()),
            sum(b for name, b in upper_bytes.items() if name not in busy_uppers),
        ),
    ]
