"""images, tag, rmi, history, inspect.

The listing, its filters and docker's ``--format`` contract live in ``layerfs.listing``
and ``layerfs.formatting``; they are imported by the commands that print, so that other
commands start without them.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from layerfs.cli.common import open_store, print_json
from layerfs.errors import LayerfsError, UsageError

FORMAT_HELP = (
    "'table' (default), 'table TEMPLATE', 'json' (one object per line) or a Go template, "
    "as docker's --format (fields: {fields})"
)


def add_format(parser: argparse.ArgumentParser, fields: str, *, short: bool = False) -> None:
    names = ["-f", "--format"] if short else ["--format"]
    parser.add_argument(
        *names, metavar="FORMAT", default=None, help=FORMAT_HELP.format(fields=fields)
    )


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "images",
        help="list images",
        description=(
            "List images, like docker images: every tagged image and every untagged image "
            "that is no other image's parent, newest first. REPOSITORY[:TAG] (a pattern: * "
            "and ? do not cross /) shows only the names it matches."
        ),
    )
    p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]")
    p.add_argument("-a", "--all", action="store_true", help="include intermediate images")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image IDs")
    p.add_argument("--digests", action="store_true", help="show digests")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate IDs")
    p.add_argument(
        "-f",
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dangling=true|false, reference=PATTERN, before=IMAGE, since=IMAGE, "
        "label=KEY or label=KEY=VALUE (repeatable; all must match, references any)",
    )
    add_format(
        p,
        "ID, Repository, Tag, Digest, CreatedSince, CreatedAt, Size, VirtualSize, "
        "Containers, SharedSize, UniqueSize",
    )
    p.set_defaults(handler=cmd_images)

    p = subparsers.add_parser(
        "tag",
        help="tag an image",
        description=(
            "Create a tag TARGET that refers to SOURCE (a name[:tag], name@digest, ID or "
            "prefix), like docker tag: a tag that exists already moves to SOURCE."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET[:TAG]")
    p.add_argument("-f", "--force", action="store_true", help="accepted for old scripts")
    p.set_defaults(handler=cmd_tag)

    p = subparsers.add_parser(
        "rmi",
        help="remove images",
        description=(
            "Untag and remove images, like docker rmi. A name untags; the image goes with "
            "its last name, and its untagged parents with it. An ID removes every name of "
            "one repository (-f: of several). An image with children is never removed (a "
            "name of it is only untagged); an image held by a pull, load or mount neither "
            "(-f on a name untags it)."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="remove an image named in several repositories; untag a held image",
    )
    p.add_argument("--no-prune", action="store_true", help="keep untagged parents")
    p.set_defaults(handler=cmd_rmi)

    p = subparsers.add_parser(
        "history",
        help="show the history of an image",
        description="Show IMAGE and its parents, newest first: when each was created, by what, "
        "the size of its own layer and its comment, like docker history.",
    )
    p.add_argument("image", nargs="?", metavar="IMAGE")
    p.add_argument(
        "-H",
        "--human",
        nargs="?",
        const="true",
        default="true",
        action=_HumanAction,
        metavar="BOOL",
        help="sizes and dates in human-readable form (default true; -H=false for bytes "
        "and RFC 3339 times)",
    )
    p.add_argument("--no-trunc", action="store_true", help="do not truncate output")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image IDs")
    add_format(p, "ID, CreatedSince, CreatedAt, CreatedBy, Size, Comment")
    p.set_defaults(handler=cmd_history)

    p = subparsers.add_parser(
        "inspect",
        help="show image details as JSON",
        description=(
            "Print Docker-compatible image details: a JSON array, one object per image, or "
            "with -f a Go template per image (docker's field names: {{.Config.Env}}, "
            "{{json .RootFS.Layers}}, ...)."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "-f", "--format", metavar="TEMPLATE", help="a Go template run on each image's details"
    )
    p.add_argument(
        "--type", choices=["image"], default="image", help="only images are inspected (docker)"
    )
    p.set_defaults(handler=cmd_inspect)


class _HumanAction(argparse.Action):
    """pflag's boolean ``-H``/``--human[=BOOL]``: a value that is no boolean is IMAGE."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        value = str(values).lower()
        if value in ("true", "1", "t"):
            namespace.human = "true"
        elif value in ("false", "0", "f"):
            namespace.human = "false"
        else:
            namespace.human = "true"
            namespace.human_operand = values


