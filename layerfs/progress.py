"""Progress reporting: bars on a terminal, plain lines otherwise, nothing when quiet.

Library code receives a :class:`Progress` (or ``None``) and calls ``start``,
``advance`` and ``finish`` on it; the CLI decides how it is shown.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


class ReportingReader:
    """A reader that reports how many bytes pass through it, so bars move while it streams."""

    def __init__(self, stream: Any, report: Callable[[int], None]) -> None:
        self._stream = stream
        self._report = report

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._stream.read(size)
        if data:
            self._report(len(data))
        return data


# Plain classes, not dataclasses: every command imports this module, and dataclasses
# (with inspect and ast under it) costs several ms of start-up (docs/benchmarks.md).


class _Task:
    __slots__ = ("done", "label", "status", "total")

    def __init__(self, label: str, total: int | None, done: int = 0, status: str = "") -> None:
        self.label = label
        self.total = total
        self.done = done
        self.status = status


class Progress:
    """Per-task bars (one line each) plus an optional total line."""

    def __init__(
        self, stream: TextIO | None = None, quiet: bool = False, tty: bool | None = None
    ) -> None:
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = tty if tty is not None else self.stream.isatty()
        self._tasks: dict[str, _Task] = {}
        self._order: list[str] = []
        self._last_draw = 0.0
        self._drawn_lines = 0
        self._total: _Task | None = None
        # copy() may stream several layers at once: one thread draws at a time.
        self._lock = threading.RLock()

    def track_total(self, label: str = "Total") -> None:
        """Add one bar (on a terminal) summing every task started from now on."""
        self._total = _Task(label, 0, 0, "")

    def start(self, key: str, label: str, total: int | None = None, status: str = "") -> None:
        with self._lock:
            if key not in self._tasks:
                self._order.append(key)
            self._tasks[key] = _Task(label, total, 0, status)
            if self._total is not None and total:
                self._total.total = (self._total.total or 0) + total
            if not self.tty and not self.quiet and status:
                print(f"{label}: {status}", file=self.stream, flush=True)
            self._draw(force=True)

    def advance(self, key: str, n: int) -> None:
        with self._lock:
            task = self._tasks.get(key)
            if task is None:
                return
            task.done += n
            if self._total is not None:
                self._total.done += n
            self._draw()

    def status(self, key: str, status: str) -> None:
        with self._lock:
            task = self._tasks.get(key)
            if task is None:
                return
            task.status = status
            if not self.tty and not self.quiet:
                print(f"{task.label}: {status}", file=self.stream, flush=True)
            self._draw(force=True)

    def finish(self, key: str, status: str = "Done") -> None:
        self.status(key, status)

    def note(self, key: str, status: str) -> None:
        """A status a destination found for a layer it already has ("Mounted from x"); a
        progress that shows more than the pipeline's "Already exists" keeps it."""
        return None

    def message(self, text: str) -> None:
        """A line that stays (not a bar)."""
        with self._lock:
            if self.quiet:
                return
            self._clear()
            print(text, file=self.stream, flush=True)
            self._draw(force=True)

    def close(self) -> None:
        with self._lock:
            if self.tty and not self.quiet:
                self._draw(force=True)
                self._drawn_lines = 0

    def _clear(self) -> None:
        if self.tty and self._drawn_lines:
            self.stream.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def _draw(self, force: bool = False) -> None:
        if self.quiet or not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._clear()
        lines = [self._line(self._tasks[k]) for k in self._order]
        if self._total is not None and lines:
            lines.append(self._line(self._total))
        if lines:
            self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn_lines = len(lines)

    @staticmethod
    def _line(task: _Task) -> str:
        label = task.label[:24].ljust(24)
        if task.total:
            frac = min(task.done / task.total, 1.0)
            bar = "=" * int(frac * 40)
            bar = (bar + ">").ljust(41)[:41] if frac < 1 else bar.ljust(41)
            return (
                f"{label} [{bar}] {human_size(task.done)}/{human_size(task.total)} {task.status}"
            ).rstrip()
        if task.done:
            return f"{label} {human_size(task.done)} {task.status}".rstrip()
        return f"{label} {task.status}".rstrip()
