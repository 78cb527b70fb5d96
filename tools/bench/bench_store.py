#!/usr/bin/env python3
"""Everyday commands on a store of 1,000 images and 10,000 layers vs an almost empty one.

Two stores are built through the store API (the copy pipeline, as a pull writes them,
fsync deferred to one `sync` at the end so that the build takes seconds, not CLI calls):

* big: 1,000 images `bench/img-N:1` of 10 small layers each (10,000 layers and graph
  nodes, a tag and a digest reference per image, every layer under a blob digest);
* small: 1 such image.

Both also get one extra image per round for `rmi` to remove. Then, interleaved, each
command runs once per round in a fresh process on each store (the CLI as a user runs
it): `inspect`, `history`, `tag` (a new tag each round), `rmi` (untag and delete a
10-layer image), `pull -q` of a small image (1 layer of 1 MB) from a docker-registry on
127.0.0.1 (removed again outside the timing), `images` twice (the first after that
change to the graph, the second with the graph settled), `images -a` and `fsck` (without
--verify). Reported: the median per command and store, and the ratio big/small.

Also measured: the floor of `fsck` without --verify, a bare Python loop that reads the
files it must read (every node's four small files, every layer's info.json) and stats
the two it only looks at (layer.tar, index), in a fresh process; and the floors of both
`images` (IMAGES_FLOOR and IMAGES_CHANGED_FLOOR below), the same way.

Writes the section "A store of 1,000 images" of docs/benchmarks.md. Not a test.
`BENCH_IMAGES`, `BENCH_LAYERS` and `BENCH_ROUNDS` change the sizes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import REPO, closing_lines, load_average, median, stamp, update_section

IMAGES = int(os.environ.get("BENCH_IMAGES", "1000"))
LAYERS = int(os.environ.get("BENCH_LAYERS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "9"))
LAYERFS = os.environ.get("BENCH_LAYERFS", str(REPO / ".venv" / "bin" / "layerfs"))


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def small_tar(seed: str) -> bytes:
    """A layer of three small files whose content depends on ``seed``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("etc", f"etc/{seed}"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tar.addfile(info)
        for i in range(3):
            data = f"{seed} file {i}\n".encode() * 8
            info = tarfile.TarInfo(f"etc/{seed}/f{i}")
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build(root: Path, names: list[str]) -> None:
    """Images ``names`` (``repo:tag``) of LAYERS fresh layers each, as pulls write them."""
    from layerfs.copy import copy
    from layerfs.model.manifest import MEDIA_DOCKER_LAYER_GZIP
    from layerfs.store.store import Store
    from layerfs.transports.base import ImageSource, LayerDesc, SourceImage
    from layerfs.transports.local import StoreDestination

    class MemorySource(ImageSource):
        def __init__(self, images: list[SourceImage]) -> None:
            self._images = images

        def images(self) -> list[SourceImage]:
            return self._images

        def open_layer(self, image: SourceImage, index: int) -> io.BytesIO:
            return io.BytesIO(image.extra["blobs"][index])

        def close(self) -> None:
            pass

    images = []
    for name in names:
        tars = [small_tar(f"{name.replace('/', '_').replace(':', '_')}-{k}") for k in range(LAYERS)]
        blobs = [gzip.compress(t, compresslevel=1, mtime=0) for t in tars]
        history = [
            {"created": f"2024-01-01T00:00:{k:02d}Z", "created_by": f"/bin/sh -c step {k}"}
            for k in range(LAYERS)
        ]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": f"2024-01-01T00:00:{LAYERS:02d}Z",
                "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"], "Labels": {"n": name}},
                "history": history,
                "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in tars]},
            },
            sort_keys=True,
        ).encode()
        layers = [
            LayerDesc(digest(t), digest(b), len(b), MEDIA_DOCKER_LAYER_GZIP)
            for t, b in zip(tars, blobs, strict=True)
        ]
        image = SourceImage(config=config, layers=layers, references=[name], name=name)
        image.manifest_digest = digest(config + b"manifest")
        image.extra["blobs"] = blobs
        images.append(image)
    store = Store.open(root)
    fsync = os.fsync
    os.fsync = lambda fd: None  # one sync at the end: the store's layout is what is measured
    try:
        copy(MemorySource(images), StoreDestination(store), keep_going=False)
    finally:
        os.fsync = fsync
    os.sync()


