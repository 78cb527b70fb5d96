"""One platform out of a source: ``load --platform`` and ``save --platform``.

:class:`PlatformSource` wraps any source. An OCI index in it resolves to its entry for the
wanted platform instead of this host's; of the images, only those whose config names the
wanted platform are copied (``os`` and ``architecture`` equal, and ``variant`` when one is
wanted, all normalised as containerd does). A load leaves the others out and fails only
when nothing is left; a save (``strict``) refuses an image that is for another platform,
as it was named on purpose.
"""

from __future__ import annotations

from typing import BinaryIO

from layerfs.errors import LayerfsError, NotFoundError
from layerfs.model.platform import Platform, matches
from layerfs.transports.base import ImageSource, SourceImage


def image_platform(image: SourceImage) -> Platform | None:
    try:
        return Platform.from_json(image.config_json())
    except LayerfsError:
        return None


class PlatformSource(ImageSource):
    """The images of ``source`` for ``wanted``; see the module docstring."""

    def __init__(self, source: ImageSource, wanted: Platform, *, strict: bool = False) -> None:
        self.source = source
        self.wanted = wanted
        self.strict = strict
        self.description = source.description
        source.want_platform(wanted)
        self._images: list[SourceImage] | None = None

    def images(self) -> list[SourceImage]:
        if self._images is None:
            found = self.source.images()
            self.rejected = self.source.rejected  # known once the source read its documents
            kept = []
            for image in found:
                platform = image_platform(image)
                if matches(platform, self.wanted):
                    kept.append(image)
                elif self.strict:
                    raise NotFoundError(
                        f"image {image.name} is for {platform or 'no platform'}, not {self.wanted}"
                    )
            if found and not kept:
                raise NotFoundError(f"{self.description} has no image for {self.wanted}")
            self._images = kept
        return self._images

    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        return self.source.open_layer(image, index)

    def close(self) -> None:
        self.source.close()
