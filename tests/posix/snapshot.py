"""The complete state of a tree, and the comparison of two trees' states.

A snapshot maps each relative path (the root is ``"."``) to what ``lstat``, ``readlink``,
``llistxattr`` and a read of the content show: type, permission bits, link count,
owner, group, size (not of directories, whose size is the file system's business),
content hash, link target, device number, extended attributes, access and modification
times (exact where a sequence set them, else "recent"), and the hard-link group (the
names sharing the inode). Comparing two trees also compares, per path, whether mtime
and ctime changed since the previous snapshot: a change of ctime is how an operation
shows that it touched an inode, and the test requires the same touches as the host.

The walk goes through directory descriptors, so depth is no limit, and reads what the
user running it may read: what it may not is recorded as the errno it got.

Standard library only (see ``calls.py``).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

from tests.posix.calls import TYPE_CHARS, digest, time_class

FIELD_NAMES = (
    "type",
    "mode",
    "nlink",
    "uid",
    "gid",
    "size",
    "content",
    "target",
    "rdev",
    "xattrs",
    "atime",
    "mtime",
)


@dataclass
class Entry:
    fields: list[Any]  # as FIELD_NAMES says
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    links: list[str] | None = None  # the names of its hard-link group, if more than one
    listing: str | None = None  # a directory this user could not list: the errno


Snapshot = dict[str, Entry]


def snapshot(root: str) -> Snapshot:
    out: Snapshot = {}
    st = os.lstat(root)
    out["."] = Entry(_fields(st, None, "", root), st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _walk(fd, "", out)
    finally:
        os.close(fd)
    groups: dict[int, list[str]] = {}
    for path, entry in out.items():
        if entry.fields[0] not in ("d", "?"):
            groups.setdefault(entry.ino, []).append(path)
    for entry in out.values():
        names = groups.get(entry.ino) if entry.fields[0] not in ("d", "?") else None
        entry.links = sorted(names) if names and len(names) > 1 else None
    return out


def _walk(dir_fd: int, prefix: str, out: Snapshot) -> None:
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError as exc:
        out[prefix.rstrip("/") or "."].listing = _errname(exc)  # not readable by this user
        return
    for name in names:
        path = prefix + name
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            out[path] = Entry(["?", _errname(exc)] + [None] * (len(FIELD_NAMES) - 2))
            continue
        fields = _fields(st, dir_fd, name, f"/proc/self/fd/{dir_fd}/{name}")
        out[path] = Entry(fields, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                out[path].listing = _errname(exc)
                continue
            try:
                _walk(child, path + "/", out)
            finally:
                os.close(child)


def _fields(st: os.stat_result, dir_fd: int | None, name: str, xattr_path: str) -> list[Any]:
    kind = TYPE_CHARS.get(stat.S_IFMT(st.st_mode), "?")
    content = None
    target = None
    if kind == "f":
        content = _content(dir_fd, name)
    elif kind == "l":
        target = os.readlink(name, dir_fd=dir_fd)
    return [
        kind,
        oct(stat.S_IMODE(st.st_mode)),
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size if kind != "d" else None,
        content,
        target,
        st.st_rdev if kind in ("c", "b") else None,
        _xattrs(xattr_path),
        time_class(st.st_atime_ns),
        time_class(st.st_mtime_ns),
    ]


def _content(dir_fd: int | None, name: str) -> str:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        return _errname(exc)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return digest(b"".join(chunks))
    finally:
        os.close(fd)


def _xattrs(path: str) -> list[Any] | str:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as exc:
        return _errname(exc)
    values: list[Any] = []
    for name in names:
        try:
            value: Any = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError as exc:
            value = _errname(exc)
        values.append([name, value])
    return values


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def comparable(
    now: Snapshot, before: Snapshot | None, untimed: set[int] | frozenset[int] = frozenset()
) -> dict[str, dict[str, Any]]:
    """What is compared of each path: the entry and whether mtime and ctime moved.

    The times of the inodes in ``untimed`` are left out.
    """
    view: dict[str, dict[str, Any]] = {}
    for path, entry in now.items():
        item = dict(zip(FIELD_NAMES, entry.fields, strict=True))
        item["links"] = entry.links
        item["listing"] = entry.listing
        old = before.get(path) if before else None
        if entry.ino in untimed:
            del item["atime"], item["mtime"]
        elif old is not None and old.fields[0] == entry.fields[0]:
            item["mtime moved"] = entry.mtime_ns != old.mtime_ns
            item["ctime moved"] = entry.ctime_ns != old.ctime_ns
        view[path] = item
    return view


def differences(
    host: Snapshot,
    host_before: Snapshot | None,
    mount: Snapshot,
    mount_before: Snapshot | None,
    untimed: tuple[set[int], set[int]] = (set(), set()),
) -> list[str]:
    """Every path whose state differs, with the fields that differ.

    ``untimed``: inodes (host's, mount's) whose times are not compared.
    """
    want = comparable(host, host_before, untimed[0])
    got = comparable(mount, mount_before, untimed[1])
    out = []
    for path in sorted(set(want) | set(got)):
        a, b = want.get(path), got.get(path)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"{path}: only on the {'mount' if a is None else 'host'}: {a or b}")
            continue
        fields = [
            f"{key}: host {a.get(key)!r}, mount {b.get(key)!r}"
            for key in dict.fromkeys([*a, *b])
            if a.get(key) != b.get(key)
        ]
        out.append(f"{path}: " + "; ".join(fields))
    return out
