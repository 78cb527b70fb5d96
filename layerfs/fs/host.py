"""What the host offers and holds: FUSE availability, the mount table, mount records.

A live mount is recorded in the store as ``mounts/<id>.json`` (mountpoint,
image, mode, upper, server pid, log) beside ``mounts/<id>.lock``, which the
server holds with an exclusive ``flock`` for as long as it runs: a record
whose lock can be taken belongs to a server that is gone (crashed or killed),
whatever its pid says. The kernel's mount table (``/proc/self/mountinfo``)
says whether the mountpoint is still mounted.

No pyfuse3 here: the command line checks availability before it imports
the FUSE side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerfs.errors import FuseUnavailableError, MountError, MountpointBusyError
from layerfs.store.files import FileLock, atomic_write, is_locked

FSTYPE = "fuse.layerfs"


def check_fuse(*, allow_other: bool = False, engine: str = "auto") -> None:
    """Raise :class:`FuseUnavailableError` saying what is missing, or return.

    pyfuse3 is needed only by its own engine (``auto`` falls back to it only on a
    kernel too old for the native one).
    """
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailableError(
            "cannot mount: /dev/fuse does not exist (the fuse kernel module is not loaded)",
            hint="run 'modprobe fuse' as root; in a container, pass the device: --device /dev/fuse",
        )
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise FuseUnavailableError(
            f"cannot mount: /dev/fuse cannot be opened: {exc.strerror}",
            hint="run as root, or get read-write access to /dev/fuse (its group, or "
            "--device /dev/fuse --cap-add SYS_ADMIN in a container)",
        ) from exc
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise FuseUnavailableError(
            "cannot mount as a normal user: fusermount3 is not installed",
            hint="apt-get install fuse3",
        )
    if allow_other and os.geteuid() != 0 and not _user_allow_other():
        raise FuseUnavailableError(
            "cannot mount with -o allow_other: /etc/fuse.conf does not say user_allow_other",
            hint="add the line 'user_allow_other' to /etc/fuse.conf (as root)",
        )
    if engine != "pyfuse3":
        return
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        raise FuseUnavailableError(
            f"cannot mount: the pyfuse3 library is not available ({exc})",
            hint="apt-get install libfuse3-dev, then pip install 'layerfs[fuse]'",
        ) from exc


def _user_allow_other() -> bool:
    try:
        lines = Path("/etc/fuse.conf").read_text().splitlines()
    except OSError:
        return False
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)


# -- the mount table ------------------------------------------------------------------------


def _unescape(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field_text):
        digits = field_text[i + 1 : i + 4]
        if field_text[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def mount_table() -> dict[str, str]:
    """Mountpoint → file system type, for this process's mount namespace."""
    table: dict[str, str] = {}
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return table
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-")
        except ValueError:
            continue
        table[_unescape(parts[4])] = parts[sep + 1]
    return table


def is_mounted(path: str | Path) -> bool:
    return os.path.realpath(path) in mount_table()


def is_layerfs_mount(path: str | Path) -> bool:
    return mount_table().get(os.path.realpath(path)) == FSTYPE


