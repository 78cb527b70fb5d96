"""The kernel's FUSE protocol: constants, structure layouts, request decoding, replies.

Everything here follows the kernel's UAPI header ``linux/fuse.h`` (protocol
7.x). Debian's copy of the header is minor 38; the few later additions this
engine uses are defined here with the minor that brought them (passthrough,
7.40). Structures are :class:`struct.Struct` layouts in native byte order
with every padding field spelled out, so that each one has the size the
header gives it (``tests/unit/test_native_protocol.py`` checks them).

Version negotiation (the header's own rules): the kernel sends its major and
minor in INIT; both sides then speak the smaller minor. A kernel older than
:data:`MIN_MINOR` is refused; a newer one gets :data:`OUR_MINOR` and adapts
to it. Nothing here does I/O: :mod:`.session` reads and writes the device.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

KERNEL_VERSION = 7
OUR_MINOR = 41
"""The newest minor whose structures this module knows."""
MIN_MINOR = 23
"""The oldest minor served (Linux 3.15): RENAME2, NO_OPEN, full-size structures."""

ROOT_ID = 1
MIN_READ_BUFFER = 8192

# -- opcodes -------------------------------------------------------------------------------

LOOKUP = 1
FORGET = 2  # no reply
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36  # no reply (but EAGAIN)
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42  # no reply
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52

_OPCODES = (
    "LOOKUP",
    "FORGET",
    "GETATTR",
    "SETATTR",
    "READLINK",
    "SYMLINK",
    "MKNOD",
    "MKDIR",
    "UNLINK",
    "RMDIR",
    "RENAME",
    "LINK",
    "OPEN",
    "READ",
    "WRITE",
    "STATFS",
    "RELEASE",
    "FSYNC",
    "SETXATTR",
    "GETXATTR",
    "LISTXATTR",
    "REMOVEXATTR",
    "FLUSH",
    "INIT",
    "OPENDIR",
    "READDIR",
    "RELEASEDIR",
    "FSYNCDIR",
    "GETLK",
    "SETLK",
    "SETLKW",
    "ACCESS",
    "CREATE",
    "INTERRUPT",
    "BMAP",
    "DESTROY",
    "IOCTL",
    "POLL",
    "NOTIFY_REPLY",
    "BATCH_FORGET",
    "FALLOCATE",
    "READDIRPLUS",
    "RENAME2",
    "LSEEK",
    "COPY_FILE_RANGE",
    "SETUPMAPPING",
    "REMOVEMAPPING",
    "SYNCFS",
    "TMPFILE",
    "STATX",
)
OPCODE_NAMES: dict[int, str] = {globals()[name]: name.lower() for name in _OPCODES}
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# -- INIT flags (fuse_init_in/out.flags; bits 32..63 travel in flags2) -----------------------

ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37  # 7.40
NO_EXPORT_SUPPORT = 1 << 38  # 7.40
HAS_RESEND = 1 << 39  # 7.40

_FLAGS = (
    "ASYNC_READ",
    "POSIX_LOCKS",
    "ATOMIC_O_TRUNC",
    "EXPORT_SUPPORT",
    "BIG_WRITES",
    "DONT_MASK",
    "SPLICE_WRITE",
    "SPLICE_MOVE",
    "SPLICE_READ",
    "FLOCK_LOCKS",
    "HAS_IOCTL_DIR",
    "AUTO_INVAL_DATA",
    "DO_READDIRPLUS",
    "READDIRPLUS_AUTO",
    "ASYNC_DIO",
    "WRITEBACK_CACHE",
    "NO_OPEN_SUPPORT",
    "PARALLEL_DIROPS",
    "HANDLE_KILLPRIV",
    "POSIX_ACL",
    "ABORT_ERROR",
    "MAX_PAGES",
    "CACHE_SYMLINKS",
    "NO_OPENDIR_SUPPORT",
    "EXPLICIT_INVAL_DATA",
    "MAP_ALIGNMENT",
    "SUBMOUNTS",
    "HANDLE_KILLPRIV_V2",
    "SETXATTR_EXT",
    "INIT_EXT",
    "SECURITY_CTX",
    "HAS_INODE_DAX",
    "CREATE_SUPP_GROUP",
    "HAS_EXPIRE_ONLY",
    "DIRECT_IO_ALLOW_MMAP",
    "PASSTHROUGH",
    "NO_EXPORT_SUPPORT",
    "HAS_RESEND",
)
FLAG_NAMES: dict[int, str] = {globals()[name]: name.lower() for name in _FLAGS}

# -- other flags ---------------------------------------------------------------------------------

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7  # 7.40

FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_KILL_SUIDGID = 1 << 2
IOCTL_DIR = 1 << 4

# -- device ioctls -------------------------------------------------------------------------------

_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (229 << 8) | number


DEV_IOC_CLONE = _ioc(_IOC_READ, 0, 4)
"""``_IOR(229, 0, uint32_t)``: make a new /dev/fuse descriptor a clone of a session's."""
BACKING_MAP = struct.Struct("=iIQ")  # fuse_backing_map: fd, flags, padding
DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, 1, BACKING_MAP.size)
"""``_IOW(229, 1, struct fuse_backing_map)``: register a backing file; returns its id."""
DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, 2, 4)

