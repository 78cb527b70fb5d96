"""fsck, gc: keeping the store honest."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from layerfs.cli.common import make_progress, open_store


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fsck",
        help="check the store (--verify: re-hash every layer too)",
        description=(
            "Check every layer (its info, tar size and index), image, parent, layer and "
            "tag, and the store's indexes; with --verify also re-hash every layer against "
            "its diff ID and rebuild and compare every entry index. Exit 0 when clean, 1 "
            "when something is wrong."
        ),
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also re-read every layer: re-hash it and compare its index (reads the whole store)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove unpublished staging leftovers and unused layers, rebuild stale indexes",
    )
    p.set_defaults(handler=cmd_fsck)
    p = subparsers.add_parser(
        "gc",
        help="remove layers no image uses and staging leftovers",
        description="Remove layers that no image uses, staging leftovers of interrupted "
        "commands and released hold files, and print what was removed.",
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


def cmd_gc(args: argparse.Namespace) -> int:
    from layerfs.store.check import gc

    store = open_store(args)
    for item in gc(store):
        print(f"removed {item}")
    return 0
