"""The command line: argparse, one small function per command, and ``main()``.

Each module of this package registers its commands on the shared subparser
set through ``register(subparsers)``; the functions only parse, call the
library and print. Errors: a :class:`~layerfs.errors.LayerfsError` becomes one
line ``layerfs: error: <message>`` on stderr and its exit code; anything else
is a bug and shows its traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from layerfs import __version__
from layerfs.errors import LayerfsError

Handler = Callable[[argparse.Namespace], int]

# Modules that add commands; each has register(subparsers).
COMMAND_MODULES = (
    "images",
    "rootfs",
    "maintenance",
    "archive",
    "mount",
    "registry",
    "system",  # last: "image ls" and friends copy the parsers registered before it
)

PROG_DESCRIPTION = """\
layerfs keeps Docker-style images (chains of layers) in one store on disk,
loads and saves `docker save` tarballs and OCI layouts, imports and exports
root filesystems, pulls from and pushes to registries, and mounts any image as
a union FUSE filesystem that can serve as a container's root filesystem.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfs",
        description=PROG_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'layerfs COMMAND --help' for a command's options. The guide is docs/guide.md."
        "\n\nenvironment:\n"
        "  LAYERFS_ROOT                 the store (as --root)\n"
        "  LAYERFS_MIN_FREE             free space load, pull, import and commit leave on the\n"
        "                               store's file system (e.g. 500M; 0: none; default 5%,\n"
        "                               at most 1G)\n"
        "  LAYERFS_MAX_EXPANSION_RATIO  how many times its compressed size a layer may expand\n"
        "                               (default 100; 0: no cap)",
    )
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"layerfs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"layerfs.cli.{name}":
                continue  # a command group not built into this copy
            raise
        module.register(subparsers)
    return parser


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"layerfs {__version__}")
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="the store (default: $LAYERFS_ROOT, /var/lib/layerfs as root, "
        "else $XDG_DATA_HOME/layerfs, also in a user namespace)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show debug logs and tracebacks of errors"
    )
    parser.add_argument(
        "--quiet", action="store_true", dest="global_quiet", help="no progress output"
    )


def run(handler: Handler, args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.WARNING,
        format="layerfs: %(levelname)s: %(message)s",
    )
    prog = getattr(args, "prog_name", "layerfs")
    try:
        return handler(args)
    except LayerfsError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(prog)
        # A write that no layerfs code wrapped: still one line, naming the file.
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror}{where}", file=sys.stderr)
        return 1
    except Exception:
        return _internal_error(prog)


def _internal_error(prog: str) -> int:
    traceback.print_exc()
    print(
        f"{prog}: internal error: this is a bug in layerfs; please report it with "
        "the traceback above",
        file=sys.stderr,
    )
    return 70


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    handler: Handler = args.handler
    return run(handler, args)


def load_main(argv: Sequence[str] | None = None) -> int:
    """``layerfs-load``: the same as ``layerfs load``."""
    return _standalone("load", argv)


def save_main(argv: Sequence[str] | None = None) -> int:
    """``layerfs-save``: the same as ``layerfs save``."""
    return _standalone("save", argv)


def _standalone(command: str, argv: Sequence[str] | None) -> int:
    parser = build_parser()
    # Usage and --help of the stand-alone tool name it, not "layerfs load".
    for action in parser._actions:  # argparse offers no public way to reach subparsers
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            action.choices[command].prog = f"layerfs-{command}"
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Global options may come first; the command name is inserted after them.
    globals_end = 0
    while globals_end < len(args_list) and args_list[globals_end] in (
        "--root",
        "--debug",
        "--quiet",
    ):
        globals_end += 2 if args_list[globals_end] == "--root" else 1
    args = parser.parse_args([*args_list[:globals_end], command, *args_list[globals_end:]])
    args.prog_name = f"layerfs-{command}"
    return run(args.handler, args)
