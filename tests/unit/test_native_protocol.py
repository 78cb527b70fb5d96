"""The native engine's protocol without a mount: layouts, decoding, replies, bad requests.

Layouts are checked field by field against the kernel's UAPI header as a C compiler
reads it (``/usr/include/linux/fuse.h``; the test compiles a few lines of C that print
``offsetof`` and ``sizeof``). Structures newer than that header are checked against
the sizes the newer header gives. Every request type is encoded here as the kernel
would send it and decoded; every reply is produced by the real handlers over a small
image and decoded back.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from layerfs.fs.lower import from_store
from layerfs.fs.native import device, protocol
from layerfs.fs.native.handlers import READ_ONLY, WRITABLE, NativeDispatcher
from layerfs.fs.native.protocol import Request
from layerfs.fs.native.session import Negotiated, Session
from layerfs.fs.operations import Operations
from layerfs.fs.upper import Upper
from layerfs.store.store import Store
from tests.helpers import build_tar, tar_member

HEADER = Path("/usr/include/linux/fuse.h")


def fields(names: str) -> list[str | None]:
    return list(names.split())


# Our layout of each structure of the header, field by field (None: padding we skip).
LAYOUTS: dict[str, tuple[struct.Struct, list[str | None]]] = {
    "fuse_in_header": (
        protocol.IN_HEADER,
        ["len", "opcode", "unique", "nodeid", "uid", "gid", "pid", "total_extlen", "padding"],
    ),
    "fuse_out_header": (protocol.OUT_HEADER, ["len", "error", "unique"]),
    "fuse_attr": (
        protocol.ATTR,
        fields(
            "ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid "
            "gid rdev blksize flags"
        ),
    ),
    "fuse_entry_out": (
        protocol.ENTRY_OUT,
        fields("nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec"),
    ),
    "fuse_attr_out": (protocol.ATTR_OUT, ["attr_valid", "attr_valid_nsec", "dummy"]),
    "fuse_open_out": (protocol.OPEN_OUT, ["fh", "open_flags", None]),
    "fuse_write_out": (protocol.WRITE_OUT, ["size", "padding"]),
    "fuse_statfs_out": (protocol.STATFS_OUT, []),
    "fuse_kstatfs": (
        protocol.STATFS_OUT,
        ["blocks", "bfree", "bavail", "files", "ffree", "bsize", "namelen", "frsize", "padding"],
    ),
    "fuse_getxattr_out": (protocol.GETXATTR_OUT, ["size", "padding"]),
    "fuse_lseek_out": (protocol.LSEEK_OUT, ["offset"]),
    "fuse_ioctl_out": (protocol.IOCTL_OUT, ["result", "flags", "in_iovs", "out_iovs"]),
    "fuse_init_out": (
        protocol.INIT_OUT,
        fields(
            "major minor max_readahead flags max_background congestion_threshold max_write "
            "time_gran max_pages map_alignment flags2"
        ),
    ),
    "fuse_init_in": (protocol.INIT_IN_EXT, ["major", "minor", "max_readahead", "flags", "flags2"]),
    "fuse_dirent": (protocol.DIRENT, ["ino", "off", "namelen", "type"]),
    "fuse_forget_in": (protocol.FORGET_IN, ["nlookup"]),
    "fuse_batch_forget_in": (protocol.BATCH_FORGET_IN, ["count", "dummy"]),
    "fuse_forget_one": (protocol.FORGET_ONE, ["nodeid", "nlookup"]),
    "fuse_getattr_in": (protocol.GETATTR_IN, ["getattr_flags", "dummy", "fh"]),
    "fuse_setattr_in": (
        protocol.SETATTR_IN,
        fields(
            "valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec "
            "mode unused4 uid gid unused5"
        ),
    ),
    "fuse_mknod_in": (protocol.MKNOD_IN, ["mode", "rdev", "umask", "padding"]),
    "fuse_mkdir_in": (protocol.MKDIR_IN, ["mode", "umask"]),
    "fuse_rename_in": (protocol.RENAME_IN, ["newdir"]),
    "fuse_rename2_in": (protocol.RENAME2_IN, ["newdir", "flags", "padding"]),
    "fuse_link_in": (protocol.LINK_IN, ["oldnodeid"]),
    "fuse_open_in": (protocol.OPEN_IN, ["flags", "open_flags"]),
    "fuse_create_in": (protocol.CREATE_IN, ["flags", "mode", "umask", "open_flags"]),
    "fuse_read_in": (
        protocol.READ_IN,
        ["fh", "offset", "size", "read_flags", "lock_owner", "flags", "padding"],
    ),
    "fuse_write_in": (
        protocol.WRITE_IN,
        ["fh", "offset", "size", "write_flags", "lock_owner", "flags", "padding"],
    ),
    "fuse_release_in": (protocol.RELEASE_IN, ["fh", "flags", "release_flags", "lock_owner"]),
    "fuse_flush_in": (protocol.FLUSH_IN, ["fh", "unused", "padding", "lock_owner"]),
    "fuse_fsync_in": (protocol.FSYNC_IN, ["fh", "fsync_flags", "padding"]),
    "fuse_setxattr_in": (protocol.SETXATTR_IN_EXT, ["size", "flags", "setxattr_flags", "padding"]),
    "fuse_getxattr_in": (protocol.GETXATTR_IN, ["size", "padding"]),
    "fuse_access_in": (protocol.ACCESS_IN, ["mask", "padding"]),
    "fuse_interrupt_in": (protocol.INTERRUPT_IN, ["unique"]),
    "fuse_bmap_in": (protocol.BMAP_IN, ["block", "blocksize", "padding"]),
    "fuse_ioctl_in": (protocol.IOCTL_IN, ["fh", "flags", "cmd", "arg", "in_size", "out_size"]),
    "fuse_poll_in": (protocol.POLL_IN, ["fh", "kh", "flags", "events"]),
    "fuse_fallocate_in": (protocol.FALLOCATE_IN, ["fh", "offset", "length", "mode", "padding"]),
    "fuse_lseek_in": (protocol.LSEEK_IN, ["fh", "offset", "whence", "padding"]),
    "fuse_copy_file_range_in": (
        protocol.COPY_FILE_RANGE_IN,
        ["fh_in", "off_in", "nodeid_out", "fh_out", "off_out", "len", "flags"],
    ),
    "fuse_syncfs_in": (protocol.SYNCFS_IN, ["padding"]),
}
# Sizes from headers newer than Debian's (minors 39 and 40): fuse_statx_in and
# fuse_backing_map are new, fuse_open_out's padding became backing_id and
# fuse_init_out's unused[0] max_stack_depth.
NEWER = {"fuse_backing_map": (protocol.BACKING_MAP, 16), "fuse_statx_in": (protocol.STATX_IN, 24)}


def offsets(layout: struct.Struct) -> list[int]:
    """The offset of every field of a "=..." layout (pad bytes "x" are not fields)."""
    fmt = layout.format[1:]
    out, pos, count = [], 0, ""
    for char in fmt:
        if char.isdigit():
            count += char
            continue
        n = int(count or 1)
        count = ""
        if char == "x":
            pos += n
            continue
        for _ in range(n):
            out.append(pos)
            pos += struct.calcsize("=" + char)
    return out


@pytest.fixture(scope="module")
def header_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """sizeof and offsetof of everything in LAYOUTS, as the C compiler reads the header."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not HEADER.exists():
        pytest.skip("needs a C compiler and linux/fuse.h (apt-get install gcc linux-libc-dev)")
    work = tmp_path_factory.mktemp("fuseh")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/fuse.h>",
        "int main(void) {",
    ]
    for name, (_layout, fields) in LAYOUTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field in fields:
            if field is not None:
                lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    lines += ["return 0;", "}"]
    (work / "sizes.c").write_text("\n".join(lines))
    subprocess.run(
        [compiler, "-o", str(work / "sizes"), str(work / "sizes.c")],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(work / "sizes")], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_structure_matches_the_kernel_header(name: str, header_layout: dict[str, int]):
    layout, fields = LAYOUTS[name]
    assert header_layout[name] == layout.size, name
    ours = offsets(layout)
    for index, field in enumerate(fields):
        if field is not None:
            assert header_layout[f"{name}.{field}"] == ours[index], f"{name}.{field}"


