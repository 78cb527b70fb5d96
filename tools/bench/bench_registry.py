#!/usr/bin/env python3
"""`layerfs pull`/`push` against a local docker-registry vs `docker pull`/`push` and skopeo.

The image: Debian 12 minbase (tools/debian-rootfs.sh) imported into a private dockerd,
plus three layers added by `docker build` (Python's standard library, /usr/share/perl
and a chunk of /usr/lib, copied from this machine), pushed by docker to a
docker-registry on 127.0.0.1. Then, interleaved, median of the rounds:

* pull: `layerfs pull` into a fresh store; `docker pull` after `docker rmi`;
  `skopeo copy docker:// oci:` into a fresh directory; `skopeo copy docker://
  containers-storage:` into a fresh overlay storage (what `podman pull` does: it
  unpacks every layer into a directory tree, as docker does).
* push: each tool pushes to a fresh, empty registry (so every layer is compressed
  and uploaded: docker keeps no compressed layers, layerfs only a digest); skopeo
  pushes the OCI layout it pulled (already compressed: it only uploads).
* repeat push: the same push again to the same registry (everything is there).
* the floor of a verified pull: the same layer blobs, read from the registry's own
  storage (no HTTP), hashed, inflated with isal, the output hashed, written and
  fsync'd, one process per core, biggest layer first: the least work a pull that
  checks both digests and keeps the uncompressed tar can do, without parsing a
  single tar header; the same floor with each blob downloaded from the registry over
  HTTP instead of read from its storage (what serving the blobs adds); and the same
  floor with layerfs's tar parser run over each inflated layer as it is written (what
  keeping an entry index adds: the least a pull of layerfs's kind can do).

PYTHONDONTWRITEBYTECODE is removed from layerfs's environment (compiling layerfs on
every run is not what a user's pull costs). Writes the section "Pull and push" of
docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ENV,
    PYTHON,
    REPO,
    SETTLE_S,
    Dockerd,
    closing_lines,
    debian_rootfs,
    fresh_memory,
    have_dockerd,
    load_average,
    median,
    remove,
    settle,
    stamp,
    update_section,
)

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PYTHON = os.environ.get("BENCH_PYTHON", PYTHON)
EXTRA = [  # (path on this machine, destination in the image)
    ("/usr/lib/python3.11", "/opt/layer1/python3.11"),
    ("/usr/share/perl", "/opt/layer2/perl"),
    ("/usr/lib/x86_64-linux-gnu/perl", "/opt/layer3/perl-lib"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    def __init__(self, work: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="registry-", dir=work))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "storage")}},
            "http": {"addr": self.host},
        }
        (self.dir / "config.yml").write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            ["/usr/bin/docker-registry", "serve", str(self.dir / "config.yml")],
            stdout=open(self.dir / "log", "wb"),  # noqa: SIM115 - the registry's log
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"registry did not start; see {self.dir}/log")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, capture_output=True, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.decode()[-3000:]}")
    return result  # type: ignore[no-any-return]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, env=ENV)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.decode()[-3000:]}")
    return elapsed


def oci_args(ref: str, oci: Path) -> list[str]:
    return [f"docker://{ref}", f"oci:{oci}:1"]


LAYERFS = REPO / ".venv" / "bin" / "layerfs"  # the installed command, as a user runs it


def layerfs(root: Path, *args: str) -> list[str]:
    command = [str(LAYERFS)] if LAYERFS.exists() else [PYTHON, "-m", "layerfs"]
    return [*command, "--root", str(root), *args]


def build_image(docker: Dockerd, work: Path, ref: str) -> None:
    tarball = str(debian_rootfs())
    sh(docker.cmd("import", tarball, "bench/base:1"))
    context = work / "context"
    context.mkdir()
    lines = ["FROM bench/base:1"]
    for i, (src, dest) in enumerate(EXTRA):
        if Path(src).is_dir():
            shutil.copytree(src, context / f"l{i}", symlinks=True, ignore_dangling_symlinks=True)
            lines.append(f"COPY l{i} {dest}")
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    sh(
        docker.cmd("build", "-q", "-t", ref, str(context)),
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    sh(docker.cmd("rmi", "bench/base:1"))
    shutil.rmtree(context)


def image_facts(docker: Dockerd, ref: str) -> tuple[int, int]:
    out = json.loads(sh(docker.cmd("inspect", ref)).stdout)[0]
    return len(out["RootFS"]["Layers"]), int(out["Size"])


def gzip_codecs() -> str:
    """Compression and inflate speed of the gzip implementations at hand, on a real tar."""
    import importlib
    import zlib

    tarball = str(debian_rootfs())
    with open(tarball, "rb") as f:
        data = f.read(96 << 20)
    codecs = [("zlib", zlib, 1), ("zlib", zlib, 6)]
    for module, name, level in (("isal.isal_zlib", "isal", 1), ("zlib_ng.zlib_ng", "zlib-ng", 1)):
        try:
            codecs.append((name, importlib.import_module(module), level))
        except ImportError:
            continue
    rows = ["| gzip | level | ratio | compress MB/s | inflate MB/s |", "|---|---|---|---|---|"]
    for name, mod, level in codecs:
        start = time.perf_counter()
        c = mod.compressobj(level, zlib.DEFLATED, 31)
        out = b"".join(c.compress(data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20))
        out += c.flush()
        packed = time.perf_counter() - start
        start = time.perf_counter()
        d = mod.decompressobj(31)
        size = sum(len(d.decompress(out[i : i + (1 << 20)])) for i in range(0, len(out), 1 << 20))
        unpacked = time.perf_counter() - start
        assert size == len(data)
        rows.append(
            f"| {name} | {level} | {len(out) / len(data):.3f} | {len(data) / packed / 1e6:.0f} "
            f"| {len(data) / unpacked / 1e6:.0f} |"
        )
    return "\n".join(rows)


def _inflate_to(src: BinaryIO, out: Path) -> str:
    """Hash what ``src`` gives, inflate it, hash and write that to ``out``, fsync; the
    hex digest of what was read."""
    from isal import isal_zlib

    blob_hash, tar_hash = hashlib.sha256(), hashlib.sha256()
    inflater = isal_zlib.decompressobj(31)
    with open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            blob_hash.update(chunk)
            data = inflater.decompress(chunk)
            tar_hash.update(data)
            dst.write(data)
        dst.flush()
        os.fsync(dst.fileno())
    return blob_hash.hexdigest()


def inflate_and_hash(blob: Path, out: Path) -> None:
    """Hash ``blob`` (checked against its name), inflate it, hash and write it, fsync."""
    with open(blob, "rb") as src:
        hex_digest = _inflate_to(src, out)
    # docker-registry keeps a blob as blobs/sha256/<2 hex>/<hex>/data.
    if hex_digest != blob.parent.name:
        raise RuntimeError(f"{blob}: content does not hash to its name")


def inflate_and_hash_url(url: str, out: Path) -> None:
    """inflate_and_hash of a blob downloaded from the registry (checked against its digest)."""
    with urllib.request.urlopen(url, timeout=60) as src:
        hex_digest = _inflate_to(src, out)
    if "sha256:" + hex_digest != url.rsplit("/", 1)[1]:
        raise RuntimeError(f"{url}: content does not hash to its digest")


class _Inflating:
    """A blob file read inflated (isal), its sha256 taken on the way."""

    def __init__(self, path: Path) -> None:
        from isal import isal_zlib

        self.hash = hashlib.sha256()
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._inflater = isal_zlib.decompressobj(31)

    def read(self, size: int = -1) -> bytes:
        while chunk := self._file.read(1 << 20):
            self.hash.update(chunk)
            data = self._inflater.decompress(chunk)
            if data:
                return data
        return b""

    def close(self) -> None:
        self._file.close()


def inflate_and_index(blob: Path, out: Path) -> None:
    """inflate_and_hash, with layerfs's tar parser over the inflated stream (the sink)."""
    from layerfs.store.tarindex import index_tar

    source = _Inflating(blob)
    try:
        with open(out, "wb") as dst:
            index_tar(source, dst)
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        source.close()
    if source.hash.hexdigest() != blob.parent.name:
        raise RuntimeError(f"{blob}: content does not hash to its name")