# What `images` must do at least with the store as it is, in bare Python: read the node
# summaries (index/graph), check their stamp against graph/, read the tags, and print a
# row per tag of each leaf and named node with its chain's size, newest first. The rows
# of nodes that are no leaf are unpacked only when a name points at one.
_FLOOR_READ = r"""
import json, os, sys
import msgpack
root = sys.argv[1]
with open(f"{root}/index/graph", "rb") as f:
    doc = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
with open(f"{root}/repositories.json", "rb") as f:
    repositories = json.load(f)["Repositories"]
names = {}
for repo, refs in repositories.items():
    for ref, image_id in refs.items():
        if ":" not in ref:
            names.setdefault(image_id, []).append((repo, ref))
lines = []
"""
_FLOOR_PRINT = r"""
lines.sort(key=lambda line: line.split("\t")[3], reverse=True)
sys.stdout.write("\n".join(lines) + "\n")
"""
IMAGES_FLOOR = (
    _FLOOR_READ
    + r"""
st = os.stat(f"{root}/graph")
fresh = doc["stamp"] == [st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink]
leaves = doc["leaves"]
rows = leaves
if any(i not in leaves for i in names):
    rows = {**leaves, **msgpack.unpackb(doc["inner"], raw=False, strict_map_key=False)}
for image_id in {*leaves, *(i for i in names if i in rows)}:
    row = rows[image_id]
    for repo, tag in names.get(image_id, [("<none>", "<none>")]):
        lines.append(f"{repo}\t{tag}\t{image_id[:12]}\t{row[3]}\t{row[5]}")
"""
    + _FLOOR_PRINT
)

# What `images` must do at least right after the graph changed, when no cached stamp
# holds and the summaries are checked against a listing of graph/: read every row, list
# graph/ with its inodes, find the leaves, add up the chains and print as above.
IMAGES_CHANGED_FLOOR = (
    _FLOOR_READ
    + r"""
rows = {**doc["leaves"], **msgpack.unpackb(doc["inner"], raw=False, strict_map_key=False)}
with os.scandir(f"{root}/graph") as entries:
    inodes = {e.name: e.inode() for e in entries}
rows = {i: r for i, r in rows.items() if inodes.get(i) == r[4]}
parents = {row[0] for row in rows.values()}
sizes = {}
for image_id, row in rows.items():
    if image_id in parents and image_id not in names:
        continue
    chain, node = [], image_id
    while node and node not in sizes:
        chain.append(node)
        node = rows[node][0]
    total = sizes.get(node, 0)
    for node in reversed(chain):
        total += rows[node][2]
        sizes[node] = total
    for repo, tag in names.get(image_id, [("<none>", "<none>")]):
        lines.append(f"{repo}\t{tag}\t{image_id[:12]}\t{row[3]}\t{total}")
"""
    + _FLOOR_PRINT
)

FSCK_FLOOR = """
import os, sys
root = sys.argv[1]
for name in os.listdir(f"{root}/graph"):
    for part in ("json", "parent", "layer", "layersize"):
        try:
            with open(f"{root}/graph/{name}/{part}", "rb") as f:
                f.read()
        except FileNotFoundError:
            pass
for name in os.listdir(f"{root}/layers"):
    with open(f"{root}/layers/{name}/info.json", "rb") as f:
        f.read()
    os.stat(f"{root}/layers/{name}/layer.tar")
    os.stat(f"{root}/layers/{name}/index")
"""


CHANGED = "images, first after a change"
FLOORS = {  # command → (row, floor program)
    "images": ("images floor", IMAGES_FLOOR),
    CHANGED: ("images floor, graph changed", IMAGES_CHANGED_FLOOR),
    "fsck": ("fsck floor", FSCK_FLOOR),
}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.decode()[-3000:]}")
    return elapsed