def test_structures_newer_than_the_header():
    for layout, size in NEWER.values():
        assert layout.size == size
    assert protocol.OPEN_OUT.size == 16 and protocol.INIT_OUT.size == 64
    assert protocol.DIRENTPLUS_NAME_OFFSET == 152
    assert protocol.DEV_IOC_CLONE == 0x8004E500
    assert protocol.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert protocol.DEV_IOC_BACKING_CLOSE == 0x4004E502
    assert protocol.PASSTHROUGH == 1 << 37 and protocol.FOPEN_PASSTHROUGH == 1 << 7


# -- decoding every request ---------------------------------------------------------------------


def request(
    opcode: int, body: bytes = b"", *, unique: int = 7, nodeid: int = 3, extlen: int = 0
) -> memoryview:
    data = (
        protocol.IN_HEADER.pack(
            protocol.IN_HEADER.size + len(body), opcode, unique, nodeid, 1000, 100, 4242, extlen, 0
        )
        + body
    )
    return memoryview(data)


def name(*names: bytes) -> bytes:
    return b"".join(n + b"\0" for n in names)


SETATTR = protocol.SETATTR_IN.pack(
    protocol.FATTR_MODE | protocol.FATTR_SIZE,
    0,
    9,
    4096,
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    0o100600,
    0,
    10,
    20,
    0,
)
READ = protocol.READ_IN.pack(5, 8192, 4096, 0, 0, os.O_RDONLY, 0)
# opcode: (body, expected args, expected names, expected data)
CASES: dict[int, tuple[bytes, tuple[int, ...], tuple[bytes, ...], bytes]] = {
    protocol.LOOKUP: (name(b"etc"), (), (b"etc",), b""),
    protocol.FORGET: (protocol.FORGET_IN.pack(3), (3,), (), b""),
    protocol.GETATTR: (protocol.GETATTR_IN.pack(1, 0, 9), (1, 0, 9), (), b""),
    protocol.SETATTR: (SETATTR, protocol.SETATTR_IN.unpack(SETATTR), (), b""),
    protocol.READLINK: (b"", (), (), b""),
    protocol.SYMLINK: (name(b"link", b"../target"), (), (b"link", b"../target"), b""),
    protocol.MKNOD: (
        protocol.MKNOD_IN.pack(0o20644, 0x103, 0o22, 0) + name(b"null"),
        (0o20644, 0x103, 0o22, 0),
        (b"null",),
        b"",
    ),
    protocol.MKDIR: (protocol.MKDIR_IN.pack(0o755, 0o22) + name(b"d"), (0o755, 0o22), (b"d",), b""),
    protocol.UNLINK: (name(b"f"), (), (b"f",), b""),
    protocol.RMDIR: (name(b"d"), (), (b"d",), b""),
    protocol.RENAME: (protocol.RENAME_IN.pack(4) + name(b"a", b"b"), (4,), (b"a", b"b"), b""),
    protocol.LINK: (protocol.LINK_IN.pack(12) + name(b"hard"), (12,), (b"hard",), b""),
    protocol.OPEN: (protocol.OPEN_IN.pack(os.O_RDWR, 0), (os.O_RDWR, 0), (), b""),
    protocol.READ: (READ, protocol.READ_IN.unpack(READ), (), b""),
    protocol.WRITE: (
        protocol.WRITE_IN.pack(5, 0, 5, 0, 0, os.O_WRONLY, 0) + b"hello",
        (5, 0, 5, 0, 0, os.O_WRONLY, 0),
        (),
        b"hello",
    ),
    protocol.STATFS: (b"", (), (), b""),
    protocol.RELEASE: (protocol.RELEASE_IN.pack(5, 0, 0, 0), (5, 0, 0, 0), (), b""),
    protocol.FSYNC: (protocol.FSYNC_IN.pack(5, 1, 0), (5, 1, 0), (), b""),
    protocol.SETXATTR: (
        protocol.SETXATTR_IN.pack(3, 1) + name(b"user.k") + b"v\0x",
        (3, 1),
        (b"user.k",),
        b"v\0x",
    ),
    protocol.GETXATTR: (
        protocol.GETXATTR_IN.pack(64, 0) + name(b"user.k"),
        (64, 0),
        (b"user.k",),
        b"",
    ),
    protocol.LISTXATTR: (protocol.GETXATTR_IN.pack(0, 0), (0, 0), (), b""),
    protocol.REMOVEXATTR: (name(b"user.k"), (), (b"user.k",), b""),
    protocol.FLUSH: (protocol.FLUSH_IN.pack(5, 0, 0, 77), (5, 0, 0, 77), (), b""),
    protocol.INIT: (
        protocol.INIT_IN_EXT.pack(7, 45, 131072, protocol.INIT_EXT, 1 << 5),
        (7, 45, 131072, protocol.INIT_EXT),
        (),
        struct.pack("=I", 1 << 5) + bytes(44),
    ),
    protocol.OPENDIR: (protocol.OPEN_IN.pack(os.O_RDONLY, 0), (os.O_RDONLY, 0), (), b""),
    protocol.READDIR: (READ, protocol.READ_IN.unpack(READ), (), b""),
    protocol.RELEASEDIR: (protocol.RELEASE_IN.pack(5, 0, 0, 0), (5, 0, 0, 0), (), b""),
    protocol.FSYNCDIR: (protocol.FSYNC_IN.pack(5, 0, 0), (5, 0, 0), (), b""),
    protocol.GETLK: (
        protocol.LK_IN.pack(1, 2, 3, 4, 5, 6, 7, 0),
        (1, 2, 3, 4, 5, 6, 7, 0),
        (),
        b"",
    ),
    protocol.SETLK: (
        protocol.LK_IN.pack(1, 2, 3, 4, 5, 6, 7, 0),
        (1, 2, 3, 4, 5, 6, 7, 0),
        (),
        b"",
    ),
    protocol.SETLKW: (
        protocol.LK_IN.pack(1, 2, 3, 4, 5, 6, 7, 0),
        (1, 2, 3, 4, 5, 6, 7, 0),
        (),
        b"",
    ),
    protocol.ACCESS: (protocol.ACCESS_IN.pack(4, 0), (4, 0), (), b""),
    protocol.CREATE: (
        protocol.CREATE_IN.pack(os.O_WRONLY, 0o644, 0o22, 0) + name(b"new"),
        (os.O_WRONLY, 0o644, 0o22, 0),
        (b"new",),
        b"",
    ),
    protocol.INTERRUPT: (protocol.INTERRUPT_IN.pack(99), (99,), (), b""),
    protocol.BMAP: (protocol.BMAP_IN.pack(1, 4096, 0), (1, 4096, 0), (), b""),
    protocol.DESTROY: (b"", (), (), b""),
    protocol.IOCTL: (
        protocol.IOCTL_IN.pack(0, 0, 0x5401, 0, 0, 60),
        (0, 0, 0x5401, 0, 0, 60),
        (),
        b"",
    ),
    protocol.POLL: (protocol.POLL_IN.pack(5, 6, 0, 1), (5, 6, 0, 1), (), b""),
    protocol.BATCH_FORGET: (
        protocol.BATCH_FORGET_IN.pack(2, 0)
        + protocol.FORGET_ONE.pack(3, 1)
        + protocol.FORGET_ONE.pack(4, 2),
        (2, 0),
        (),
        protocol.FORGET_ONE.pack(3, 1) + protocol.FORGET_ONE.pack(4, 2),
    ),
    protocol.FALLOCATE: (protocol.FALLOCATE_IN.pack(5, 0, 100, 1, 0), (5, 0, 100, 1, 0), (), b""),
    protocol.READDIRPLUS: (READ, protocol.READ_IN.unpack(READ), (), b""),
    protocol.RENAME2: (
        protocol.RENAME2_IN.pack(4, 2, 0) + name(b"a", b"b"),
        (4, 2, 0),
        (b"a", b"b"),
        b"",
    ),
    protocol.LSEEK: (protocol.LSEEK_IN.pack(5, 10, 3, 0), (5, 10, 3, 0), (), b""),
    protocol.COPY_FILE_RANGE: (
        protocol.COPY_FILE_RANGE_IN.pack(5, 0, 9, 6, 10, 100, 0),
        (5, 0, 9, 6, 10, 100, 0),
        (),
        b"",
    ),
    protocol.SYNCFS: (protocol.SYNCFS_IN.pack(0), (0,), (), b""),
    protocol.TMPFILE: (
        protocol.CREATE_IN.pack(os.O_RDWR, 0o600, 0o22, 0) + name(b""),
        (os.O_RDWR, 0o600, 0o22, 0),
        (b"",),
        b"",
    ),
    protocol.STATX: (protocol.STATX_IN.pack(0, 0, 0, 0, 0x7FF), (0, 0, 0, 0, 0x7FF), (), b""),
}


