"""The command line: argparse, one small function per command, and ``main()``.

Each module of this package registers its commands on the shared subparser
set through ``register(subparsers)``; the functions only parse, call the
library and print. Errors: a :class:`~layerfs.errors.LayerfsError` becomes one
line ``layerfs: error: <message>`` on stderr and its exit code (with ``--debug``,
after its traceback, and followed by one ``caused by:`` line per cause); anything
else is a bug and shows its traceback. Ctrl-C exits 130.

Start-up is most of what ``images``, ``inspect`` or ``tag`` cost, so a command imports
only what it needs: the modules of this package import the library (transports, the
registry client, FUSE, compression) inside the command functions that use it, and
``main`` builds the options of the one command it runs (the others are listed with
their help, their options are not built). ``tests/unit/test_cli_startup.py`` keeps it so.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; given ``argv``, with the options of only the command it names.

    argparse formats every option as it is added, which costs more than most commands
    take to run; with ``argv`` every command is still listed with its help, but only
    the one ``argv`` runs gets its options (none for ``layerfs --help``).
    """
    parser = argparse.ArgumentParser(
        prog="layerfs",
        description=PROG_DESCRIPTION,
        formatter_class=_RawDescriptionFormatter,
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
    wanted = _command_of(argv or [])
    # "image ls" and friends are copies of the other commands' parsers: it needs them all.
    commands = _Commands(subparsers, argv is not None and wanted != "image", wanted)
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"layerfs.cli.{name}").register(commands)
    return parser


def _columns() -> int:
    """The help width argparse would choose, without importing shutil (and bz2, lzma)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, width or _columns())


class _RawDescriptionFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs, past the global options; None for --help, --version."""
    end = _globals_end(argv)
    if end < len(argv) and not argv[end].startswith("-"):
        return argv[end]
    return None


def _globals_end(argv: Sequence[str]) -> int:
    """The index of the first argument of ``argv`` that is not a global option."""
    i = 0
    while i < len(argv):
        name, equals, _ = argv[i].partition("=")
        if name not in _GLOBAL_OPTIONS:
            break
        i += 2 if name in _GLOBAL_VALUED and not equals else 1
    return i


class _Commands:
    """The subparsers as the command modules see them (``add_parser``)."""

    def __init__(self, subparsers: Any, filtered: bool, wanted: str | None) -> None:
        self._subparsers = subparsers
        self._filtered = filtered
        self._wanted = wanted

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        if not self._filtered or self._wanted in (name, *kwargs.get("aliases", ())):
            return self._subparsers.add_parser(name, **kwargs)
        listed = {k: v for k, v in kwargs.items() if k in ("help", "aliases")}
        self._subparsers.add_parser(name, add_help=False, **listed)
        return _NotRun()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._subparsers, name)


class _NotRun:
    """The parser of a command that is not being run: whatever is added to it is ignored."""

    def _ignore(self, *args: Any, **kwargs: Any) -> _NotRun:
        return self

    def __getattr__(self, name: str) -> Any:
        return self._ignore


# The options that come before the command, for layerfs and the stand-alone tools alike:
# name -> argparse keywords. Those without an action take a value.
_GLOBAL_OPTIONS: dict[str, dict[str, Any]] = {
    "--root": {
        "metavar": "DIR",
        "help": "the store (default: $LAYERFS_ROOT, /var/lib/layerfs as root, "
        "else $XDG_DATA_HOME/layerfs, also in a user namespace)",
    },
    "--debug": {
        "action": "store_true",
        "help": "show debug logs, tracebacks of errors and their causes",
    },
    "--quiet": {"action": "store_true", "dest": "global_quiet", "help": "no progress output"},
}
_GLOBAL_VALUED = frozenset(name for name, kw in _GLOBAL_OPTIONS.items() if "action" not in kw)


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"layerfs {__version__}")
    for name, keywords in _GLOBAL_OPTIONS.items():
        parser.add_argument(name, **keywords)


def configure_logging(debug: bool) -> None:
    """Library messages as ``layerfs: LEVEL: text`` on stderr.

    logging (with traceback, tokenize, string, ... that it imports) costs a few ms of the
    start-up of commands that log nothing. When no module has imported it yet, it is
    configured the moment one does (:class:`_ConfigureOnImport`), not imported here.
    """

    def configure(logging: Any) -> None:
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.WARNING,
            format="layerfs: %(levelname)s: %(message)s",
        )

    if debug or "logging" in sys.modules:
        import logging

        configure(logging)
    elif not any(isinstance(finder, _ConfigureOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ConfigureOnImport(configure))


class _ConfigureOnImport:
    """A meta path finder that runs ``configure(logging)`` right after logging's import."""

    def __init__(self, configure: Callable[[Any], None]) -> None:
        self._configure = configure

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "logging":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = cast(Any, _ThenConfigure(spec.loader, self._configure))
        return spec


class _ThenConfigure:
    """The real loader of logging, and then the configuration."""

    def __init__(self, loader: Any, configure: Callable[[Any], None]) -> None:
        self._loader = loader
        self._configure = configure

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._configure(module)

    def __getattr__(self, name: str) -> Any:  # get_source and the rest, for tracebacks
        return getattr(self._loader, name)


def run(handler: Handler, args: argparse.Namespace) -> int:
    configure_logging(bool(getattr(args, "debug", False)))
    prog = getattr(args, "prog_name", "layerfs")
    try:
        return handler(args)
    except LayerfsError as exc:
        debug = bool(getattr(args, "debug", False))
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        if debug:
            for cause in causes_of(exc):
                print(f"  caused by: {_qualified_name(cause)}: {cause}", file=sys.stderr)
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


def causes_of(exc: BaseException) -> list[BaseException]:
    """What led to ``exc``, nearest first: its cause, or the error it was raised while
    handling (unless ``from None`` hid it), and so on."""
    chain: list[BaseException] = []
    current = exc
    while True:
        nxt = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if nxt is None or nxt is exc or nxt in chain:
            return chain
        chain.append(nxt)
        current = nxt


def _qualified_name(exc: BaseException) -> str:
    kind = type(exc)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _internal_error(prog: str) -> int:
    import traceback

    traceback.print_exc()
    print(
        f"{prog}: internal error: this is a bug in layerfs; please report it with "
        "the traceback above",
        file=sys.stderr,
    )
    return 70


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
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
    parser = build_parser([command])
    # Usage and --help of the stand-alone tool name it, not "layerfs load".
    for action in parser._actions:  # argparse offers no public way to reach subparsers
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            action.choices[command].prog = f"layerfs-{command}"
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Global options may come first; the command name is inserted after them.
    globals_end = _globals_end(args_list)
    args = parser.parse_args([*args_list[:globals_end], command, *args_list[globals_end:]])
    args.prog_name = f"layerfs-{command}"
    return run(args.handler, args)
