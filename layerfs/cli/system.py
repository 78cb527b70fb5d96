"""``image`` (docker's management command: ls, rm, inspect, ..., prune) and ``system df``.

Registered after every other command module: ``image ls`` and friends are the parsers of
``images``, ``rmi``, ... copied under ``image``, so options and help never drift apart.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from layerfs.cli.common import open_store

# docker image SUBCOMMAND -> the top-level command it is (aliases after the name).
IMAGE_COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ls": ("images", ("list",)),
    "rm": ("rmi", ("remove",)),
    "inspect": ("inspect", ()),
    "history": ("history", ()),
    "tag": ("tag", ()),
    "save": ("save", ()),
    "load": ("load", ()),
    "import": ("import", ()),
    "pull": ("pull", ()),
    "push": ("push", ()),
}


def register(subparsers: Any) -> None:
    commands: dict[str, argparse.ArgumentParser] = subparsers.choices
    image = subparsers.add_parser(
        "image",
        help="manage images (docker's 'image' commands: ls, rm, inspect, prune, ...)",
        description="The image commands under docker's names: 'layerfs image ls' is "
        "'layerfs images', 'image rm' is 'rmi', and 'image prune' removes unused images.",
    )
    image_commands = image.add_subparsers(dest="image_command", metavar="COMMAND")
    image.set_defaults(handler=_needs_subcommand(image))
    for name, (command, aliases) in IMAGE_COMMANDS.items():
        original = commands.get(command)
        if original is None:
            continue  # a command group not built into this copy
        image_commands.add_parser(
            name,
            aliases=list(aliases),
            parents=[original],
            add_help=False,
            help=f"the same as 'layerfs {command}'",
            description=original.description,
            epilog=original.epilog,
            formatter_class=original.formatter_class,
        )
    p = image_commands.add_parser(
        "prune",
        help="remove unused images",
        description=(
            "Remove dangling images (untagged and no other image's parent), or with -a "
            "every image that is not mounted, pulled or loaded right now, like docker image "
            "prune; then print what went and the space the store got back. Asks first "
            "unless -f."
        ),
    )
    p.add_argument("-a", "--all", action="store_true", help="remove all unused images")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="until=TIME (a duration such as 24h, an RFC 3339 time, Unix seconds), "
        "label=KEY[=VALUE], label!=KEY[=VALUE]",
    )
    p.set_defaults(handler=cmd_image_prune)

    system = subparsers.add_parser(
        "system", help="store-wide information (df)", description="Store-wide commands."
    )
    system_commands = system.add_subparsers(dest="system_command", metavar="COMMAND")
    system.set_defaults(handler=_needs_subcommand(system))
    p = system_commands.add_parser(
        "df",
        help="show the store's disk usage",
        description=(
            "Show what the store holds, like docker system df: images, layers, mounts and "
            "upper directories; how many, how many in use, their size on disk and what "
            "removing the unused ones would give back."
        ),
    )
    p.add_argument(
        "--format",
        metavar="FORMAT",
        help="'table' (default), 'table TEMPLATE', 'json' or a Go template "
        "(fields: Type, TotalCount, Active, Size, Reclaimable)",
    )
    p.set_defaults(handler=cmd_system_df)


def _needs_subcommand(parser: argparse.ArgumentParser) -> Any:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return handler


WARNINGS = {
    False: "WARNING! This will remove all dangling images.",
    True: "WARNING! This will remove all images not mounted, pulled or loaded right now.",
}


def cmd_image_prune(args: argparse.Namespace) -> int:
    from layerfs.formatting.output import human_size
    from layerfs.listing import parse_filters
    from layerfs.prune import PRUNE_FILTERS, prune_images

    filters = parse_filters(args.filter, PRUNE_FILTERS)
    store = open_store(args)
    if not args.force:
        print(WARNINGS[bool(args.all)])
        print("Are you sure you want to continue? [y/N] ", end="", flush=True)
        answer = sys.stdin.readline().strip()
        if answer not in ("y", "Y"):
            return 0
    report = prune_images(store, all_images=args.all, filters=filters)
    if report.records:
        print("Deleted Images:")
        for what, ident in report.records:
            print(f"{what}: {ident}")
        print()
    print(f"Total reclaimed space: {human_size(report.reclaimed)}")
    return 0


def cmd_system_df(args: argparse.Namespace) -> int:
    from layerfs.diskusage import disk_usage
    from layerfs.formatting import contexts
    from layerfs.formatting.output import render

    store = open_store(args)
    rows = [
        contexts.df_context(r.kind, r.total, r.active, r.size, r.reclaimable)
        for r in disk_usage(store)
    ]
    sys.stdout.write(
        render(rows, args.format, contexts.DF_HEADERS, default_table=contexts.DF_TABLE)
    )
    return 0
