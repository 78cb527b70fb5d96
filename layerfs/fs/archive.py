"""An archive's image as the lower layers of a mount: the copy pipeline's destination.

:func:`layerfs.fs.lower.from_archive` copies the one image of a docker-archive or OCI
layout into :class:`ArchiveLayers` with :func:`layerfs.copy.copy_image`, like a load
copies into the store, except that nothing is stored: each layer is indexed where it lies
in the archive (a plain tar read in place, at its offset) or, compressed, inflated once
into an unlinked file of the store's ``tmp/``, and its diff ID is checked against the
image's as every destination checks it. The descriptors stay open for the mount.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from layerfs.compression import detect, open_decompressed
from layerfs.errors import DigestMismatchError, FormatError
from layerfs.store.files import temp_path
from layerfs.store.tarindex import Entry, index_tar
from layerfs.transports.base import ImageDestination, LayerDesc, ProgressFn, SourceImage
from layerfs.transports.files import MemberReader


class ArchiveLayers(ImageDestination):
    """The layers of one image, indexed and open; see the module docstring."""

    def __init__(self, spec: str, tmp_root: Path) -> None:
        self.spec = spec
        self.tmp_root = tmp_root
        self.image: SourceImage | None = None
        self._indexed: dict[str, tuple[int, int, list[Entry], str]] = {}
        self._open: list[int] = []  # closed by close() unless put_image handed them over
        # After put_image, one per layer of the image, base first:
        self.fds: list[int] = []
        self.bases: list[int] = []  # where the layer's tar starts in its descriptor
        self.entries: list[list[Entry]] = []
        self.diff_ids: list[str] = []

    def begin_image(self, image: SourceImage) -> None:
        self.image = image

    def has_layer(self, layer: LayerDesc) -> bool:
        return False

    def _number(self, layer: LayerDesc) -> int:
        assert self.image is not None
        return next(i for i, known in enumerate(self.image.layers) if known is layer)

    def _key(self, layer: LayerDesc, number: int) -> str:
        return layer.diff_id or layer.digest or f"#{number}"

    def put_layer(
        self, stream: BinaryIO, layer: LayerDesc, what: str, progress: ProgressFn | None = None
    ) -> None:
        assert self.image is not None
        number = self._number(layer)
        fd, base, entries, diff_id = index_layer(
            stream, f"layer {number + 1} of {self.image.name or 'the image'}", self.tmp_root
        )
        self._open.append(fd)
        if layer.diff_id is not None and layer.diff_id != diff_id:
            raise DigestMismatchError(
                f"cannot mount {self.spec}: layer {number + 1} has diff ID {diff_id}, the "
                f"config says {layer.diff_id}"
            )
        self._indexed[self._key(layer, number)] = (fd, base, entries, diff_id)

    def put_image(self, image: SourceImage) -> None:
        handed: set[int] = set()
        for number, layer in enumerate(image.layers):
            fd, base, entries, diff_id = self._indexed[self._key(layer, number)]
            if fd in handed:  # the same layer twice: each place gets its own descriptor
                fd = os.dup(fd)
                self._open.append(fd)
            handed.add(fd)
            self.fds.append(fd)
            self.bases.append(base)
            self.entries.append(entries)
            self.diff_ids.append(diff_id)
        self._open = []

    def commit(self) -> None:
        pass

    def close(self) -> None:
        """Close the descriptors of an image that was not put (a failure)."""
        for fd in self._open:
            os.close(fd)
        self._open = []


def index_layer(stream: BinaryIO, what: str, tmp_root: Path) -> tuple[int, int, list[Entry], str]:
    """(descriptor, offset of the tar in it, entries, diff ID) of one layer."""
    if isinstance(stream, MemberReader):  # a member of an archive file: read it in place
        fd, offset, size = stream.extent()
        head = os.pread(fd, 6, offset)
        if detect(head) == "none":
            result = index_tar(stream)
            if result.tar_size > size:
                raise FormatError(f"{what} is cut short")
            return os.dup(fd), offset, result.entries, result.diff_id
    # Compressed (or not a plain file): decompress once into an unlinked file.
    path = temp_path(tmp_root, "mount-layer")
    out_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    try:
        with open(os.dup(out_fd), "wb") as out:
            reader, _ = open_decompressed(stream, what)
            result = index_tar(reader, out)
    except BaseException:
        os.close(out_fd)
        raise
    return out_fd, 0, result.entries, result.diff_id
