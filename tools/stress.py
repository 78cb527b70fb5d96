#!/usr/bin/env python3
"""Many users at once: N processes for T seconds mixing every store command, then checks.

Each worker loops until the time is up, running one ``layerfs`` command at a time
(a new process each, as users would) chosen at random: pull, load, import, save, tag,
rmi, gc, mount + read + umount, mount --rw + write + commit + umount, fsck. They work
on a few images that share layers. A command may fail when another process got there
first (an image removed or held, a tag already set): that is counted as a *refusal*
and must be a one-line ``layerfs: error:`` with a non-zero exit. A traceback, an
internal error (exit 70), a death by a signal or a command that hangs is a *failure*.

At the end (all workers stopped): ``fsck --verify`` clean, no mounts and no layerfs
processes left, no staging files in tmp/, no pending records, no hold file still
held. Prints the operations done per second. Exit status 0 when all of that holds.

    python3 tools/stress.py --workers 4 --seconds 1800 --root /tmp/stress

A registry for the pulls: ``--registry HOST:PORT`` (loopback, plain HTTP), or else the
Debian ``docker-registry`` is started on 127.0.0.1 for the run if it is installed
(pulls are left out when neither is there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT = 120.0
NAMES = ["stress/base:1", "stress/app:1", "stress/tool:1"]


def _layer(name: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for i in range(8):
            data = rng.randbytes(size // 8)
            info = tarfile.TarInfo(f"{name}/f{i}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _archive(path: Path, images: list[tuple[list[bytes], str]]) -> None:
    """A docker-archive of images (layers base first, one tag each)."""
    import hashlib

    manifest = []
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        written: set[str] = set()
        for layers, tag in images:
            diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
            config = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "created": "2024-01-01T00:00:00Z",
                    "config": {"Cmd": ["/bin/sh"]},
                    "rootfs": {"type": "layers", "diff_ids": diff_ids},
                    "history": [{"created": "2024-01-01T00:00:00Z"} for _ in layers],
                },
                sort_keys=True,
            ).encode()
            config_name = hashlib.sha256(config).hexdigest() + ".json"
            add(config_name, config)
            paths = []
            for layer, diff_id in zip(layers, diff_ids, strict=True):
                member = f"{diff_id[7:]}/layer.tar"
                if member not in written:
                    add(member, layer)
                    written.add(member)
                paths.append(member)
            manifest.append({"Config": config_name, "RepoTags": [tag], "Layers": paths})
        add("manifest.json", json.dumps(manifest).encode())


@dataclass
class Setup:
    root: Path
    work: Path
    archives: dict[str, Path]
    rootfs: Path
    registry: str | None
    registry_process: subprocess.Popen[bytes] | None = None


@dataclass
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def layerfs(
    root: Path, *args: str, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "layerfs", "--root", str(root), "--quiet", *args],
        capture_output=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_registry(work: Path) -> tuple[str, subprocess.Popen[bytes]] | None:
    binary = shutil.which("docker-registry")
    if binary is None:
        return None
    port = _free_port()
    config = work / "registry.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": {"filesystem": {"rootdirectory": str(work / "registry")}},
                "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(8)},
            }
        )
    )
    proc = subprocess.Popen(
        [binary, "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                return f"127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    return None


def prepare(root: Path, work: Path, registry: str | None, use_registry: bool) -> Setup:
    base = _layer("base", 256 << 10, 1)
    app = _layer("app", 128 << 10, 2)
    tool = _layer("tool", 64 << 10, 3)
    images = {
        NAMES[0]: [base],
        NAMES[1]: [base, app],
        NAMES[2]: [base, app, tool],
    }
    archives = {}
    for name, layers in images.items():
        path = work / (name.replace("/", "_").replace(":", "_") + ".tar")
        _archive(path, [(layers, name)])
        archives[name] = path
    rootfs = work / "rootfs.tar"
    rootfs.write_bytes(_layer("rootfs", 32 << 10, 4))
    setup = Setup(root, work, archives, rootfs, registry)
    if use_registry and registry is None:
        started = _start_registry(work)
        if started is not None:
            setup.registry, setup.registry_process = started
    for path in archives.values():
        _check(layerfs(root, "load", "-i", str(path)), "setup load")
    if setup.registry:
        for name in NAMES:
            remote = f"{setup.registry}/{name}"
            _check(layerfs(root, "tag", "-f", name, remote), "setup tag")
            _check(layerfs(root, "push", remote), "setup push")
    return setup


def _check(result: subprocess.CompletedProcess[bytes], what: str) -> None:
    if result.returncode != 0:
        raise SystemExit(f"stress: {what} failed: {result.stderr.decode().strip()}")


def _classify(tally: Tally, op: str, result: subprocess.CompletedProcess[bytes]) -> bool:
    stderr = result.stderr.decode(errors="replace")
    if result.returncode == 0:
        tally.ok[op] += 1
        return True
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("layerfs: error: ")]
    if (
        result.returncode > 0
        and result.returncode != 70
        and errors
        and "Traceback" not in stderr
        and "internal error" not in stderr
    ):
        tally.refused[op] += 1
        return False
    tally.failures.append(f"{op}: exit {result.returncode}: {stderr.strip()[-2000:]}")
    return False


def worker(setup: Setup, number: int, deadline: float, seed: int, out: Path) -> None:
    rng = random.Random(seed)
    tally = Tally()
    root = setup.root
    ops = ["load", "import", "save", "tag", "rmi", "gc", "mount", "commit", "fsck"]
    if setup.registry:
        ops.append("pull")
    mnt = setup.work / f"mnt{number}"
    mnt.mkdir(exist_ok=True)
    while time.monotonic() < deadline:
        op = rng.choice(ops)
        name = rng.choice(NAMES)
        try:
            if op == "load":
                _classify(tally, op, layerfs(root, "load", "-i", str(setup.archives[name])))
            elif op == "import":
                _classify(
                    tally, op, layerfs(root, "import", str(setup.rootfs), f"stress/imp:{number}")
                )
            elif op == "save":
                target = setup.work / f"save{number}.tar"
                _classify(tally, op, layerfs(root, "save", "-o", str(target), name))
                target.unlink(missing_ok=True)
            elif op == "tag":
                _classify(tally, op, layerfs(root, "tag", name, f"stress/tag:{rng.randrange(3)}"))
            elif op == "rmi":
                victim = rng.choice(
                    [*NAMES, "stress/tag:0", f"stress/imp:{number}", "stress/commit:1"]
                )
                _classify(tally, op, layerfs(root, "rmi", victim))
            elif op == "gc":
                _classify(tally, op, layerfs(root, "gc"))
            elif op == "fsck":
                _classify(tally, op, layerfs(root, "fsck"))
            elif op == "pull":
                _classify(tally, op, layerfs(root, "pull", f"{setup.registry}/{name}"))
            elif op in ("mount", "commit"):
                _mount_cycle(tally, op, setup, name, mnt, number)
        except subprocess.TimeoutExpired as exc:
            tally.failures.append(f"{op}: hung for {exc.timeout} s: {exc.cmd}")
    out.write_text(
        json.dumps({"ok": tally.ok, "refused": tally.refused, "failures": tally.failures})
    )


def _mount_cycle(tally: Tally, op: str, setup: Setup, name: str, mnt: Path, number: int) -> None:
    root = setup.root
    upper = f"w{number}-{secrets.token_hex(3)}"  # a new upper for each cycle
    args = ["mount", "--rw", "--upper", upper] if op == "commit" else ["mount"]
    if not _classify(tally, "mount", layerfs(root, *args, name, str(mnt))):
        return
    try:
        for path in sorted(mnt.rglob("f*"))[:6]:
            path.read_bytes()
        tally.ok["read"] += 1
        if op == "commit":
            (mnt / f"written-by-{number}").write_bytes(os.urandom(4096))
            _classify(tally, "commit", layerfs(root, "commit", str(mnt), "stress/commit:1"))
    except OSError as exc:
        tally.failures.append(f"read in {name}: {exc}")
    finally:
        _classify(tally, "umount", layerfs(root, "umount", str(mnt)))


def final_checks(setup: Setup) -> list[str]:
    root = setup.root
    problems = []
    mounts = Path("/proc/mounts").read_text()
    if str(setup.work) in mounts:
        problems.append("a mount is left under " + str(setup.work))
    listed = layerfs(root, "mounts", "--format", "json").stdout.strip()
    if listed:
        problems.append(f"layerfs mounts lists: {listed.decode()[:300]}")
    gc = layerfs(root, "gc")
    if gc.returncode != 0:
        problems.append(f"gc failed: {gc.stderr.decode().strip()}")
    fsck = layerfs(root, "fsck", "--verify")
    if fsck.returncode != 0:
        problems.append(f"fsck --verify: {(fsck.stdout + fsck.stderr).decode().strip()}")
    for sub in ("tmp", "journal"):
        left = sorted(os.listdir(root / sub)) if (root / sub).is_dir() else []
        if left:
            problems.append(f"{sub}/ is not empty: {left[:5]}")
    holds = sorted(os.listdir(root / "holds")) if (root / "holds").is_dir() else []
    if holds:
        problems.append(f"hold files left after gc (still held): {holds[:5]}")
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"layerfs" in cmdline and str(root).encode() in cmdline:
                problems.append(f"process {pid} is still running: {cmdline[:200]!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--root", type=Path, help="the store (default: a new one under --work)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--registry", help="HOST:PORT of a registry for the pulls")
    parser.add_argument("--no-registry", action="store_true", help="leave pulls out")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="layerfs-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    root = args.root or work / "store"
    setup = prepare(root, work, args.registry, not args.no_registry)
    try:
        start = time.monotonic()
        deadline = start + args.seconds
        procs = []
        for number in range(args.workers):
            out = work / f"worker{number}.json"
            pid = os.fork()
            if pid == 0:  # a worker: plain loops of subprocesses
                code = 1
                try:
                    worker(setup, number, deadline, args.seed * 1000 + number, out)
                    code = 0
                finally:
                    os._exit(code)
            procs.append((pid, out))
        for pid, _ in procs:
            os.waitpid(pid, 0)
        elapsed = time.monotonic() - start
        total = Tally()
        for _, out in procs:
            doc = json.loads(out.read_text()) if out.exists() else {"failures": ["worker died"]}
            total.ok.update(doc.get("ok", {}))
            total.refused.update(doc.get("refused", {}))
            total.failures.extend(doc.get("failures", []))
        problems = final_checks(setup)
    finally:
        if setup.registry_process is not None:
            os.killpg(setup.registry_process.pid, signal.SIGTERM)
            setup.registry_process.wait(timeout=10)
    done = sum(total.ok.values()) + sum(total.refused.values())
    rate = done / elapsed
    print(f"workers {args.workers}, {elapsed:.0f} s, {done} operations, {rate:.2f} per second")
    for op in sorted(set(total.ok) | set(total.refused)):
        print(f"  {op:8} {total.ok[op]:6} done {total.refused[op]:6} refused")
    for line in total.failures:
        print(f"FAILURE {line}")
    for line in problems:
        print(f"PROBLEM {line}")
    if total.failures or problems:
        return 1
    print("store checks: fsck --verify clean, no mounts, processes, staging, records or holds left")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
