"""The lower layers of a mount: an image's chain, its layer tars and their merged tree.

:func:`from_store` walks an image's parent chain in the store (refusing
chains deeper than Docker's 127), streams each layer's index into one merged
tree and names the tar files that hold the data. The tars are opened once by
the server and read with ``pread``; layers never change, so nothing here is
ever refreshed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfs.errors import DepthLimitError
from layerfs.fs.union import MergedTree
from layerfs.model.image import MAX_IMAGE_DEPTH, Image
from layerfs.store.store import Store


@dataclass
class Lower:
    image_id: str
    reference: str  # the name the user gave
    config: dict[str, Any]  # the image's run config (Env, Cmd, WorkingDir, User...)
    diff_ids: list[str]  # base first
    tar_paths: list[Path]  # one per diff ID
    tree: MergedTree
    chain: list[str] = field(default_factory=list)  # image IDs, the image first
    init: bool = True

    @property
    def data_size(self) -> int:
        total = 0
        for path in self.tar_paths:
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def open_tars(self) -> list[int]:
        fds: list[int] = []
        try:
            for path in self.tar_paths:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds


def chain_of(store: Store, image: Image, reference: str, *, limit: int = MAX_IMAGE_DEPTH
             ) -> list[Image]:
    """The image and its ancestors (image first), refused past ``limit`` images."""
    chain = store.graph.walk_history(image)
    if len(chain) > limit:
        raise DepthLimitError(
            f"cannot mount {reference}: its chain has {len(chain)} images, more than the "
            f"{limit} a mount allows (Docker's MaxImageDepth)")
    return chain


def from_store(store: Store, image: Image, reference: str, *, init: bool = True) -> Lower:
    """The merged tree of a stored image (the caller holds the image against deletion)."""
    chain = chain_of(store, image, reference)
    diff_ids = [i.layer for i in reversed(chain) if i.layer]
    tar_paths = [store.layers.tar_path(d) for d in diff_ids]
    tree = MergedTree.from_rows((store.layers.index_rows(d) for d in diff_ids), init=init)
    return Lower(image_id=image.id, reference=reference, config=dict(image.config),
                 diff_ids=diff_ids, tar_paths=tar_paths, tree=tree,
                 chain=[i.id for i in chain], init=init)
