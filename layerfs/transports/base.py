"""The contract between image sources, image destinations and the copy pipeline.

Every format layerfs reads or writes is an adapter: a docker-archive, an OCI
layout, a registry, the store itself. ``copy(source, destination)`` in
:mod:`layerfs.copy` moves images between any two of them, so load, save, pull
and push are the same code path.

Call order (driven by :func:`layerfs.copy.copy`)::

    source.images()                        # once: every image the source offers
    for each image:
        destination.begin_image(image)     # optional: the layers that follow are this image's
        for each layer, base first:
            destination.has_layer(layer)   # True: skip it (the destination holds it)
            source.open_layer(image, i)    # a stream of the blob as described
            destination.put_layer(stream, layer, what)
        source.finish_image(image)         # optional: a new image's config, now complete
        destination.put_image(image)       # publish: all of it or nothing
    destination.commit()                   # finish the output (an archive's index)
    source.close(); destination.close()    # always, also after an error

Who checks what: the *destination* verifies every blob while it streams -- the
blob digest against ``LayerDesc.digest`` when given, the sha256 of the
uncompressed tar against ``LayerDesc.diff_id`` -- before anything becomes
visible. The *source* checks its own documents (manifest digests, config
digest against the manifest, JSON shape) before it returns them from
``images()``. A destination whose input breaks mid-stream (a truncated layer, a
digest mismatch, an exception) fails that image and leaves nothing of it
behind; ``close()`` after a failure removes whatever was staged.

Optional parts, each a method of the base classes below with a default that does
nothing, so that mypy checks every transport against them: a source offers
``rejected``, the images it found broken while reading its documents (an archive
holding one bad image among good ones; ``images()`` leaves those out and ``copy()``
reports them as failed), and ``want_platform(wanted)``, which makes an index in it
resolve to ``wanted``'s entry instead of this host's, and ``finish_image(image)``, called
after the destination took the image's layers and before ``put_image``: a source that
makes a new image rather than moving one (import, commit: ``transports/new_image.py``)
writes its config there, once the destination has measured the new layer's diff ID.
A destination defines
``begin_image(image)``, called before any ``has_layer``/``put_layer`` of that image, when
where a layer goes depends on the image (a docker-archive names layer directories by v1
IDs), and ``claim_layer(layer, on_wait)``, a context manager around the fetch of one
layer (``open_layer`` and ``put_layer``) that yields whether the layer must be streamed
at all: the store uses it so that two processes never fetch the same blob at once, the
second waiting for the first and taking its copy (:mod:`layerfs.store.downloads`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from layerfs.errors import LayerfsError
from layerfs.model.digest import sha256_digest
from layerfs.model.image import decode_json_object
from layerfs.model.manifest import MEDIA_OCI_LAYER_TAR
from layerfs.model.platform import Platform


@dataclass
class LayerDesc:
    """One layer as a source offers it."""

    diff_id: str | None  # sha256 of the uncompressed tar; None if the source cannot know
    digest: str | None = None  # sha256 of the blob exactly as open_layer streams it
    size: int | None = None  # size of that blob, when known
    media_type: str = MEDIA_OCI_LAYER_TAR
    # Compressed digests this layer is known by elsewhere (lets push skip work).
    known_blob_digests: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # foreign layers
    # How messages name this layer, when the source knows better than "IMAGE: layer i/n".
    what: str = ""
    # False for a stream that is a plain tar whatever its first bytes (a commit's own tar):
    # the destination then never takes them for a compression header.
    may_be_compressed: bool = True


@dataclass
class LegacyNode:
    """A v1 image of a legacy chain: its ID and its exact JSON."""

    id: str
    json: bytes


@dataclass
class SourceImage:
    """An image as a source offers it: exact config bytes, layers base first, names."""

    config: bytes
    layers: list[LayerDesc]
    references: list[str] = field(default_factory=list)  # "repo:tag" / "repo@sha256:..."
    name: str = ""  # how messages refer to it
    legacy: list[LegacyNode] | None = None  # v1 chain, base first, when the source has one
    manifest_digest: str | None = None  # the manifest it came from (registry pulls)
    manifest: bytes | None = None
    manifest_media_type: str | None = None
    # The config digest of the image this one was built on, when the source records it
    # (manifest.json's Parent) and offers that image too, before this one.
    parent: str | None = None
    # A new image made here on a stored image (commit): that image's ID. The destination
    # puts the image's one node right above it, whatever kind of image it is.
    base: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def image_id(self) -> str:
        """The ID the image has in the store: the top v1 ID for legacy chains."""
        if self.legacy:
            return self.legacy[-1].id
        return self.config_digest[7:]

    def config_json(self) -> dict[str, Any]:
        return decode_json_object(self.config, f"config of {self.name or 'image'}")


ProgressFn = Callable[[int], None]


class ImageSource(ABC):
    """Where images come from; see the module docstring for the call order."""

    description: str = "the source"  # how messages name the whole source
    # Images found broken while reading the documents, left out of images().
    rejected: Sequence[tuple[str, LayerfsError]] = ()

    @abstractmethod
    def images(self) -> list[SourceImage]:
        """Every image to copy, checked (see the module docstring)."""

    @abstractmethod
    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        """A stream of ``image.layers[index]``'s blob, as described by its LayerDesc."""

    @abstractmethod
    def close(self) -> None:
        """Release everything the source holds open."""

    def want_platform(self, wanted: Platform) -> None:
        """Resolve an index to ``wanted``'s entry (default: this host's); before images()."""
        return None  # a source without indexes has nothing to resolve

    def finish_image(self, image: SourceImage) -> None:
        """After the destination took ``image``'s layers, before ``put_image``: complete
        what depended on them (a new image's config needs its new layer's diff ID)."""
        return None  # the images of most sources are whole from images() on


class ImageDestination(ABC):
    """Where images go; see the module docstring for the call order."""

    def begin_image(self, image: SourceImage) -> None:
        """Called before the layers of ``image``: where a layer goes may depend on it."""
        return None

    @contextmanager
    def claim_layer(
        self, layer: LayerDesc, on_wait: Callable[[], None] | None = None
    ) -> Iterator[bool]:
        """Around the fetch of one layer: yields False when it need not be streamed after
        all (another process fetched it meanwhile). By default every layer is streamed."""
        yield True

    @abstractmethod
    def has_layer(self, layer: LayerDesc) -> bool:
        """True when the destination already has this layer and needs no stream."""

    @abstractmethod
    def put_layer(
        self, stream: BinaryIO, layer: LayerDesc, what: str, progress: ProgressFn | None = None
    ) -> None:
        """Consume and verify one layer; stage it, publish nothing yet."""

    @abstractmethod
    def put_image(self, image: SourceImage) -> None:
        """Publish the image with its staged layers, all or nothing."""

    @abstractmethod
    def commit(self) -> None:
        """Finish after the last image (write indexes, close archives)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; after a failure, remove what was staged."""
