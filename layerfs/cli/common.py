"""What every command shares: the store, progress, output helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.errors import UsageError
from layerfs.model.image import parse_created
from layerfs.progress import Progress, human_size
from layerfs.store.store import Store


def open_store(args: argparse.Namespace) -> Store:
    return Store.open(Path(args.root) if args.root else None)


def make_progress(args: argparse.Namespace) -> Progress:
    quiet = bool(getattr(args, "global_quiet", False) or getattr(args, "quiet", False))
    return Progress(quiet=quiet)


def add_quiet(parser: argparse.ArgumentParser, help_text: str = "no progress output") -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help=help_text)


def short_id(image_id: str) -> str:
    return image_id[:12]


def ago(created: str) -> str:
    when = parse_created(created)
    if when is None:
        return "N/A"
    seconds = (datetime.now(UTC) - when).total_seconds()
    if seconds < 0:
        return "in the future"
    for unit, size in (
        ("years", 365 * 86400),
        ("months", 30 * 86400),
        ("weeks", 7 * 86400),
        ("days", 86400),
        ("hours", 3600),
        ("minutes", 60),
    ):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit} ago"
        if seconds >= size:
            return f"About an {unit[:-1]} ago" if unit == "hours" else f"1 {unit[:-1]} ago"
    return "Less than a second ago" if seconds < 1 else f"{int(seconds)} seconds ago"


def size_text(n: int) -> str:
    return human_size(n)


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


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
            raise UsageError(f"cannot write {path!r}: {exc.strerror}") from None
    if sys.stdout.isatty():
        raise UsageError(f"refusing to write {what} to a terminal; use -o FILE or redirect")
    return sys.stdout.buffer, False


def binary_input(path: str | None, what: str) -> tuple[BinaryIO, bool]:
    if path and path != "-":
        try:
            return open(path, "rb"), True
        except FileNotFoundError:
            raise UsageError(f"cannot read {path!r}: no such file") from None
        except OSError as exc:
            raise UsageError(f"cannot read {path!r}: {exc.strerror}") from None
    if sys.stdin.isatty():
        raise UsageError(f"refusing to read {what} from a terminal; use -i FILE or redirect")
    return sys.stdin.buffer, False


def finish_output(handle: BinaryIO, owned: bool, path: str | None) -> None:
    handle.flush()
    if owned:
        os.fsync(handle.fileno())
        handle.close()
    del path
