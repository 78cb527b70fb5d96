"""The data files of a writable layer: copying a range out of a layer tar, fallocate, holes.

An upper file's data is an ordinary file of the store (``upper/<name>/data/<n>``), so
what the store's file system offers for it, the mount offers: sparse files, the
``fallocate`` modes, ``SEEK_DATA``/``SEEK_HOLE``. A lower file's data is a contiguous
range of its layer tar and has no holes. ``upper.py`` decides when these run; this
module only moves bytes.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

COPY_CHUNK = 1 << 30
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def error(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


@dataclass
class CopyPlan:
    """A copy-up under way: the lower data's range and the upper data file it goes to."""

    ino: int
    number: int  # the upper data file
    fd: int
    src: int  # the layer tar, or -1 when nothing is copied
    src_offset: int
    count: int


def copy_range(src: int, offset: int, dst: int, count: int) -> None:
    """``count`` bytes of ``src`` at ``offset`` to the start of ``dst`` (copy_file_range)."""
    dst_offset = 0
    while count:
        try:
            copied = os.copy_file_range(src, dst, min(count, COPY_CHUNK), offset, dst_offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            copied = _copy_plain(src, offset, dst, dst_offset, count)
        if copied == 0:
            raise error(errno.EIO, "layer tar is shorter than its index says")
        offset += copied
        dst_offset += copied
        count -= copied


def _copy_plain(src: int, offset: int, dst: int, dst_offset: int, count: int) -> int:
    data = os.pread(src, min(count, 1 << 20), offset)
    if data:
        os.pwrite(dst, data, dst_offset)
    return len(data)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself: ``os.posix_fallocate`` would write zeros where it is refused."""
    if offset < 0 or length <= 0:
        raise error(errno.EINVAL)
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise error(code)


def seek(fd: int, offset: int, whence: int) -> int:
    """``SEEK_DATA``/``SEEK_HOLE`` in an upper data file (ENXIO past its end)."""
    return os.lseek(fd, offset, whence)


def seek_contiguous(size: int, offset: int, whence: int) -> int:
    """``SEEK_DATA``/``SEEK_HOLE`` in data without holes (a lower file)."""
    if offset < 0:
        raise error(errno.EINVAL)
    if offset >= size:
        raise error(errno.ENXIO)
    return offset if whence == os.SEEK_DATA else size
