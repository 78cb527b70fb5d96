#!/usr/bin/env python3
"""Merged-tree benchmark: what a mount, ``export`` and ``commit`` do with layer rows, in-process.

The work around the union mount that never crosses FUSE, for this checkout against
another revision of layerfs (``--against``, default ``main``, unpacked with ``git
archive``), run interleaved in fresh processes over one store:

- merge: stream the index rows of every layer of a 127-layer image into one merged tree
  (``MergedTree.from_rows``: the lower half of ``layerfs mount``);
- lookup: look up every path of the tree (``MergedTree.lookup``, a node snapshot);
- walk: every path, parents first (``MergedTree.walk``);
- export: ``layerfs export`` of the image into /dev/null;
- commit tar: ``commit.write_layer_tar`` of one row per file, data from the lower tars;
- memory: bytes per merged entry the tree keeps (tracemalloc, after the timed passes);
- row types: what ``store/rows.py`` chose between. The index rows of every layer as
  msgpack decodes them (lists) and turned into a NamedTuple or a slotted class:
  bytes per row with every row held (tracemalloc: the object, its path, its numbers),
  the object alone (``sys.getsizeof``), and the time to decode a row, make it and
  read ten of its columns, as the merge does.

The image: ``--files`` regular files (plus a symlink and a hardlink per 50 files) in 100
directories, file k in layer k % 127, so every directory merges from many layers.
``--mounts N`` adds, as root and where ``bench_mount.py`` has prepared its store
(``$LAYERFS_BENCH_DIR``), N rounds of the real thing: ``layerfs mount --engine native``
of its Debian image as 1 and as 127 layers, each checkout in turn, timed until the
mount is ready, then a walk of the mount with the caches dropped first (cold).

Medians of ``--rounds`` rounds (rotating the order), reported as seconds and as the
ratio this / against (lower is better). Writes the "Merged tree" section of
docs/benchmarks.md with ``--doc``. Not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, REPO, drop_caches, median, publish, stamp

DEPTH = 127
DIRS = 100
MEASURES = ("merge", "lookup", "walk", "export", "commit tar")


def _layer_tar(files: int, layer: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for k in range(layer, files, DEPTH):
            directory = f"d{k % DIRS:03d}"
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
            data = b"%016d" % k
            info = tarfile.TarInfo(f"{directory}/file{k:06d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            if k % 50 == 0:
                link = tarfile.TarInfo(f"{directory}/link{k:06d}")
                link.type, link.linkname = tarfile.SYMTYPE, f"file{k:06d}"
                tar.addfile(link)
                hard = tarfile.TarInfo(f"{directory}/hard{k:06d}")
                hard.type, hard.linkname = tarfile.LNKTYPE, f"{directory}/file{k:06d}"
                tar.addfile(hard)
    return buf.getvalue()


def prepare(root: Path, files: int) -> str:
    """A store at ``root`` holding the 127-layer image; returns its ID."""
    from layerfs.store.store import Store

    store = Store.open(root)
    parent = ""
    for layer in range(DEPTH):
        staged = store.layers.ingest(io.BytesIO(_layer_tar(files, layer)))
        parent = store.graph.create(staged, parent=parent, created_by="bench").id
    return parent


def worker(root: Path, image_id: str) -> dict[str, float]:
    """One pass of every measure with the layerfs on sys.path (a fresh process)."""
    from layerfs.fs.commit import write_layer_tar
    from layerfs.fs.union import MergedTree
    from layerfs.rootfs import export_image
    from layerfs.store.store import Store

    store = Store.open(root)
    image = store.graph.get(image_id)
    diff_ids = store.graph.layers_of(image)
    result: dict[str, float] = {}

    start = time.perf_counter()
    tree = MergedTree.from_rows(store.layers.index_rows(d) for d in diff_ids)
    result["merge"] = time.perf_counter() - start
    paths = [path for path, _ in tree.walk()]

    start = time.perf_counter()
    for path in paths:
        tree.lookup(path)
    result["lookup"] = time.perf_counter() - start

    start = time.perf_counter()
    for _ in tree.walk():
        pass
    result["walk"] = time.perf_counter() - start

    with open(os.devnull, "wb") as out:
        start = time.perf_counter()
        export_image(store, image, out)
        result["export"] = time.perf_counter() - start

    rows = [
        [*row, diff_id]
        for diff_id in diff_ids
        for row in store.layers.index_rows(diff_id)
        if row[1] == "f"
    ]
    with open(os.devnull, "wb") as out:
        start = time.perf_counter()
        write_layer_tar(rows, root, out, store.layers.open_tar)
        result["commit tar"] = time.perf_counter() - start

    del tree
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tree = MergedTree.from_rows(store.layers.index_rows(d) for d in diff_ids)
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    result["entries"] = len(tree)
    result["bytes per entry"] = kept / len(tree)
    return result


class _RowTuple(NamedTuple):
    path: bytes
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    offset: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: Any
    source: Any = None


class _RowSlots:
    __slots__ = _RowTuple._fields

    def __init__(self, *values: Any) -> None:
        for name, value in zip(_RowTuple._fields, values, strict=False):
            setattr(self, name, value)
        if len(values) < len(_RowTuple._fields):
            self.source = None


def _read_list(row: Any) -> tuple[Any, ...]:
    return row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[11]


def _read_named(row: Any) -> tuple[Any, ...]:
    return (
        row.path,
        row.type,
        row.mode,
        row.uid,
        row.gid,
        row.size,
        row.mtime_ns,
        row.offset,
        row.linkname,
        row.xattrs,
    )


def row_types(root: Path, image_id: str) -> dict[str, tuple[float, int, float]]:
    """Row type -> (bytes per row, all held; bytes of the object alone; ns per row)."""
    from layerfs.store.store import Store

    store = Store.open(root)
    diff_ids = store.graph.layers_of(store.graph.get(image_id))
    makers: dict[str, tuple[Callable[[Any], Any] | None, Callable[[Any], Any]]] = {
        "list (column names)": (None, _read_list),
        "NamedTuple": (lambda row: _RowTuple(*row), _read_named),
        "slotted class": (lambda row: _RowSlots(*row), _read_named),
    }
    result = {}
    for name, (make, read) in makers.items():
        tracemalloc.start()
        held = [make(r) if make else r for d in diff_ids for r in store.layers.index_rows(d)]
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        count, alone = len(held), sys.getsizeof(held[0])
        del held
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for d in diff_ids:
                for r in store.layers.index_rows(d):
                    read(make(r) if make else r)
            times.append(time.perf_counter() - start)
        result[name] = (size / count, alone, median(times) / count * 1e9)
    return result


def _against_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "layerfs"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_worker(code: Path, root: Path, image_id: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(code))
    out = subprocess.run(
        [PYTHON, __file__, "--worker", str(root), image_id],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


MOUNT_IMAGES = ("bench/debian:1", "bench/debian:127")


def mount_rows(mounts: dict[str, dict[str, float]], rounds: int, tail: str = "") -> list[str]:
    """Table rows of mount_rounds's medians: this checkout against the other revision;
    ``tail`` closes a row that has more columns than these four."""
    rows = []
    for m in mounts.get("this", {}):
        before, after = mounts["against"][m], mounts["this"][m]
        rows.append(
            f"| {m} (native engine, {rounds} rounds) | {before:.3f} | {after:.3f} | "
            f"{after / before:.2f}x |{tail}"
        )
    return rows


def mount_rounds(codes: dict[str, Path], rounds: int, mnt: Path) -> dict[str, dict[str, float]]:
    """Checkout -> "mount, IMAGE" / "cold walk, IMAGE" -> median seconds (see the docstring)."""
    from bench_mount import WORK as work
    from bench_mount import walk

    def layerfs(code: Path, *args: str) -> None:
        subprocess.run(
            [PYTHON, "-m", "layerfs", "--root", str(work / "store"), *args],
            check=True,
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=str(code)),
            cwd=code,
        )

    mnt.mkdir(parents=True, exist_ok=True)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in codes}
    for code in codes.values():  # once first, so that both run from compiled bytecode
        layerfs(code, "mount", "--no-init", "--engine", "native", MOUNT_IMAGES[0], str(mnt))
        layerfs(code, "umount", str(mnt))
    for round_ in range(rounds):
        order = list(codes) if round_ % 2 == 0 else list(reversed(codes))
        for name in order:
            for image in MOUNT_IMAGES:
                drop_caches()
                start = time.perf_counter()
                layerfs(codes[name], "mount", "--no-init", "--engine", "native", image, str(mnt))
                times[name].setdefault(f"mount, {image}", []).append(time.perf_counter() - start)
                try:
                    drop_caches()
                    start = time.perf_counter()
                    walk(mnt)
                    took = time.perf_counter() - start
                    times[name].setdefault(f"cold walk, {image}", []).append(took)
                finally:
                    layerfs(codes[name], "umount", str(mnt))
    return {name: {m: median(v) for m, v in by.items()} for name, by in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument(
        "--mounts",
        type=int,
        default=0,
        metavar="N",
        help="N rounds of mounts and cold walks (root, bench_mount's store)",
    )
    parser.add_argument("--doc", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument("--worker", nargs=2, metavar=("STORE", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1])))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-tree-") as tmp:
        sys.path.insert(0, str(REPO))
        image_id = prepare(Path(tmp) / "store", args.files)
        rows = row_types(Path(tmp) / "store", image_id)
        codes = {"against": _against_tree(args.against, Path(tmp) / "against"), "this": REPO}
        load = os.getloadavg()
        runs: dict[str, list[dict[str, float]]] = {"against": [], "this": []}
        for round_ in range(args.rounds):
            order = list(codes) if round_ % 2 == 0 else list(reversed(codes))
            for name in order:
                runs[name].append(_run_worker(codes[name], Path(tmp) / "store", image_id))
        mounts = mount_rounds(codes, args.mounts, Path(tmp) / "mnt") if args.mounts else {}
        load_after = os.getloadavg()
    med = {
        name: {m: median([r[m] for r in results]) for m in MEASURES}
        for name, results in runs.items()
    }
    entries = int(runs["this"][0]["entries"])
    lines = [
        f"{stamp()} {entries} merged entries over {DEPTH} layers ({args.files} files); "
        f"medians of {args.rounds} interleaved rounds in fresh processes. Load average "
        f"(1, 5, 15 min) {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start, "
        f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} at the end "
        "(a shared machine: compare the columns of one run only).",
        "",
        f"| measurement | {args.against} s | this checkout s | this / {args.against} |",
        "|---|---|---|---|",
    ]
    for m in MEASURES:
        before, after = med["against"][m], med["this"][m]
        lines.append(f"| {m} | {before:.3f} | {after:.3f} | {after / before:.2f}x |")
    lines += mount_rows(mounts, args.mounts)
    for name, label in (("against", args.against), ("this", "this checkout")):
        per = median([r["bytes per entry"] for r in runs[name]])
        lines.append(
            f"\nMerged tree memory, {label}: {per:.0f} bytes per merged entry "
            "(tracemalloc, the tree kept after a merge)."
        )
    lines += [
        "",
        "Row types (the index rows of every layer; see layerfs/store/rows.py):",
        "",
        "| row type | bytes per row, all held | the object alone | decode, make, read 10 columns |",
        "|---|---|---|---|",
    ]
    for name, (held, alone, ns) in rows.items():
        lines.append(f"| {name} | {held:.0f} | {alone} | {ns:.0f} ns |")
    publish("\n".join(lines), "tree", "Merged tree", doc=args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
