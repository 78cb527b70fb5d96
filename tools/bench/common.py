"""Shared pieces of the benchmarks: timing, machine facts, docs/benchmarks.md sections.

Benchmarks are scripts, never tests: they print ratios measured in one run and
write them into their own section of docs/benchmarks.md, between the markers
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``, so that each
benchmark updates its section without touching the others.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else "python3"
# The environment of timed layerfs commands: without PYTHONDONTWRITEBYTECODE (set in some
# shells), so that they run from cached bytecode instead of compiling layerfs each time.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} vCPU ({cpu}), {mem_gib:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def stamp() -> str:
    return f"Measured {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}."


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def median(values: list[float]) -> float:
    return statistics.median(values)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def update_section(name: str, title: str, body: str) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    DOC.parent.mkdir(exist_ok=True)
    text = (
        DOC.read_text()
        if DOC.exists()
        else (
            "# Benchmarks\n\nRatios measured in one run on one machine; rerun with "
            "`make bench` or `tools/bench/<name>.py`. Timings are never part of the tests.\n"
        )
    )
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def publish(text: str, name: str, title: str, *, doc: bool) -> None:
    """Print a benchmark's report; with ``doc``, it also becomes its section of the doc."""
    print(text)
    if doc:
        update_section(name, title, text)


class Dockerd:
    """A private Docker engine (own data root and socket) for a benchmark run."""

    def __init__(self) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="lfb", dir="/tmp"))
        self.host = f"unix://{self.dir}/docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Dockerd:
        self.proc = subprocess.Popen(
            [
                "/usr/sbin/dockerd",
                "--data-root",
                str(self.dir / "root"),
                "--exec-root",
                str(self.dir / "exec"),
                "--pidfile",
                str(self.dir / "pid"),
                "-H",
                self.host,
                "--iptables=false",
                "--bridge=none",
                "--ip-masq=false",
            ],
            stdout=open(self.dir / "log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for _ in range(600):
            if subprocess.run(self.cmd("version"), capture_output=True).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"dockerd did not start; see {self.dir}/log")

    def cmd(self, *args: str) -> list[str]:
        return ["/usr/bin/docker", "-H", self.host, *args]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        subprocess.run(["umount", "-R", "-l", str(self.dir / "root")], capture_output=True)
        subprocess.run(["pkill", "-f", str(self.dir)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def have_dockerd() -> bool:
    return Path("/usr/sbin/dockerd").exists() and os.geteuid() == 0


def debian_rootfs(variant: str = "minbase") -> Path:
    """The Debian 12 root file system tarball ``tools/debian-rootfs.sh VARIANT`` builds
    (once, then cached): ``minbase``, or ``large`` (plus python3, perl and git)."""
    out = subprocess.run(
        ["bash", str(REPO / "tools" / "debian-rootfs.sh"), variant],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(out.strip())


SETTLE_S = 2.0


def settle() -> None:
    """Wait until memory freed by the last command is no longer warm (see fresh_memory).

    On a virtual machine whose host takes back the pages the guest frees (free page
    reporting), a command that writes right after another freed memory gets warm pages
    and one that writes later pays for faulting them in again: several times the cost of
    the write itself. Timed commands that write what they fetch start after this pause,
    so that each pays the same.
    """
    time.sleep(SETTLE_S)


def fresh_memory(mb: int = 256) -> tuple[float, float]:
    """(ms per MB, ms per MB) to write ``mb`` MB into a new file's page cache after
    settle(), and again at once into the pages just freed: what first touch costs here."""
    import tempfile

    block = os.urandom(1 << 20)
    results = []
    for pause in (True, False):
        if pause:
            settle()
        with tempfile.TemporaryFile(dir="/var/tmp") as f:
            start = time.perf_counter()
            for _ in range(mb):
                f.write(block)
            f.flush()
            results.append((time.perf_counter() - start) * 1000 / mb)
    return results[0], results[1]


def load_average() -> str:
    """The 1-minute load average, for the record of a shared machine."""
    return f"{os.getloadavg()[0]:.1f}"


def closing_lines(load_start: str, load_end: str, tool: str) -> str:
    """The last lines of a recorded section: the machine's load, and how to run ``tool``."""
    return (
        f"Load average (1 min) while measuring: {load_start} at the start, {load_end} at the"
        f" end.\nRun it with `.venv/bin/python tools/bench/{tool}`."
    )
