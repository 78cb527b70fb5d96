#!/usr/bin/env python3
"""Start-up of the everyday commands: `layerfs` against the `docker` CLI and a local daemon.

One small image (a busybox rootfs) is imported into a fresh layerfs store and into a
private dockerd (its own data root and socket). Then, interleaved, each command runs
once per round in a fresh process: `--help`, `images`, `inspect`, `history` and `tag`
(a new tag each round), for layerfs (the installed `layerfs` command) and for each
docker CLI at hand (the one on PATH and Debian's /usr/bin/docker, which the tests'
engine uses), plus `python -c pass` (the interpreter alone, the floor of any Python
command). Reported: medians in ms and layerfs / docker.

Python caches compiled modules; PYTHONDONTWRITEBYTECODE (set in some shells) would
make every run compile layerfs again, so it is removed for the runs, and each command
runs once before the timing. Also printed: what `python -X importtime` says `layerfs
images` imports (modules, and the slowest ones).

Writes the section "Start-up" of docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import (
    ENV,
    PYTHON,
    REPO,
    Dockerd,
    closing_lines,
    have_dockerd,
    load_average,
    median,
    stamp,
    update_section,
)

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))
LAYERFS = os.environ.get("BENCH_LAYERFS", str(REPO / ".venv" / "bin" / "layerfs"))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, env=ENV, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.decode()[-2000:]}")
    return elapsed


def docker_clis() -> list[tuple[str, str]]:
    """(label, path) of each docker CLI: the one on PATH first, then Debian's."""
    found: list[tuple[str, str]] = []
    for path in (shutil.which("docker"), "/usr/bin/docker"):
        if (
            path
            and Path(path).exists()
            and all(Path(p).resolve() != Path(path).resolve() for _, p in found)
        ):
            version = subprocess.run([path, "--version"], capture_output=True, text=True)
            number = re.search(r"version ([0-9.]+)", version.stdout)
            found.append((f"docker {number.group(1) if number else '?'} ({path})", path))
    return found


def import_report(root: Path) -> str:
    """What `layerfs images` imports, from `python -X importtime` (best of 5 runs)."""
    best: dict[str, int] = {}
    modules = 0
    for _ in range(5):
        result = subprocess.run(
            [PYTHON, "-X", "importtime", LAYERFS, "--root", str(root), "images"],
            capture_output=True,
            text=True,
            env=ENV,
        )
        lines = [m for m in result.stderr.splitlines() if m.startswith("import time:")]
        modules = len(lines) - 1  # the header line
        for line in lines[1:]:
            self_us, _cumulative, name = line.removeprefix("import time:").split("|")
            key = name.strip()
            best[key] = min(best.get(key, 1 << 40), int(self_us))
    top = sorted(best.items(), key=lambda kv: -kv[1])[:12]
    listed = ", ".join(f"{name} {us / 1000:.1f}" for name, us in top)
    total = sum(best.values()) / 1000
    return (
        f"`python -X importtime` of `layerfs images`: {modules} modules, {total:.0f} ms of "
        f"import time in all (the best of 5 runs per module; importtime's own overhead "
        f"included). The slowest, in ms of their own: {listed}."
    )


def main() -> None:
    if not have_dockerd():
        sys.exit("needs root and dockerd")
    finder = glob.glob(
        str(REPO / ".venv/lib/python3*/site-packages/__editable___layerfs_*finder.py")
    )
    if finder:
        print(
            "warning: layerfs is installed with setuptools' import hook, which costs every "
            "command ~25 ms; run tools/install-deps.sh --venv-only to reinstall it",
            file=sys.stderr,
        )
    work = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=str(Path.home())))
    load_start = load_average()
    docker = Dockerd()
    times: dict[tuple[str, str], list[float]] = {}
    try:
        docker.__enter__()
        sys.path.insert(0, str(REPO))
        from tests.helpers import write_busybox_rootfs_tar

        rootfs = write_busybox_rootfs_tar(work / "rootfs.tar")
        root = work / "store"
        subprocess.run(
            [LAYERFS, "--root", str(root), "import", str(rootfs), "bench/app:1"],
            check=True,
            capture_output=True,
            env=ENV,
        )
        subprocess.run(
            docker.cmd("import", str(rootfs), "bench/app:1"), check=True, capture_output=True
        )
        clis = docker_clis()
        tools: dict[str, list[str]] = {"layerfs": [LAYERFS, "--root", str(root)]}
        for label, path in clis:
            tools[label] = [path, "-H", docker.host]
        commands = {
            "--help": ["--help"],
            "images": ["images"],
            "inspect": ["inspect", "bench/app:1"],
            "history": ["history", "bench/app:1"],
            "tag": ["tag", "bench/app:1", "bench/app:{tool}-{n}"],
        }
        for args in commands.values():  # warm-up: compiled modules cached, pages in
            for tool, base in tools.items():
                timed([*base, *(a.format(tool=len(tool), n="warm") for a in args)])
        floor: list[float] = []
        stack: list[float] = []  # the standard modules a command line of this kind loads
        for n in range(ROUNDS):
            floor.append(timed([PYTHON, "-c", "pass"]))
            stack.append(timed([PYTHON, "-c", "import argparse, json, pathlib, typing"]))
            order = list(tools) if n % 2 else list(reversed(tools))
            for name, args in commands.items():
                for tool in order:
                    cmd = [*tools[tool], *(a.format(tool=len(tool), n=n) for a in args)]
                    times.setdefault((name, tool), []).append(timed(cmd))
        report = import_report(root)
    finally:
        docker.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()

    docker_tools = [t for t in tools if t != "layerfs"]
    header = "| command | layerfs ms | " + " | ".join(f"{t} ms" for t in docker_tools)
    header += " | " + " | ".join(f"layerfs / {t.split(' (')[0]}" for t in docker_tools) + " |"
    header += " at least as fast as docker |"
    rows = [header, "|" + "---|" * (3 + 2 * len(docker_tools))]
    for name in commands:
        mine = median(times[(name, "layerfs")])
        theirs = [median(times[(name, t)]) for t in docker_tools]
        rows.append(
            f"| {name} | {mine * 1000:.1f} | "
            + " | ".join(f"{t * 1000:.1f}" for t in theirs)
            + " | "
            + " | ".join(f"{mine / t:.2f}x" for t in theirs)
            + " | "
            + ", ".join(
                f"{'met' if mine <= t else '**missed**'} ({n.split(' (')[0]})"
                for n, t in zip(docker_tools, theirs, strict=True)
            )
            + " |"
        )
    body = f"""{stamp()}

Each command in a fresh process, against a store (layerfs) or a private dockerd (docker)
holding one small image; median of {ROUNDS} interleaved rounds after a warm-up. A ratio
below 1 means layerfs starts faster. The interpreter alone (`python -c pass`, the floor of
any command written in Python): {median(floor) * 1000:.1f} ms; with the standard modules an
argparse command line working on files loads (`import argparse, json, pathlib, typing`):
{median(stack) * 1000:.1f} ms.

{chr(10).join(rows)}

{report}

{closing_lines(load_start, load_end, "bench_startup.py")}
"""
    print(body)
    update_section("startup", "Start-up", body)


if __name__ == "__main__":
    main()