def pull_floor(
    pool: ProcessPoolExecutor,
    blobs: list[Path],
    out: Path,
    urls: list[str] | None = None,
    index: bool = False,
) -> float:
    """Seconds to inflate and hash every blob, one process per core (see the docstring)."""
    out.mkdir()
    start = time.perf_counter()
    if urls is not None:
        jobs = [pool.submit(inflate_and_hash_url, u, out / u[-64:]) for u in urls]
    elif index:
        jobs = [pool.submit(inflate_and_index, b, out / b.parent.name) for b in blobs]
    else:
        jobs = [pool.submit(inflate_and_hash, b, out / b.parent.name) for b in blobs]
    for job in jobs:
        job.result()
    took = time.perf_counter() - start
    shutil.rmtree(out)
    return took


def floor_command(out: Path, blobs: list[Path]) -> None:
    """The index floor as a command of its own (``--floor-command``): this fresh process
    imports the HTTP stack a pull needs, forks a worker per core and indexes the blobs."""
    import multiprocessing

    import requests  # noqa: F401 - what a pull in Python imports before its first request

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        pull_floor(pool, blobs, out, index=True)


def command_floor(blobs: list[Path], out: Path) -> float:
    """Seconds floor_command takes, from the start of its process to its exit."""
    return timed([PYTHON, __file__, "--floor-command", str(out), *map(str, blobs)])


