"""images, tag, rmi, history, inspect."""

from __future__ import annotations

import argparse
import json
from typing import Any

from layerfs.cli.common import ago, open_store, print_json, short_id, size_text, table
from layerfs.inspect import created_unix, history_rows, inspect_document, virtual_sizes
from layerfs.model.reference import Reference


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "images", help="list images", description="List images: tagged ones and the tops of chains."
    )
    p.add_argument("repository", nargs="?", help="only this repository")
    p.add_argument("-a", "--all", action="store_true", help="include intermediate images")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image IDs")
    p.add_argument("--digests", action="store_true", help="show digests")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate IDs")
    p.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="table (default) or json (one object per line)",
    )
    p.set_defaults(handler=cmd_images)

    p = subparsers.add_parser(
        "tag",
        help="tag an image",
        description=(
            "Create a tag TARGET that refers to SOURCE (a name[:tag], name@digest, ID or prefix)."
        ),
    )
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("-f", "--force", action="store_true", help="move an existing tag")
    p.set_defaults(handler=cmd_tag)

    p = subparsers.add_parser(
        "rmi",
        help="remove images",
        description=(
            "Untag and remove images, like docker rmi. Untagged parents go too. An image with "
            "children is not removed (-f only untags it); an image held by a pull, load or "
            "mount is never removed."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="untag an image referenced by several repositories or with children",
    )
    p.add_argument("--no-prune", action="store_true", help="keep untagged parents")
    p.set_defaults(handler=cmd_rmi)

    p = subparsers.add_parser(
        "history",
        help="show the history of an image",
        description="Show IMAGE and its parents, newest first: when each was created, by what, "
        "the size of its own layer and its comment, like docker history.",
    )
    p.add_argument("image")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate output")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image IDs")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(handler=cmd_history)

    p = subparsers.add_parser(
        "inspect",
        help="show image details as JSON",
        description=("Print Docker-compatible image details (a JSON array, one object per image)."),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(handler=cmd_inspect)


def cmd_images(args: argparse.Namespace) -> int:
    store = open_store(args)
    images = store.graph.summaries()  # not every node's json: one cached summary file
    sizes = virtual_sizes(images)
    by_id = store.tags.by_id()
    heads = set(images) - {i.parent for i in images.values() if i.parent}
    wanted_repo = Reference.parse(args.repository).repository if args.repository else None
    rows: list[dict[str, Any]] = []
    for image_id, image in sorted(images.items(), key=lambda kv: kv[1].created, reverse=True):
        refs = by_id.get(image_id, [])
        tags = [r for r in refs if "@" not in r]
        digests = [r for r in refs if "@" in r]
        if not (args.all or tags or digests or image_id in heads):
            continue
        pairs: list[tuple[str, str]] = []
        for ref in tags:
            repo, _, tag = ref.rpartition(":")
            pairs.append((repo, tag))
        if not pairs:
            if digests:
                pairs = [(d.partition("@")[0], "<none>") for d in digests[:1]]
            else:
                pairs = [("<none>", "<none>")]
        for repo, tag in pairs:
            if wanted_repo is not None and repo != wanted_repo:
                continue
            digest = next(
                (d.partition("@")[2] for d in digests if d.partition("@")[0] == repo), "<none>"
            )
            rows.append(
                {
                    "Repository": repo,
                    "Tag": tag,
                    "Digest": digest,
                    "ID": "sha256:" + image_id,
                    "CreatedAt": image.created,
                    "CreatedSince": ago(image.created),
                    "Size": sizes[image_id],
                }
            )
    if args.quiet:
        seen: set[str] = set()
        for row in rows:
            ident = row["ID"] if args.no_trunc else row["ID"][7:19]
            if ident not in seen:
                seen.add(ident)
                print(ident)
        return 0
    if args.format == "json":
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    headers = [
        "REPOSITORY",
        "TAG",
        *(["DIGEST"] if args.digests else []),
        "IMAGE ID",
        "CREATED",
        "SIZE",
    ]
    lines = [
        [
            r["Repository"],
            r["Tag"],
            *([r["Digest"]] if args.digests else []),
            r["ID"] if args.no_trunc else r["ID"][7:19],
            r["CreatedSince"],
            size_text(r["Size"]),
        ]
        for r in rows
    ]
    print(table(lines, headers))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = open_store(args)
    ref = Reference.parse(args.target)
    if ref.digest:
        from layerfs.errors import UsageError

        raise UsageError(f"cannot tag with a digest: {args.target!r}")
    image = store.tags.lookup_image(args.source)
    message = store.tags.tag(ref.repository, ref.tag or "latest", image.id, force=args.force)
    if message:
        print(message)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from layerfs.store.removal import remove_image

    store = open_store(args)
    status = 0
    from layerfs.errors import LayerfsError

    for name in args.images:
        try:
            removal = remove_image(store, name, force=args.force, prune=not args.no_prune)
        except LayerfsError as exc:
            import sys

            print(f"layerfs: error: {exc.message}", file=sys.stderr)
            status = exc.exit_code
            continue
        for ref in removal.untagged:
            print(f"Untagged: {ref}")
        for image_id in removal.deleted:
            print(f"Deleted: sha256:{image_id}")
    return status


def cmd_history(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = store.tags.lookup_image(args.image)
    rows = history_rows(store, image)
    if args.quiet:
        for row in rows:
            print(row.id if args.no_trunc or row.id == "<missing>" else short_id(row.id))
        return 0
    if args.format == "json":
        for row in rows:
            print(
                json.dumps(
                    {
                        "ID": row.id if row.id == "<missing>" else "sha256:" + row.id,
                        "Created": created_unix(row.created),
                        "CreatedAt": row.created,
                        "CreatedBy": row.created_by,
                        "Size": row.size,
                        "Comment": row.comment,
                        "Tags": row.tags,
                    },
                    sort_keys=True,
                )
            )
        return 0
    lines = []
    for row in rows:
        created_by = row.created_by
        if not args.no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        ident = row.id if args.no_trunc or row.id == "<missing>" else short_id(row.id)
        lines.append([ident, ago(row.created), created_by, size_text(row.size), row.comment])
    print(table(lines, ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    store = open_store(args)
    docs = [inspect_document(store, store.tags.lookup_image(name)) for name in args.images]
    print_json(docs)
    return 0
