"""What ``inspect``, ``history`` and ``images`` show about an image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from layerfs.model.image import Image, parse_created
from layerfs.store.store import Store
from layerfs.store.summaries import NodeSummary


def image_ref_id(image: Image) -> str:
    return "sha256:" + image.id


def virtual_size(store: Store, image: Image) -> int:
    return image.size + store.graph.get_parents_size(image)


def virtual_sizes(nodes: Mapping[str, NodeSummary]) -> dict[str, int]:
    """The size of every node with its parents (``virtual_size``), from summaries alone."""
    sizes: dict[str, int] = {}
    for image_id in nodes:
        chain: list[str] = []
        current: str = image_id
        while current in nodes and current not in sizes and len(chain) <= len(nodes):
            chain.append(current)
            current = nodes[current].parent
        below = sizes.get(current, 0)
        for node_id in reversed(chain):
            below += nodes[node_id].size
            sizes[node_id] = below
    return sizes


def inspect_document(store: Store, image: Image) -> dict[str, Any]:
    """Docker's ``image inspect`` fields (legacy Lookup plus the modern ones)."""
    refs = store.tags.references(image.id)
    repo_tags = [r for r in refs if "@" not in r]
    repo_digests = [r for r in refs if "@" in r]
    diff_ids = store.graph.layers_of(image)
    created = image.created
    doc: dict[str, Any] = {
        "Id": image_ref_id(image),
        "RepoTags": repo_tags,
        "RepoDigests": repo_digests,
        "Parent": image_ref_id(store.graph.get(image.parent)) if image.parent else "",
        "Comment": image.comment,
        "Created": created,
        "Container": image.data.get("container", ""),
        "ContainerConfig": image.container_config or None,
        "DockerVersion": image.data.get("docker_version", ""),
        "Author": image.author,
        "Config": image.config or None,
        "Architecture": image.architecture,
        "Os": image.os,
        "Size": virtual_size(store, image),
        "VirtualSize": virtual_size(store, image),
        "GraphDriver": {
            "Name": "layerfs",
            "Data": {
                "Store": str(store.root),
                "LayerTars": ":".join(str(store.layers.tar_path(d)) for d in diff_ids),
            },
        },
        "RootFS": {"Type": "layers", "Layers": diff_ids},
        "Metadata": {"LastTagTime": ""},
    }
    if image.data.get("variant"):
        doc["Variant"] = image.data["variant"]
    return doc


@dataclass
class HistoryRow:
    id: str  # full ID, or "<missing>"
    created: str
    created_by: str
    size: int
    comment: str
    tags: list[str]


def history_rows(store: Store, image: Image) -> list[HistoryRow]:
    """Newest first, one row per history entry (empty layers included) down to the base."""
    rows: list[HistoryRow] = []
    for node in store.graph.walk_history(image):
        parent_len = 0
        if node.parent:
            parent = store.graph.get(node.parent)
            parent_len = len(parent.history) if parent.is_config else 0
        own = node.history[parent_len:] if node.is_config else []
        tags = store.tags.references(node.id)
        if not own:
            rows.append(
                HistoryRow(node.id, node.created, node.created_by(), node.size, node.comment, tags)
            )
            continue
        first = True
        for entry in reversed(own):
            empty = bool(entry.get("empty_layer"))
            rows.append(
                HistoryRow(
                    node.id if first else "<missing>",
                    str(entry.get("created", "")),
                    str(entry.get("created_by", "")),
                    0 if empty else node.size,
                    str(entry.get("comment", "")),
                    tags if first else [],
                )
            )
            first = False
    return rows


def created_unix(created: str) -> int:
    when = parse_created(created)
    return int(when.timestamp()) if when else 0
