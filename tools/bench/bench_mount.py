#!/usr/bin/env python3
"""Mount benchmark: layerfs against a plain directory, overlayfs and fuse-overlayfs.

Not a test. Needs root (mounts, dropping caches). Every target serves the same
files: a Debian 12 minbase root file system (``tools/debian-rootfs.sh``) as one
layer, the same files spread over 127 layers (file k goes to layer k % 127, so
most directories are merged from many layers), a 2 GiB file, and 100,000 small
files for the memory figure. The layers are extracted once for the plain
directory, the kernel's overlayfs and fuse-overlayfs (whiteout-free, so the
extraction is the same for all), stored once for layerfs; all of it is cached
in ``$LAYERFS_BENCH_DIR`` (default /var/tmp/layerfs-bench) between runs.

One more column, "pyfuse3 floor", is ``pyfuse3_floor.py``: a read-only mirror of
the plain directory whose handlers are one dictionary lookup or one pread, with
the kernel settings layerfs uses. It shows what any pyfuse3 file system pays per
request, so that layerfs's own cost can be told apart from pyfuse3's. It serves a
directory, not layers, so it has no 127-layer rows. "pyfuse3 floor, 1 task" is the
same with ``pyfuse3.main(max_tasks=1)`` (one worker instead of pyfuse3's default
pool), for the 1-layer rows only.

Each measurement runs every target in turn, ``--rounds`` times (rotating the
order), and reports medians as ratios to the plain directory. Cold means
``echo 3 > /proc/sys/vm/drop_caches`` first. ``--doc`` writes the "Mount"
section of docs/benchmarks.md; ``--profile`` records the layerfs server with
py-spy during warm walks and reads and prints where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, REPO, drop_caches, median, stamp, update_section

WORK = Path(os.environ.get("LAYERFS_BENCH_DIR", "/var/tmp/layerfs-bench"))
DEPTH = 127
BIG = 2 << 30
SMALL_FILES = 100_000
STAT_PASSES = 7
TARGETS = ("plain", "overlayfs", "fuse-overlayfs", "floor", "floor1", "layerfs")
TITLES = {"floor": "pyfuse3 floor", "floor1": "pyfuse3 floor, 1 task"}
FLOOR = Path(__file__).resolve().parent / "pyfuse3_floor.py"
_floors: dict[Path, subprocess.Popen[bytes]] = {}


def sh(*cmd: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, cwd=cwd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {result.stderr.decode()[-2000:]}")
    return result.stdout.decode()


def layerfs(*args: str | Path) -> str:
    return sh(PYTHON, "-m", "layerfs", "--root", WORK / "store", *args)


def compile_once() -> None:
    """Users run layerfs with its bytecode cached: make sure it is, and used."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sh(PYTHON, "-c", "import layerfs.cli, layerfs.fs.mount, layerfs.container; "
                     "layerfs.cli.build_parser()")


# -- building the inputs (cached) ---------------------------------------------------------------


def debian_tar() -> Path:
    return Path(sh("bash", REPO / "tools" / "debian-rootfs.sh").strip())


