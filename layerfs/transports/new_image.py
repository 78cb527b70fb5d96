"""An image made here, as a source: one new layer, on a stored image or on nothing.

``layerfs import`` and ``layerfs commit`` make an image instead of moving one, yet they
hand it to the store the way load and pull do: ``copy(NewImageSource,
StoreDestination)``, so the new layer is staged, verified and published by the same code
(free space checked first, the layer held, image and tags in one journal record).

The source offers the base image's layers (the store has them: they are skipped) and the
new layer, streamed from what the caller opened (a tarball, a URL, a commit's own tar).
Its config cannot be written before the destination has measured the new layer's diff
ID, so :meth:`NewImageSource.finish_image` writes it then, as ``docker import`` and
``docker commit`` do (:func:`layerfs.model.image.build_config`): the base's config and
history continued by one entry, the changes (``--change``) applied by the caller.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from layerfs.errors import IntegrityError
from layerfs.model.manifest import MEDIA_OCI_LAYER_TAR
from layerfs.store.graph import chain_layers
from layerfs.store.store import Store
from layerfs.transports.base import ImageSource, LayerDesc, SourceImage


@dataclass
class NewImage:
    """What the new image's config and names say besides its layers."""

    base: str = ""  # the stored image it is made on (an ID); "" for none
    comment: str = ""
    author: str = ""
    config: dict[str, Any] | None = None  # the run config; None: the base's
    created_by: str = ""
    platform: tuple[str, str, str] | None = None  # os, architecture, variant
    references: list[str] = field(default_factory=list)  # "repo:tag"


class NewImageSource(ImageSource):
    """One image: ``recipe.base``'s layers and ``layer``, the stream of the new one."""

    def __init__(
        self,
        store: Store,
        recipe: NewImage,
        layer: BinaryIO,
        *,
        name: str,
        what: str,
        size: int | None = None,
        plain: bool = False,
    ) -> None:
        """``what`` names the new layer in messages; ``size`` is its stream's, when known;
        ``plain``: the stream is an uncompressed tar whatever its first bytes."""
        self.store = store
        self.recipe = recipe
        self.description = name
        self._layer = layer
        self._new = LayerDesc(
            diff_id=None,
            size=size,
            media_type=MEDIA_OCI_LAYER_TAR,
            what=what,
            may_be_compressed=not plain,
        )
        self._session = f"new-{uuid.uuid4().hex}"

    def images(self) -> list[SourceImage]:
        graph = self.store.graph
        base = None
        chain = []
        if self.recipe.base:
            # Held until the copy ends: no rmi takes the base away before the new image
            # names it as its parent.
            with graph.transaction():
                base = graph.get(self.recipe.base)
                chain = graph.walk_history(base)
                graph.retain(self._session, *(node.id for node in chain))
        layers = [LayerDesc(diff_id=d) for d in chain_layers(chain)]
        return [
            SourceImage(
                config=b"",  # written by finish_image
                layers=[*layers, self._new],
                references=list(self.recipe.references),
                name=self.description,
                base=base.id if base is not None else None,
            )
        ]

    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        if image.layers[index] is self._new:
            return self._layer
        # The store has every layer of the base, unless fsck --verify found one damaged.
        diff_id = image.layers[index].diff_id or ""
        raise IntegrityError(
            f"{self.description}: layer {diff_id[:19]} of image {self.recipe.base[:12]} is "
            "damaged (layerfs fsck --verify); pull or load that image again first"
        )

    def finish_image(self, image: SourceImage) -> None:
        recipe = self.recipe
        image.config, _, _ = self.store.graph.new_config(
            self._new.diff_id,
            parent=recipe.base,
            comment=recipe.comment,
            author=recipe.author,
            config=recipe.config,
            created_by=recipe.created_by,
            platform=recipe.platform,
        )

    def close(self) -> None:
        self.store.graph.release(self._session)
