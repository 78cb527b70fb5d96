"""load, save: docker save tarballs and OCI layouts in and out of the store.

Both are ``copy(source, destination)`` (``layerfs.copy``): load copies an archive into the
store (:class:`~layerfs.transports.local.StoreDestination`), save copies images of the
store (:class:`~layerfs.transports.local.StoreSource`) into an archive. Also installed as
``layerfs-load`` and ``layerfs-save``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfs.cli.common import make_progress, open_store
from layerfs.errors import LayerfsError, UsageError

if TYPE_CHECKING:
    from layerfs.progress import Progress
    from layerfs.transports.base import ImageDestination, ImageSource, SourceImage

# The transports are imported by the commands that use them (see layerfs.cli).

GLOBALS_NOTE = (
    "The global options --root DIR (the store), --debug and --quiet may come before "
    "the command's own."
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "load",
        help="load images from a docker save tarball or an OCI layout",
        description=(
            "Load the images of an archive into the store, like docker load: a docker save "
            "tarball (any Docker version, legacy ones included), an OCI image layout as a tar "
            "or a directory, plain or compressed with gzip, zstd, bzip2 or xz. Every layer "
            "and config is verified against its digest before anything is stored; layers "
            "already in the store are not stored again. An archive loads image by image: "
            "each image appears with all its tags in one step, or not at all. Prints "
            "'Loaded image: NAME:TAG' or 'Loaded image ID: sha256:...' for exactly the "
            "images loaded; if some images of the archive cannot be loaded it says which, "
            "loads the others and exits with status 1."
        ),
        epilog=GLOBALS_NOTE,
    )
    p.add_argument(
        "-i",
        "--input",
        metavar="FILE",
        help="read from FILE (a tarball, an OCI layout directory, or docker-archive:PATH, "
        "oci-archive:PATH[:REF], oci:DIR[:REF], docker://NAME) instead of standard input",
    )
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="load only the images for this platform (of a multi-platform OCI index: its "
        "entry for it)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=cmd_load)

    p = subparsers.add_parser(
        "save",
        help="save images to a docker save tarball or an OCI layout",
        description=(
            "Write images of the store to an archive, like docker save. IMAGE is a "
            "name[:tag], a name (every tag of it), an ID or a unique ID prefix. The default "
            "format is what Docker 1.10-24 writes (manifest.json, repositories and one "
            "directory per layer), which every Docker, podman and skopeo loads; 'oci' writes "
            "an OCI image layout tar with Docker 25's manifest.json beside it, 'oci-dir' the "
            "layout as a directory (-o DIR). Layers shared by several images are written once; "
            "saving the same images twice gives identical bytes."
        ),
        epilog=GLOBALS_NOTE,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="an image to save (one or more)")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    p.add_argument(
        "--format",
        choices=["docker", "oci", "oci-dir"],
        default="docker",
        help="docker (default), oci (a tar) or oci-dir (a directory)",
    )
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="refuse an image that is not for this platform",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress and no 'Saved image' lines"
    )
    p.set_defaults(handler=cmd_save)


def _progress(args: argparse.Namespace) -> Progress:
    progress = make_progress(args)
    progress.track_total()
    return progress


def _name(image: SourceImage) -> list[str]:
    return image.references or [f"sha256:{image.image_id}"]


def cmd_load(args: argparse.Namespace) -> int:
    prog = getattr(args, "prog_name", "layerfs")
    if args.input in (None, "-") and sys.stdin.isatty():
        raise UsageError(
            "refusing to read an archive from a terminal; use -i FILE or redirect standard input"
        )
    from layerfs.copy import copy
    from layerfs.model.platform import Platform
    from layerfs.store.files import reporting_no_space
    from layerfs.transports import SOURCES, open_source, split_spec
    from layerfs.transports.local import StoreDestination
    from layerfs.transports.platforms import PlatformSource

    store = open_store(args)
    spec = args.input or "-"
    if split_spec(spec, SOURCES)[0] is None and spec != "-" and not Path(spec).exists():
        raise UsageError(f"cannot read {spec!r}: no such file or directory")
    platform = Platform.parse(args.platform) if args.platform else None
    # Standard input and compressed archives are spooled (decompressed) into the store.
    with reporting_no_space(store.root, f"cannot load {spec if spec != '-' else 'standard input'}"):
        source: ImageSource = open_source(spec, tmp_dir=store.tmp)  # its errors name the archive
    if platform is not None:
        source = PlatformSource(source, platform)
    try:
        source.images()  # an archive-level problem: one line naming the archive
    except LayerfsError as exc:
        source.close()
        what = source.description
        raise _renamed(exc, f"cannot load {what}: {exc.message}") from exc
    destination = StoreDestination(store)
    progress = _progress(args)
    try:
        # Two layers at a time: one thread hashes (sha256 runs outside the GIL) while the
        # other parses tar headers; on 2 cores this loads about 20% faster.
        result = copy(source, destination, progress=progress, max_concurrent=2)
    finally:
        progress.close()
    for image, messages in destination.loaded:
        for message in messages:
            print(message)
        if image.references:
            for ref in image.references:
                print(f"Loaded image: {ref}")
        else:
            print(f"Loaded image ID: sha256:{image.image_id}")
    for name, error in result.failed:
        message = error.message.removeprefix(f"{name}: ")
        print(f"{prog}: error: cannot load {name}: {message}", file=sys.stderr)
    if result.failed and destination.loaded:
        print(
            f"{prog}: {len(result.failed)} of {len(result.failed) + len(destination.loaded)} "
            "images were not loaded",
            file=sys.stderr,
        )
    return 1 if result.failed else 0


def _renamed(exc: LayerfsError, message: str) -> LayerfsError:
    """The same kind of error (same exit code) with a message saying what was being done."""
    try:
        return type(exc)(message, hint=exc.hint)
    except TypeError:
        return LayerfsError(message, hint=exc.hint)


def _destination(args: argparse.Namespace, tmp: Path) -> tuple[ImageDestination, bool]:
    """The destination for --format and -o; True when it writes to standard output."""
    from layerfs.transports.archive import DockerArchiveDestination
    from layerfs.transports.oci import OciLayoutDestination, existing_index
    from layerfs.transports.writer import DirWriter, TarWriter

    if args.format == "oci-dir":
        if not args.output or args.output == "-":
            raise UsageError("--format oci-dir writes a directory: give it with -o DIR")
        root = Path(args.output)
        index = existing_index(root) if root.exists() else None
        return OciLayoutDestination(DirWriter(root), tmp_dir=tmp, existing_index=index), False
    to_stdout = not args.output or args.output == "-"
    if to_stdout:
        if sys.stdout.isatty():
            raise UsageError("refusing to write an archive to a terminal; use -o FILE or redirect")
        writer = TarWriter(sys.stdout.buffer)
    else:
        writer = TarWriter.to_file(Path(args.output))
    if args.format == "oci":
        return OciLayoutDestination(writer, tmp_dir=tmp), to_stdout
    return DockerArchiveDestination(writer, tmp_dir=tmp), to_stdout


def cmd_save(args: argparse.Namespace) -> int:
    from layerfs.copy import copy
    from layerfs.model.platform import Platform
    from layerfs.store.files import reporting_no_space
    from layerfs.transports.local import StoreSource
    from layerfs.transports.platforms import PlatformSource

    platform = Platform.parse(args.platform) if args.platform else None
    store = open_store(args)
    source: ImageSource = StoreSource(store, args.images)
    if platform is not None:
        source = PlatformSource(source, platform, strict=True)
    source.images()  # unknown names fail here, before any output exists
    destination, to_stdout = _destination(args, store.tmp)
    progress = _progress(args)
    output = Path(args.output).absolute().parent if args.output not in (None, "-") else Path("-")
    try:
        with reporting_no_space(output, f"cannot save to {args.output or 'standard output'}"):
            result = copy(source, destination, progress=progress, keep_going=False)
    finally:
        progress.close()
    if not args.quiet and not getattr(args, "global_quiet", False):
        out = sys.stderr if to_stdout else sys.stdout
        for image in result.copied:
            for name in _name(image):
                print(f"Saved image: {name}", file=out)
    return 0