def split_layers(source: Path, out_dir: Path, count: int) -> list[Path]:
    """Spread the files of a flat tar over ``count`` layer tars, parents in each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{i:03}.tar" for i in range(count)]
    outs = [tarfile.open(p, "w", format=tarfile.PAX_FORMAT) for p in paths]  # noqa: SIM115
    dirs: dict[str, tarfile.TarInfo] = {}
    written: list[set[str]] = [set() for _ in range(count)]
    placed: dict[str, int] = {}
    with tarfile.open(source) as src:
        for k, member in enumerate(src):
            name = member.name.rstrip("/").removeprefix("./")
            if not name or name == ".":
                continue
            if member.isdir():
                dirs[name] = member
                continue
            layer = placed[member.linkname.removeprefix("./")] if member.islnk() else k % count
            placed[name] = layer
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                parent = "/".join(parts[:i])
                if parent not in written[layer] and parent in dirs:
                    outs[layer].addfile(dirs[parent])
                    written[layer].add(parent)
            data = src.extractfile(member) if member.isreg() else None
            outs[layer].addfile(member, data)
    for out in outs:
        out.close()
    return paths


def big_tar(path: Path) -> Path:
    block = hashlib.sha256(b"big").digest() * (1 << 15)  # 1 MiB
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                               format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big")
        info.size = BIG

        class Stream:
            left = BIG

            def read(self, n: int) -> bytes:
                n = min(n, self.left, len(block))
                self.left -= n
                return block[:n]

        tar.addfile(info, Stream())  # type: ignore[arg-type]
    return path


def small_tar(path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        import io

        for d in range(SMALL_FILES // 100):
            info = tarfile.TarInfo(f"dir{d:04}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            for f in range(100):
                data = b"x" * (f % 64)
                info = tarfile.TarInfo(f"dir{d:04}/file-{f:03}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def extract(tar: Path, dest: Path) -> Path:
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sh("tar", "--numeric-owner", "--xattrs", "-xpf", tar, "-C", tmp)
        tmp.rename(dest)
    return dest


def prepare() -> dict[str, object]:
    """Everything the measurements need; built once, then reused."""
    WORK.mkdir(parents=True, exist_ok=True)
    marker = WORK / "ready.json"
    if marker.is_file():
        return json.loads(marker.read_text())  # type: ignore[no-any-return]
    shutil.rmtree(WORK / "store", ignore_errors=True)
    deb = debian_tar()
    layers = split_layers(deb, WORK / "split", DEPTH)
    big = big_tar(WORK / "big.tar")
    small = small_tar(WORK / "small.tar")
    layerfs("import", "-q", deb, "bench/debian:1")
    layerfs("import", "-q", big, "bench/big:1")
    layerfs("import", "-q", small, "bench/small:1")
    sys.path.insert(0, str(REPO))
    from layerfs.store.store import Store

    store = Store.open(WORK / "store")
    parent = ""
    for path in layers:
        with open(path, "rb") as stream:
            parent = store.graph.create(store.layers.ingest(stream), parent=parent).id
    store.tags.tag("bench/debian", "127", parent, force=True)
    tiny = WORK / "tiny.tar"
    with tarfile.open(tiny, "w") as tar:
        tar.addfile(tarfile.TarInfo("empty"))
    layerfs("import", "-q", tiny, "bench/tiny:1")
    extract(deb, WORK / "plain-debian")
    extract(big, WORK / "plain-big")
    (WORK / "empty").mkdir(exist_ok=True)
    for i, path in enumerate(layers):
        extract(path, WORK / "layers" / str(i))
    entries = sum(1 for _ in (WORK / "plain-debian").rglob("*"))
    info: dict[str, object] = {"debian_entries": entries, "debian_bytes": deb.stat().st_size}
    marker.write_text(json.dumps(info))
    return info


# -- mounting each target -------------------------------------------------------------------


SCENARIOS = {
    # name: (plain dir, overlay lowerdirs relative to WORK (top first), layerfs image)
    "debian": ("plain-debian", ["plain-debian", "empty"], "bench/debian:1"),
    "debian127": ("plain-debian", [f"layers/{i}" for i in reversed(range(DEPTH))],
                  "bench/debian:127"),
    "big": ("plain-big", ["plain-big", "empty"], "bench/big:1"),
}


def mount_target(target: str, scenario: str, mnt: Path) -> tuple[Path, float]:
    """Mount; returns the root to read and the seconds the mount took to be ready."""
    plain, lowers, image = SCENARIOS[scenario]
    if target == "plain":
        return WORK / plain, 0.0
    mnt.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(lowers)
    start = time.perf_counter()
    if target == "overlayfs":
        sh("mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", mnt, cwd=WORK)
    elif target == "fuse-overlayfs":
        sh("fuse-overlayfs", "-o", f"lowerdir={lowerdir}", mnt, cwd=WORK)
    elif target in ("floor", "floor1"):
        tasks = "1" if target == "floor1" else "99"
        proc = subprocess.Popen([PYTHON, FLOOR, "--max-tasks", tasks, WORK / plain, mnt],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise RuntimeError(f"pyfuse3_floor.py did not mount {mnt}")
        _floors[mnt] = proc
    else:
        layerfs("mount", "--no-init", image, mnt)
    return mnt, time.perf_counter() - start


def unmount_target(target: str, mnt: Path) -> None:
    if target == "plain":
        return
    if target == "layerfs":
        layerfs("umount", mnt)
    elif target in ("fuse-overlayfs", "floor", "floor1"):
        sh("fusermount3", "-u", mnt)
        if target != "fuse-overlayfs":
            _floors.pop(mnt).wait(30)
    else:
        sh("umount", mnt)


@contextmanager
def mounted(target: str, scenario: str) -> Iterator[tuple[Path, float]]:
    mnt = WORK / "mnt" / target
    root, took = mount_target(target, scenario, mnt)
    try:
        yield root, took
    finally:
        unmount_target(target, mnt)


# -- the work -----------------------------------------------------------------------------------


def walk(root: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def regular_files(root: Path) -> list[str]:
    files = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mode & 0o170000 == 0o100000:
                files.append(path)
    return files


def read_files(files: list[str]) -> int:
    total = 0
    buf = bytearray(1 << 20)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total


def stat_files(files: list[str]) -> None:
    for path in files:
        os.lstat(path)


def timeit(fn: Callable[[], object], *, cold: bool, prime: Callable[[], object] | None = None
           ) -> float:
    """Seconds ``fn`` takes; cold: caches dropped first (then ``prime`` runs, untimed)."""
    if cold:
        drop_caches()
    if prime is not None:
        prime()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def server_pid(mnt: Path) -> int:
    for line in layerfs("mounts", "--format", "json").splitlines():
        row = json.loads(line)
        if row["Mountpoint"] == str(mnt):
            return int(row["Pid"])
    raise RuntimeError(f"no layerfs server for {mnt}")


def memory_per_entry() -> tuple[float, int]:
    """(bytes per merged entry, entries) at 100k entries, after a full walk."""
    results = {}
    for image in ("bench/tiny:1", "bench/small:1"):
        mnt = WORK / "mnt" / "memory"
        mnt.mkdir(parents=True, exist_ok=True)
        layerfs("mount", "--no-init", image, mnt)
        try:
            entries = walk(mnt)
            results[image] = (rss_kib(server_pid(mnt)), entries)
        finally:
            layerfs("umount", mnt)
    (base, _), (full, entries) = results["bench/tiny:1"], results["bench/small:1"]
    return (full - base) * 1024 / entries, entries


# -- the run --------------------------------------------------------------------------------------


def measure(rounds: int) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for r in range(rounds):
        order = TARGETS[r % len(TARGETS):] + TARGETS[:r % len(TARGETS)]
        for target in order:
            print(f"round {r + 1}/{rounds}: {target}", file=sys.stderr)
            for name, seconds in measure_target(target):
                samples[name][target].append(seconds)
    return {name: {t: median(v) for t, v in per.items()} for name, per in samples.items()}


def measure_target(target: str) -> Iterator[tuple[str, float]]:
    with mounted(target, "debian") as (root, took):
        if target not in ("plain", "floor", "floor1"):
            yield "mount, 1 layer (s)", took
        files = regular_files(root)
        yield "cold tree walk", timeit(partial(walk, root), cold=True)
        walk(root)
        yield "warm tree walk", timeit(partial(walk, root), cold=False)
        yield "cold read, all files", timeit(partial(read_files, files), cold=True)
        read_files(files)
        yield "warm re-read, all files", timeit(partial(read_files, files), cold=False)
    if target == "floor1":
        return
    if target != "floor":
        yield from measure_deep(target)
    with mounted(target, "big") as (root, _took):
        yield "cold sequential read, 2 GiB", timeit(partial(read_files, [str(root / "big")]),
                                                    cold=True)


def measure_deep(target: str) -> Iterator[tuple[str, float]]:
    with mounted(target, "debian127") as (root, took):
        if target != "plain":
            yield "mount, 127 layers (s)", took
        yield "cold tree walk, 127 layers", timeit(partial(walk, root), cold=True)
        walk(root)
        yield "warm tree walk, 127 layers", timeit(partial(walk, root), cold=False)
        # Primed with one stat so that the server's own code is paged in: this
        # compares lookups in the bottom and the top layer, nothing else.
        prime = partial(os.lstat, root / "etc")
        # Each layer has only about 50 files, a few milliseconds of stat: the median
        # of several cold passes, bottom and top alternating, keeps the noise out.
        bottom = [str(root / p) for p in _layer_files(0)]
        top = [str(root / p) for p in _layer_files(DEPTH - 1)]
        times: dict[str, list[float]] = {"bottom": [], "top": []}
        for _ in range(STAT_PASSES):
            for where, files in (("bottom", bottom), ("top", top)):
                times[where].append(timeit(partial(stat_files, files), cold=True, prime=prime))
        yield "cold stat, bottom-layer files", median(times["bottom"])
        yield "cold stat, top-layer files", median(times["top"])


def _layer_files(layer: int) -> list[str]:
    with tarfile.open(WORK / "split" / f"{layer:03}.tar") as tar:
        return [m.name.removeprefix("./") for m in tar if m.isreg()][:200]


def report(results: dict[str, dict[str, float]], memory: tuple[float, int],
           info: dict[str, object], rounds: int) -> str:
    lines = [stamp(), "",
             f"Inputs: Debian 12 minbase ({info['debian_entries']} entries, "
             f"{int(info['debian_bytes']) // 2**20} MiB) as 1 layer and spread over "  # type: ignore[call-overload]
             f"{DEPTH} layers (file k in layer k % {DEPTH}); one 2 GiB file. Medians of "
             f"{rounds} interleaved rounds; ratios to the plain directory (lower is better), "
             "mount times in seconds. Cold = `echo 3 > /proc/sys/vm/drop_caches` first. "
             "FUSE ratios move by up to 3x with machine load: compare columns of one run only.",
             "", "| measurement | plain s | "
             + " | ".join(TITLES.get(t, t) for t in TARGETS[1:]) + " |",
             "|---" * (len(TARGETS) + 1) + "|"]
    for name, per in results.items():
        if name.endswith("(s)"):
            cells = ["-"] + [f"{per[t]:.3f} s" if t in per else "-" for t in TARGETS[1:]]
        else:
            base = per["plain"]
            cells = [f"{base:.3f}"] + [f"{per[t] / base:.1f}x" if t in per else "-"
                                        for t in TARGETS[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    per_entry, entries = memory
    lines += ["", f"layerfs server memory: {per_entry:.0f} bytes per merged entry "
                  f"(RSS growth from an empty image to {entries} entries, after a full walk)."]
    return "\n".join(lines)


def assessment(results: dict[str, dict[str, float]], per_entry: float) -> str:
    """The issue's targets, each with what this run measured (and the pyfuse3 floor's)."""

    def ratio(name: str, target: str = "layerfs") -> float:
        return results[name][target] / results[name]["plain"]

    def floor(name: str) -> str:
        return f"{ratio(name, 'floor'):.1f}x" if "floor" in results[name] else "-"

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    mount127 = results["mount, 127 layers (s)"]["layerfs"]
    bottom = results["cold stat, bottom-layer files"]["layerfs"]
    top = results["cold stat, top-layer files"]["layerfs"]
    rows = [
        ("mount of a 127-layer image ready in under 1 s", f"{mount127:.2f} s", "-",
         mount127 < 1),
        ("stat from the bottom layer costs what one from the top costs",
         f"{bottom * 1000:.1f} ms vs {top * 1000:.1f} ms (a layer's files, median of "
         f"{STAT_PASSES} cold passes)", "-",
         max(bottom, top) < 1.5 * min(bottom, top)),
        ("warm tree walk within 2x of the plain directory",
         f"{ratio('warm tree walk'):.1f}x", floor("warm tree walk"),
         ratio("warm tree walk") <= 2),
    ]
    for name in ("warm re-read, all files", "cold tree walk", "cold read, all files",
                 "cold sequential read, 2 GiB"):
        ours, theirs = ratio(name), ratio(name, "fuse-overlayfs")
        wanted = "faster than" if name.startswith("warm") else "at least as fast as"
        rows.append((f"{name}: {wanted} fuse-overlayfs", f"{ours:.1f}x vs {theirs:.1f}x",
                     floor(name), ours < theirs if name.startswith("warm") else ours <= theirs))
    deep = "cold tree walk, 127 layers"
    walk127 = ratio(deep)
    rows.append(("cold tree walk of 127 layers within 3x of the plain directory",
                 f"{walk127:.1f}x (overlayfs {ratio(deep, 'overlayfs'):.1f}x, "
                 f"fuse-overlayfs {ratio(deep, 'fuse-overlayfs'):.1f}x)", "-", walk127 <= 3))
    rows.append(("server memory under 300 bytes per merged entry at 100k entries",
                 f"{per_entry:.0f} bytes", "-", per_entry < 300))
    lines = ["| target (issue 4) | this run | pyfuse3 floor | |", "|---|---|---|---|"]
    lines += [f"| {what} | {got} | {low} | {verdict(ok)} |" for what, got, low, ok in rows]
    return "\n".join(lines)


def request_counts() -> dict[str, dict[str, int]]:
    """Requests the layerfs server gets for one warm walk and one warm read of every file."""
    os.environ["LAYERFS_COUNT_REQUESTS"] = "1"
    try:
        with mounted("layerfs", "debian") as (root, _):
            files = regular_files(root)
            walk(root)
            read_files(files)

            def counts() -> dict[str, int]:
                return json.loads(os.getxattr(root, "user.layerfs.stats"))  # type: ignore[no-any-return]

            before = counts()
            walk(root)
            after_walk = counts()
            read_files(files)
            after_read = counts()
    finally:
        os.environ.pop("LAYERFS_COUNT_REQUESTS", None)

    def delta(new: dict[str, int], old: dict[str, int]) -> dict[str, int]:
        return {k: v - old.get(k, 0) for k, v in new.items()
                if v - old.get(k, 0) and k != "getxattr"}

    return {"warm tree walk": delta(after_walk, before),
            "warm re-read, all files": delta(after_read, after_walk)}


def profile(seconds: int = 20) -> str:
    """py-spy the layerfs server during warm walks and re-reads; top frames by self time."""
    out = WORK / "profile.txt"
    with mounted("layerfs", "debian") as (root, _):
        pid = server_pid(root)
        files = regular_files(root)
        spy = subprocess.Popen([_py_spy(), "record", "-p", str(pid), "-d", str(seconds), "-r",
                                "1000", "-f", "raw", "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + seconds - 1
        while time.monotonic() < deadline:
            walk(root)
            read_files(files)
        spy.wait()
    kinds: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        mine = [f for f in frames if "layerfs/fs/" in f and "layerfs/fs/mount.py" not in f]
        leaf = frames[-1]
        if "_thread_cache" in leaf or "get_events" in leaf or "_epoll_wait" in leaf:
            kinds["idle: waiting for the kernel (epoll) or in worker threads"] += n
        elif mine:
            kinds["layerfs handlers (operations.py and below)"] += n
            ours[mine[-1]] += n
        elif "_pyfuse3.py" in leaf:
            kinds["pyfuse3 in C: read /dev/fuse, decode, call, reply"] += n
        else:
            kinds["trio scheduling, locks and the rest"] += n
    lines = [f"{100 * c / total:5.1f}% {k}" for k, c in kinds.most_common()]
    lines += ["", "layerfs frames (self):"]
    lines += [f"{100 * c / total:5.1f}% {f}" for f, c in ours.most_common(8)]
    return "\n".join(lines)


def _py_spy() -> str:
    for candidate in (Path(sys.executable).with_name("py-spy"), Path(PYTHON).with_name("py-spy")):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit("bench_mount: py-spy is missing (pip install py-spy)")
    return found


ANALYSIS = """\
What the numbers say:

