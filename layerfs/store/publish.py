"""Publishing a new image made here (import, commit): layer, node and tags in one step.

The layer was staged by the caller; this module writes the pending record
(:mod:`layerfs.store.journal`), publishes the layer and the image node, then
writes every tag in one rename, all under the store lock. A crash anywhere
leaves a record that the next command settles: the image with all its tags,
or nothing.
"""

from __future__ import annotations

from typing import Any

from layerfs.model.image import Image
from layerfs.model.reference import familiar_name
from layerfs.store.faults import fault
from layerfs.store.journal import CREATE, Record
from layerfs.store.layers import StagedLayer
from layerfs.store.store import Store


def publish_new_image(
    store: Store,
    layer: StagedLayer | None,
    *,
    command: str,
    parent: str = "",
    comment: str = "",
    author: str = "",
    config: dict[str, Any] | None = None,
    created_by: str = "",
    tags: list[tuple[str, str]] | None = None,
    platform: tuple[str, str, str] | None = None,
) -> tuple[Image, list[str]]:
    """Create the image with ``layer`` on ``parent`` and tag it; (image, rename messages).

    The staged layer is consumed: published with the image or discarded.
    """
    graph = store.graph
    try:
        with graph.transaction():
            raw, image_id, parent_id = graph.new_config(
                layer.diff_id if layer is not None else None,
                parent=parent,
                comment=comment,
                author=author,
                config=config,
                created_by=created_by,
                platform=platform,
            )
            refs = [(familiar_name(repo), tag or "latest", image_id) for repo, tag in tags or []]
            new_layers = (
                [layer.diff_id]
                if layer is not None and not store.layers.exists(layer.diff_id)
                else []
            )
            new_images = [] if (graph.root / image_id / "json").is_file() else [image_id]
            with store.journal.pending(Record(command, CREATE, new_images, new_layers, refs)):
                graph.register(raw, image_id, parent=parent_id, layer=layer)
                fault("publish.between-image-and-tag")
                messages = store.tags.set_refs(refs) if refs else []
            return graph.get(image_id), messages
    finally:
        if layer is not None:
            layer.discard()  # a no-op once published: the staging directory was renamed
