#!/usr/bin/env python3
"""`layerfs import` of a real root filesystem tarball vs `tar -xf` and `docker import`.

The tarball is a Debian 12 minbase plus python3, perl and git (tools/debian-rootfs.sh
large: ~280 MB, ~11,700 entries). Each tool gets a fresh destination on the same disk;
runs are interleaved; the median of the rounds is reported, with and without a final
`sync` (layerfs fsyncs what it publishes, tar and dockerd do not).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PYTHON,
    Dockerd,
    debian_rootfs,
    have_dockerd,
    median,
    remove,
    stamp,
    timed,
    update_section,
)

ROUNDS = 3


def main() -> None:
    tarball = debian_rootfs("large")
    size_mb = tarball.stat().st_size / 1e6
    entries = int(
        subprocess.run(
            f"tar tf {tarball} | wc -l", shell=True, check=True, capture_output=True, text=True
        ).stdout
    )
    work = Path(tempfile.mkdtemp(prefix="bench-import-", dir=str(Path.home())))
    results: dict[str, list[float]] = {"layerfs import": [], "tar -xf": [], "docker import": []}
    synced: dict[str, list[float]] = {k: [] for k in results}
    docker = Dockerd() if have_dockerd() else None
    try:
        if docker is not None:
            docker.__enter__()
        for round_no in range(ROUNDS):
            subprocess.run(["cat", str(tarball)], stdout=subprocess.DEVNULL, check=True)
            for name in list(results)[round_no % 3 :] + list(results)[: round_no % 3]:
                target = work / f"{name.split()[0]}-{round_no}"
                if name == "layerfs import":
                    cmd = [
                        PYTHON,
                        "-m",
                        "layerfs",
                        "--root",
                        str(target),
                        "--quiet",
                        "import",
                        str(tarball),
                        "bench/import",
                    ]
                elif name == "tar -xf":
                    target.mkdir()
                    cmd = ["tar", "--numeric-owner", "-xf", str(tarball), "-C", str(target)]
                else:
                    if docker is None:
                        continue
                    cmd = docker.cmd("import", str(tarball), f"bench/import:{round_no}")
                elapsed = timed(
                    lambda cmd=cmd: subprocess.run(cmd, check=True, capture_output=True)
                )
                flush = timed(lambda: subprocess.run(["sync"], check=True))
                results[name].append(elapsed)
                synced[name].append(elapsed + flush)
                print(
                    f"round {round_no}: {name}: {elapsed:.2f} s (+sync {flush:.2f} s)", flush=True
                )
                if name == "docker import" and docker is not None:
                    subprocess.run(
                        docker.cmd("rmi", f"bench/import:{round_no}"), capture_output=True
                    )
                remove(target)
    finally:
        if docker is not None:
            docker.__exit__(None, None, None)
        remove(work)
    base = median(results["layerfs import"])
    base_synced = median(synced["layerfs import"])
    rows = [
        "| tool | median s | ratio to layerfs | median s incl. sync | ratio incl. sync |",
        "|---|---|---|---|---|",
    ]
    for name in results:
        if not results[name]:
            rows.append(f"| {name} | not run (no Docker engine) | | | |")
            continue
        t, ts = median(results[name]), median(synced[name])
        rows.append(f"| {name} | {t:.2f} | {t / base:.2f}x | {ts:.2f} | {ts / base_synced:.2f}x |")
    body = (
        f"{stamp()}\n\n"
        f"Input: Debian 12 minbase + python3, perl, git (`tools/debian-rootfs.sh large`), "
        f"{size_mb:.0f} MB, {entries} entries, page-cached; each tool writes to a fresh "
        f"directory on the same disk; median of {ROUNDS} interleaved rounds. A ratio above "
        "1 means slower than `layerfs import`. `layerfs import` stores the tar and its index "
        "(one streaming pass: copy, sha256, index, fsync); `tar -xf` creates every file; "
        "`docker import` extracts into overlay2 and hashes.\n\n" + "\n".join(rows)
    )
    update_section("import", "Import of a root filesystem tarball", body)
    print(body)


if __name__ == "__main__":
    main()
