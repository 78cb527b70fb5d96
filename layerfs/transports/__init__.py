"""Open an image source or destination by name, with skopeo's transport names.

``docker-archive:PATH[:REF]``  a docker save tarball (plain, gzip, zstd, bzip2, xz)
``oci-archive:PATH[:REF]``     an OCI image layout in a tar
``oci:DIR[:REF]``              an OCI image layout directory
``docker://NAME``              an image in a registry (API v2): pulled from, pushed to
``PATH`` / ``-``               a source only: a file, a directory or standard input,
                               recognised by what it holds

As in skopeo, the path ends at the first ``:`` after the transport; REF is an image name
(docker-archive) or the ref name of the image in the layout (OCI). ``docker://`` takes a
whole image name instead (``docker://localhost:5000/app:v1``; the tag defaults to
``latest``), with the registry options' defaults: ``layerfs pull`` and ``push`` are this
transport with their options, and what they record in the store. Another module adds a
transport by adding a function to :data:`SOURCES` / :data:`DESTINATIONS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerfs.errors import FormatError, UsageError
from layerfs.transports.archive import DockerArchiveDestination, DockerArchiveSource
from layerfs.transports.base import ImageDestination, ImageSource
from layerfs.transports.files import (
    ArchiveFiles,
    DirFiles,
    open_tar_path,
    open_tar_stream,
)
from layerfs.transports.oci import OciLayoutDestination, OciLayoutSource, existing_index
from layerfs.transports.writer import DirWriter, TarWriter

SourceOpener = Callable[[str, str | None, Path | None], ImageSource]
DestinationOpener = Callable[[str, str | None, Path | None], ImageDestination]


def source_for_files(files: ArchiveFiles, reference: str | None = None) -> ImageSource:
    """The reader that fits what an archive or directory holds."""
    try:
        if files.exists("manifest.json"):
            return DockerArchiveSource(files, reference=reference)
        if files.exists("oci-layout"):
            return OciLayoutSource(files, reference=reference)
        if files.exists("repositories") or any(n.endswith("/json") for n in files.names()):
            return DockerArchiveSource(files, reference=reference)
    except BaseException:
        files.close()
        raise
    files.close()
    raise FormatError(
        f"{files.description}: unrecognized image format (no manifest.json, oci-layout or "
        "repositories)"
    )


def _files_at(path: str, tmp_dir: Path | None) -> ArchiveFiles:
    where = Path(path)
    if where.is_dir():
        return DirFiles(where, f"'{path}'")
    return open_tar_path(where, tmp_dir, f"'{path}'")


def _docker_archive_source(path: str, ref: str | None, tmp_dir: Path | None) -> ImageSource:
    return DockerArchiveSource(_files_at(path, tmp_dir), reference=ref)


def _oci_source(path: str, ref: str | None, tmp_dir: Path | None) -> ImageSource:
    if not Path(path).is_dir():
        raise UsageError(f"oci:{path}: not a directory (use oci-archive: for a tar)")
    return OciLayoutSource(DirFiles(Path(path), f"'{path}'"), reference=ref)


def _oci_archive_source(path: str, ref: str | None, tmp_dir: Path | None) -> ImageSource:
    return OciLayoutSource(open_tar_path(Path(path), tmp_dir, f"'{path}'"), reference=ref)


def _docker_archive_destination(
    path: str, ref: str | None, tmp_dir: Path | None
) -> ImageDestination:
    return DockerArchiveDestination(TarWriter.to_file(Path(path)), tmp_dir=tmp_dir, reference=ref)


def _oci_archive_destination(path: str, ref: str | None, tmp_dir: Path | None) -> ImageDestination:
    return OciLayoutDestination(TarWriter.to_file(Path(path)), tmp_dir=tmp_dir, reference=ref)


def _oci_destination(path: str, ref: str | None, tmp_dir: Path | None) -> ImageDestination:
    root = Path(path)
    index = existing_index(root) if root.exists() else None
    return OciLayoutDestination(
        DirWriter(root), tmp_dir=tmp_dir, reference=ref, existing_index=index
    )


def _docker_source(name: str, ref: str | None, tmp_dir: Path | None) -> ImageSource:
    # The registry client (and requests under it) is loaded only by who uses it.
    from layerfs.model.reference import Reference
    from layerfs.transports.registry import open_registry_source

    return open_registry_source(Reference.parse(name))


def _docker_destination(name: str, ref: str | None, tmp_dir: Path | None) -> ImageDestination:
    from layerfs.model.reference import Reference
    from layerfs.transports.registry import open_registry_destination

    reference = Reference.parse(name)
    if reference.digest:
        raise UsageError(f"docker://{name}: cannot push to a digest reference; name a tag")
    return open_registry_destination(reference, tags=[reference.tag or "latest"])


SOURCES: dict[str, SourceOpener] = {
    "docker": _docker_source,
    "docker-archive": _docker_archive_source,
    "oci": _oci_source,
    "oci-archive": _oci_archive_source,
}
DESTINATIONS: dict[str, DestinationOpener] = {
    "docker": _docker_destination,
    "docker-archive": _docker_archive_destination,
    "oci": _oci_destination,
    "oci-archive": _oci_archive_destination,
}


def split_spec(spec: str, known: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """``transport:path[:ref]`` → (transport, path, ref); (None, spec, None) without one.

    ``docker://NAME`` → ("docker", NAME, None): an image name has colons of its own.
    """
    transport, colon, rest = spec.partition(":")
    if not colon or transport not in known:
        return None, spec, None
    if transport == "docker":
        if not rest.startswith("//") or not rest[2:]:
            raise UsageError(f"{spec!r}: the docker transport takes docker://NAME")
        return transport, rest[2:], None
    path, colon, ref = rest.partition(":")
    if not path:
        raise UsageError(f"{spec!r}: the {transport} transport needs a path")
    return transport, path, (ref if colon and ref else None)


def open_source(spec: str, *, tmp_dir: Path | None = None, stdin: Any = None) -> ImageSource:
    """A source by transport name, or a plain path (``-``: standard input) recognised."""
    transport, path, ref = split_spec(spec, SOURCES)
    if transport is not None:
        return SOURCES[transport](path, ref, tmp_dir)
    if spec == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return source_for_files(open_tar_stream(stream, tmp_dir, "standard input"))
    if not Path(spec).exists():
        raise UsageError(f"cannot read {spec!r}: no such file or directory")
    return source_for_files(_files_at(spec, tmp_dir))


def open_destination(spec: str, *, tmp_dir: Path | None = None) -> ImageDestination:
    """A destination by transport name (``docker-archive:``, ``oci-archive:``, ``oci:``,
    ``docker://``)."""
    transport, path, ref = split_spec(spec, DESTINATIONS)
    if transport is None:
        raise UsageError(
            f"{spec!r}: name a transport ({', '.join(sorted(DESTINATIONS))}), e.g. "
            f"docker-archive:{spec}"
        )
    return DESTINATIONS[transport](path, ref, tmp_dir)


__all__ = [
    "DESTINATIONS",
    "SOURCES",
    "open_destination",
    "open_source",
    "source_for_files",
    "split_spec",
]