- Everything that is a lookup is cheap and flat in depth: the merged tree is one
  dictionary per directory in the server, so a cold stat costs the same from the
  bottom of 127 layers as from the top, about what ext4 takes to read its own
  inodes, and a cold walk of the 127-layer image beats overlayfs and fuse-overlayfs,
  which look each name up layer by layer.
- Everything that is a round trip is expensive, and that is pyfuse3's cost, not
  layerfs's. The "pyfuse3 floor" columns are a pyfuse3 file system with nothing to
  do (`tools/bench/pyfuse3_floor.py`: the whole tree in dictionaries before the
  mount, each handler one lookup or one pread, layerfs's kernel settings). It misses
  the same targets layerfs misses: no pyfuse3 file system reaches them. With the same
  single worker it walks somewhat faster than layerfs (it keeps a ready-made
  attribute object per entry, about 200 bytes each, where layerfs builds one from its
  compact inode table per request) and reads slower. Each request costs tens of microseconds of
  reading /dev/fuse, decoding, calling into Python, replying and trio's scheduling
  (the profile: layerfs's handlers are a few percent of the server's time) where
  fuse-overlayfs spends a few microseconds of C. Warm walks and warm re-reads are
  made of nothing else: the page cache and the dentry cache answer the data and the
  lookups (long entry and attribute timeouts, keep_cache, readdirplus), but the
  kernel still asks for every opendir, readdir (twice per directory: the entries,
  then the end), releasedir, readlink, open and release. pyfuse3 is also what
  stands between layerfs and the kernel flags that would remove those requests:
  `readdir` and `read` receive only the file handle, never the inode, so answering
  OPENDIR or OPEN with ENOSYS (the kernel's "no open" mode, in which it also caches
  directory listings, FOPEN_CACHE_DIR) would leave the handlers unable to tell
  which directory or file is meant; `opendir` cannot return FOPEN_CACHE_DIR; and
  FUSE_CAP_CACHE_SYMLINKS (cached readlink) is a connection flag pyfuse3 never sets.
  What layerfs does about round trips: FLUSH is answered ENOSYS once, which the
  kernel honours (one round trip less per close), and a read-only mount runs one
  pyfuse3 worker task instead of pyfuse3's default pool, which hands every request
  from task to task through a lock (compare the two floor columns); a writable
  mount keeps the pool, so that a long copy-up never holds up other requests.
- Cold reads: small files come from one layer tar, read with pread and the tar's
  own readahead; a big cold read goes to a worker thread and asks the kernel to
  read the next 8 MiB of the tar (fadvise WILLNEED), and the server raises its
  mount's read_ahead_kb to 1 MiB (a FUSE mount starts at 128 KiB and cannot ask
  for more at init), so that the kernel sends 1 MiB reads: sequential reads went
  from about 150 MiB/s to 1 GiB/s. What is left between layerfs and fuse-overlayfs
  on a big sequential read is again pyfuse3's: fuse-overlayfs answers a read with
  the file descriptor and offset (`fuse_reply_data` with an fd buffer, which libfuse
  reads or splices straight into its reply), while a pyfuse3 `read` must return the
  bytes, so every MiB is copied into Python and out again; the floor, with a plain
  pread, is no faster.
