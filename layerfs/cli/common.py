"""What every command shares: the store, progress, output helpers."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from layerfs.errors import UsageError
from layerfs.progress import Progress

if TYPE_CHECKING:
    from layerfs.store.store import Store


def open_store(args: argparse.Namespace) -> Store:
    # Imported here: --help and argument errors need no store (nor dataclasses, json, ...).
    from layerfs.store.store import Store

    return Store.open(Path(args.root) if args.root else None)


def make_progress(args: argparse.Namespace) -> Progress:
    quiet = bool(getattr(args, "global_quiet", False) or getattr(args, "quiet", False))
    return Progress(quiet=quiet)


def add_quiet(parser: argparse.ArgumentParser, help_text: str = "no progress output") -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help=help_text)


def add_changes(parser: argparse.ArgumentParser) -> None:
    """``-c/--change``, as ``docker commit`` and ``docker import`` take it."""
    parser.add_argument(
        "-c",
        "--change",
        action="append",
        default=[],
        metavar="INSTRUCTION",
        help="apply a Dockerfile instruction: CMD, ENTRYPOINT, ENV, WORKDIR, USER, "
        "LABEL, EXPOSE, VOLUME, STOPSIGNAL, ONBUILD, HEALTHCHECK (repeatable)",
    )


def print_json(doc: Any, *, escape_html: bool = False) -> None:
    """Indented JSON; ``escape_html`` writes <, > and & as Go's encoder does (\\u003c)."""
    text = json.dumps(doc, indent=4, ensure_ascii=False)
    if escape_html:  # these characters only occur inside JSON strings
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    print(text)


def binary_output(path: str | None, what: str) -> tuple[BinaryIO, bool]:
    """Open ``path`` (or stdout) for binary output; refuse a terminal. Returns (file, owned)."""
    if path and path != "-":
        try:
            return open(path, "wb"), True
        except OSError as exc:
            raise UsageError(f"cannot write {path!r}: {exc.strerror}") from exc
    if sys.stdout.isatty():
        raise UsageError(f"refusing to write {what} to a terminal; use -o FILE or redirect")
    return sys.stdout.buffer, False


def finish_output(handle: BinaryIO, owned: bool) -> None:
    handle.flush()
    if owned:
        if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            os.fsync(handle.fileno())  # a device or FIFO (-o /dev/null) has nothing to sync
        handle.close()
