#!/usr/bin/env python3
"""This checkout against another revision of layerfs: the commands that move images.

A change that must not make anything slower is measured here: the same commands, on the
same inputs, run by this checkout and by another revision (``--against``, unpacked with
``git archive`` as ``bench_tree.py`` does), each in a fresh process with its own
``PYTHONPATH``, interleaved (the order alternates every round); medians of ``--rounds``:

- load: ``layerfs load -i`` of a 3-layer, 283 MB docker-archive (``bench_archive.py``'s
  medium archive) into a fresh store;
- save: ``layerfs save -o`` of that image;
- import: ``layerfs import`` of the Debian minbase rootfs tar (128 MB) into a fresh store;
- export: ``layerfs export -o`` of the loaded image;
- push: ``layerfs push`` of the loaded image to a fresh docker-registry on 127.0.0.1;
- pull: ``layerfs pull`` of it back into a fresh store;
- mount and cold walk, with ``--mounts N``: ``bench_tree.mount_rounds`` (the native
  engine, 1 and 127 layers, where ``bench_mount.py`` has prepared its store).

Reported as seconds and the ratio this / against (lower is better); ``--doc`` writes
the section "This checkout against another revision" of docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_archive import build
from bench_registry import Registry
from bench_tree import _against_tree, mount_rounds, mount_rows
from common import ENV, PYTHON, REPO, debian_rootfs, load_average, median, publish, stamp

TAG = "bench/debian:archive"
COMMANDS = ("load", "save", "import", "export", "push", "pull")


def layerfs(code: Path, root: Path, *args: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``layerfs`` command of checkout ``code``; raises if it fails.

    CPU is the user and system time of the command and of the processes it waited for
    (its worker processes): the steadier figure, as the wall time of commands that fsync
    moves with the shared disk.
    """
    env = dict(ENV, PYTHONPATH=str(code))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [PYTHON, "-m", "layerfs", "--root", str(root), *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=code,
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{code}: layerfs {' '.join(args)} failed:\n{result.stderr.decode()}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu


def one_round(
    code: Path, work: Path, archive: Path, rootfs: Path
) -> dict[str, tuple[float, float]]:
    """Every command once, by checkout ``code``, on fresh stores and a fresh registry."""
    for name in ("store", "imported", "pulled", "out.tar", "export.tar"):
        path = work / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    store = work / "store"
    times = {
        "load": layerfs(code, store, "load", "-q", "-i", str(archive)),
        "save": layerfs(code, store, "save", "-q", "-o", str(work / "out.tar"), TAG),
        "import": layerfs(code, work / "imported", "import", "-q", str(rootfs), "bench/rootfs:1"),
        "export": layerfs(code, store, "export", "-q", "-o", str(work / "export.tar"), TAG),
    }
    registry = Registry(work)
    try:
        target = f"{registry.host}/bench/debian:1"
        layerfs(code, store, "tag", TAG, target)
        times["push"] = layerfs(code, store, "push", "-q", target)
        times["pull"] = layerfs(code, work / "pulled", "pull", "-q", target)
    finally:
        registry.stop()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mounts", type=int, default=0, help="rounds of mount and cold walk")
    parser.add_argument("--doc", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    if shutil.which("docker-registry") is None:
        print("bench_revisions: docker-registry is missing", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-revisions-", dir=str(Path.home())))
    try:
        archive = build(work)["medium"]
        rootfs = debian_rootfs("minbase")
        codes = {"against": _against_tree(args.against, work / "against"), "this": REPO}
        load_start = load_average()
        for code in codes.values():  # once, so that both run from compiled bytecode
            one_round(code, work, archive, rootfs)
        runs: dict[str, list[dict[str, tuple[float, float]]]] = {name: [] for name in codes}
        for round_ in range(args.rounds):
            order = list(codes) if round_ % 2 == 0 else list(reversed(codes))
            for name in order:
                runs[name].append(one_round(codes[name], work, archive, rootfs))
        mounts = mount_rounds(codes, args.mounts, work / "mnt") if args.mounts else {}
        load_end = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"{stamp()} Medians of {args.rounds} interleaved rounds, each command in a fresh "
        f"process. Load average (1 min) {load_start} at the start, {load_end} at the end.",
        "",
        f"| command | {args.against} s | this checkout s | this / {args.against} "
        f"| {args.against} CPU s | this checkout CPU s | CPU this / {args.against} |",
        "|---|---|---|---|---|---|---|",
    ]
    for command in COMMANDS:
        cells = []
        for part in (0, 1):
            before = median([r[command][part] for r in runs["against"]])
            after = median([r[command][part] for r in runs["this"]])
            cells.append(f"{before:.3f} | {after:.3f} | {after / before:.2f}x")
        lines.append(f"| {command} | {' | '.join(cells)} |")
    lines += mount_rows(mounts, args.mounts, tail=" | | |")
    lines += [
        "",
        f"Run: `tools/bench/bench_revisions.py --against {args.against} "
        f"--rounds {args.rounds} --mounts {args.mounts}`",
    ]
    publish("\n".join(lines), "revisions", "This checkout against another revision", doc=args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