def test_every_request_the_engine_knows_has_a_case():
    assert set(protocol.LAYOUTS) == set(CASES)


@pytest.mark.parametrize("opcode", sorted(CASES), ids=lambda op: protocol.OPCODE_NAMES[op])
def test_every_request_type_decodes(opcode: int):
    body, args, names, data = CASES[opcode]
    req = protocol.decode(request(opcode, body))
    assert (req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid) == (
        opcode,
        7,
        3,
        1000,
        100,
        4242,
    )
    assert req.args == args
    assert req.names == names
    assert bytes(req.data) == data


def test_extensions_at_the_end_are_cut_off_and_unknown_opcodes_keep_their_body():
    body = name(b"file") + bytes(16)  # a 16-byte extension (e.g. supplementary groups)
    req = protocol.decode(request(protocol.UNLINK, body, extlen=2))
    assert req.names == (b"file",)
    req = protocol.decode(request(4000, b"abcd"))
    assert req.opcode == 4000 and bytes(req.data) == b"abcd" and req.name == "opcode 4000"


def test_setxattr_ext_layout():
    body = protocol.SETXATTR_IN_EXT.pack(1, 0, 1, 0) + name(b"user.a") + b"z"
    req = protocol.decode(request(protocol.SETXATTR, body), setxattr_ext=True)
    assert req.args == (1, 0, 1, 0) and req.names == (b"user.a",) and bytes(req.data) == b"z"


