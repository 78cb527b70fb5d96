#!/usr/bin/env python3
"""layerfs-load / layerfs-save against docker load / docker save and skopeo, same archive.

The archive is a multi-layer Debian image assembled directly (no network, no containers):
layer 1 is Debian 12 minbase (tools/debian-rootfs.sh), layer 2 what the "large" rootfs
adds to it (python3, perl, git), layer 3 a few changed files and whiteouts; the "large"
archive adds a 256 MB layer of incompressible data. Timed, interleaved, median of the
rounds, on the medium archive:

* ``layerfs-load -i`` into a fresh store / ``docker load -i`` into an engine that does not
  have the layers / ``skopeo copy docker-archive: oci:`` into a fresh directory;
* ``layerfs-save -o`` / ``docker save -o`` of the loaded image.

Peak memory (``ru_maxrss`` of the child, from ``wait4``) of layerfs-load, layerfs-save and
skopeo for the small, medium and large archives shows whether it stays flat as archives
grow (dockerd's memory is the daemon's, not a child's, and is not measured).
"""

from __future__ import annotations

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

from common import PYTHON, Dockerd, debian_rootfs, have_dockerd, median, stamp, update_section

ROUNDS = 5
TAG = "bench/debian:archive"


# -- building the archive -------------------------------------------------------------------


def _added_layer(minbase: Path, large: Path, out: Path) -> None:
    """What the large rootfs has that minbase has not, as a layer tar."""
    with tarfile.open(minbase) as base:
        known = {m.name.removeprefix("./").rstrip("/") for m in base}
    written: set[str] = set()
    with tarfile.open(large) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            name = member.name.removeprefix("./").rstrip("/")
            if not name or name in known:
                continue
            if member.islnk():
                target = member.linkname.removeprefix("./").rstrip("/")
                if target not in written:
                    continue  # its target is in the lower layer: not representable here
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            written.add(name)


def _small_layer(out: Path) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/motd", b"benchmark\n"), ("etc/bench.conf", b"x = 1\n" * 100)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for gone in ("usr/share/doc/.wh.dpkg", "var/log/.wh.dpkg.log"):
            tar.addfile(tarfile.TarInfo(gone))


