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

from layerfs.errors import StoreError, StoreLockedError


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
