"""The lower layers of a mount: an image's chain, its layer tars and their merged tree.

:func:`from_store` walks an image's parent chain in the store (refusing
chains deeper than Docker's 127), streams each layer's index into one merged
tree and names the tar files that hold the data. :func:`from_archive` does
the same for an image in a docker-archive tarball or an OCI layout without
loading it: each layer is indexed in one pass (its diff ID checked against
the config) and read in place, at its offset inside the archive; a
compressed layer is decompressed once into an unlinked file of the store's
tmp/. Either way the server reads data with ``pread`` on descriptors opened
once; layers never change, so nothing here is ever refreshed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfs.compression import detect, open_decompressed
from layerfs.errors import DepthLimitError, DigestMismatchError, FormatError, UsageError
from layerfs.fs.union import MergedTree
from layerfs.model.digest import sha256_digest
from layerfs.model.image import MAX_IMAGE_DEPTH, Image, decode_json_object
from layerfs.store.files import temp_path
from layerfs.store.store import Store
from layerfs.store.tarindex import Entry, index_tar

ARCHIVE_PREFIXES = ("docker-archive:", "oci:", "oci-archive:")


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
    fds: list[int] | None = None  # already open (an archive), instead of tar_paths
    archive: bool = False

    @property
    def data_size(self) -> int:
        if self.archive:
            return 0
        total = 0
        for path in self.tar_paths:
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def open_tars(self) -> list[int]:
        if self.fds is not None:
            opened, self.fds = self.fds, None
            return opened
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


def from_store(store: Store, image: Image, reference: str, *, init: bool = True,
               chain: list[Image] | None = None) -> Lower:
    """The merged tree of a stored image (the caller holds the image against deletion;
    ``chain``: its :func:`chain_of`, when the caller has it already)."""
    if chain is None or len(chain) > MAX_IMAGE_DEPTH:
        chain = chain_of(store, image, reference)
    diff_ids = [i.layer for i in reversed(chain) if i.layer]
    tar_paths = [store.layers.tar_path(d) for d in diff_ids]
    tree = MergedTree.from_rows((store.layers.index_rows(d) for d in diff_ids), init=init)
    return Lower(image_id=image.id, reference=reference, config=dict(image.config),
                 diff_ids=diff_ids, tar_paths=tar_paths, tree=tree,
                 chain=[i.id for i in chain], init=init)


# -- archives --------------------------------------------------------------------------------


def is_archive(name: str) -> bool:
    """True when IMAGE names an archive file or layout directory rather than a stored image."""
    if name.startswith(ARCHIVE_PREFIXES):
        return True
    path = Path(name)
    if path.is_file():
        return True
    return path.is_dir() and any((path / marker).exists()
                                 for marker in ("oci-layout", "manifest.json", "index.json"))


def from_archive(spec: str, tmp_root: Path, *, init: bool = True) -> Lower:
    """The merged tree of the image in a docker-archive or OCI layout, read in place."""
    from layerfs.transports import open_source

    source = open_source(spec, tmp_dir=tmp_root)
    fds: list[int] = []
    try:
        images = source.images()
        rejected = source.rejected
        if not images:
            reason = f": {rejected[0][1]}" if rejected else ""
            raise FormatError(f"cannot mount {spec}: it holds no usable image{reason}")
        if len(images) > 1:
            names = ", ".join(r for i in images for r in i.references[:1]) or "untagged"
            raise UsageError(f"cannot mount {spec}: it holds {len(images)} images ({names})",
                             hint="name one: docker-archive:PATH:REF, oci:DIR:REF or "
                                  "oci-archive:PATH:REF")
        image = images[0]
        if len(image.layers) > MAX_IMAGE_DEPTH:
            raise DepthLimitError(
                f"cannot mount {spec}: it has {len(image.layers)} layers, more than the "
                f"{MAX_IMAGE_DEPTH} a mount allows (Docker's MaxImageDepth)")
        config = decode_json_object(image.config, f"config of {image.name or spec}")
        expected = config.get("rootfs", {}).get("diff_ids") if isinstance(
            config.get("rootfs"), dict) else None
        layers: list[list[Entry]] = []
        bases: list[int] = []
        diff_ids: list[str] = []
        for number in range(len(image.layers)):
            fd, base, entries, diff_id = _layer(source, image, number, tmp_root)
            fds.append(fd)
            if isinstance(expected, list) and number < len(expected) and \
                    expected[number] != diff_id:
                raise DigestMismatchError(
                    f"cannot mount {spec}: layer {number + 1} has diff ID {diff_id}, the "
                    f"config says {expected[number]}")
            layers.append(entries)
            bases.append(base)
            diff_ids.append(diff_id)
        tree = MergedTree.from_rows((_shifted(entries, base) for entries, base
                                     in zip(layers, bases, strict=True)), init=init)
        run_config = config.get("config")
        return Lower(image_id=sha256_digest(image.config)[7:], reference=spec,
                     config=dict(run_config) if isinstance(run_config, dict) else {},
                     diff_ids=diff_ids, tar_paths=[], tree=tree, init=init, fds=fds,
                     archive=True)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        source.close()


def _shifted(entries: list[Entry], base: int) -> Iterator[list[Any]]:
    for entry in entries:
        row = entry.to_row()
        row[7] += base
        yield row


def _layer(source: Any, image: Any, number: int, tmp_root: Path) -> tuple[int, int, list[Entry],
                                                                          str]:
    """(descriptor, offset of the tar in it, entries, diff ID) of one layer."""
    what = f"layer {number + 1} of {image.name or 'the image'}"
    stream = source.open_layer(image, number)
    try:
        extent = getattr(stream, "extent", None)
        if extent is not None:
            fd, offset, size = extent()
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
    finally:
        stream.close()