@pytest.mark.parametrize(
    "data, unique, words",
    [
        (b"\x01\x02", 0, "short request"),
        (protocol.IN_HEADER.pack(99, protocol.LOOKUP, 5, 1, 0, 0, 0, 0, 0), 5, "length 99"),
        (bytes(request(protocol.LOOKUP, b"unterminated")), 7, "not terminated"),
        (bytes(request(protocol.READ, b"\x00" * 10)), 7, "needs 40"),
        (
            bytes(request(protocol.RENAME, protocol.RENAME_IN.pack(4) + b"a\0b")),
            7,
            "not terminated",
        ),
        (bytes(request(protocol.LOOKUP, name(b"x"), extlen=9)), 7, "extension length"),
    ],
)
def test_malformed_requests_are_refused(data: bytes, unique: int, words: str):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode(memoryview(data))
    assert err.value.unique == unique
    assert words in str(err.value)


# -- the session answers malformed requests and goes on ---------------------------------------


class Replies:
    """The other end of a pipe a session writes its replies to."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)

    def take(self) -> list[tuple[int, int, bytes]]:
        """(unique, error, body) of each reply written so far."""
        try:
            data = os.read(self.read_fd, 1 << 20)
        except BlockingIOError:
            return []
        out = []
        while data:
            length, error, unique = protocol.OUT_HEADER.unpack_from(data)
            out.append((unique, error, data[protocol.OUT_HEADER.size : length]))
            data = data[length:]
        return out


_POOLS: list[ThreadPoolExecutor] = []


@pytest.fixture(autouse=True)
def _io_pools_shut_down() -> Iterator[None]:
    yield
    while _POOLS:
        _POOLS.pop().shutdown(wait=True)


def bare_session(dispatcher: NativeDispatcher, replies: Replies, flags: int) -> Session:
    conn = device.Connection(replies.write_fd, "/nonexistent", "test")
    session = Session(conn, dispatcher, workers=1)
    # A READ of a page not in the page cache goes to the I/O pool (run_blocking), as in a
    # served session: whether a page is cached is the machine's, not the test's, choice.
    session._pool = ThreadPoolExecutor(1, thread_name_prefix="test-io")
    _POOLS.append(session._pool)
    negotiated = Negotiated(7, 41, 45, flags, flags, 131072, 1 << 20, 256)
    session.negotiated = negotiated
    session._table = dispatcher.handlers(negotiated, session)
    return session


def test_a_bad_request_gets_eio_and_the_next_one_is_served(
    ro_ops: Operations, caplog: pytest.LogCaptureFixture
):
    replies = Replies()
    session = bare_session(NativeDispatcher(ro_ops), replies, READ_ONLY)
    counts = [0] * 64
    session._handle(replies.write_fd, request(protocol.LOOKUP, b"no nul", unique=11), counts)
    session._handle(replies.write_fd, memoryview(b"\x00" * 5), counts)
    session._handle(
        replies.write_fd, request(protocol.GETATTR, bytes(16), unique=12, nodeid=1), counts
    )
    session._handle(replies.write_fd, request(protocol.SETUPMAPPING, b"", unique=13), counts)
    session._handle(
        replies.write_fd, request(protocol.FORGET, protocol.FORGET_IN.pack(1), unique=14), counts
    )
    got = replies.take()
    assert [(u, e) for u, e, _ in got] == [(11, -errno.EIO), (12, 0), (13, -errno.ENOSYS)]
    assert "malformed request" in caplog.text
    mode = protocol.ATTR_OUT.unpack(got[1][2])[3 + 9]
    assert stat.S_ISDIR(mode)


def test_interrupt_ends_a_blocked_wait_with_eintr(ro_ops: Operations):
    import threading

    replies = Replies()
    session = bare_session(NativeDispatcher(ro_ops), replies, READ_ONLY)
    from concurrent.futures import ThreadPoolExecutor

    session._pool = ThreadPoolExecutor(1)
    release = threading.Event()
    req = Request(protocol.READ, 21, 3, 0, 0, 0)
    outcome: list[BaseException | str] = []

    def blocked() -> None:
        try:
            outcome.append(session.run_blocking(req, release.wait))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    while 21 not in session._waiting:
        pass
    session._handle(
        replies.write_fd,
        request(protocol.INTERRUPT, protocol.INTERRUPT_IN.pack(21), unique=22),
        [0] * 64,
    )
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome[0], InterruptedError) and req.interrupted
    assert replies.take() == []  # INTERRUPT itself gets no reply
    # An INTERRUPT that comes before the handler waits is remembered.
    session._interrupt(31)
    with pytest.raises(InterruptedError):
        session.run_blocking(Request(protocol.READ, 31, 3, 0, 0, 0), release.wait)
    release.set()
    assert session.run_blocking(Request(protocol.READ, 41, 3, 0, 0, 0), lambda: 5) == 5
    session._pool.shutdown()


# -- replies of the real handlers ------------------------------------------------------------------

MTIME = 1_700_000_000


def _tar(*members: tuple[str, bytes, bytes, int, str]) -> bytes:
    return build_tar(
        *(
            tar_member(
                path,
                kind,
                data=data,
                mode=mode,
                linkname=link,
                mtime=MTIME,
                pax={"SCHILY.xattr.user.note": "hi"} if path == "etc/passwd" else None,
            )
            for path, kind, data, mode, link in members
        )
    )


IMAGE = _tar(
    ("etc", tarfile.DIRTYPE, b"", 0o755, ""),
    ("etc/passwd", tarfile.REGTYPE, b"root:x:0:0\n", 0o644, ""),
    ("etc/link", tarfile.SYMTYPE, b"", 0o777, "passwd"),
    ("dev", tarfile.DIRTYPE, b"", 0o755, ""),
    ("dev/null", tarfile.CHRTYPE, b"", 0o666, ""),
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def _image(store: Store) -> str:
    staged = store.layers.ingest(io.BytesIO(IMAGE))
    return store.graph.create(staged, parent="").id


@pytest.fixture
def ro_ops(store: Store) -> Iterator[Operations]:
    image = _image(store)
    lower = from_store(store, store.graph.get(image), image, init=False)
    tars = lower.open_tars()
    yield Operations(lower.tree, tars)
    for fd in tars:
        os.close(fd)


@pytest.fixture
def rw_ops(store: Store) -> Iterator[Operations]:
    image = _image(store)
    lower = from_store(store, store.graph.get(image), image, init=False)
    tars = lower.open_tars()
    upper = Upper.open(
        lower.tree,
        store.subdir("upper") / "u",
        image_id=image,
        diff_ids=lower.diff_ids,
        tars=tars,
        init=False,
        tmp_root=store.tmp,
    )
    yield Operations(lower.tree, tars, upper=upper)
    upper.close()
    for fd in tars:
        os.close(fd)


def served(ops: Operations, flags: int) -> tuple[NativeDispatcher, Replies, Session]:
    replies = Replies()
    dispatcher = NativeDispatcher(ops, passthrough=False)
    session = bare_session(dispatcher, replies, flags)
    return dispatcher, replies, session


def ask(
    session: Session,
    replies: Replies,
    opcode: int,
    body: bytes = b"",
    nodeid: int = 1,
    unique: int = 50,
) -> tuple[int, bytes]:
    session._handle(replies.write_fd, request(opcode, body, unique=unique, nodeid=nodeid), [0] * 64)
    ((got_unique, error, reply),) = replies.take()
    assert got_unique == unique
    return error, reply


def entry(reply: bytes) -> tuple[int, ...]:
    assert len(reply) == protocol.ENTRY_OUT.size
    return protocol.ENTRY_OUT.unpack(reply)


def test_read_only_replies(ro_ops: Operations):
    _, replies, session = served(ro_ops, READ_ONLY)

    def call(opcode: int, body: bytes = b"", nodeid: int = 1) -> tuple[int, bytes]:
        return ask(session, replies, opcode, body, nodeid)

    error, reply = call(protocol.LOOKUP, name(b"etc"))
    etc = entry(reply)
    assert error == 0 and etc[0] == ro_ops.t.resolve(b"etc") and etc[2] > 3600
    assert stat.S_ISDIR(etc[6 + 9]) and etc[6 + 4] == MTIME  # mode, mtime
    error, reply = call(protocol.LOOKUP, name(b"nothing"))
    negative = entry(reply)
    assert negative[0] == 0 and negative[2] > 3600  # a cached negative entry
    passwd = ro_ops.t.resolve(b"etc/passwd")
    error, reply = call(protocol.GETATTR, bytes(16), nodeid=passwd)
    attr = protocol.ATTR_OUT.unpack(reply)
    assert attr[3:5] == (passwd, 11) and attr[3 + 9] == stat.S_IFREG | 0o644
    null = ro_ops.t.resolve(b"dev/null")
    _, reply = call(protocol.GETATTR, bytes(16), nodeid=null)
    assert protocol.ATTR_OUT.unpack(reply)[3 + 13] == 0  # tar device 0,0
    # No OPEN, no OPENDIR, no FLUSH: ENOSYS, which the kernel remembers.
    for opcode in (protocol.OPEN, protocol.OPENDIR, protocol.FLUSH):
        assert (
            call(
                opcode,
                protocol.FLUSH_IN.pack(0, 0, 0, 0)[:8]
                if opcode != protocol.FLUSH
                else protocol.FLUSH_IN.pack(0, 0, 0, 0),
                nodeid=passwd,
            )[0]
            == -errno.ENOSYS
        )
    assert (
        call(
            protocol.IOCTL,
            protocol.IOCTL_IN.pack(0, 0, 0x5401, 0, 0, 60),
            nodeid=passwd,
        )[0]
        == -errno.ENOTTY
    )
    error, reply = call(protocol.READ, protocol.READ_IN.pack(0, 5, 100, 0, 0, 0, 0), nodeid=passwd)
    assert (error, reply) == (0, b"x:0:0\n")
    link = ro_ops.t.resolve(b"etc/link")
    assert call(protocol.READLINK, nodeid=link) == (0, b"passwd")

    def getxattr(size: int) -> tuple[int, bytes]:
        body = protocol.GETXATTR_IN.pack(size, 0) + name(b"user.note")
        return call(protocol.GETXATTR, body, nodeid=passwd)

    assert getxattr(0) == (0, protocol.GETXATTR_OUT.pack(2, 0))  # the size it needs
    assert getxattr(64) == (0, b"hi")
    assert getxattr(1)[0] == -errno.ERANGE
    assert call(protocol.LISTXATTR, protocol.GETXATTR_IN.pack(64, 0), nodeid=passwd) == (
        0,
        b"user.note\0",
    )
    error, reply = call(protocol.STATFS)
    assert protocol.STATFS_OUT.unpack(reply)[6] == 255  # namelen
    assert call(protocol.MKDIR, protocol.MKDIR_IN.pack(0o755, 0) + name(b"x"))[0] == -errno.EROFS
    assert call(protocol.LSEEK, protocol.LSEEK_IN.pack(0, 3, 4, 0), nodeid=passwd) == (
        0,
        protocol.LSEEK_OUT.pack(11),
    )  # SEEK_HOLE: the end


def parse_dirents(data: bytes, plus: bool) -> list[tuple[bytes, int, int, int]]:
    """(name, ino, next offset, nodeid of the entry part) of each entry."""
    out = []
    pos = 0
    while pos < len(data):
        nodeid = protocol.ENTRY_OUT.unpack_from(data, pos)[0] if plus else 0
        base = pos + (protocol.ENTRY_OUT.size if plus else 0)
        ino, off, namelen, _kind = protocol.DIRENT.unpack_from(data, base)
        start = base + protocol.DIRENT.size
        out.append((data[start : start + namelen], ino, off, nodeid))
        pos = (start + namelen + 7) & ~7
    return out


@pytest.mark.parametrize("plus", [False, True])
def test_listings_resume_at_their_offsets_in_small_buffers(ro_ops: Operations, plus: bool):
    _, replies, session = served(ro_ops, READ_ONLY)
    opcode = protocol.READDIRPLUS if plus else protocol.READDIR
    etc = ro_ops.t.resolve(b"etc")
    seen: list[tuple[bytes, int, int, int]] = []
    offset = 0
    while True:
        size = 200 if plus else 40  # room for one entry at a time
        error, reply = ask(
            session, replies, opcode, protocol.READ_IN.pack(0, offset, size, 0, 0, 0, 0), nodeid=etc
        )
        assert error == 0
        batch = parse_dirents(reply, plus)
        if not batch:
            break
        seen += batch
        offset = batch[-1][2]
    assert [n for n, *_ in seen] == [b".", b"..", b"passwd", b"link"]
    assert seen[2][1] == ro_ops.t.resolve(b"etc/passwd")
    if plus:
        assert [nodeid for *_, nodeid in seen] == [0, 0, seen[2][1], seen[3][1]]


def test_writable_replies_and_lookup_counts(rw_ops: Operations):
    dispatcher, replies, session = served(rw_ops, WRITABLE)

    def call(opcode: int, body: bytes = b"", nodeid: int = 1) -> tuple[int, bytes]:
        return ask(session, replies, opcode, body, nodeid)

    etc = rw_ops.t.resolve(b"etc")
    error, reply = call(
        protocol.CREATE,
        protocol.CREATE_IN.pack(os.O_WRONLY, 0o640, 0o22, 0) + name(b"new"),
        nodeid=etc,
    )
    assert error == 0
    made = entry(reply[: protocol.ENTRY_OUT.size])
    fh, open_flags, backing = protocol.OPEN_OUT.unpack(reply[protocol.ENTRY_OUT.size :])
    ino = made[0]
    assert made[6 + 9] == stat.S_IFREG | 0o640 and (made[6 + 11], made[6 + 12]) == (1000, 100)
    assert open_flags == 0 and backing == 0  # upper file, no passthrough here
    error, reply = call(
        protocol.WRITE,
        protocol.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"hello",
        nodeid=ino,
    )
    assert (error, protocol.WRITE_OUT.unpack(reply)[0]) == (0, 5)
    assert call(protocol.RELEASE, protocol.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=ino) == (0, b"")
    # A lower file opened for writing with O_TRUNC: emptied, nothing copied.
    passwd = rw_ops.t.resolve(b"etc/passwd")
    error, reply = call(
        protocol.OPEN,
        protocol.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC, 0),
        nodeid=passwd,
    )
    fh2, open_flags, _ = protocol.OPEN_OUT.unpack(reply)
    assert error == 0 and rw_ops.t.size[passwd] == 0
    call(protocol.RELEASE, protocol.RELEASE_IN.pack(fh2, 0, 0, 0), nodeid=passwd)
    # SETATTR: mode and mtime.
    fields = [0] * 16  # SETATTR_IN: valid is field 0, mtime 6, mtimensec 9, mode 11
    fields[0] = protocol.FATTR_MODE | protocol.FATTR_MTIME
    fields[6], fields[9], fields[11] = 12345, 6, 0o600
    body = protocol.SETATTR_IN.pack(*fields)
    error, reply = call(protocol.SETATTR, body, nodeid=ino)
    attr = protocol.ATTR_OUT.unpack(reply)
    assert attr[3 + 9] == stat.S_IFREG | 0o600 and (attr[3 + 4], attr[3 + 7]) == (12345, 6)
    # mkdir, symlink, mknod, link, rename2, unlink, rmdir, xattrs.
    d = entry(call(protocol.MKDIR, protocol.MKDIR_IN.pack(0o750, 0) + name(b"dir"))[1])
    assert d[6 + 9] == stat.S_IFDIR | 0o750
    s = entry(call(protocol.SYMLINK, name(b"sym", b"etc/new"))[1])
    assert call(protocol.READLINK, nodeid=s[0]) == (0, b"etc/new")
    n = entry(
        call(
            protocol.MKNOD,
            protocol.MKNOD_IN.pack(stat.S_IFCHR | 0o600, (1 << 8) | 3, 0, 0) + name(b"null"),
        )[1]
    )
    assert rw_ops.t.rdev[n[0]] == os.makedev(1, 3) and n[6 + 13] == (1 << 8) | 3
    linked = entry(call(protocol.LINK, protocol.LINK_IN.pack(ino) + name(b"hard"))[1])
    assert linked[0] == ino and linked[6 + 10] == 2
    into_d = protocol.RENAME2_IN.pack(d[0], 1, 0)
    assert call(protocol.RENAME2, into_d + name(b"hard", b"moved"))[0] == 0
    assert call(protocol.RENAME2, into_d + name(b"sym", b"moved"))[0] == -errno.EEXIST
    assert call(protocol.UNLINK, name(b"moved"), nodeid=d[0])[0] == 0
    assert call(protocol.RMDIR, name(b"dir"))[0] == 0
    create = protocol.SETXATTR_IN.pack(1, 1) + name(b"user.k")  # XATTR_CREATE
    assert call(protocol.SETXATTR, create + b"v", nodeid=ino)[0] == 0
    assert call(protocol.SETXATTR, create + b"w", nodeid=ino)[0] == -errno.EEXIST
    assert call(protocol.REMOVEXATTR, name(b"user.k"), nodeid=ino)[0] == 0
    # Every entry reply and readdirplus entry took a reference; FORGET gives them back.
    before = dict(rw_ops._lookups)
    assert before[ino] >= 2
    ask_none = session._handle
    ask_none(
        replies.write_fd,
        request(
            protocol.BATCH_FORGET,
            protocol.BATCH_FORGET_IN.pack(1, 0) + protocol.FORGET_ONE.pack(ino, before[ino]),
        ),
        [0] * 64,
    )
    assert replies.take() == [] and ino not in rw_ops._lookups
    assert dispatcher.passthrough is False
