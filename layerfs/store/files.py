"""Atomic publication of files and directories, staging owners, and the store's kernel locks.

Everything the store makes visible is first written under ``<root>/tmp/``,
fsynced, then renamed into place; a crash leaves the old state or the new one.
Locks are ``flock`` locks on open files: the kernel drops them when their
process dies, so a killed process never leaves the store locked.

Every staging entry is named ``<kind>-<owner>-<random>``. The owner is one
process: it holds an exclusive flock on ``<root>/owners/<owner>`` for as long
as it lives, so whether an entry's writer is still alive is a lock probe
(:func:`owner_alive`), not a PID that may have been reused or belong to another
PID namespace. :func:`sweep_stale` removes the entries of owners that are gone.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.errors import NoSpaceError, StoreError, StoreLockedError
from layerfs.store.faults import fault

OWNERS_DIR = "owners"
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# -- free space -------------------------------------------------------------------------------

RESERVE_VARIABLE = "LAYERFS_MIN_FREE"
RESERVE_FRACTION = 20  # by default keep 1/20 (5%) of the file system free...
RESERVE_CAP = 1 << 30  # ...but never more than 1 GiB
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"1G"``, ``"4096"`` (bytes; K, M, G, T are powers of 1024)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)].strip()
    if not number.isdigit():
        raise StoreError(
            f"{RESERVE_VARIABLE}={text!r} is not a size",
            hint="give bytes, or a number with K, M, G or T (powers of 1024), e.g. 512M",
        )
    return int(number) * _UNITS[unit]


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def reserve_bytes(path: Path) -> int:
    """The free space ingest leaves alone on ``path``'s file system.

    ``LAYERFS_MIN_FREE`` if set (0 turns the reserve off), else 5% of the file
    system, at most 1 GiB: a decompression bomb or a huge pull stops before the
    disk that the rest of the machine lives on is full.
    """
    value = os.environ.get(RESERVE_VARIABLE)
    if value:
        return parse_size(value)
    st = os.statvfs(path)
    return min(st.f_blocks * st.f_frsize // RESERVE_FRACTION, RESERVE_CAP)


def _show_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class SpaceGuard:
    """A file writer that refuses to take the file system below the reserve.

    Ingest (load, pull, import, commit) writes through one of these: before a
    write would leave less than :func:`reserve_bytes` free it raises
    :class:`NoSpaceError` naming the store's path, what was being written and
    the override, and the caller removes what it staged. ``statvfs`` is asked
    again only after a fraction of the remaining headroom has been written, so
    the check costs nothing next to hashing; other writers on the same file
    system are seen at the next check.
    """

    def __init__(self, out: Any, directory: Path, what: str) -> None:
        self._out = out
        self._directory = directory
        self._what = what
        self._reserve = reserve_bytes(directory)
        self._headroom = 0  # bytes that may be written before asking statvfs again
        self.written = 0
        self._check(0)

    def _check(self, size: int) -> None:
        if self._reserve <= 0 or size <= self._headroom:
            self._headroom -= size
            return
        free = free_bytes(self._directory)
        if free - size < self._reserve:
            raise NoSpaceError(
                f"{self._what}: stopped after writing {_show_size(self.written)}: the file "
                f"system of {self._directory} has {_show_size(free)} free and layerfs keeps "
                f"{_show_size(self._reserve)} free ({RESERVE_VARIABLE})",
                hint=f"free some space (layerfs rmi, layerfs gc), or set a smaller reserve, "
                f"e.g. {RESERVE_VARIABLE}={max(self._reserve >> 21, 1)}M (0 turns it off)",
            )
        # Ask again once half of what is left above the reserve is used, or after 64 MiB.
        self._headroom = min((free - self._reserve) // 2, 64 << 20) - size

    def write(self, data: bytes | memoryview) -> int:
        self._check(len(data))
        self.written += len(data)
        return int(self._out.write(data))


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- a full disk -------------------------------------------------------------------------


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse to start ``what`` when ``needed`` bytes will not fit beside ``path``."""
    try:
        free = free_bytes(path)
    except OSError:
        return  # no answer is no reason to refuse; the write itself will tell
    if needed > free:
        raise NoSpaceError(
            f"{what}: needs {_human(needed)} but the file system of {path} has {_human(free)} free",
            hint="free some space (layerfs gc removes unused layers) or use another --root",
        )


def no_space_error(exc: OSError, path: Path, what: str, needed: int | None = None) -> NoSpaceError:
    """The one-line error for a write that hit ENOSPC/EDQUOT under ``path``."""
    reason = "over quota" if exc.errno == errno.EDQUOT else "no space left"
    need = f" ({_human(needed)} needed)" if needed else ""
    return NoSpaceError(
        f"{what}: {reason} on the file system of {path}{need}; nothing was stored",
        hint="free some space (layerfs gc removes unused layers) or use another --root",
    )