def _random_layer(out: Path, size: int) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        chunk = 64 << 20
        for index in range(size // chunk):
            info = tarfile.TarInfo(f"data/blob{index}")
            info.size = chunk
            tar.addfile(info, io.BytesIO(os.urandom(chunk)))


def _sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _archive(layers: list[Path], out: Path) -> None:
    """A docker-archive (Docker 1.10-24 layout) of one image with these layers."""
    diff_ids = [_sha256_file(p) for p in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/bash"], "Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2024-01-01T00:00:00Z"} for _ in layers],
        },
        sort_keys=True,
    ).encode()
    import hashlib

    config_hex = hashlib.sha256(config).hexdigest()
    with tarfile.open(out, "w") as tar:
        paths = []
        for index, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
            directory = hashlib.sha256(f"{index}{diff_id}".encode()).hexdigest()
            tar.add(layer, f"{directory}/layer.tar")
            paths.append(f"{directory}/layer.tar")
        for name, data in (
            (f"{config_hex}.json", config),
            (
                "manifest.json",
                json.dumps(
                    [{"Config": f"{config_hex}.json", "RepoTags": [TAG], "Layers": paths}]
                ).encode(),
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def build(work: Path) -> dict[str, Path]:
    minbase, large = debian_rootfs("minbase"), debian_rootfs("large")
    added, small, noise = (work / f"{n}-layer.tar" for n in ("added", "small", "noise"))
    _added_layer(minbase, large, added)
    _small_layer(small)
    _random_layer(noise, 256 << 20)
    archives = {
        "small": [minbase, small],
        "medium": [minbase, added, small],
        "large": [minbase, added, small, noise],
    }
    paths = {}
    for name, layers in archives.items():
        paths[name] = work / f"{name}.tar"
        _archive(layers, paths[name])
    for path in (added, small, noise):
        path.unlink()
    return paths


# -- running --------------------------------------------------------------------------------


def measure(argv: list[str], *, daemon: int | None = None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in MB) of one command.

    GNU time runs it, so its peak RSS is its own (a child forked from Python would carry
    this process's). With ``daemon`` (dockerd's pid) the CPU that process tree spent
    meanwhile is added: docker load and save do their work in the daemon.
    """
    report = Path(tempfile.mktemp(prefix="bench-time-"))
    before = _tree_cpu(daemon) if daemon else 0.0
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-o", str(report), "-f", "%U %S %M", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - start
    after = _tree_cpu(daemon) if daemon else 0.0
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed: {result.stderr.decode(errors='replace')[-2000:]}")
    user, system, rss_kb = report.read_text().split()[-3:]
    report.unlink()
    return elapsed, float(user) + float(system) + after - before, int(rss_kb) // 1024


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        fields = stats.get(current)
        if fields is not None:
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        pending.extend(children.get(current, []))
    return total / ticks


def layerfs(root: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "layerfs", "--root", str(root), *args]


class Engine(Dockerd):
    """The shared private engine, stopped by the process id this benchmark started."""

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        subprocess.run(["umount", "-R", "-l", str(self.dir / "root")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    if not have_dockerd() or shutil.which("skopeo") is None:
        sys.exit("bench_archive needs root, dockerd and skopeo")
    work = Path(tempfile.mkdtemp(prefix="bench-archive-", dir=str(Path.home())))
    try:
        archives = build(work)
        with Engine() as docker:
            body = run_all(work, archives, docker)
        update_section("archive", "Load and save", body)
        print(body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def run_all(work: Path, archives: dict[str, Path], docker: Engine) -> str:
    medium = archives["medium"]
    size_mb = medium.stat().st_size / 1e6
    times: dict[str, list[float]] = {
        "layerfs-load": [],
        "docker load": [],
        "skopeo copy docker-archive: oci:": [],
        "layerfs-save": [],
        "docker save": [],
    }
    cpus: dict[str, list[float]] = {name: [] for name in times}
    load_before = f"{os.getloadavg()[0]:.1f}"
    assert docker.proc is not None
    pid = docker.proc.pid
    store = work / "store"
    for round_no in range(ROUNDS):
        subprocess.run(["cat", str(medium)], stdout=subprocess.DEVNULL, check=True)
        order = ["layerfs-load", "docker load", "skopeo copy docker-archive: oci:"]
        order = order[round_no % 3 :] + order[: round_no % 3]
        for name in order:
            if name == "layerfs-load":
                _fresh(store)
                seconds, cpu, _ = measure(layerfs(store, "load", "-q", "-i", str(medium)))
            elif name == "docker load":
                subprocess.run(docker.cmd("rmi", "-f", TAG), capture_output=True)
                seconds, cpu, _ = measure(docker.cmd("load", "-q", "-i", str(medium)), daemon=pid)
            else:
                target = _fresh(work / "oci")
                seconds, cpu, _ = measure(
                    [
                        "skopeo",
                        "--insecure-policy",
                        "copy",
                        "-q",
                        f"docker-archive:{medium}",
                        f"oci:{target}:x",
                    ]
                )
            times[name].append(seconds)
            cpus[name].append(cpu)
            print(f"round {round_no}: {name} {seconds:.2f} s, {cpu:.2f} s CPU", flush=True)
        for name in (
            ["layerfs-save", "docker save"]
            if round_no % 2 == 0
            else ["docker save", "layerfs-save"]
        ):
            out = work / "saved.tar"
            out.unlink(missing_ok=True)
            if name == "layerfs-save":
                seconds, cpu, _ = measure(layerfs(store, "save", "-q", "-o", str(out), TAG))
            else:
                seconds, cpu, _ = measure(docker.cmd("save", "-o", str(out), TAG), daemon=pid)
            times[name].append(seconds)
            cpus[name].append(cpu)
            print(f"round {round_no}: {name} {seconds:.2f} s, {cpu:.2f} s CPU", flush=True)
    memory: dict[str, dict[str, int]] = {"layerfs-load": {}, "layerfs-save": {}, "skopeo copy": {}}
    sizes = {}
    for label, archive in archives.items():
        sizes[label] = archive.stat().st_size / 1e6
        _fresh(store)
        memory["layerfs-load"][label] = measure(layerfs(store, "load", "-q", "-i", str(archive)))[2]
        out = work / "saved.tar"
        out.unlink(missing_ok=True)
        saved = measure(layerfs(store, "save", "-q", "-o", str(out), TAG))
        memory["layerfs-save"][label] = saved[2]
        target = _fresh(work / "oci")
        memory["skopeo copy"][label] = measure(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "-q",
                f"docker-archive:{archive}",
                f"oci:{target}:x",
            ]
        )[2]
    return report(times, cpus, memory, sizes, size_mb) + (
        f"\nLoad average (1 min) while measuring: {load_before} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.\n"
    )


def report(
    times: dict[str, list[float]],
    cpus: dict[str, list[float]],
    memory: dict[str, dict[str, int]],
    sizes: dict[str, float],
    size_mb: float,
) -> str:
    base = {
        "load": (median(times["layerfs-load"]), median(cpus["layerfs-load"])),
        "save": (median(times["layerfs-save"]), median(cpus["layerfs-save"])),
    }
    lines = [
        stamp(),
        "",
        "Input: one image of 3 layers assembled from Debian 12 (minbase; what python3, perl "
        f"and git add; a few changed files and whiteouts), a {size_mb:.0f} MB uncompressed "
        "docker-archive, page-cached; layerfs into a fresh store, docker into an engine "
        "without the image, skopeo into a fresh OCI directory (skopeo gzips the layers, its "
        f"default for oci:); median of {ROUNDS} interleaved rounds. A ratio above 1 means "
        "slower than layerfs. CPU s is the user+system time of the command and, for docker, "
        "of dockerd and its children meanwhile (load and save run in the daemon); it is the "
        "steadier figure when other work shares the machine.",
        "",
        "| operation | median s | MB/s | ratio to layerfs | CPU s | CPU ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in times:
        wall, cpu = base["load" if "load" in name or "copy" in name else "save"]
        seconds, used = median(times[name]), median(cpus[name])
        lines.append(
            f"| {name} | {seconds:.2f} | {size_mb / seconds:.0f} | {seconds / wall:.2f}x "
            f"| {used:.2f} | {used / cpu:.2f}x |"
        )
    lines += [
        "",
        "Peak memory (max RSS of the process, MB) as the archive grows:",
        "",
        "| process | " + " | ".join(f"{label} ({sizes[label]:.0f} MB)" for label in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name, values in memory.items():
        lines.append(f"| {name} | " + " | ".join(str(values[label]) for label in sizes) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
