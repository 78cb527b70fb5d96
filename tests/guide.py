"""The runnable transcripts of docs/guide.md: finding them, running them, comparing shapes.

A fenced block right after the line ``<!-- runnable -->`` is a transcript: each ``$ ``
line is a command (a line ending in ``\\`` continues it; a ``<<'EOF'`` here-document runs
to its end marker), the lines after it are what it printed (standard output and error
together). ``<!-- runnable: script -->`` marks a block that is a plain script: it must
run to the end without error, and shows no output. Every runnable block of the guide runs
in one session, in order: one working directory (``/tmp/guide`` in the text) and one store
(``$LAYERFS_ROOT``).

Outputs are compared by shape: IDs and digests (12 to 64 hex digits), times, dates,
sizes, the PID column of ``layerfs mounts`` and numbers of four digits or more are
normalised, runs of whitespace count as one, a run of progress lines (``<id>: Status``)
may come in any order, and a line ``...`` in the guide stands for any number of lines.
``update`` writes what a run printed back into the transcript, keeping its ``...`` lines
where the rest still matches.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<options>[\w ,=-]*?))?\s*-->\s*$")
ELLIPSIS = "..."
GUIDE_DIR = "/tmp/guide"


@dataclass
class Step:
    command: str
    expected: list[str]
    line: int  # where the command starts in the guide (0-based)


@dataclass
class Block:
    start: int  # the opening fence's line (0-based)
    end: int  # the closing fence's line
    script: bool
    body: list[str]
    steps: list[Step] = field(default_factory=list)


def parse(text: str) -> list[Block]:
    lines = text.split("\n")
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = MARKER.match(lines[index])
        if match is None:
            index += 1
            continue
        options = (match.group("options") or "").split()
        start = index + 1
        if start >= len(lines) or not lines[start].startswith("```"):
            raise ValueError(f"line {index + 1}: a runnable marker must precede a fenced block")
        end = start + 1
        while end < len(lines) and lines[end] != "```":
            end += 1
        if end >= len(lines):
            raise ValueError(f"line {start + 1}: the runnable block is not closed")
        body = lines[start + 1 : end]
        block = Block(start, end, "script" in options, body)
        if not block.script:
            block.steps = parse_steps(body, start + 1)
            if not block.steps:
                raise ValueError(f"line {start + 1}: a runnable transcript has no $ command")
        blocks.append(block)
        index = end + 1
    return blocks


_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


def parse_steps(body: list[str], first_line: int) -> list[Step]:
    steps: list[Step] = []
    index = 0
    while index < len(body):
        line = body[index]
        if not line.startswith("$ "):
            if not steps:
                raise ValueError(f"line {first_line + index + 1}: output before any $ command")
            steps[-1].expected.append(line)
            index += 1
            continue
        start = index
        command = [line[2:]]
        index += 1
        while command[-1].endswith("\\") and index < len(body):
            command.append(body[index])
            index += 1
        heredoc = _HEREDOC.search("\n".join(command))
        if heredoc is not None:
            while index < len(body):
                command.append(body[index])
                index += 1
                if command[-1].strip() == heredoc.group(1):
                    break
        steps.append(Step("\n".join(command), [], first_line + start))
    return steps


# -- shapes --------------------------------------------------------------------------------

_MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b[0-9a-f]{12,64}\b"), "<id>"),
    (re.compile(r"(Less than a second|About an? \w+|\d+ \w+) ago"), "<ago>"),
    (
        re.compile(
            r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|\s?[+-]\d\d:?\d\d)?( [A-Z]{3,5})?"
        ),
        "<time>",
    ),
    (re.compile(rf"\b({_MONTHS}) +\d{{1,2}} +(\d{{4}}|\d\d:\d\d)\b"), "<date>"),
    (re.compile(r"\b\d+(\.\d+)?(e\+\d+)?(B|kB|MB|GB|TB)\b"), "<size>"),
    # the PID column of `layerfs mounts`: a process ID has any number of digits (a run in a
    # fresh PID namespace, as CI's is, gets two- and three-digit ones)
    (re.compile(r"\b\d+(?=\s+(?:running|dead|stopping)$)"), "<pid>"),
    (re.compile(r"\b\d{4,}\b"), "<n>"),
]
_PROGRESS = re.compile(r"^<id>: ")


def shape(lines: Sequence[str]) -> list[str]:
    """Lines with IDs, times, sizes and long numbers normalised, spaces collapsed, and each
    run of progress lines sorted."""
    out: list[str] = []
    run: list[str] = []
    for line in lines:
        if line == ELLIPSIS:
            out.extend(sorted(run))
            run = []
            out.append(line)
            continue
        for pattern, replacement in _RULES:
            line = pattern.sub(replacement, line)
        line = " ".join(line.split())
        if _PROGRESS.match(line):
            run.append(line)
            continue
        out.extend(sorted(run))
        run = []
        out.append(line)
    out.extend(sorted(run))
    while out and out[-1] == "":
        out.pop()
    return out


def align(expected: Sequence[str], actual: Sequence[str]) -> list[int] | None:
    """For each expected line, the actual line it matches (``...`` matches any run, -1);
    None when the shapes differ."""
    memo: dict[tuple[int, int], list[int] | None] = {}

    def go(i: int, j: int) -> list[int] | None:
        if (i, j) in memo:
            return memo[(i, j)]
        result: list[int] | None
        if i == len(expected):
            result = [] if j == len(actual) else None
        elif expected[i] == ELLIPSIS:
            result = None
            for k in range(j, len(actual) + 1):
                rest = go(i + 1, k)
                if rest is not None:
                    result = [-1, *rest]
                    break
        elif j < len(actual) and expected[i] == actual[j]:
            rest = go(i + 1, j + 1)
            result = None if rest is None else [j, *rest]
        else:
            result = None
        memo[(i, j)] = result
        return result

    return go(0, 0)


def same_shape(expected: Sequence[str], actual: Sequence[str]) -> bool:
    return align(shape(expected), shape(actual)) is not None


# -- running -----------------------------------------------------------------------------------


@dataclass
class Session:
    """Runs the guide's commands with its names mapped to this machine's."""

    workdir: str
    env: Mapping[str, str]
    names: dict[str, str]  # as the guide writes it -> as it is here (paths, registry hosts)

    def to_here(self, text: str) -> str:
        for guide, here in self.names.items():
            text = text.replace(guide, here)
        return text

    def to_guide(self, text: str) -> str:
        for guide, here in sorted(self.names.items(), key=lambda kv: -len(kv[1])):
            text = text.replace(here, guide)
        return text

    def run(self, command: str, *, timeout: float = 300) -> str:
        result = subprocess.run(
            ["bash", "-c", self.to_here(command)],
            cwd=self.workdir,
            env=dict(self.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        return self.to_guide(result.stdout.decode(errors="replace"))

    def script(self, body: Sequence[str]) -> None:
        result = subprocess.run(
            ["bash", "-e", "-c", self.to_here("\n".join(body))],
            cwd=self.workdir,
            env=dict(self.env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"the guide's script failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace')[-2000:]}"
            )


def session_env(
    workdir: str, bin_dir: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERFS_", "DOCKER_"))}
    env.update(
        PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        LAYERFS_ROOT=f"{workdir}/store",
        HOME=f"{workdir}/home",
        PYTHONUNBUFFERED="1",
        LC_ALL="C.UTF-8",
        TZ="UTC",
        COLUMNS="200",
        TABSIZE="0",  # ls -C aligns with spaces, not tabs
    )
    env.update(extra or {})
    return env


def rewritten(expected: list[str], actual: list[str]) -> list[str]:
    """What the transcript of a step becomes after a run: the real lines, with the guide's
    ``...`` kept where the rest of its lines still match."""
    actual = list(actual)
    while actual and actual[-1] == "":
        actual.pop()
    plan = align(shape(expected), shape(actual)) if ELLIPSIS in expected else None
    if plan is None:
        return actual
    shaped_actual = shape(actual)
    # shape() may reorder progress runs; map each shaped line back to a real one.
    by_shape: dict[str, list[str]] = {}
    for real in actual:
        by_shape.setdefault(shape([real])[0] if shape([real]) else "", []).append(real)
    out: list[str] = []
    for index, target in enumerate(plan):
        if target < 0:
            out.append(ELLIPSIS)
            continue
        candidates = by_shape.get(shaped_actual[target], [])
        out.append(candidates.pop(0) if candidates else expected[index])
    return out