# -- structures ----------------------------------------------------------------------------------

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
ATTR_FORMAT = "QQQQQQIIIIIIIIII"  # fuse_attr
ATTR = struct.Struct("=" + ATTR_FORMAT)
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR_FORMAT)
ATTR_OUT = struct.Struct("=QII" + ATTR_FORMAT)
OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id
WRITE_OUT = struct.Struct("=II")
STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # fuse_kstatfs: ... bsize namelen frsize pad spare
GETXATTR_OUT = struct.Struct("=II")
LSEEK_OUT = struct.Struct("=Q")
IOCTL_OUT = struct.Struct("=iIII")
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_IN_EXT = struct.Struct("=IIIII44x")  # ... flags2 unused[11]
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")
"""major minor max_readahead flags max_background congestion_threshold max_write time_gran
max_pages map_alignment flags2 max_stack_depth unused[6]"""
INIT_OUT_COMPAT_22_SIZE = 24
DIRENT = struct.Struct("=QQII")  # ino off namelen type, then the name
DIRENT_NAME_OFFSET = DIRENT.size
DIRENTPLUS_NAME_OFFSET = ENTRY_OUT.size + DIRENT.size

# Request bodies: (layout, number of NUL-terminated names after it, a data tail follows).
FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
GETATTR_IN = struct.Struct("=IIQ")
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
"""valid pad fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode
unused4 uid gid unused5"""
MKNOD_IN = struct.Struct("=IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")  # mode umask
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")  # newdir flags padding
LINK_IN = struct.Struct("=Q")
OPEN_IN = struct.Struct("=II")  # flags open_flags
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags padding
RELEASE_IN = struct.Struct("=QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("=QIIQ")  # fh unused padding lock_owner
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("=II")  # size flags
SETXATTR_IN_EXT = struct.Struct("=IIII")  # size flags setxattr_flags padding
GETXATTR_IN = struct.Struct("=II")  # size padding
ACCESS_IN = struct.Struct("=II")  # mask padding
INTERRUPT_IN = struct.Struct("=Q")
BMAP_IN = struct.Struct("=QII")
IOCTL_IN = struct.Struct("=QIIQII")  # fh flags cmd arg in_size out_size
POLL_IN = struct.Struct("=QQII")
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
LK_IN = struct.Struct("=QQQQIIII")  # fh owner start end type pid lk_flags padding
STATX_IN = struct.Struct("=IIQII")
SYNCFS_IN = struct.Struct("=Q")
EMPTY = struct.Struct("")


@dataclass(frozen=True)
class Layout:
    body: struct.Struct
    names: int = 0  # NUL-terminated names after the fixed part
    data: bool = False  # a data tail after the names


LAYOUTS: dict[int, Layout] = {
    LOOKUP: Layout(EMPTY, 1),
    FORGET: Layout(FORGET_IN),
    GETATTR: Layout(GETATTR_IN),
    SETATTR: Layout(SETATTR_IN),
    READLINK: Layout(EMPTY),
    SYMLINK: Layout(EMPTY, 2),
    MKNOD: Layout(MKNOD_IN, 1),
    MKDIR: Layout(MKDIR_IN, 1),
    UNLINK: Layout(EMPTY, 1),
    RMDIR: Layout(EMPTY, 1),
    RENAME: Layout(RENAME_IN, 2),
    LINK: Layout(LINK_IN, 1),
    OPEN: Layout(OPEN_IN),
    READ: Layout(READ_IN),
    WRITE: Layout(WRITE_IN, 0, True),
    STATFS: Layout(EMPTY),
    RELEASE: Layout(RELEASE_IN),
    FSYNC: Layout(FSYNC_IN),
    SETXATTR: Layout(SETXATTR_IN, 1, True),
    GETXATTR: Layout(GETXATTR_IN, 1),
    LISTXATTR: Layout(GETXATTR_IN),
    REMOVEXATTR: Layout(EMPTY, 1),
    FLUSH: Layout(FLUSH_IN),
    INIT: Layout(INIT_IN, 0, True),  # the INIT_EXT part is read from the tail
    OPENDIR: Layout(OPEN_IN),
    READDIR: Layout(READ_IN),
    RELEASEDIR: Layout(RELEASE_IN),
    FSYNCDIR: Layout(FSYNC_IN),
    GETLK: Layout(LK_IN),
    SETLK: Layout(LK_IN),
    SETLKW: Layout(LK_IN),
    ACCESS: Layout(ACCESS_IN),
    CREATE: Layout(CREATE_IN, 1),
    INTERRUPT: Layout(INTERRUPT_IN),
    BMAP: Layout(BMAP_IN),
    DESTROY: Layout(EMPTY),
    IOCTL: Layout(IOCTL_IN, 0, True),
    POLL: Layout(POLL_IN),
    BATCH_FORGET: Layout(BATCH_FORGET_IN, 0, True),
    FALLOCATE: Layout(FALLOCATE_IN),
    READDIRPLUS: Layout(READ_IN),
    RENAME2: Layout(RENAME2_IN, 2),
    LSEEK: Layout(LSEEK_IN),
    COPY_FILE_RANGE: Layout(COPY_FILE_RANGE_IN),
    SYNCFS: Layout(SYNCFS_IN),
    TMPFILE: Layout(CREATE_IN, 1),
    STATX: Layout(STATX_IN),
}


_LAYOUT = {opcode: (layout.body, layout.names, layout.data) for opcode, layout in LAYOUTS.items()}
EMPTY_VIEW = memoryview(b"")


class ProtocolError(Exception):
    """A request that does not decode; ``unique`` is 0 when even its header is unreadable."""

    def __init__(self, message: str, unique: int = 0) -> None:
        super().__init__(message)
        self.unique = unique


class Request:
    """One decoded request: the header's fields, the fixed body, names and a data tail."""

    __slots__ = (
        "args",
        "data",
        "gid",
        "interrupted",
        "names",
        "nodeid",
        "opcode",
        "pid",
        "uid",
        "unique",
    )

    def __init__(
        self,
        opcode: int,
        unique: int,
        nodeid: int,
        uid: int,
        gid: int,
        pid: int,
        args: tuple[int, ...] = (),
        names: tuple[bytes, ...] = (),
        data: memoryview = EMPTY_VIEW,
    ) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.args = args
        self.names = names
        self.data = data
        self.interrupted = False

    @property
    def name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"opcode {self.opcode}")

    def __repr__(self) -> str:
        return (
            f"Request({self.name}, unique={self.unique}, nodeid={self.nodeid}, "
            f"args={self.args}, names={self.names})"
        )


