"""fsck, gc: keeping the store honest."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from layerfs.cli.common import make_progress, open_store

if TYPE_CHECKING:
    from layerfs.store.store import Store


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fsck",
        help="check the store (--verify: re-hash every layer too)",
        description=(
            "Check every layer's files and size, every image (json, parent, layer, a "
            "config's hash against its ID and its diff IDs against its chain), every tag "
            "and the store's indexes. "
            "It first finishes or undoes what an interrupted command left pending and removes "
            "the staging files of processes that are gone. With --verify it also re-hashes "
            "every layer tar against its diff ID and rebuilds every index, and names the "
            "images that use a damaged layer (a later pull of such an image fetches the layer "
            "again). Exit 0 when clean, 1 when something is wrong."
        ),
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every layer and rebuild every index (reads every byte of the store)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove unused layers and released hold files, rebuild stale indexes; with "
        "--verify also fetch a damaged layer again from the registry it was pulled from, or "
        "where none is recorded (or none answers) remove the images (and their tags) whose "
        "chain holds it, and the layer",
    )
    p.set_defaults(handler=cmd_fsck)
    p = subparsers.add_parser(
        "gc",
        help="remove layers no image uses and staging leftovers",
        description="Remove layers that no image uses, staging leftovers of interrupted "
        "commands, released hold files and download locks, and print what was removed.",
    )
    p.set_defaults(handler=cmd_gc)


def cmd_fsck(args: argparse.Namespace) -> int:
    from layerfs.store.check import fsck

    store = open_store(args)
    progress = make_progress(args)
    progress.tty = progress.tty and not progress.quiet
    report = fsck(
        store,
        repair=args.repair,
        verify=args.verify,
        progress=progress if progress.tty else None,
        refetch=_refetcher(store) if args.repair and args.verify else None,
    )
    progress.close()
    for line in report.repaired:
        print(f"repaired: {line}")
    for line in report.leftovers:
        print(f"leftover: {line} (fsck --repair removes it)")
    for line in report.stale_indexes:
        print(f"index: {line} (fsck --repair rebuilds it)")
    for line in report.problems:
        print(f"problem: {line}")
    summary = (
        f"checked {report.checked_layers} layers, {report.checked_images} images, "
        f"{report.checked_tags} tags: "
    )
    if report.problems:
        print(summary + f"{len(report.problems)} problems", file=sys.stderr)
        return 1
    if report.leftovers:
        print(summary + f"{len(report.leftovers)} removable leftovers", file=sys.stderr)
        return 1
    if report.stale_indexes:
        print(summary + f"{len(report.stale_indexes)} index entries to rebuild", file=sys.stderr)
        return 1
    print(summary + "clean")
    return 0


def _refetcher(store: Store) -> Callable[[str], str | None]:
    def refetch(diff_id: str) -> str | None:
        from layerfs.transports.refetch import refetch_layer  # only a repair pays for requests

        return refetch_layer(store, diff_id)

    return refetch


def cmd_gc(args: argparse.Namespace) -> int:
    from layerfs.store.check import gc

    store = open_store(args)
    for item in gc(store):
        print(f"removed {item}")
    return 0
