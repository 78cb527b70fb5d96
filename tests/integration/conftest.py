"""Fixtures for the integration tests: the real things, always cleaned up.

- ``fuse_available``: skips with the exact reason when FUSE cannot be used here. Every
  test marked ``@pytest.mark.fuse`` gets it automatically.
- ``docker_engine``: a private ``dockerd`` on its own socket and directories, one per
  pytest-xdist worker, shared by that worker's tests.
- ``registry_server``: a factory starting Debian's ``docker-registry`` on 127.0.0.1,
  plain http, TLS, htpasswd or token auth.
- ``layerfs_cli``: runs ``python -m layerfs --root <per-test store>``.
- ``engine``: each mount engine in turn (native, pyfuse3), through ``$LAYERFS_ENGINE``.

Each fixture stops what it started (whole process groups, then any process still naming
its directories), unmounts whatever is left under its directories and removes them in a
``finally``, whether the test passed, failed or was interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's client, matching Debian's dockerd
REGISTRY = "/usr/bin/docker-registry"

COMMAND_TIMEOUT = 300  # seconds for one docker/layerfs command
DOCKERD_START_TIMEOUT = 60
REGISTRY_START_TIMEOUT = 30


# --- running commands and cleaning up ------------------------------------------------


class CommandError(subprocess.CalledProcessError):
    """A failed command; unlike its base class its message shows what it printed."""

    def __str__(self) -> str:
        text = super().__str__()
        for name, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                tail = data[-4000:].decode(errors="replace") if isinstance(data, bytes) else data
                text += f"\n--- {name} ---\n{tail.rstrip()}"
        return text


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """Run *argv* capturing stdout and stderr as bytes; raise CommandError if *check*."""
    args = [os.fspath(arg) for arg in argv]
    result = subprocess.run(
        args,
        input=input,
        capture_output=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        stdin=subprocess.DEVNULL if input is None else None,
        check=False,
    )
    if check and result.returncode != 0:
        raise CommandError(result.returncode, args, result.stdout, result.stderr)
    return result


def _stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the leader, wait up to *timeout*, then SIGKILL its whole process group."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader's pgid is its pid (new session)
    except ProcessLookupError:
        pass
    proc.wait()


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, NUL-separated command line) for every live process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        # The command name in stat is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


def kill_processes_naming(*paths: Path, timeout: float = 10) -> list[int]:
    """SIGKILL every process whose command line names one of *paths*, and their descendants.

    This finds what escaped a process group: containerd and its shims (they name the
    exec root), FUSE daemons (they name their mountpoint), and what runs under them.
    Returns the pids that were killed.
    """
    needles = [str(path).rstrip("/") for path in paths]

    def names_a_path(cmdline: str) -> bool:
        # "/tmp/x" names /tmp/x and /tmp/x/sock, not /tmp/x1.
        return any(
            needle + "/" in arg or arg.endswith(needle)
            for arg in cmdline.split("\0")
            for needle in needles
        )

    table = _process_table()
    own = {os.getpid(), os.getppid()}
    victims = {
        pid for pid, (_, cmdline) in table.items() if pid not in own and names_a_path(cmdline)
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    pending = list(victims)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in victims and child not in own:
                victims.add(child)
                pending.append(child)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while victims and time.monotonic() < deadline:
        victims &= set(_process_table())
        if victims:
            time.sleep(0.05)
    return sorted(victims)


def _mountpoints() -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        # mountinfo escapes space, tab, newline and backslash as octal.
        mounts.append(point.encode().decode("unicode_escape"))
    return mounts


def unmount_all_under(*dirs: Path) -> None:
    """Lazily unmount every mount at or below *dirs*, the deepest first."""
    roots = [os.path.realpath(d) for d in dirs]
    under = sorted(
        {
            m
            for m in _mountpoints()
            if any(m == root or m.startswith(root.rstrip("/") + "/") for root in roots)
        },
        key=len,
        reverse=True,
    )
    for point in under:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-R", "-l", point], capture_output=True, check=False)
        else:
            subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True, check=False)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise RuntimeError(f"could not remove {path}: something still uses it")


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return "(no log)"


# --- FUSE ---------------------------------------------------------------------------


def fuse_unavailable_reason() -> str | None:
    """Why FUSE cannot be used here, or None when it can."""
    if shutil.which("fusermount3") is None:
        return "fuse3 is not installed (apt-get install fuse3)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (modprobe fuse)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as err:
        return f"/dev/fuse cannot be opened: {err.strerror}"
    return None


@pytest.fixture(scope="session")
def fuse_available() -> None:
    """Skip the test, with the exact reason, unless FUSE mounts can work here."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


