"""mount, umount, mounts, commit, run: images as union file systems and containers.

The FUSE side (``layerfs.fs.mount``, which needs pyfuse3) is imported only
after ``check_fuse`` has said it can work, so every other command runs where
libfuse is missing.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfs.cli.common import add_changes, open_store
from layerfs.errors import MountError, UsageError
from layerfs.fs import ENGINES

if TYPE_CHECKING:
    from layerfs.fs.host import Records
    from layerfs.store.store import Store

# layerfs.fs.host (subprocess, signals) is imported by the commands that use it.

_OPTIONS = ("allow_other", "ro", "rw", "suid", "nosuid", "dev", "nodev")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "mount",
        help="mount an image as a union file system",
        description=(
            "Mount IMAGE (name[:tag], name@digest, ID or prefix) on MOUNTPOINT, an empty "
            "directory, as one merged tree of its layers with the init layer on top. "
            "Returns once the mount is ready; a background server answers it until "
            "'layerfs umount' (or fusermount3 -u). Read-only unless --rw; nosuid and nodev "
            "unless --suid / --dev. The image cannot be removed while it is mounted."
        ),
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--rw", action="store_true", help="writable: changes go to an upper directory in the store"
    )
    p.add_argument(
        "--upper",
        metavar="NAME",
        help="the upper directory to use (kept between mounts; implies --rw)",
    )
    p.add_argument(
        "--no-init",
        dest="init",
        action="store_false",
        help="leave out the init layer (/.dockerenv, /etc/hosts, ... placeholders)",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT]",
        help=f"mount options: {', '.join(_OPTIONS)}",
    )
    p.add_argument("--suid", action="store_true", help="honour setuid/setgid bits")
    p.add_argument("--dev", action="store_true", help="allow device nodes to be opened")
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="serve in this process until unmounted (logs also to stderr)",
    )
    add_engine_option(p)
    p.set_defaults(handler=cmd_mount)

    p = subparsers.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount a layerfs mount and stop its server",
        description=(
            "Unmount MOUNTPOINT and wait for its server to save the upper directory "
            "and exit. Also cleans up the mountpoint of a server that crashed."
        ),
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "-l",
        "--lazy",
        action="store_true",
        help="detach now even if busy; the server exits when the last user leaves",
    )
    p.set_defaults(handler=cmd_umount)

    p = subparsers.add_parser(
        "mounts",
        help="list live mounts",
        description="List the mounts of this store (layerfs's ps): "
        "mountpoint, image, mode, upper directory, engine, "
        "server.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only show mountpoints")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate image IDs")
    p.add_argument(
        "--format",
        metavar="FORMAT",
        help="'table' (default), 'table TEMPLATE', 'json' (one object per line) or "
        "a Go template, as docker's --format (fields: Mountpoint, Image, ID, "
        "Mode, Upper, Engine, Pid, Status, Log)",
    )
    p.set_defaults(handler=cmd_mounts)

    p = subparsers.add_parser(
        "commit",
        help="make an image from a writable mount's changes",
        description=(
            "Turn the changes made in a writable mount into a new layer and an "
            "image whose parent is the mounted image, like docker commit."
        ),
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("reference", nargs="?", metavar="REPOSITORY[:TAG]")
    p.add_argument("-m", "--message", default="", help="commit message")
    p.add_argument("-a", "--author", default="", help='author ("Name <email>")')
    add_changes(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only print the image ID")
    p.set_defaults(handler=cmd_commit)

    register_run(subparsers)


def add_engine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=["auto", *ENGINES],
        default=os.environ.get("LAYERFS_ENGINE") or "auto",
        help="FUSE engine: native (layerfs's own, speaking the kernel's protocol "
        "on /dev/fuse) or pyfuse3 (libfuse); auto: native, or pyfuse3 on a "
        "kernel too old for it (default: $LAYERFS_ENGINE, else auto)",
    )


def register_run(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a command in an image (namespaces + chroot over a writable mount)",
        description=(
            "Mount IMAGE writable, make new mount, PID, UTS and IPC namespaces, mount /proc "
            "and a minimal /dev, bind the host's resolv.conf, hosts and hostname, chroot and "
            "run COMMAND (default: the image's Entrypoint and Cmd) with the image's Env, "
            "WorkingDir and User. Signals are forwarded; the exit code is the command's. "
            "Needs root."
        ),
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND...")
    p.add_argument(
        "--rm", dest="remove", action="store_true", help="drop the upper directory afterwards"
    )
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable (KEY alone: take it from here)",
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the image")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user name or uid[:gid]")
    p.add_argument(
        "--name",
        metavar="NAME",
        help="name of the upper directory (kept without --rm; mount it with "
        "--upper NAME, commit it from there)",
    )
    p.add_argument("--hostname", metavar="NAME", help="host name (default: a random ID)")
    add_engine_option(p)
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from layerfs.fs.host import check_fuse

    if os.geteuid() != 0:
        raise UsageError(
            "layerfs run needs root: it creates namespaces, mounts /proc and /dev and chroots",
            hint="run it with sudo, or mount the image and use a rootless runtime on it",
        )
    from layerfs.store.store import in_user_namespace

    if in_user_namespace():
        raise UsageError(
            "layerfs run needs the host's root; it does not run inside a user namespace",
            hint="run it with sudo, or use a rootless runtime on a mount made in here",
        )
    check_fuse(allow_other=True, engine=args.engine)
    store = open_store(args)
    from layerfs.container import RunSpec, run

    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    return run(
        store,
        RunSpec(
            image=args.image,
            command=command,
            env=args.env,
            workdir=args.workdir,
            user=args.user,
            remove=args.remove,
            name=args.name,
            hostname=args.hostname,
            engine=args.engine,
            debug=bool(getattr(args, "debug", False)),
        ),
    )


def parse_options(values: list[str]) -> set[str]:
    options: set[str] = set()
    for value in values:
        for option in value.split(","):
            option = option.strip()
            if not option:
                continue
            if option not in _OPTIONS:
                raise UsageError(f"unsupported mount option {option!r}: use {', '.join(_OPTIONS)}")
            options.add(option)
    return options


def cmd_mount(args: argparse.Namespace) -> int:
    from layerfs.fs.host import check_fuse

    options = parse_options(args.options)
    writable = bool(args.rw or args.upper or "rw" in options)
    if writable and "ro" in options:
        raise UsageError("-o ro and --rw (or --upper) contradict each other")
    allow_other = "allow_other" in options
    check_fuse(allow_other=allow_other, engine=args.engine)
    store = open_store(args)
    from layerfs.fs.mount import MountRequest, mount

    mount(
        store,
        MountRequest(
            image=args.image,
            mountpoint=Path(args.mountpoint),
            writable=writable,
            upper=args.upper,
            init=args.init,
            allow_other=allow_other,
            suid=bool(args.suid or "suid" in options) and "nosuid" not in options,
            dev=bool(args.dev or "dev" in options) and "nodev" not in options,
            foreground=args.foreground,
            debug=bool(getattr(args, "debug", False)),
            engine=args.engine,
        ),
    )
    return 0


def records_of(store: Store) -> Records:
    from layerfs.fs.host import Records

    return Records(store.root / "mounts", store.tmp)


def cmd_umount(args: argparse.Namespace) -> int:
    from layerfs.fs.host import stop_mount

    stop_mount(records_of(open_store(args)), args.mountpoint, lazy=args.lazy)
    return 0


def cmd_mounts(args: argparse.Namespace) -> int:
    from layerfs.formatting import contexts
    from layerfs.formatting.output import render
    from layerfs.fs.host import is_mounted

    store = open_store(args)
    records = records_of(store)
    rows = []
    for record in records.all():
        alive = records.alive(record.id)
        mounted = is_mounted(record.mountpoint)
        if not alive and not mounted:
            records.remove(record.id)  # stale: nothing left to show or clean
            continue
        status = "running" if alive and mounted else "dead" if mounted else "stopping"
        rows.append(
            contexts.mount_context(
                record.mountpoint,
                record.reference,
                "sha256:" + record.image,
                record.mode,
                record.upper or "",
                record.engine,
                record.pid,
                status,
                record.log,
                trunc=not args.no_trunc,
            )
        )
    sys.stdout.write(
        render(
            rows,
            args.format,
            contexts.MOUNT_HEADERS,
            default_table=contexts.MOUNT_TABLE,
            quiet=args.quiet,
            quiet_format=contexts.MOUNT_QUIET,
        )
    )
    return 0


def control(mountpoint: str, what: str) -> dict[str, Any]:
    """Ask a mount's server (a getxattr on its root; see layerfs.fs.mount)."""
    try:
        data = os.getxattr(mountpoint, f"user.layerfs.{what}")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise MountError(f"{mountpoint} is not a layerfs mount") from None
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"the server of {mountpoint} is gone",
                hint="layerfs umount cleans up the mountpoint",
            ) from None
        raise MountError(f"cannot reach the server of {mountpoint}: {exc.strerror}") from exc
    doc: dict[str, Any] = json.loads(data)
    return doc


def cmd_commit(args: argparse.Namespace) -> int:
    store = open_store(args)
    info = control(args.mountpoint, "sync")
    if info.get("mode") != "rw" or not info.get("upper_path"):
        raise UsageError(
            f"{args.mountpoint} is a read-only mount: nothing to commit",
            hint="mount with --rw to make changes",
        )
    if Path(info["store"]) != store.root:
        raise UsageError(
            f"{args.mountpoint} is mounted from the store {info['store']}",
            hint=f"use --root {info['store']}",
        )
    from layerfs.fs.commit import commit_upper

    image, rename = commit_upper(
        store,
        Path(info["upper_path"]),
        info["image"],
        args.reference,
        message=args.message,
        author=args.author,
        changes=args.change,
        created_by="layerfs commit",
    )
    if rename and not args.quiet:
        print(rename)
    print(f"sha256:{image.id}")
    return 0