_header = IN_HEADER.unpack_from
_HEADER_SIZE = IN_HEADER.size


def decode(buf: memoryview, *, setxattr_ext: bool = False) -> Request:
    """Decode the request in ``buf`` (exactly what one read of the device returned)."""
    size = len(buf)
    if size < _HEADER_SIZE:
        raise ProtocolError(f"short request: {size} bytes, a header alone is {_HEADER_SIZE}")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _header(buf)
    if length != size:
        raise ProtocolError(f"request length {length} but {size} bytes were read", unique)
    end = size - 8 * extlen  # extensions (security context, groups) sit at the end: unused
    if end < _HEADER_SIZE:
        raise ProtocolError(f"extension length {8 * extlen} exceeds the request", unique)
    layout = _LAYOUT.get(opcode)
    if layout is None:
        return Request(opcode, unique, nodeid, uid, gid, pid, (), (), buf[_HEADER_SIZE:end])
    body, count, has_data = layout
    if setxattr_ext and opcode == SETXATTR:
        body = SETXATTR_IN_EXT
    offset = _HEADER_SIZE + body.size
    if offset > end:
        raise ProtocolError(
            f"{OPCODE_NAMES[opcode]}: body of {end - _HEADER_SIZE} bytes, needs {body.size}", unique
        )
    args = body.unpack_from(buf, _HEADER_SIZE) if body.size else ()
    names: tuple[bytes, ...] = ()
    if count:
        tail = bytes(buf[offset:end])
        first = tail.find(b"\0")
        if first < 0:
            raise ProtocolError(f"{OPCODE_NAMES[opcode]}: a name is not terminated", unique)
        if count == 1:
            names = (tail[:first],)
            offset += first + 1
        else:
            second = tail.find(b"\0", first + 1)
            if second < 0:
                raise ProtocolError(f"{OPCODE_NAMES[opcode]}: a name is not terminated", unique)
            names = (tail[:first], tail[first + 1 : second])
            offset += second + 1
    data = buf[offset:end] if has_data else EMPTY_VIEW
    return Request(opcode, unique, nodeid, uid, gid, pid, args, names, data)


# -- replies -------------------------------------------------------------------------------------


def reply_header(unique: int, length: int, error: int = 0) -> bytes:
    """The out header of a reply of ``length`` body bytes (``error`` is a negative errno)."""
    return OUT_HEADER.pack(OUT_HEADER.size + length, error, unique)


def error_reply(unique: int, errno_: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -errno_, unique)


def pack_dirent(buf: bytearray, pos: int, ino: int, off: int, kind: int, name: bytes) -> int:
    """Write one ``fuse_dirent`` at ``pos``; returns the position after it (8-aligned)."""
    DIRENT.pack_into(buf, pos, ino, off, len(name), kind)
    start = pos + DIRENT.size
    buf[start : start + len(name)] = name
    return (start + len(name) + 7) & ~7


def dirent_size(name: bytes, plus: bool) -> int:
    base = DIRENTPLUS_NAME_OFFSET if plus else DIRENT_NAME_OFFSET
    return (base + len(name) + 7) & ~7


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in sorted(FLAG_NAMES.items()) if flags & bit]


def init_reply_size(minor: int) -> int:
    """How much of ``fuse_init_out`` a kernel speaking ``minor`` accepts."""
    return INIT_OUT_COMPAT_22_SIZE if minor < 23 else INIT_OUT.size