@contextlib.contextmanager
def reporting_no_space(path: Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn an ENOSPC/EDQUOT inside the block into :class:`NoSpaceError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise no_space_error(exc, path, what, needed) from exc
        raise


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- staging owners -----------------------------------------------------------------------

_owners: dict[str, tuple[str, int, int]] = {}  # owners dir → (owner, fd, pid)
_owners_mutex = threading.Lock()


def owners_dir(tmp_root: Path) -> Path:
    return tmp_root.parent / OWNERS_DIR


def owner_name(tmp_root: Path) -> str:
    """This process's owner name for staging under ``tmp_root``; its lock lives with it.

    The owner file stays when the process ends: a child it forked (a mount server)
    may share the lock and go on using the staging; the next sweep removes the file
    once nobody holds it.
    """
    owners = owners_dir(tmp_root)
    key = str(owners)
    pid = os.getpid()
    with _owners_mutex:
        known = _owners.get(key)
        if known is not None and known[2] == pid:
            return known[0]
        owners.mkdir(mode=0o700, exist_ok=True)
        while True:
            name = f"{pid}o{os.urandom(4).hex()}"
            path = owners / name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A sweeper probing between our open and our flock may have unlinked the file.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        _owners[key] = (name, fd, pid)
        return name


def owner_of(name: str) -> str | None:
    """The owner in a ``<kind>-<owner>-<random>`` name (the kind may have dashes)."""
    parts = name.split("-")
    return parts[-2] if len(parts) >= 3 and parts[-2] else None


def owner_alive(tmp_root: Path, owner: str) -> bool:
    """True while the process that owns ``owner``'s staging lives."""
    if owner.isdigit():  # an entry named by a layerfs older than owner files: a PID
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError, ValueError):
            return True
        return True
    if "/" in owner or owner.startswith("."):
        return False
    return is_locked(owners_dir(tmp_root) / owner)


def stale_entries(tmp_root: Path) -> list[Path]:
    """Entries of tmp/ whose owner is gone (or that name no owner)."""
    try:
        names = sorted(os.listdir(tmp_root))
    except FileNotFoundError:
        return []
    alive: dict[str, bool] = {}
    stale = []
    for name in names:
        owner = owner_of(name)
        if owner is None:
            stale.append(tmp_root / name)
            continue
        if owner not in alive:
            alive[owner] = owner_alive(tmp_root, owner)
        if not alive[owner]:
            stale.append(tmp_root / name)
    return stale


def sweep_stale(tmp_root: Path) -> list[str]:
    """Remove the staging of owners that are gone, then their owner files; names removed."""
    removed = []
    for path in stale_entries(tmp_root):
        remove_tree(path)
        removed.append(f"tmp/{path.name}")
    owners = owners_dir(tmp_root)
    try:
        names = os.listdir(owners)
    except FileNotFoundError:
        names = []
    for name in names:
        probe = FileLock(owners / name)
        try:
            if not probe.acquire(exclusive=True, blocking=False):
                continue
        except StoreError:
            continue
        try:
            (owners / name).unlink(missing_ok=True)  # unlinked while we hold it: see owner_name
        finally:
            probe.release()
    return removed


def make_temp_dir(tmp_root: Path, prefix: str) -> Path:
    """A fresh private directory under the store's tmp/ folder."""
    path = temp_path(tmp_root, prefix)
    path.mkdir(mode=0o700)
    return path


def open_private(path: Path) -> BinaryIO:
    """A new file only its owner may read (0600 whatever the umask), open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def temp_path(tmp_root: Path, prefix: str) -> Path:
    """A fresh, not yet existing path under the store's tmp/ folder, named by its owner."""
    return tmp_root / f"{prefix}-{owner_name(tmp_root)}-{os.urandom(6).hex()}"


def atomic_write(path: Path, data: bytes, tmp_root: Path, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: write to tmp/, fsync, rename, fsync the directory."""
    tmp = temp_path(tmp_root, "write")
    with reporting_no_space(path.parent, f"cannot write {path.name}", len(data)):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
    fault("write.before-rename")
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fault("write.after-rename")
    fsync_dir(path.parent)


def publish_dir(staged: Path, final: Path) -> bool:
    """Rename a fully written staging directory into place.

    Returns False (and removes the staging copy) when ``final`` already exists:
    content-addressed entries are identical, so the first writer wins.
    """
    for entry in staged.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(staged)
    final.parent.mkdir(parents=True, exist_ok=True)
    fault("publish.before-rename")
    try:
        os.rename(staged, final)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            remove_tree(staged)
            return False
        raise
    fault("publish.after-rename")
    fsync_dir(final.parent)
    return True


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree; missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            import shutil  # imports bz2 and lzma: not on every command's way

            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


_keep_removed: contextvars.ContextVar[Path | None] = contextvars.ContextVar("keep_removed")


@contextlib.contextmanager
def keeping_removed(directory: Path) -> Iterator[None]:
    """Within the block :func:`trash` moves into ``directory`` (as ``<parent>-<name>``)."""
    token = _keep_removed.set(directory)
    try:
        yield
    finally:
        _keep_removed.reset(token)


def trash(path: Path, tmp_root: Path) -> None:
    """Make ``path`` disappear at once (a rename), then delete it at leisure."""
    keep = _keep_removed.get(None)
    target = keep / f"{path.parent.name}-{path.name}" if keep else temp_path(tmp_root, "trash")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
    if keep is not None:  # an undoable command: kept until it is done (journal.undoable)
        fsync_dir(keep)
        return
    if target.is_dir():
        children = sorted(target.iterdir())
        if len(children) > 1:  # a named step half way through the removal
            remove_tree(children[0])
            fault("remove.mid-unlink")
    remove_tree(target)


class FileLock:
    """A kernel ``flock`` on one file; shared or exclusive, blocking or not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, exclusive: bool = True, blocking: bool = True) -> bool:
        if self._fd is not None:
            raise StoreError(f"lock {self.path} is already taken by this object")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError as exc:
            raise StoreError(f"cannot open lock file {self.path}: {exc.strerror}") from exc
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not blocking:
            flags |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def is_locked(path: Path) -> bool:
    """True while some process (this one included) holds any flock on ``path``."""
    if not path.exists():
        return False
    probe = FileLock(path)
    if probe.acquire(exclusive=True, blocking=False):
        probe.release()
        return False
    return True


def remove_unheld_lock_files(directory: Path) -> int:
    """Remove the lock files in ``directory`` that no process holds; how many went.

    The caller holds the store lock, so no one takes a new lock file meanwhile; one taken
    before is skipped while it is held.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    for path in directory.iterdir():
        probe = FileLock(path)
        if probe.acquire(exclusive=True, blocking=False):
            path.unlink(missing_ok=True)
            probe.release()
            removed += 1
    return removed


_held: dict[str, tuple[FileLock, int]] = {}
_held_mutex = threading.RLock()
_lock_hooks: dict[str, Callable[[], None]] = {}


LOCK_WARN_SECONDS = 10.0


def lock_holders(path: Path) -> list[int]:
    """PIDs holding a flock on ``path``, from /proc/locks (empty where it cannot tell)."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; blocked waiters have "->"
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == dev and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))


def describe_holders(path: Path) -> str:
    """``process 1234 (layerfs load ...)`` for whoever holds ``path``, or a plain phrase."""
    described = []
    for pid in lock_holders(path):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
            described.append(f"process {pid} ({cmd.decode(errors='replace')[:80]})")
        except OSError:
            described.append(f"process {pid}")
    return ", ".join(described) or "another process"


def _wait_for(lock: FileLock, path: Path) -> None:
    """Take ``lock``, waiting; say who holds it once the wait grows long.

    ``LAYERFS_LOCK_TIMEOUT`` (seconds) turns a wait that long into an error naming
    the holder instead of waiting on.
    """
    if lock.acquire(blocking=False):
        return
    limit_text = os.environ.get("LAYERFS_LOCK_TIMEOUT", "")
    try:
        limit = float(limit_text) if limit_text else None
    except ValueError:
        limit = None
    start = time.monotonic()
    warned = False
    delay = 0.001
    while not lock.acquire(blocking=False):
        waited = time.monotonic() - start
        if limit is not None and waited >= limit:
            raise StoreLockedError(
                f"the store lock {path} has been held for over {limit:g} s by "
                f"{describe_holders(path)}",
                hint="wait for it to finish, or stop it",
            )
        if not warned and waited >= LOCK_WARN_SECONDS:
            import logging  # only when there is something to say (not every command's way)

            logging.getLogger(__name__).warning(
                "waiting for the store lock %s held by %s", path, describe_holders(path)
            )
            warned = True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def set_lock_hook(path: Path, hook: Callable[[], None]) -> None:
    """Run ``hook`` each time this process takes the lock on ``path`` (not when re-entering).

    The store uses it to finish or undo the pending records of dead processes and
    to sweep their staging before anyone changes anything.
    """
    _lock_hooks[str(path)] = hook


@contextlib.contextmanager
def locked(path: Path, *, timeout_message: str | None = None) -> Iterator[None]:
    """Hold the exclusive flock on ``path`` for the duration of the block.

    Re-entrant within a process: a nested ``locked`` on the same path (say, a
    tag change inside a load's transaction) does not deadlock on its own lock.
    Threads of one process serialise on a mutex first. With ``timeout_message``
    a busy lock raises :class:`StoreLockedError` instead of waiting.
    """
    key = str(path)
    with _held_mutex:
        lock, depth = _held.get(key, (FileLock(path), 0))
        if depth == 0:
            if timeout_message is not None:
                if not lock.acquire(blocking=False):
                    raise StoreLockedError(timeout_message)
            else:
                _wait_for(lock, path)
        _held[key] = (lock, depth + 1)
        try:
            hook = _lock_hooks.get(key) if depth == 0 else None
            if hook is not None:
                hook()
            yield
        finally:
            lock, depth = _held[key]
            if depth == 1:
                del _held[key]
                lock.release()
            else:
                _held[key] = (lock, depth - 1)
