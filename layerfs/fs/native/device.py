"""/dev/fuse: opening it, mounting it, cloning it, registering backing files.

:func:`mount` makes the mount and returns the session's device descriptor:

- as root (also the root of a user namespace), with mount(2) itself: the
  options ``fd=``, ``rootmode=``, ``user_id=``, ``group_id=``,
  ``default_permissions``, ``allow_other`` when asked, ``max_read=``, and the
  file system type ``fuse.layerfs`` (subtype layerfs);
- otherwise through ``fusermount3``, the setuid helper of fuse3: it mounts
  and passes the descriptor back over the socket named by ``_FUSE_COMMFD``.
  With ``auto_unmount`` it stays behind and unmounts when the server's end of
  that socket closes, so a killed server leaves no dead mount.

:func:`clone` gives a worker thread a descriptor of its own on the same
session (``FUSE_DEV_IOC_CLONE``); :func:`backing_open` registers an open file
for passthrough (``FUSE_DEV_IOC_BACKING_OPEN``, root only, Linux 6.9+).
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass, field

from layerfs.errors import FuseUnavailableError, MountError
from layerfs.fs.native import protocol

DEVICE = "/dev/fuse"
FSTYPE = "fuse.layerfs"
SUBTYPE = "layerfs"

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


@dataclass
class MountOptions:
    fsname: str
    read_only: bool = True
    nosuid: bool = True
    nodev: bool = True
    allow_other: bool = False
    max_read: int = 1 << 20
    extra: list[str] = field(default_factory=list)  # passed on as they are


@dataclass
class Connection:
    """A mounted session: the device descriptor and how it was mounted."""

    fd: int
    mountpoint: str
    via: str  # "mount(2)" or "fusermount3"
    comm: socket.socket | None = None  # fusermount3's socket, open while we serve
    helper: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.comm is not None:
            self.comm.close()  # an auto_unmount helper unmounts and exits now


def mount(mountpoint: str, options: MountOptions) -> Connection:
    """Mount a new FUSE session on ``mountpoint``; raises MountError saying why not."""
    if os.geteuid() == 0:
        try:
            return _mount_syscall(mountpoint, options)
        except PermissionError as exc:
            # Root of a user namespace without /dev/fuse access, or a container
            # without CAP_SYS_ADMIN: the setuid helper may still do it.
            if shutil.which("fusermount3") is None:
                raise MountError(f"cannot mount on {mountpoint}: {exc.strerror}") from exc
    return _mount_fusermount(mountpoint, options)


def _mount_syscall(mountpoint: str, options: MountOptions) -> Connection:
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FuseUnavailableError(f"cannot mount: {DEVICE} does not exist") from None
    flags = 0
    if options.read_only:
        flags |= MS_RDONLY
    if options.nosuid:
        flags |= MS_NOSUID
    if options.nodev:
        flags |= MS_NODEV
    data = [
        f"fd={fd}",
        f"rootmode={stat.S_IFDIR:o}",
        f"user_id={os.geteuid()}",
        f"group_id={os.getegid()}",
        "default_permissions",
        f"max_read={options.max_read}",
    ]
    if options.allow_other:
        data.append("allow_other")
    data += options.extra
    libc = _c()
    if (
        libc.mount(
            options.fsname.encode(),
            mountpoint.encode(),
            FSTYPE.encode(),
            flags,
            ",".join(data).encode(),
        )
        != 0
    ):
        code = ctypes.get_errno()
        os.close(fd)
        if code in (errno.EPERM, errno.EACCES):
            raise PermissionError(code, os.strerror(code))
        raise MountError(f"cannot mount on {mountpoint}: {os.strerror(code)}")
    return Connection(fd, mountpoint, "mount(2)")


def _mount_fusermount(mountpoint: str, options: MountOptions) -> Connection:
    helper = shutil.which("fusermount3")
    if helper is None:
        raise FuseUnavailableError(
            "cannot mount as a normal user: fusermount3 is not installed",
            hint="apt-get install fuse3",
        )
    opts = [
        "ro" if options.read_only else "rw",
        "nosuid",
        "nodev",
        f"fsname={options.fsname}",
        f"subtype={SUBTYPE}",
        "default_permissions",
        f"max_read={options.max_read}",
        "auto_unmount",
    ]
    if options.allow_other:
        opts.append("allow_other")
    opts += options.extra
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen(
            [helper, "-o", ",".join(opts), "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        if not fds:
            _, err = proc.communicate(timeout=30)
            message = err.decode(errors="replace").strip().splitlines()
            reason = message[-1] if message else f"fusermount3 exited with {proc.returncode}"
            reason = reason.removeprefix("fusermount3: ")
            raise MountError(f"cannot mount on {mountpoint}: {reason}")
    except BaseException:
        ours.close()
        raise
    fd = fds[0]
    os.set_inheritable(fd, False)
    ours.set_inheritable(False)
    return Connection(fd, mountpoint, "fusermount3", comm=ours, helper=proc)


def unmount_lazily(mountpoint: str) -> None:
    """Detach the mount (the session ends when its last user leaves); best effort."""
    if os.geteuid() == 0 and _c().umount2(mountpoint.encode(), MNT_DETACH) == 0:
        return
    helper = shutil.which("fusermount3")
    if helper is not None:
        subprocess.run(
            [helper, "-u", "-z", "--", mountpoint],
            capture_output=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )


def clone(fd: int) -> int:
    """A new descriptor on the session of ``fd``, or -1 where /dev/fuse cannot be opened
    (a normal user, whose session came from fusermount3): then threads share ``fd``."""
    try:
        new = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        fcntl.ioctl(new, protocol.DEV_IOC_CLONE, array.array("I", [fd]))
    except OSError:
        os.close(new)
        return -1
    return new


def backing_open(fd: int, file_fd: int) -> int:
    """Register ``file_fd`` as a backing file of the session; returns its backing id."""
    # A mutable buffer makes fcntl.ioctl return the call's result, the id.
    request = bytearray(protocol.BACKING_MAP.pack(file_fd, 0, 0))
    return int(fcntl.ioctl(fd, protocol.DEV_IOC_BACKING_OPEN, request, True))


def backing_close(fd: int, backing_id: int) -> None:
    fcntl.ioctl(fd, protocol.DEV_IOC_BACKING_CLOSE, array.array("i", [backing_id]))