ENGINES = ("native", "pyfuse3")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each mount engine in turn: every ``layerfs`` started by the test mounts with it.

    A test module of mounts runs on both with ``pytestmark = ...usefixtures("engine")``.
    """
    name: str = request.param
    if name == "pyfuse3":
        try:
            import pyfuse3  # noqa: F401
        except ImportError as err:
            pytest.skip(
                f"pyfuse3 cannot be imported ({err}); apt-get install libfuse3-dev, then make deps"
            )
    monkeypatch.setenv("LAYERFS_ENGINE", name)
    return name


@pytest.fixture(autouse=True)
def _fuse_marker_needs_fuse(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("fuse") is not None:
        request.getfixturevalue("fuse_available")


# --- Docker engine ------------------------------------------------------------------


@dataclass
class DockerEngine:
    """A private dockerd. ``run("images")`` runs ``/usr/bin/docker -H <host> images``."""

    host: str  # unix:///tmp/lfd.../docker.sock
    data_root: Path
    exec_root: Path
    log: Path
    env: dict[str, str]  # DOCKER_HOST and an empty DOCKER_CONFIG, for skopeo and friends

    def run(
        self,
        *args: str | os.PathLike[str],
        input: bytes | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[bytes]:
        return run_command(
            [DOCKER, "-H", self.host, *args],
            input=input,
            check=check,
            env=self.env,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """Start dockerd on private directories; stop it and remove every trace afterwards.

    Session scoped: under pytest-xdist each worker is its own session and so starts its
    own engine, with its own socket and directories.
    """
    with running_docker_engine() as engine:
        yield engine


@pytest.fixture
def fresh_docker_engine() -> Iterator[DockerEngine]:
    """A second engine that has never seen any image, for this test alone."""
    with running_docker_engine() as engine:
        yield engine


@contextlib.contextmanager
def running_docker_engine() -> Iterator[DockerEngine]:
    """dockerd on private directories, stopped and removed without a trace afterwards."""
    for path, package in (
        (DOCKERD, "docker.io"),
        (DOCKER, "docker.io"),
        ("containerd", "containerd"),
    ):
        if shutil.which(path) is None:
            pytest.skip(f"{path} is not installed (apt-get install {package})")
    if os.geteuid() != 0:
        pytest.skip("the Docker engine needs root")

    # Unix socket paths are limited to 108 bytes, and containerd's shim sockets go
    # below the exec root: keep both in a short directory.
    short = Path(tempfile.mkdtemp(prefix="lfd", dir="/tmp"))
    base = Path(tempfile.mkdtemp(prefix="layerfs-dockerd-"))
    data_root, exec_root, log = base / "root", short / "exec", base / "dockerd.log"
    config = base / "daemon.json"
    config.write_text("{}\n")  # ignore /etc/docker/daemon.json
    (base / "client").mkdir()
    host = f"unix://{short}/docker.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=host, DOCKER_CONFIG=str(base / "client"))
    engine = DockerEngine(host, data_root, exec_root, log, env)

    proc = None
    try:
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [
                    DOCKERD,
                    "--config-file",
                    str(config),
                    "--data-root",
                    str(data_root),
                    "--exec-root",
                    str(exec_root),
                    "--pidfile",
                    str(base / "pid"),
                    "-H",
                    host,
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                    "--ip-masq=false",
                    "--userland-proxy=false",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _wait_for_docker(engine, proc)
        yield engine
    finally:
        try:
            if proc is not None:
                # dockerd stops its containers (up to 15 s) and its containerd on SIGTERM.
                _stop_process_group(proc, timeout=30)
            kill_processes_naming(short, base)
            unmount_all_under(short, base)
        finally:
            _remove_tree(short)
            _remove_tree(base)


def _wait_for_docker(engine: DockerEngine, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DOCKERD_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"dockerd exited with {proc.returncode}:\n{_log_tail(engine.log)}")
        result = engine.run("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"dockerd did not answer on {engine.host} within {DOCKERD_START_TIMEOUT} s:\n"
                f"{_log_tail(engine.log)}"
            )
        time.sleep(0.2)


# --- registry -----------------------------------------------------------------------


@dataclass
class RegistryServer:
    """A running docker-registry (the CNCF Distribution registry)."""

    url: str  # "http://127.0.0.1:PORT" or "https://..."
    host: str  # "127.0.0.1:PORT", as in an image reference
    port: int
    storage: Path  # its filesystem storage root
    config: Path
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)


RegistryFactory = Callable[..., RegistryServer]


@pytest.fixture
def registry_server() -> Iterator[RegistryFactory]:
    """A factory: ``registry_server(tls=None, htpasswd=None, token=None, extra=None)``.

    - ``tls=(cert, key)``: serve https with that certificate and key (PEM files).
    - ``htpasswd=path``: basic auth against a bcrypt htpasswd file (``htpasswd -Bbn``).
    - ``token={"realm": ..., "service": ..., "issuer": ..., "rootcertbundle": ...}``:
      bearer-token auth; the registry trusts tokens signed by a key whose certificate
      is in the rootcertbundle file.
    - ``extra={...}``: more top-level configuration sections, e.g.
      ``{"compatibility": {"schema1": {"enabled": True}}}`` to accept schema1 manifests.

    Each call starts one registry with its own storage; all are stopped, and their
    directories removed, when the test ends.
    """
    if shutil.which(REGISTRY) is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    processes: list[subprocess.Popen[bytes]] = []
    dirs: list[Path] = []

    def start(
        *,
        tls: tuple[Path, Path] | None = None,
        htpasswd: Path | None = None,
        token: Mapping[str, str | os.PathLike[str]] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> RegistryServer:
        if htpasswd is not None and token is not None:
            raise ValueError("a registry has one auth method: htpasswd or token, not both")
        base = Path(tempfile.mkdtemp(prefix="layerfs-registry-"))
        dirs.append(base)
        config, log = base / "config.yml", base / "registry.log"
        for _attempt in range(3):  # the free port may be taken before the registry binds it
            port = free_port()
            settings = _registry_config(port, base / "storage", tls, htpasswd, token)
            settings.update(extra or {})
            config.write_text(json.dumps(settings, indent=2))
            with log.open("wb") as log_file:
                proc = subprocess.Popen(
                    [REGISTRY, "serve", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            processes.append(proc)
            server = RegistryServer(
                url=f"{'https' if tls else 'http'}://127.0.0.1:{port}",
                host=f"127.0.0.1:{port}",
                port=port,
                storage=base / "storage",
                config=config,
                log=log,
                process=proc,
            )
            if _wait_for_registry(server):
                return server
            if proc.poll() is None or b"address already in use" not in log.read_bytes():
                break
        pytest.fail(f"docker-registry did not start on port {port}:\n{_log_tail(log)}")

    try:
        yield start
    finally:
        try:
            for proc in processes:
                _stop_process_group(proc, timeout=10)
        finally:
            for base in dirs:
                _remove_tree(base)


def _registry_config(
    port: int,
    storage: Path,
    tls: tuple[Path, Path] | None,
    htpasswd: Path | None,
    token: Mapping[str, str | os.PathLike[str]] | None,
) -> dict[str, object]:
    # JSON is YAML, so no YAML library is needed to write the config.
    http: dict[str, object] = {
        "addr": f"127.0.0.1:{port}",
        "secret": secrets.token_hex(16),
        "headers": {"X-Content-Type-Options": ["nosniff"]},
    }
    if tls is not None:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http,
        "health": {"storagedriver": {"enabled": False}},
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "layerfs-test", "path": str(htpasswd)}}
    if token is not None:
        missing = {"realm", "service", "issuer", "rootcertbundle"} - set(token)
        if missing:
            raise ValueError(f"token auth needs {', '.join(sorted(missing))}")
        config["auth"] = {"token": {key: os.fspath(value) for key, value in token.items()}}
    return config


def _wait_for_registry(server: RegistryServer) -> bool:
    """Wait until GET /v2/ answers 200 or 401; False if the registry exited first."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asking whether it is up
    deadline = time.monotonic() + REGISTRY_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(server.url + "/v2/", timeout=5, context=context) as resp:
                if resp.status == 200:
                    return True
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 401:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


# --- the layerfs command line ------------------------------------------------------------


@dataclass
class LayerfsCli:
    """``layerfs_cli("images")`` runs ``python -m layerfs --root <root> images``."""

    root: Path  # the store, fresh for each test

    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        """The command line that runs ``layerfs --root <root> ARGS`` (for Popen)."""
        return [sys.executable, "-m", "layerfs", "--root", str(self.root), *map(str, args)]

    def __call__(
        self,
        *args: str | os.PathLike[str],
        input: bytes | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[bytes]:
        full_env = {**os.environ, **env} if env is not None else None
        return run_command(
            self.argv(*args),
            input=input,
            check=check,
            env=full_env,
            timeout=timeout,
        )

    run = __call__


@pytest.fixture
def layerfs_cli(tmp_path: Path) -> Iterator[LayerfsCli]:
    """Run the layerfs CLI on a per-test store; afterwards unmount and stop what it left."""
    root = tmp_path / "store"
    try:
        yield LayerfsCli(root)
    finally:
        # Mounts and their FUSE daemons may live under or name the store or tmp_path.
        unmount_all_under(tmp_path)
        kill_processes_naming(root, tmp_path)
        unmount_all_under(tmp_path)