def unmount(path: str | Path, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount (fusermount3, or umount as root)."""
    point = os.path.realpath(path)
    commands = []
    if shutil.which("fusermount3"):
        commands.append(["fusermount3", "-u", *(["-z"] if lazy else []), point])
    if os.geteuid() == 0 and shutil.which("umount"):
        commands.append(["umount", *(["-l"] if lazy else []), point])
    if not commands:
        raise MountError(
            "cannot unmount: neither fusermount3 nor umount is available",
            hint="apt-get install fuse3",
        )
    message = ""
    for command in commands:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
        if result.returncode == 0 or not is_mounted(point):
            return
        lines = (result.stderr or result.stdout).strip().splitlines()
        message = lines[-1] if lines else ""
        if "busy" in message.lower():
            raise MountpointBusyError(
                f"cannot unmount {point}: it is busy (a process uses a file or directory in it)",
                hint="stop those processes (fuser -vm MOUNTPOINT), or use --lazy",
            )
    raise MountError(f"cannot unmount {point}: {message or 'unknown error'}")


def check_mountpoint(path: Path) -> Path:
    """The mountpoint, resolved, if it is an empty directory nobody mounted on."""
    if not path.exists():
        raise MountError(
            f"cannot mount on {str(path)!r}: no such directory",
            hint=f"create it first: mkdir -p {path}",
        )
    if not path.is_dir():
        raise MountError(f"cannot mount on {str(path)!r}: not a directory")
    real = Path(os.path.realpath(path))
    if is_mounted(real):
        raise MountpointBusyError(
            f"cannot mount on {str(path)!r}: something is already mounted there",
            hint="layerfs umount it first",
        )
    try:
        with os.scandir(real) as entries:
            if any(True for _ in entries):
                raise MountpointBusyError(
                    f"cannot mount on {str(path)!r}: the directory is not empty"
                )
    except PermissionError as exc:
        raise MountError(f"cannot mount on {str(path)!r}: {exc.strerror}") from exc
    return real


# -- mount records ----------------------------------------------------------------------------


@dataclass
class MountRecord:
    id: str
    mountpoint: str
    image: str  # image ID
    reference: str  # the name it was mounted by
    mode: str  # "ro" or "rw"
    upper: str | None = None  # the upper directory's name
    upper_path: str | None = None
    pid: int = 0
    started: str = ""
    log: str = ""
    options: list[str] = field(default_factory=list)
    engine: str = "pyfuse3"  # records written before the native engine came were pyfuse3's

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MountRecord:
        doc: dict[str, Any] = json.loads(data)
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Records:
    """The store's ``mounts/`` directory."""

    def __init__(self, directory: Path, tmp_root: Path) -> None:
        self.directory = directory
        self.tmp_root = tmp_root

    def record_path(self, mount_id: str) -> Path:
        return self.directory / f"{mount_id}.json"

    def lock_path(self, mount_id: str) -> Path:
        return self.directory / f"{mount_id}.lock"

    def write(self, record: MountRecord) -> None:
        atomic_write(self.record_path(record.id), record.to_json(), self.tmp_root)

    def remove(self, mount_id: str) -> None:
        for path in (self.record_path(mount_id), self.lock_path(mount_id)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def hold(self, mount_id: str) -> FileLock:
        """The server's lock: held as long as the server lives."""
        lock = FileLock(self.lock_path(mount_id))
        lock.acquire(exclusive=True)
        return lock

    def alive(self, mount_id: str) -> bool:
        return is_locked(self.lock_path(mount_id))

    def wait_released(self, mount_id: str, timeout: float) -> bool:
        """Wait until a mount's server has let go of its lock; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.alive(mount_id):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def all(self) -> list[MountRecord]:
        records: list[MountRecord] = []
        if not self.directory.is_dir():
            return records
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(MountRecord.from_json(path.read_bytes()))
            except (OSError, ValueError, TypeError):
                continue
        return records

    def find(self, mountpoint: str | Path) -> MountRecord | None:
        real = os.path.realpath(mountpoint)
        for record in self.all():
            if record.mountpoint == real:
                return record
        return None


def _other_mount_namespace(pid: int) -> bool:
    """True if process ``pid`` is known to live in another mount namespace than ours."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False


def stop_mount(
    records: Records, mountpoint: str | Path, *, lazy: bool = False, timeout: float = 60.0
) -> None:
    """Unmount and wait for the server to finish (or clean up after a dead one)."""
    real = os.path.realpath(mountpoint)
    record = records.find(real)
    if not is_mounted(real):
        if record is not None and not records.alive(record.id):
            records.remove(record.id)  # the server died and someone unmounted already
            return
        if record is None:
            raise MountError(f"{mountpoint} is not mounted")
        if _other_mount_namespace(record.pid):
            # Mounted in a mount namespace of its own (unshare --mount) that this
            # process cannot see into: the server unmounts there on SIGTERM.
            timeout = min(timeout, 2.0)
    elif not is_layerfs_mount(real):
        raise MountError(f"{mountpoint} is not a layerfs mount")
    else:
        unmount(real, lazy=lazy)
    if record is None:
        return
    if not records.wait_released(record.id, timeout if not lazy else 0.5):
        if lazy:
            return  # detached; the server ends when the last user leaves
        try:
            os.kill(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not records.wait_released(record.id, 10):
            raise MountError(
                f"the server of {mountpoint} (pid {record.pid}) does not exit",
                hint=f"see its log: {record.log}",
            )
    records.remove(record.id)
