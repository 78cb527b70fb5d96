"""The one pipeline: source → verified layers → destination, image by image.

load, save, pull and push are all ``copy(source, destination)``; see
:mod:`layerfs.transports.base` for the contract. An image whose copy fails is
reported and left out; the others still go through.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from layerfs.errors import LayerfsError
from layerfs.progress import Progress
from layerfs.transports.base import ImageDestination, ImageSource, SourceImage

if TYPE_CHECKING:
    from layerfs.model.image import Image
    from layerfs.transports.new_image import NewImageSource

log = logging.getLogger(__name__)

# The status of a layer another process is fetching into the same store (docker: "Waiting").
WAITING_FOR_OTHER = "Waiting for another process"


@dataclass
class CopyResult:
    copied: list[SourceImage] = field(default_factory=list)
    failed: list[tuple[str, LayerfsError]] = field(default_factory=list)
    layers_copied: int = 0
    layers_skipped: int = 0


def _layer_key(image: SourceImage, index: int) -> str:
    layer = image.layers[index]
    return layer.diff_id or layer.digest or f"{image.name}#{index}"


def copy_image(
    source: ImageSource,
    destination: ImageDestination,
    image: SourceImage,
    progress: Progress | None = None,
    max_concurrent: int = 1,
    result: CopyResult | None = None,
) -> None:
    """Copy one image: its missing layers (in parallel if asked), then the image itself."""
    result = result if result is not None else CopyResult()
    destination.begin_image(image)
    todo: list[int] = []
    seen: set[str] = set()
    for index, layer in enumerate(image.layers):
        key = _layer_key(image, index)
        short = (layer.diff_id or layer.digest or key).split(":")[-1][:12]
        if key in seen:
            continue
        seen.add(key)
        if destination.has_layer(layer):
            result.layers_skipped += 1
            if progress is not None:
                progress.start(key, short, None, "Already exists")
            continue
        todo.append(index)
        if progress is not None:
            progress.start(key, short, layer.size, "Waiting")

    def one(index: int) -> None:
        key = _layer_key(image, index)
        waiting = partial(progress.status, key, WAITING_FOR_OTHER) if progress is not None else None
        with destination.claim_layer(image.layers[index], waiting) as needed:
            if needed:
                fetch(index, key)
            elif progress is not None:
                progress.finish(key, "Complete")

    def fetch(index: int, key: str) -> None:
        layer = image.layers[index]
        named = layer.diff_id or layer.digest
        what = layer.what or (
            f"{image.name or 'image'}: layer {index + 1}/{len(image.layers)}"
            + (f" ({named[:19]})" if named else "")
        )
        if progress is not None:
            progress.status(key, "Copying")
        stream = source.open_layer(image, index)
        try:
            destination.put_layer(
                stream,
                layer,
                what,
                (lambda n: progress.advance(key, n)) if progress is not None else None,
            )
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if progress is not None:
            progress.finish(key, "Complete")

    if max_concurrent > 1 and len(todo) > 1:
        # Biggest first: the longest layer starts at once instead of ending the copy alone.
        todo.sort(key=lambda i: -(image.layers[i].size or 0))
        with ThreadPoolExecutor(max_workers=max_concurrent) as pool:
            for future in [pool.submit(one, i) for i in todo]:
                future.result()
    else:
        for index in todo:
            one(index)
    result.layers_copied += len(todo)
    source.finish_image(image)
    destination.put_image(image)


def copy(
    source: ImageSource,
    destination: ImageDestination,
    *,
    progress: Progress | None = None,
    max_concurrent: int = 1,
    keep_going: bool = True,
) -> CopyResult:
    """Copy every image of ``source``; failures are collected when ``keep_going``."""
    result = CopyResult()
    try:
        images = source.images()
        result.failed.extend(source.rejected)
        for image in images:
            try:
                copy_image(source, destination, image, progress, max_concurrent, result)
            except LayerfsError as exc:
                if not keep_going:
                    raise
                log.debug("copy of %s failed", image.name, exc_info=True)
                result.failed.append((image.name or image.image_id[:12], exc))
                continue
            result.copied.append(image)
        destination.commit()
    finally:
        try:
            destination.close()
        finally:
            source.close()
    return result


def copy_new_image(source: NewImageSource, *, command: str) -> tuple[Image, str | None]:
    """Put the image ``source`` makes (import, commit) into its store, as ``command``; the
    image and the rename message of its tag, if a tag moved."""
    from layerfs.transports.local import StoreDestination

    destination = StoreDestination(source.store, command=command)
    copy(source, destination, keep_going=False)
    loaded, messages = destination.loaded[0]
    return source.store.graph.get(loaded.image_id), messages[0] if messages else None