def main() -> None:
    from bench_registry import Registry

    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=str(Path.home())))
    registry = None
    load_start = load_average()
    try:
        big, small = work / "big", work / "small"
        extra = [f"bench/rmi-{n}:1" for n in range(ROUNDS)]
        started = time.perf_counter()
        build(big, [f"bench/img-{n}:1" for n in range(IMAGES)] + extra)
        built = time.perf_counter() - started
        build(small, [f"bench/img-{IMAGES // 2}:1", *extra])
        layer_count = len(list((big / "layers").iterdir()))
        node_count = len(list((big / "graph").iterdir()))

        registry = Registry(work)
        pulled = f"{registry.host}/bench/small:1"
        rootfs = work / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            info = tarfile.TarInfo("data/blob")
            info.size = 1 << 20
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))
        source = work / "source"
        subprocess.run(
            [LAYERFS, "--root", str(source), "import", str(rootfs), pulled],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [LAYERFS, "--root", str(source), "push", "-q", pulled], check=True, capture_output=True
        )

        middle = f"bench/img-{IMAGES // 2}:1"  # in both stores
        # The pull's image is removed again right after it (untimed): the next `images`
        # is the first after a change to the graph, the one after it finds it settled.
        commands: dict[str, list[str]] = {
            "inspect": ["inspect", middle],
            "history": ["history", middle],
            "tag": ["tag", middle, "bench/tagged:{n}"],
            "rmi": ["rmi", "bench/rmi-{n}:1"],
            "pull (1 MB image)": ["pull", "-q", pulled],
            CHANGED: ["images"],
            "images": ["images"],
            "images -a": ["images", "-a"],
            "fsck": ["fsck"],
        }
        times: dict[tuple[str, str], list[float]] = {}
        for n in range(ROUNDS):
            for name, args in commands.items():
                stores = [("small", small), ("big", big)]
                for label, root in stores if n % 2 else reversed(stores):
                    cmd = [LAYERFS, "--root", str(root), *(a.format(n=n) for a in args)]
                    times.setdefault((name, label), []).append(timed(cmd))
                    if name in FLOORS:
                        floor = [sys.executable, "-c", FLOORS[name][1], str(root)]
                        times.setdefault((FLOORS[name][0], label), []).append(timed(floor))
                    if name.startswith("pull"):
                        subprocess.run(
                            [LAYERFS, "--root", str(root), "rmi", pulled],
                            check=True,
                            capture_output=True,
                        )
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()

    rows = [
        f"| command | almost empty store, ms | {IMAGES:,} images, ms | ratio | within 1.5x |",
        "|---|---|---|---|---|",
    ]
    targets = ("images", CHANGED, "inspect", "tag", "rmi", "pull (1 MB image)", "fsck")
    for name in [*commands, *(floor for floor, _ in FLOORS.values())]:
        t_small, t_big = median(times[(name, "small")]), median(times[(name, "big")])
        ratio = t_big / t_small
        verdict = ("met" if ratio <= 1.5 else "**missed**") if name in targets else "-"
        rows.append(
            f"| {name} | {t_small * 1000:.0f} | {t_big * 1000:.0f} | {ratio:.2f}x | {verdict} |"
        )
    table = "\n".join(rows)

    def best(command: str) -> float:
        """The command's time on the small store plus what its floor adds on the big one,
        against its time on the small store: the best ratio it could reach."""
        floor, small = FLOORS[command][0], median(times[(command, "small")])
        return (small + median(times[(floor, "big")]) - median(times[(floor, "small")])) / small

    floor_best, changed_best = best("images"), best(CHANGED)
    body = f"""{stamp()}

The big store: {IMAGES} images of {LAYERS} layers ({layer_count} layers, {node_count} graph
nodes, {IMAGES + ROUNDS} tags and as many digest references), built through the store API
in {built:.0f} s; the almost empty store: 1 image. Each command runs in a fresh process
(`{Path(LAYERFS).name}`, the installed command line); median of {ROUNDS} interleaved rounds.
`tag` adds a new tag, `rmi` removes an untagged 10-layer image, `pull` fetches a 1-layer
image of 1 MB from a docker-registry on 127.0.0.1 into the store, `fsck` checks without
--verify.

{table}

"{CHANGED}" runs right after a change to the graph (the pulled image removed
again), when the cached node summaries' stamp no longer holds: it lists `graph/`, checks
every row against it and writes the summaries anew. `images` runs next and finds them
settled: it reads `index/graph` and the tags and nothing else.

"fsck floor" is the loop described in the tool's docstring: what reading the files that
`fsck` checks costs in Python, before checking anything. "images floor" is the least
`images` does with a settled store, in bare Python: read the node summaries
(`index/graph`), check their stamp against `graph/`, read the tags and print a row per
tag of each leaf and named node with its chain's size. The best `images` could do on the
big store is its time on the small one plus what the floor adds: {floor_best:.2f}x.
"images floor, graph changed" is the least the first `images` after a change does: read
every row, list `graph/` with its inodes, keep the rows that match, find the leaves, add
up the chains and print: {changed_best:.2f}x at best.

{closing_lines(load_start, load_end, "bench_store.py")}
"""
    print(body)
    update_section("store", "A store of 1,000 images", body)


if __name__ == "__main__":
    main()
