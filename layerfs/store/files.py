"""Atomic publication of files and directories, and the store's kernel locks.

Everything the store makes visible is first written under ``<root>/tmp/``,
fsynced, then renamed into place; a crash leaves the old state or the new one.
Locks are ``flock`` locks on open files: the kernel drops them when their
process dies, so a killed process never leaves the store locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.errors import NoSpaceError, StoreError, StoreLockedError

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


def make_temp_dir(tmp_root: Path, prefix: str) -> Path:
    """A fresh private directory under the store's tmp/ folder."""
    path = tmp_root / f"{prefix}-{os.getpid()}-{os.urandom(6).hex()}"
    path.mkdir(mode=0o700)
    return path


def open_private(path: Path) -> BinaryIO:
    """A new file only its owner may read (0600 whatever the umask), open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def temp_path(tmp_root: Path, prefix: str) -> Path:
    """A fresh, not yet existing path under the store's tmp/ folder."""
    return tmp_root / f"{prefix}-{os.getpid()}-{os.urandom(6).hex()}"


def atomic_write(path: Path, data: bytes, tmp_root: Path, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: write to tmp/, fsync, rename, fsync the directory."""
    tmp = temp_path(tmp_root, "write")
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
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
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
    try:
        os.rename(staged, final)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            remove_tree(staged)
            return False
        raise
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


def trash(path: Path, tmp_root: Path) -> None:
    """Make ``path`` disappear at once (a rename), then delete it at leisure."""
    target = temp_path(tmp_root, "trash")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
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


_held: dict[str, tuple[FileLock, int]] = {}
_held_mutex = threading.RLock()


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
                lock.acquire()
        _held[key] = (lock, depth + 1)
        try:
            yield
        finally:
            lock, depth = _held[key]
            if depth == 1:
                del _held[key]
                lock.release()
            else:
                _held[key] = (lock, depth - 1)
