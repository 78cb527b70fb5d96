"""Import a flat root filesystem tarball as an image; export an image as one.

Import stores the tarball as a layer exactly as it arrives (after
decompression), like ``docker import``: no extraction. Export walks the merged
tree of the image's chain (whiteouts and opaque directories applied, hardlinks
kept) and writes one tar, like ``docker export`` without a container.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.copy import copy_new_image
from layerfs.errors import (
    FormatError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    UsageError,
)
from layerfs.fs.union import MergedTree
from layerfs.model.changes import apply_changes
from layerfs.model.image import Image
from layerfs.model.platform import Platform
from layerfs.model.reference import Reference
from layerfs.progress import Progress, ReportingReader
from layerfs.store.store import Store
from layerfs.store.tarindex import REG, open_pax_writer
from layerfs.store.tarwriter import DataRange, tar_info
from layerfs.transports.new_image import NewImage, NewImageSource


@dataclass
class ImportResult:
    image: Image
    tagged: str | None
    rename_message: str | None


def _open_source(source: str, stdin: BinaryIO) -> tuple[Any, int | None, Callable[[], None]]:
    """(stream, size if known, close) for a file, '-' or a URL.

    A name that is no file and reads as ``host[:port]/path`` is a URL without its scheme,
    as Docker's legacy import took it: https:// is tried first, then http://.
    """
    if source == "-":
        return stdin, None, lambda: None
    if source.startswith(("http://", "https://")):
        return _download(source)
    path = Path(source)
    if not path.exists() and _looks_like_url(source):
        return _download_guessing_scheme(source)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the returned callback
    except FileNotFoundError:
        raise NotFoundError(f"cannot import {source!r}: no such file") from None
    except IsADirectoryError:
        raise UsageError(
            f"cannot import {source!r}: it is a directory; make a tarball of it (tar -C DIR -c .)"
        ) from None
    except PermissionError as exc:
        raise UsageError(f"cannot import {source!r}: {exc.strerror}") from exc
    return handle, os.fstat(handle.fileno()).st_size, handle.close


# A host with a dot, an IPv6 address in brackets, localhost, or any name with a port.
_URL_HOST = re.compile(
    r"^(?:(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|\[[0-9A-Fa-f:]+\])(?::\d+)?"
    r"|[A-Za-z0-9-]+:\d+)/"
)


def _looks_like_url(source: str) -> bool:
    """``example.com/x.tar``, ``127.0.0.1:8000/x``, ``localhost/x``: a host, then a path."""
    return bool(_URL_HOST.match(source))


def _download(url: str) -> tuple[Any, int | None, Callable[[], None]]:
    import requests  # only imports from a URL pay for loading requests

    try:
        response = requests.get(url, stream=True, timeout=(15, 300))
        response.raise_for_status()
    except requests.RequestException as exc:
        raise RegistryError(f"cannot download {url}: {exc}") from exc
    length = response.headers.get("Content-Length")
    response.raw.decode_content = False
    return response.raw, int(length) if length and length.isdigit() else None, response.close


def _download_guessing_scheme(source: str) -> tuple[Any, int | None, Callable[[], None]]:
    import requests

    try:
        return _download(f"https://{source}")
    except RegistryError as exc:
        cause = exc.__cause__
        # An answer over https (a 404, say) is the answer; only a failed connection
        # (refused, or a server that speaks no TLS) sends us to plain http.
        if not isinstance(cause, requests.ConnectionError):
            raise
    try:
        return _download(f"http://{source}")
    except RegistryError as exc:
        raise RegistryError(
            f"cannot import {source!r}: it is no file, and as a URL: {exc.message}"
        ) from exc


def import_rootfs(
    store: Store,
    source: str,
    reference: str | None = None,
    *,
    message: str = "",
    changes: list[str] | None = None,
    progress: Progress | None = None,
    stdin: BinaryIO | None = None,
    platform: Platform | None = None,
) -> ImportResult:
    """``docker import``: one layer, no parent, optional tag (force), optional platform."""
    ref = Reference.parse(reference) if reference else None
    if ref is not None and ref.digest:
        raise UsageError(f"cannot import as {reference!r}: a digest cannot be a tag")
    config = apply_changes({}, changes or [])
    recipe = NewImage(
        comment=message or f"Imported from {source}",
        config=config,
        platform=(platform.os, platform.architecture, platform.variant) if platform else None,
        references=[f"{ref.repository}:{ref.tag or 'latest'}"] if ref is not None else [],
    )
    stream, size, close = _open_source(source, stdin or sys.stdin.buffer)
    if progress is not None:
        progress.start("import", "Importing", size, "")
        stream = ReportingReader(stream, lambda n: progress.advance("import", n))
    what = f"cannot import {source!r}"
    try:
        image, rename = copy_new_image(
            NewImageSource(store, recipe, stream, name=source, what=what, size=size),
            command="import",
        )
    finally:
        close()
    if progress is not None:
        progress.finish("import", "Imported")
    return ImportResult(image, str(ref) if ref else None, rename)


def merged_tree(store: Store, image: Image, *, init: bool = False) -> tuple[MergedTree, list[str]]:
    """The merged tree of an image's chain and the diff IDs it was built from."""
    diff_ids = store.graph.layers_of(image)
    tree = MergedTree.build([store.layers.entries(d) for d in diff_ids], init=init)
    return tree, diff_ids


def export_image(
    store: Store, image: Image, out: BinaryIO, progress: Progress | None = None
) -> int:
    """Write the image's merged filesystem as one tar; returns the number of entries."""
    tree, diff_ids = merged_tree(store, image)
    tars = [store.layers.open_tar(d) for d in diff_ids]
    written_links: dict[tuple[int, bytes], str] = {}
    count = 0
    if progress is not None:
        progress.start("export", "Exporting", None, "")
    try:
        with open_pax_writer(out) as archive:
            for path, node in tree.walk():
                if path == b"":
                    continue
                entry = node.entry
                info = tar_info(entry)
                if node.link_key is not None and node.link_key in written_links:
                    info.type = tarfile.LNKTYPE
                    info.linkname = written_links[node.link_key]
                    # Another name of a written inode: a link, no data, no device numbers.
                    info.size = info.devmajor = info.devminor = 0
                    archive.addfile(info)
                    count += 1
                    continue
                if entry.type == REG and node.layer >= 0 and entry.size:
                    archive.addfile(info, DataRange(tars[node.layer], entry.offset, entry.size))
                    if progress is not None:
                        progress.advance("export", entry.size)
                else:
                    archive.addfile(info)
                if node.link_key is not None:
                    written_links[node.link_key] = info.name
                count += 1
    except tarfile.TarError as exc:
        raise FormatError(f"cannot export image {image.id[:12]}: {exc}") from exc
    except OSError as exc:
        if exc.errno is not None:
            raise  # the output's or the disk's: the command line says which
        # tarfile's own "unexpected end of data": a stored layer tar shorter than its index
        raise IntegrityError(
            f"cannot export image {image.id[:12]}: a layer tar ends before its data "
            "(run layerfs fsck --verify)"
        ) from exc
    finally:
        for tar in tars:
            tar.close()
    if progress is not None:
        progress.finish("export", f"Exported {count} entries")
    return count