- Mount latency is Python's start-up, imports (the command line imports every
  command's module; pyfuse3 and trio alone take about 0.15 s) and reading 127
  index files; memory is about 50 bytes of array columns per inode plus a name and
  a dictionary slot in its directory.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--doc", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument("--profile", action="store_true", help="py-spy the server")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_mount: needs root (mounts, drop_caches)", file=sys.stderr)
        return 1
    for tool in ("fuse-overlayfs", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench_mount: {tool} is missing (apt-get install {tool})", file=sys.stderr)
            return 1
    compile_once()
    info = prepare()
    if args.profile:
        print(profile())
        return 0
    results = measure(args.rounds)
    memory = memory_per_entry()
    text = report(results, memory, info, args.rounds)
    text += "\n\n" + assessment(results, memory[0])
    requests = request_counts()
    text += "\n\nRequests the layerfs server answers (one pass, after a warm-up):\n\n"
    for name, counts in requests.items():
        listed = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        text += f"- {name}: {sum(counts.values())} ({listed})\n"
    if args.doc:
        text += "\nWhere the server's time goes (py-spy, warm walks and re-reads):\n\n```\n"
        text += profile() + "\n```\n"
        text += "\n" + ANALYSIS
    print(text)
    if args.doc:
        update_section("mount", "Mount", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
