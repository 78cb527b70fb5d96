"""The calls of a POSIX sequence, and how one call runs on one tree.

A call is a JSON list ``[name, *args]``. Paths are relative to the tree's root and the
runner makes that root its working directory before each call, so the very same path
string reaches the kernel for both trees (ENAMETOOLONG and PATH_MAX do not depend on
where a tree is). Open files live in numbered slots. An answer is ``["ok", value]`` or
``["err", "ENOENT"]``; values are JSON too, and never descriptor or inode numbers, which
differ between the trees by nature.

Standard library only: the runner may run from a virtualenv of the system's Python, as
a normal user.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
from typing import Any

Call = list[Any]
Answer = list[Any]

OPEN_FLAGS = {
    "O_RDONLY": os.O_RDONLY,
    "O_WRONLY": os.O_WRONLY,
    "O_RDWR": os.O_RDWR,
    "O_CREAT": os.O_CREAT,
    "O_EXCL": os.O_EXCL,
    "O_TRUNC": os.O_TRUNC,
    "O_APPEND": os.O_APPEND,
    "O_NOFOLLOW": os.O_NOFOLLOW,
    "O_DIRECTORY": os.O_DIRECTORY,
    "O_TMPFILE": os.O_TMPFILE,  # O_DIRECTORY among its bits
}
RENAME_FLAGS = {"RENAME_NOREPLACE": 1, "RENAME_EXCHANGE": 2, "RENAME_WHITEOUT": 4}
FALLOC_FLAGS = {
    "KEEP_SIZE": 0x01,
    "PUNCH_HOLE": 0x02,
    "COLLAPSE_RANGE": 0x08,
    "ZERO_RANGE": 0x10,
    "INSERT_RANGE": 0x20,
}
WHENCE = {
    "SEEK_SET": os.SEEK_SET,
    "SEEK_CUR": os.SEEK_CUR,
    "SEEK_END": os.SEEK_END,
    "SEEK_DATA": os.SEEK_DATA,
    "SEEK_HOLE": os.SEEK_HOLE,
}
XATTR_FLAGS = {"CREATE": os.XATTR_CREATE, "REPLACE": os.XATTR_REPLACE}
NODE_TYPES = {
    "reg": stat.S_IFREG,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
    "sock": stat.S_IFSOCK,
}
TYPE_CHARS = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}
RECENT_NS = 1_600_000_000 * 10**9
"""Times before this were set by a sequence or the starting tree; later ones are "now"."""

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.faccessat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def data_of(spec: list[int]) -> bytes:
    """The bytes a write call names: ``[length, salt]``, the same on every run."""
    length, salt = spec
    block = hashlib.sha256(b"posix-%d" % salt).digest()
    return (block * (length // len(block) + 1))[:length]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def time_class(ns: int) -> int | str:
    """A time as compared: its exact value when a sequence set it, else "recent"."""
    return ns if ns < RECENT_NS else "recent"


def stat_answer(st: os.stat_result) -> list[Any]:
    kind = TYPE_CHARS.get(stat.S_IFMT(st.st_mode), "?")
    return [
        kind,
        oct(stat.S_IMODE(st.st_mode)),
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size if kind != "d" else None,
        time_class(st.st_atime_ns),
        time_class(st.st_mtime_ns),
    ]


def _flags(names: list[str], table: dict[str, int]) -> int:
    value = 0
    for name in names:
        value |= table[name]
    return value


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _time(value: Any) -> tuple[int, int]:
    if value == "now":
        return 0, _UTIME_NOW
    if value == "omit":
        return 0, _UTIME_OMIT
    return divmod(int(value), 10**9)


class Tree:
    """One side of a run: its root and its open files (slot -> descriptor)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[int, int] = {}

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def run(self, call: Call) -> Answer:
        name, args = call[0], call[1:]
        try:
            value = getattr(self, "_" + name)(*args)
        except OSError as exc:
            return ["err", errno.errorcode.get(exc.errno or 0, str(exc.errno))]
        return ["ok", value]

    def fd(self, slot: int) -> int:
        fd = self.fds.get(slot)
        if fd is None:
            raise OSError(errno.EBADF, "slot is not open")
        return fd

    # -- open files -----------------------------------------------------------------------

    def _open(self, path: str, flags: list[str], mode: int, slot: int) -> None:
        self._close(slot)
        # Never block on a FIFO; O_NONBLOCK changes nothing for other files.
        self.fds[slot] = os.open(path, _flags(flags, OPEN_FLAGS) | os.O_NONBLOCK, mode)

    def _close(self, slot: int) -> None:
        fd = self.fds.pop(slot, None)
        if fd is not None:
            os.close(fd)

    def _read(self, slot: int, size: int) -> list[Any]:
        data = os.read(self.fd(slot), size)
        return [len(data), digest(data)]

    def _pread(self, slot: int, size: int, offset: int) -> list[Any]:
        data = os.pread(self.fd(slot), size, offset)
        return [len(data), digest(data)]

    def _write(self, slot: int, data: list[int]) -> int:
        return os.write(self.fd(slot), data_of(data))

    def _pwrite(self, slot: int, data: list[int], offset: int) -> int:
        return os.pwrite(self.fd(slot), data_of(data), offset)

    def _lseek(self, slot: int, offset: int, whence: str) -> int:
        return os.lseek(self.fd(slot), offset, WHENCE[whence])

    def _ftruncate(self, slot: int, size: int) -> None:
        os.ftruncate(self.fd(slot), size)

    def _fallocate(self, slot: int, flags: list[str], offset: int, length: int) -> None:
        _check(_libc.fallocate(self.fd(slot), _flags(flags, FALLOC_FLAGS), offset, length))

    def _fchmod(self, slot: int, mode: int) -> None:
        os.fchmod(self.fd(slot), mode)

    def _fchown(self, slot: int, uid: int, gid: int) -> None:
        os.fchown(self.fd(slot), uid, gid)

    def _fstat(self, slot: int) -> list[Any]:
        return stat_answer(os.fstat(self.fd(slot)))

    def _fsync(self, slot: int) -> None:
        os.fsync(self.fd(slot))

    # -- names ------------------------------------------------------------------------------

    def _stat(self, path: str, follow: bool) -> list[Any]:
        return stat_answer(os.stat(path, follow_symlinks=follow))

    def _access(self, path: str, mode: int) -> None:
        _check(_libc.faccessat(_AT_FDCWD, os.fsencode(path), mode, 0))

    def _listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def _readlink(self, path: str) -> str:
        return os.readlink(path)

    def _truncate(self, path: str, size: int) -> None:
        os.truncate(path, size)

    def _link(self, src: str, dst: str) -> None:
        os.link(src, dst, follow_symlinks=False)

    def _symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    def _rename(self, src: str, dst: str, flags: list[str]) -> None:
        value = _flags(flags, RENAME_FLAGS)
        _check(_libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), value))

    def _unlink(self, path: str) -> None:
        os.unlink(path)

    def _rmdir(self, path: str) -> None:
        os.rmdir(path)

    def _mkdir(self, path: str, mode: int) -> None:
        os.mkdir(path, mode)

    def _mknod(self, path: str, kind: str, mode: int, major: int, minor: int) -> None:
        os.mknod(path, NODE_TYPES[kind] | mode, os.makedev(major, minor))

    def _mkfifo(self, path: str, mode: int) -> None:
        os.mkfifo(path, mode)

    def _chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def _chown(self, path: str, uid: int, gid: int, follow: bool) -> None:
        os.chown(path, uid, gid, follow_symlinks=follow)

    def _utimensat(self, path: str, atime: Any, mtime: Any, follow: bool) -> None:
        times = (_Timespec * 2)(_Timespec(*_time(atime)), _Timespec(*_time(mtime)))
        flags = 0 if follow else _AT_SYMLINK_NOFOLLOW
        _check(_libc.utimensat(_AT_FDCWD, os.fsencode(path), ctypes.byref(times), flags))

    def _setxattr(self, path: str, name: str, value: str, flags: list[str]) -> None:
        os.setxattr(path, name, value.encode(), _flags(flags, XATTR_FLAGS), follow_symlinks=False)

    def _removexattr(self, path: str, name: str) -> None:
        os.removexattr(path, name, follow_symlinks=False)

    def _getxattr(self, path: str, name: str) -> str:
        return os.getxattr(path, name, follow_symlinks=False).decode(errors="replace")

    def _listxattr(self, path: str) -> list[str]:
        return sorted(os.listxattr(path, follow_symlinks=False))

    def _umask(self, mask: int) -> None:
        os.umask(mask)  # the runner sets it again before every call of either tree
