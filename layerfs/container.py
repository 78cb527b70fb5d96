"""``layerfs run``: an image's program in new namespaces over a writable mount.

The image is mounted writable (suid and dev honoured, the init layer on top,
a fresh upper directory) under the store's ``containers/``. Then::

    layerfs run ──fork──▶ helper: unshare(mount, PID, UTS, IPC) ──fork──▶ PID 1
                                                                         │
    mounts /proc, a small /dev (null zero full random urandom tty, devpts,
    shm), binds copies of the host's resolv.conf, hosts and hostname over the
    init layer's placeholders, sets the hostname, chroots, takes the image's
    User and WorkingDir, and executes the command with the image's Env.

``layerfs run`` forwards the signals it gets to PID 1, returns its exit code
(128+N for a signal), and unmounts; ``--rm`` drops the upper directory. The
mounts made inside die with the namespace. Root only: namespaces, chroot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfs.errors import LayerfsError, UsageError
from layerfs.fs.host import Records, stop_mount
from layerfs.fs.mount import MountRequest, mount
from layerfs.store.store import Store

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE, MS_STRICTATIME = 4096, 16384, 1 << 18, 1 << 24

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)
EXIT_SETUP_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class RunSpec:
    image: str
    command: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    remove: bool = False
    name: str | None = None
    hostname: str | None = None
    engine: str = "auto"
    debug: bool = False


@dataclass(frozen=True)
class _Process:
    """What the container's first process is: its root, command and identity."""

    root: Path
    etc_copy: Path  # the host files bound over the init layer's placeholders
    argv: list[str]
    env: dict[str, str]
    workdir: str
    user: str
    hostname: str


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(
    source: str, target: str | Path, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode(),
            os.fsencode(target),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def run(store: Store, spec: RunSpec) -> int:
    """Run the image's command; returns its exit status."""
    if os.geteuid() != 0:
        raise UsageError(
            "layerfs run needs root: it creates namespaces and chroots",
            hint="mount the image with 'layerfs mount --rw' and use unshare/"
            "chroot or a container runtime yourself",
        )
    image = store.tags.lookup_image(spec.image)
    store.graph.check_depth(image)
    config: dict[str, Any] = dict(image.config)
    argv = _command(config, spec.command)
    run_id = secrets.token_hex(6)
    hostname = spec.hostname or run_id
    containers = store.subdir("containers")
    root = containers / run_id
    root.mkdir()
    etc_copy = containers / f"{run_id}.etc"
    records = Records(store.root / "mounts", store.tmp)
    upper_name = spec.name or f"run-{run_id}"
    mounted = False
    try:
        mount(
            store,
            MountRequest(
                image=image.id,
                mountpoint=root,
                writable=True,
                upper=upper_name,
                allow_other=True,
                suid=True,
                dev=True,
                container=True,
                debug=spec.debug,
                engine=spec.engine,
            ),
        )
        mounted = True
        _host_files(etc_copy, hostname)
        env = _environment(config, spec.env, hostname)
        return _spawn(
            _Process(
                root,
                etc_copy,
                argv,
                env,
                spec.workdir or config.get("WorkingDir") or "/",
                spec.user or config.get("User") or "",
                hostname,
            )
        )
    finally:
        try:
            if mounted:
                stop_mount(records, root)
        finally:
            shutil.rmtree(etc_copy, ignore_errors=True)
            try:
                root.rmdir()
            except OSError:
                pass
            if spec.remove:
                shutil.rmtree(store.root / "upper" / upper_name, ignore_errors=True)


def _command(config: dict[str, Any], command: Sequence[str]) -> list[str]:
    entrypoint = [str(a) for a in config.get("Entrypoint") or []]
    cmd = list(command) or [str(a) for a in config.get("Cmd") or []]
    argv = entrypoint + cmd
    if not argv:
        raise UsageError("no command given and the image has no Entrypoint or Cmd")
    return argv


def _environment(config: dict[str, Any], extra: Sequence[str], hostname: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOSTNAME"] = hostname
    for item in extra:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid -e {item!r}: expected KEY=VALUE")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def _host_files(directory: Path, hostname: str) -> None:
    """Private copies of the host's name files: the container may write them."""
    directory.mkdir(mode=0o755)
    for name in ("resolv.conf", "hosts"):
        try:
            data = Path("/etc", name).read_bytes()
        except OSError:
            data = b""
        if name == "hosts":
            data += f"127.0.1.1\t{hostname}\n".encode()
        (directory / name).write_bytes(data)
    (directory / "hostname").write_text(hostname + "\n")


def _exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _spawn(process: _Process) -> int:
    pid_r, pid_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(pid_r)
        _helper(process, pid_w)
    os.close(pid_w)
    with os.fdopen(pid_r, "rb") as pipe:
        text = pipe.read().decode().strip()
    init_pid = int(text) if text.isdigit() else 0

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(init_pid or helper, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                _, status = os.waitpid(helper, 0)
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _exit_code(status)


def _helper(process: _Process, pid_w: int) -> None:
    """Runs in the first child: makes the namespaces, forks PID 1, waits for it."""
    code = EXIT_SETUP_FAILED
    try:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC), "unshare")
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        init = os.fork()
        if init == 0:
            os.close(pid_w)
            _init(process)
        os.write(pid_w, str(init).encode())
        os.close(pid_w)
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # the terminal's signals are PID 1's business
        _, status = os.waitpid(init, 0)
        code = _exit_code(status)
    except BaseException as exc:
        _say(f"cannot start the container: {exc}")
    finally:
        os._exit(code)


def _init(process: _Process) -> None:
    """PID 1 of the new namespaces: set up the root file system and exec the command."""
    argv, env = process.argv, dict(process.env)
    try:
        _setup_root(process.root, process.etc_copy)
        hostname = process.hostname.encode()
        _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
        os.chroot(process.root)
        uid, gid, groups, home = _resolve_user(process.user)
        env.setdefault("HOME", home)
        os.makedirs(process.workdir, exist_ok=True)
        os.chdir(process.workdir)
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except (OSError, LayerfsError) as exc:
        _say(f"cannot start the container: {exc}")
        os._exit(EXIT_SETUP_FAILED)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        _say(f"cannot run {argv[0]!r}: {exc.strerror}")
        os._exit(EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE)


def _setup_root(root: Path, etc_copy: Path) -> None:
    _mount("proc", root / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = root / "dev"
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k")
    old_umask = os.umask(0)
    try:
        for name, major, minor in DEVICES:
            path = dev / name
            try:
                os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            except PermissionError:  # no mknod here: bind the host's node
                path.touch(mode=0o666)
                _mount(f"/dev/{name}", path, None, MS_BIND)
        (dev / "pts").mkdir(mode=0o755)
        (dev / "shm").mkdir(mode=0o1777)
    finally:
        os.umask(old_umask)
    _mount(
        "devpts",
        dev / "pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    _mount("shm", dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777")
    for link, points_to in (
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(points_to, dev / link)
    (dev / "console").touch()
    for name in ("resolv.conf", "hosts", "hostname"):
        target = root / "etc" / name
        if target.is_file() and not target.is_symlink():
            _mount(str(etc_copy / name), target, None, MS_BIND)


def _resolve_user(user: str) -> tuple[int, int, list[int], str]:
    """uid, gid, groups and home for ``user`` (name|uid[:group|gid]) from the image's files."""
    name, _, group = user.partition(":")
    passwd = _table("/etc/passwd")
    uid, gid, home = 0, 0, "/"
    username = ""
    if name:
        match = next(
            (row for row in passwd if row[0] == name or (name.isdigit() and row[2] == name)), None
        )
        if match is not None:
            username, uid, home = match[0], int(match[2]), match[5] or "/"
            gid = int(match[3]) if match[3].isdigit() else 0
        elif name.isdigit():
            uid = int(name)
        else:
            raise LayerfsError(f"unable to find user {name}: no matching entries in passwd file")
    else:
        root_row = next((row for row in passwd if row[2] == "0"), None)
        if root_row is not None:
            username, home = root_row[0], root_row[5] or "/"
    groups_table = _table("/etc/group")
    if group:
        match = next(
            (
                row
                for row in groups_table
                if row[0] == group or (group.isdigit() and row[2] == group)
            ),
            None,
        )
        if match is not None:
            gid = int(match[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise LayerfsError(f"unable to find group {group}: no matching entries in group file")
    groups = sorted(
        {gid}
        | {
            int(row[2])
            for row in groups_table
            if username and len(row) > 3 and username in row[3].split(",")
        }
    )
    return uid, gid, groups, home


def _table(path: str) -> list[list[str]]:
    """The rows of a passwd or group file whose third field is a number, padded to 7."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            rows = [line.rstrip("\n").split(":") for line in handle]
    except OSError:
        return []
    return [row + [""] * (7 - len(row)) for row in rows if len(row) >= 3 and row[2].isdigit()]


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"layerfs: error: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass
