"""The lower layers of a mount: an image's chain, its layer tars and their merged tree.

:func:`from_store` walks an image's parent chain in the store (refusing
chains deeper than Docker's 127), streams each layer's index into one merged
tree and names the tar files that hold the data. :func:`from_archive` does
the same for an image in a docker-archive tarball or an OCI layout without
loading it: the copy pipeline moves the image from the archive's source into
:class:`layerfs.fs.archive.ArchiveLayers`, which indexes each layer in one pass
(its diff ID checked as every destination checks it) and reads it in place, at
its offset inside the archive; a compressed layer is decompressed once into an
unlinked file of the store's tmp/. Either way the server reads data with
``pread`` on descriptors opened once; layers never change, so nothing here is
ever refreshed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfs.errors import DepthLimitError, FormatError, UsageError
from layerfs.fs.union import MergedTree
from layerfs.model.digest import sha256_digest
from layerfs.model.image import MAX_IMAGE_DEPTH, Image, decode_json_object
from layerfs.store.graph import chain_layers
from layerfs.store.rows import OFFSET, Row
from layerfs.store.store import Store
from layerfs.store.tarindex import Entry

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


def chain_of(
    store: Store, image: Image, reference: str, *, limit: int = MAX_IMAGE_DEPTH
) -> list[Image]:
    """The image and its ancestors (image first), refused past ``limit`` images."""
    chain = store.graph.walk_history(image)
    if len(chain) > limit:
        raise DepthLimitError(
            f"cannot mount {reference}: its chain has {len(chain)} images, more than the "
            f"{limit} a mount allows (Docker's MaxImageDepth)"
        )
    return chain


def from_store(
    store: Store,
    image: Image,
    reference: str,
    *,
    init: bool = True,
    chain: list[Image] | None = None,
) -> Lower:
    """The merged tree of a stored image (the caller holds the image against deletion;
    ``chain``: its :func:`chain_of`, when the caller has it already)."""
    if chain is None or len(chain) > MAX_IMAGE_DEPTH:
        chain = chain_of(store, image, reference)
    diff_ids = chain_layers(chain)
    tar_paths = [store.layers.tar_path(d) for d in diff_ids]
    tree = MergedTree.from_rows((store.layers.index_rows(d) for d in diff_ids), init=init)
    return Lower(
        image_id=image.id,
        reference=reference,
        config=dict(image.config),
        diff_ids=diff_ids,
        tar_paths=tar_paths,
        tree=tree,
        chain=[i.id for i in chain],
        init=init,
    )


# -- archives --------------------------------------------------------------------------------


def is_archive(name: str) -> bool:
    """True when IMAGE names an archive file or layout directory rather than a stored image."""
    if name.startswith(ARCHIVE_PREFIXES):
        return True
    path = Path(name)
    if path.is_file():
        return True
    return path.is_dir() and any(
        (path / marker).exists() for marker in ("oci-layout", "manifest.json", "index.json")
    )


def from_archive(spec: str, tmp_root: Path, *, init: bool = True) -> Lower:
    """The merged tree of the image in a docker-archive or OCI layout, read in place."""
    from layerfs.copy import copy_image
    from layerfs.fs.archive import ArchiveLayers
    from layerfs.transports import open_source

    source = open_source(spec, tmp_dir=tmp_root)
    destination = ArchiveLayers(spec, tmp_root)
    try:
        images = source.images()
        rejected = source.rejected
        if not images:
            reason = f": {rejected[0][1]}" if rejected else ""
            raise FormatError(f"cannot mount {spec}: it holds no usable image{reason}")
        if len(images) > 1:
            names = ", ".join(r for i in images for r in i.references[:1]) or "untagged"
            raise UsageError(
                f"cannot mount {spec}: it holds {len(images)} images ({names})",
                hint="name one: docker-archive:PATH:REF, oci:DIR:REF or oci-archive:PATH:REF",
            )
        image = images[0]
        if len(image.layers) > MAX_IMAGE_DEPTH:
            raise DepthLimitError(
                f"cannot mount {spec}: it has {len(image.layers)} layers, more than the "
                f"{MAX_IMAGE_DEPTH} a mount allows (Docker's MaxImageDepth)"
            )
        config = decode_json_object(image.config, f"config of {image.name or spec}")
        copy_image(source, destination, image)  # each layer indexed and checked
        tree = MergedTree.from_rows(
            (
                _shifted(entries, base)
                for entries, base in zip(destination.entries, destination.bases, strict=True)
            ),
            init=init,
        )
        run_config = config.get("config")
        return Lower(
            image_id=sha256_digest(image.config)[7:],
            reference=spec,
            config=dict(run_config) if isinstance(run_config, dict) else {},
            diff_ids=destination.diff_ids,
            tar_paths=[],
            tree=tree,
            init=init,
            fds=destination.fds,
            archive=True,
        )
    except BaseException:
        for fd in destination.fds:
            os.close(fd)
        raise
    finally:
        try:
            destination.close()
        finally:
            source.close()


def _shifted(entries: list[Entry], base: int) -> Iterator[Row]:
    """The rows of a layer read in place, its data offsets moved to where the tar starts."""
    for entry in entries:
        row = entry.to_row()
        row[OFFSET] += base
        yield row
