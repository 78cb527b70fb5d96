"""import, export: flat root filesystems in and out."""

from __future__ import annotations

import argparse
from typing import Any

from layerfs.cli.common import (
    add_changes,
    add_quiet,
    binary_output,
    finish_output,
    make_progress,
    open_store,
)

# layerfs.rootfs (tarfile, the union model) is imported by the commands that use it.


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import",
        help="import a root filesystem tarball as an image",
        description=(
            "Create a one-layer image from a root filesystem tarball, like docker import. "
            "SOURCE is a file, - for standard input, or a URL (http(s)://..., or host/path "
            "without a scheme: https is tried first, then http); plain, gzip, zstd, bzip2 "
            "or xz. The tar is stored as it is, not extracted."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("reference", nargs="?", metavar="REPOSITORY[:TAG]")
    p.add_argument("-m", "--message", default="", help="commit message for the image")
    add_changes(p)
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the platform the image is for (default: this machine's)",
    )
    add_quiet(p, "only print the image ID")
    p.set_defaults(handler=cmd_import)

    p = subparsers.add_parser(
        "export",
        help="write an image's merged filesystem as one tar",
        description=(
            "Write the merged filesystem of an image (whiteouts and opaque "
            "directories applied, hardlinks kept) as a tar, like docker export."
        ),
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    add_quiet(p)
    p.set_defaults(handler=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    from layerfs.model.platform import Platform
    from layerfs.rootfs import import_rootfs

    platform = Platform.parse(args.platform) if args.platform else None
    store = open_store(args)
    progress = make_progress(args)
    result = import_rootfs(
        store,
        args.source,
        args.reference,
        message=args.message,
        changes=args.change,
        progress=progress,
        platform=platform,
    )
    progress.close()
    if result.rename_message and not args.quiet:
        print(result.rename_message)
    print(f"sha256:{result.image.id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from layerfs.rootfs import export_image

    store = open_store(args)
    image = store.tags.lookup_image(args.image)
    out, owned = binary_output(args.output, "a tar archive")
    progress = make_progress(args)
    if not owned:
        progress.quiet = progress.quiet or not progress.tty
    try:
        export_image(store, image, out, progress)
    finally:
        finish_output(out, owned)
        progress.close()
    return 0