def _write(text: str) -> None:
    sys.stdout.write(text)


def cmd_images(args: argparse.Namespace) -> int:
    from layerfs.formatting import contexts
    from layerfs.formatting.output import render
    from layerfs.listing import IMAGE_FILTERS, image_rows, list_images, parse_filters

    filters = parse_filters(args.filter, IMAGE_FILTERS)
    if args.repository:
        filters.setdefault("reference", []).append(args.repository)
    store = open_store(args)
    summaries = list_images(store, all_images=args.all, filters=filters)
    now = time.time()
    rows = [
        contexts.image_context(
            summary.id,
            row.repository,
            row.tag,
            row.digest,
            summary.created_unix,
            summary.size,
            trunc=not args.no_trunc,
            now=now,
        )
        for summary in summaries
        for row in image_rows(summary, digests=args.digests)
    ]
    fmt = contexts.image_format(args.format, digests=args.digests, quiet=args.quiet)
    _write(render(rows, fmt, contexts.IMAGE_HEADERS, default_table=contexts.IMAGE_TABLE))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from layerfs.model.reference import Reference

    store = open_store(args)
    ref = Reference.parse(args.target)
    if ref.digest:
        raise UsageError(f"cannot tag with a digest: {args.target!r}")
    image = store.tags.lookup_image(args.source)
    store.tags.tag(ref.repository, ref.tag or "latest", image.id, force=True)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from layerfs.store.removal import remove_image

    store = open_store(args)
    prog = getattr(args, "prog_name", "layerfs")
    status = 0
    for name in args.images:
        try:
            removal = remove_image(store, name, force=args.force, prune=not args.no_prune)
        except LayerfsError as exc:
            print(f"{prog}: error: {exc.message}", file=sys.stderr)
            status = exc.exit_code
            continue
        for what, ident in removal.records:
            print(f"{what}: {ident}")
    return status


def cmd_history(args: argparse.Namespace) -> int:
    from layerfs.formatting import contexts
    from layerfs.formatting.output import render
    from layerfs.inspect import created_unix, history_rows

    name = args.image
    operand = getattr(args, "human_operand", None)
    if operand is not None:
        if name is not None:
            raise UsageError(f"history takes one IMAGE, got {operand!r} and {name!r}")
        name = operand
    if name is None:
        raise UsageError("history needs an IMAGE")
    human = args.human == "true"
    store = open_store(args)
    image = store.tags.lookup_image(name)
    now = time.time()
    rows = [
        contexts.history_context(
            "sha256:" + row.id if row.id != "<missing>" else row.id,
            created_unix(row.created),
            row.created_by,
            row.size,
            row.comment,
            trunc=not args.no_trunc,
            human=human,
            now=now,
        )
        for row in history_rows(store, image)
    ]
    fmt = args.format
    if not fmt or fmt == "table":
        fmt = (
            "{{.ID}}"
            if args.quiet
            else (contexts.HISTORY_TABLE if human else contexts.HISTORY_TABLE_NOT_HUMAN)
        )
    _write(render(rows, fmt, contexts.HISTORY_HEADERS, default_table=contexts.HISTORY_TABLE))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Like docker: what is found is printed, each name not found is an error line."""
    from layerfs.inspect import inspect_document

    store = open_store(args)
    prog = getattr(args, "prog_name", "layerfs")
    docs = []
    status = 0
    errors = []
    for name in args.images:
        try:
            docs.append(inspect_document(store, store.tags.lookup_image(name)))
        except LayerfsError as exc:
            if len(args.images) == 1:
                raise
            errors.append(f"{prog}: error: {exc.message}")
            status = exc.exit_code
    if args.format:
        from layerfs.formatting.output import render_each
        from layerfs.inspect import typed_document

        _write(render_each([typed_document(d) for d in docs], args.format))
    else:
        print_json(docs, escape_html=True)
    for line in errors:
        print(line, file=sys.stderr)
    return status