def remove_containers_storage(storage: Path) -> None:
    """containers-storage bind-mounts its overlay directory on itself: unmount, then remove."""
    subprocess.run(["umount", "-R", str(storage / "root" / "overlay")], capture_output=True)
    shutil.rmtree(storage, ignore_errors=True)


def layer_blobs(registry_dir: Path) -> list[Path]:
    """The gzip blobs in a docker-registry's storage, biggest first."""
    blobs = []
    for data in (registry_dir / "storage").rglob("data"):
        with open(data, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                blobs.append(data)
    return sorted(blobs, key=lambda p: -p.stat().st_size)


def main() -> None:
    if not have_dockerd() or not shutil.which("skopeo"):
        sys.exit("needs root, dockerd, docker-registry and skopeo")
    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=str(Path.home())))
    registries: list[Registry] = []
    pull: dict[str, list[float]] = {
        "layerfs pull": [],
        "docker pull": [],
        "skopeo copy (oci:)": [],
        "skopeo copy (containers-storage:)": [],
    }
    floor: list[float] = []
    http_floor: list[float] = []
    index_floor: list[float] = []
    command_floors: list[float] = []
    load_start = load_average()
    cores = os.cpu_count() or 1
    pool = ProcessPoolExecutor(cores)
    push: dict[str, list[float]] = {"layerfs push": [], "docker push": [], "skopeo copy": []}
    again: dict[str, list[float]] = {"layerfs push": [], "docker push": [], "skopeo copy": []}
    python_floor: dict[str, list[float]] = {"pass": [], "import requests": []}
    docker = Dockerd()
    try:
        docker.__enter__()
        source = Registry(work)
        registries.append(source)
        ref = f"{source.host}/bench/debian:1"
        build_image(docker, work, ref)
        layers, size = image_facts(docker, ref)
        sh(docker.cmd("push", ref))
        compressed = sum(
            f.stat().st_size for f in (source.dir / "storage").rglob("data") if f.is_file()
        )
        sh(docker.cmd("rmi", ref))
        stores = work / "stores"
        stores.mkdir()
        blobs = layer_blobs(source.dir)
        urls = [f"http://{source.host}/v2/bench/debian/blobs/sha256:{b.parent.name}" for b in blobs]
        list(pool.map(abs, range(cores)))  # the workers start outside the timing
        first_touch, warm_touch = fresh_memory()
        timed(layerfs(stores / "warm", "images"))  # layerfs's compiled modules are cached
        for n in range(ROUNDS):
            settle()
            floor.append(pull_floor(pool, blobs, work / "floor"))
            settle()
            http_floor.append(pull_floor(pool, blobs, work / "floor", urls))
            settle()
            index_floor.append(pull_floor(pool, blobs, work / "floor", index=True))
            settle()
            command_floors.append(command_floor(blobs, work / "floor"))
            order = list(pull)[n % len(pull) :] + list(pull)[: n % len(pull)]
            for tool in order:
                settle()
                if tool == "layerfs pull":
                    root = stores / f"pull-{n}"
                    pull[tool].append(timed(layerfs(root, "pull", "-q", ref)))
                    if n < ROUNDS - 1:
                        remove(root)
                elif tool == "docker pull":
                    pull[tool].append(timed(docker.cmd("pull", "-q", ref)))
                    if n < ROUNDS - 1:
                        sh(docker.cmd("rmi", ref))
                elif tool == "skopeo copy (oci:)":
                    oci = work / f"oci-{n}"
                    pull[tool].append(
                        timed(
                            ["skopeo", "copy", "-q", "--src-tls-verify=false", *oci_args(ref, oci)]
                        )
                    )
                else:
                    storage = work / f"containers-storage-{n}"
                    destination = (
                        f"containers-storage:[overlay@{storage}/root+{storage}/run]bench/debian:1"
                    )
                    pull[tool].append(
                        timed(
                            [
                                "skopeo",
                                "copy",
                                "-q",
                                "--src-tls-verify=false",
                                f"docker://{ref}",
                                destination,
                            ]
                        )
                    )
                    remove_containers_storage(storage)
        store = stores / f"pull-{ROUNDS - 1}"
        oci = work / f"oci-{ROUNDS - 1}"
        for n in range(ROUNDS):
            targets = {}
            for tool in push:
                reg = Registry(work)
                registries.append(reg)
                targets[tool] = f"{reg.host}/bench/debian:1"
            order = list(push)[n % 3 :] + list(push)[: n % 3]
            for tool in order:
                target = targets[tool]
                if tool == "layerfs push":
                    sh(layerfs(store, "tag", ref, target))
                    cmd = layerfs(store, "push", "-q", target)
                elif tool == "docker push":
                    sh(docker.cmd("tag", ref, target))
                    cmd = docker.cmd("push", "-q", target)
                else:
                    cmd = [
                        "skopeo",
                        "copy",
                        "-q",
                        "--dest-tls-verify=false",
                        f"oci:{oci}:1",
                        f"docker://{target}",
                    ]
                push[tool].append(timed(cmd))
                again[tool].append(timed(cmd))
                if tool == "docker push":
                    sh(docker.cmd("rmi", target))
                if tool == "layerfs push":
                    sh(layerfs(store, "rmi", target))
            for code in python_floor:
                python_floor[code].append(timed([PYTHON, "-c", code]))
            for reg in registries[1:]:
                reg.stop()
            del registries[1:]
    finally:
        pool.shutdown()
        for reg in registries:
            reg.stop()
        docker.__exit__(None, None, None)
        for storage in work.glob("containers-storage-*"):
            remove_containers_storage(storage)
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()

    def table(results: dict[str, list[float]], base: str) -> str:
        rows = ["| tool | median s | ratio to layerfs |", "|---|---|---|"]
        ref_time = median(results[base])
        for tool, values in results.items():
            rows.append(f"| {tool} | {median(values):.2f} | {median(values) / ref_time:.2f}x |")
        return "\n".join(rows)

    from layerfs.transports.registry import FAST_GZIP

    pull_ratio = median(pull["layerfs pull"]) / median(floor)
    podman_ratio = median(pull["layerfs pull"]) / median(pull["skopeo copy (containers-storage:)"])
    push_ratio = median(again["layerfs push"]) / median(again["docker push"])

    index_s = median(index_floor)
    requests_s = median(python_floor["import requests"])

    def verdict(met: bool) -> str:
        return "met" if met else "**missed**"

    codecs = gzip_codecs()

    body = f"""{stamp()}

Image: Debian 12 minbase (`tools/debian-rootfs.sh`) plus {len(EXTRA)} layers added by
`docker build` (Python's standard library, Perl's modules), {layers} layers,
{size / 1e6:.0f} MB uncompressed, {compressed / 1e6:.0f} MB as pushed by docker; a
docker-registry on 127.0.0.1 (plain http); median of {ROUNDS} interleaved rounds. A ratio
above 1 means slower than layerfs.

Pull (`layerfs pull` into a fresh store: download 3 layers at a time, biggest first,
decompress, hash blob and tar, index, fsync, big layers in a worker process per core;
`docker pull` after `docker rmi`: download, decompress, extract into overlay2; `skopeo
copy docker:// oci:` into a fresh directory: download and write the compressed blobs;
`skopeo copy docker:// containers-storage:` into a fresh overlay storage, as `podman pull`
does: download, decompress, extract):

{table(pull, "layerfs pull")}

skopeo does the least work: it keeps the blobs compressed and never inflates, hashes the
tar or indexes it. layerfs stores what a mount needs (the uncompressed tar, its entry
index, fsync'd), so a pull inflates {size / 1e6:.0f} MB and parses every tar header in
Python; docker inflates and creates every file.

The floor of a verified pull, measured in the same rounds: the same {len(blobs)} blobs read
from the registry's storage (no HTTP), each hashed, inflated with isal, its tar hashed,
written and fsync'd, {cores} processes (one per core), biggest layer first, no tar
header parsed: **{median(floor):.2f} s**, against {median(pull["skopeo copy (oci:)"]):.2f} s for
skopeo's whole copy. A pull that checks the diff IDs and stores the uncompressed tar
cannot beat that floor; layerfs pull takes {pull_ratio:.2f}x the floor. The same floor with
every blob downloaded from the registry over HTTP (urllib, one connection per blob) instead
of read from its storage: **{median(http_floor):.2f} s** ({median(http_floor) / median(floor):.2f}x
the floor): what the registry's serving and the HTTP transfer add on this machine, where
the registry shares the two cores with the puller. The same floor with layerfs's tar
parser run over each inflated layer as it is written (the entry index a mount needs,
without which layerfs would have to read every layer again at mount time):
**{index_s:.2f} s** ({index_s / median(floor):.2f}x the floor); layerfs pull takes
{median(pull["layerfs pull"]) / index_s:.2f}x that. The floors run in processes started
before the timing; a `layerfs pull` starts Python and imports the HTTP stack before its
first request ({requests_s:.3f} s for `python -c "import requests"`, measured below). With
that added, the floor is {median(floor) + requests_s:.2f} s and layerfs pull takes
{median(pull["layerfs pull"]) / (median(floor) + requests_s):.2f}x it; the floor with the
index, {index_s + requests_s:.2f} s, and
{median(pull["layerfs pull"]) / (index_s + requests_s):.2f}x it: what a pull written in
Python that keeps the index could come down to is that. The same index floor run as a
command of its own (a fresh Python process that imports `requests`, forks a worker per
core and indexes the blobs, timed from its start to its exit):
**{median(command_floors):.2f} s**; layerfs pull takes
{median(pull["layerfs pull"]) / median(command_floors):.2f}x that.

Every pull and floor above starts after a {SETTLE_S:.0f} s pause. On this machine,
writing into page cache memory that was not in use in the last second costs
{first_touch:.2f} ms per MB (the host backs the guest's freed pages again on first
touch), and {warm_touch:.2f} ms per MB into pages just freed: a command run right after
another one removed its output writes {first_touch / warm_touch:.0f}x faster. Without
the pause, the floors, which ran one after another, got the warm pages.

| target (issue 14) | this run | |
|---|---|---|
| pull within 1.3x of the verified-pull floor | {pull_ratio:.2f}x | {verdict(pull_ratio <= 1.3)} |
| pull faster than `skopeo copy docker:// containers-storage:` | {podman_ratio:.2f}x its time \
| {verdict(podman_ratio < 1)} |
| repeat push within 2x of `docker push` | {push_ratio:.2f}x | {verdict(push_ratio <= 2)} |

Push to a fresh, empty registry (layerfs gzips each layer with {FAST_GZIP} at level 1 and
uploads it; docker re-compresses with Go's gzip; skopeo uploads the already compressed
blobs of the OCI layout it pulled):

{table(push, "layerfs push")}

Repeat push of the same image to the same registry (layerfs knows each layer's
compressed digest and size, so it builds the manifest it would push and sends one HEAD
for it: the same digest, nothing else to do; docker checks each layer, then puts the
manifest again):

{table(again, "layerfs push")}

What a push written in Python pays before its first request, in the same rounds: the
interpreter's start-up (`python -c pass`) {median(python_floor["pass"]):.3f} s, and with the
HTTP stack the registry client is built on (`python -c "import requests"`)
{requests_s:.3f} s, {requests_s / median(again["docker push"]):.2f}x docker's whole repeat push.

The gzip implementations on the first 96 MB of the same Debian tar (one thread): why
layers are compressed with ISA-L's igzip at level 1 on push, and inflated with it on
pull (`isal` is a dependency; zlib-ng was measured and not taken):

{codecs}

{closing_lines(load_start, load_end, "bench_registry.py")}
"""
    print(body)
    update_section("registry", "Pull and push", body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor-command"]:
        floor_command(Path(sys.argv[2]), [Path(b) for b in sys.argv[3:]])
    else:
        main()
