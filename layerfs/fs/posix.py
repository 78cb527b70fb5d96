"""The POSIX rules of a writable mount: opening, names, attributes; what each call changes.

Every engine serving a writable mount calls these, as :class:`~layerfs.fs.upper.Upper`
methods, and only translates: which errno, which times move, what happens to link
counts and setuid bits is decided here, checked against Linux on ext4 by the
differential test (``tests/posix``). Each method either changes the inode table
completely or raises ``OSError`` with the errno a local file system gives, before it
changes anything.

What the kernel decides before a request arrives, it decides for every FUSE file
system alike: path resolution, ``O_EXCL`` on a name it knows, ``O_NOFOLLOW``, the
permission checks of a mount with ``default_permissions`` (modes, sticky
directories, who may chown or chmod), setgid stripped from a chmod by someone outside
the group, PATH_MAX. Names longer than NAME_MAX are refused here, as ext4 does.

Times: a change of data moves mtime and ctime; a change of metadata moves ctime;
atime moves only when set (a mount reads like ``noatime``, see ``inodes.py``).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass

from layerfs.fs import datafile, whiteout
from layerfs.fs.inodes import LAYER_UPPER, PATH_MAX, InodeTable, check_name

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
"""The kernel's limit; ext4 keeps values up to a block unless it has ``ea_inode``."""
XATTR_NAMESPACES = frozenset({"user", "trusted", "security"})

_error = datafile.error


def check_xattr_name(name: str) -> None:
    """The names ext4 takes: 1 to 255 bytes in the user, trusted or security namespace.

    Any other namespace is EOPNOTSUPP, a namespace alone EINVAL. (POSIX ACLs,
    ``system.posix_acl_*``, never get here: the kernel answers them for a FUSE file
    system that does not enable them.)
    """
    size = len(name.encode("utf-8", "surrogateescape"))
    if not size or size > XATTR_NAME_MAX:
        raise _error(errno.ERANGE, "an extended attribute name has 1 to 255 bytes")
    namespace, dot, rest = name.partition(".")
    if not dot or namespace not in XATTR_NAMESPACES:
        raise _error(errno.EOPNOTSUPP, "unknown extended attribute namespace")
    if not rest:
        raise _error(errno.EINVAL, "an extended attribute name needs more than its namespace")


def get_xattr(table: InodeTable, ino: int, name: str) -> bytes:
    """getxattr(2): ENODATA where the inode has no attribute ``name``."""
    if not table.alive(ino):
        raise _error(errno.ENOENT)
    check_xattr_name(name)
    value = (table.xattrs.get(ino) or {}).get(name)
    if value is None:
        raise _error(errno.ENODATA)
    return value


@dataclass(frozen=True)
class Caller:
    """Who asks for a change: what the kernel tells of the process (FUSE's request header).

    ``umask`` is the process's, which the kernel sends with every create, mkdir and
    mknod. ``privileged``: root, which the kernel lets keep setuid/setgid bits
    (CAP_FSETID); the server sees user IDs, not capabilities.
    """

    uid: int
    gid: int
    umask: int = 0

    @property
    def privileged(self) -> bool:
        return self.uid == 0


def listed_xattrs(table: InodeTable, ino: int, caller: Caller) -> list[str]:
    """The names listxattr(2) shows ``caller``: ``trusted.*`` only to root, as ext4 lists.

    (The kernel itself refuses to read or write ``trusted.*`` for anyone else.)
    """
    names = table.xattrs.get(ino)
    if not names:
        return []
    if caller.privileged:
        return list(names)
    return [name for name in names if not name.startswith("trusted.")]


class PosixRules:
    """The rules of :class:`~layerfs.fs.upper.Upper` that are not about storage."""

    table: InodeTable
    linkable: set[int]  # unnamed files (O_TMPFILE) that link may name

    def truncate(self, ino: int, size: int, now: int = 0) -> None:
        raise NotImplementedError

    def _new_data_file(self) -> tuple[int, int]:
        """A new, empty upper data file: its number and a read-write descriptor."""
        raise NotImplementedError

    def _data_file_taken(self, ino: int, fd: int) -> None:
        """The new data file open as ``fd`` holds the data of ``ino`` from now on."""
        raise NotImplementedError

    # -- opening -----------------------------------------------------------------------

    def open_file(self, ino: int, flags: int, caller: Caller) -> None:
        """What opening ``ino`` with ``flags`` does to it: refuse what it cannot be, truncate.

        The kernel resolves the path and applies ``O_CREAT|O_EXCL``, ``O_NOFOLLOW``
        and the permission checks (``default_permissions``) before it asks, and it
        puts every write of an ``O_APPEND`` descriptor at the end of the file; what
        the inode decides is here. ``O_TRUNC`` truncates a regular file, with
        ``O_RDONLY`` too as Linux does, before anything else: a lower file is then
        copied up with nothing to copy. As any truncation by a caller other than
        root, it drops setuid and setgid; here the kernel leaves that to the server
        whatever else it does itself.
        """
        t = self.table
        if not t.alive(ino):
            raise _error(errno.ENOENT)
        fmt = stat.S_IFMT(t.mode[ino])
        if fmt == stat.S_IFLNK:
            raise _error(errno.ELOOP)
        if flags & os.O_DIRECTORY and fmt != stat.S_IFDIR:
            raise _error(errno.ENOTDIR)
        if fmt == stat.S_IFDIR and (
            flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT)
        ):
            raise _error(errno.EISDIR)
        if flags & os.O_TRUNC and fmt == stat.S_IFREG:
            now = time.time_ns()
            self.truncate(ino, 0, now)
            if not caller.privileged:
                self._drop_privs(ino, now)

    def create_file(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> int:
        """``open(O_CREAT)`` of a name: a new regular file, or the existing one without O_EXCL."""
        existing = self.table.lookup(parent, name)
        if existing:
            if flags & os.O_EXCL:
                raise _error(errno.EEXIST)
            self.open_file(existing, flags, caller)
            return existing
        return self.make_node(parent, name, stat.S_IFREG | (mode & 0o7777), caller)

    def make_node(
        self,
        parent: int,
        name: bytes,
        mode: int,
        caller: Caller,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> int:
        """A new entry made by ``caller`` (create, mkdir, mknod, symlink).

        It belongs to the caller; its group is the caller's, or the directory's
        when the directory is setgid, and a directory made there is setgid too.
        The caller's umask applies (again: the kernel applies it already unless the
        engine asked it not to, and twice is the same as once).
        """
        t = self.table
        self._check_dir(parent)
        gid = caller.gid
        if t.mode[parent] & stat.S_ISGID:
            gid = t.gid[parent]
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        if not stat.S_ISLNK(mode):
            mode &= ~(caller.umask & 0o777)
        return self.create(parent, name, mode, caller.uid, gid, rdev=rdev, target=target)

    # -- names -------------------------------------------------------------------------

    def _check_dir(self, ino: int) -> dict[bytes, int]:
        t = self.table
        if not t.alive(ino):
            raise _error(errno.ENOENT)
        if not t.is_dir(ino):
            raise _error(errno.ENOTDIR)
        if t.nlink[ino] == 0:
            raise _error(errno.ENOENT, "directory was removed")
        return t.children[ino]

    def _existing(self, parent: int, name: bytes) -> int:
        """The inode of an existing name (ENOENT, ENOTDIR, ENAMETOOLONG as a lookup says)."""
        ino = self._check_dir(parent).get(name, 0)
        if not ino:
            check_name(name)
            raise _error(errno.ENOENT)
        return ino

    def _check_new_name(self, parent: int, name: bytes) -> None:
        names = self._check_dir(parent)
        if name in names:
            raise _error(errno.EEXIST)
        check_name(name)
        if whiteout.is_reserved(name):
            raise _error(errno.EPERM, "names starting with .wh. are reserved for whiteouts")

    def _touch_ctime(self, ino: int) -> None:
        # A new ctime alone is not a change a layer can carry: the file is not marked.
        self.table.ctime[ino] = time.time_ns()

    def _drop_privs(self, ino: int, now: int) -> None:
        """Clear setuid, and setgid where it means set-group-ID (group-executable)."""
        t = self.table
        mode = t.mode[ino]
        kept = mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            kept &= ~stat.S_ISGID
        if kept != mode:
            t.set_attrs(ino, mode=kept, ctime_ns=now)

    def _dir_modified(self, *dirs: int) -> None:
        now = time.time_ns()
        for d in dirs:
            self.table.set_attrs(d, mtime_ns=now)

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> int:
        """A new entry; ``mode`` carries the type bits (S_IFREG, S_IFDIR, S_IFLNK...)."""
        self._check_new_name(parent, name)
        ino = self._new_inode(mode, uid, gid, rdev, target)
        self.table.add_name(parent, name, ino)
        self._dir_modified(parent)
        return ino

    def _new_inode(self, mode: int, uid: int, gid: int, rdev: int, target: bytes) -> int:
        t = self.table
        kind_bits = stat.S_IFMT(mode)
        if kind_bits not in (
            stat.S_IFREG,
            stat.S_IFDIR,
            stat.S_IFLNK,
            stat.S_IFCHR,
            stat.S_IFBLK,
            stat.S_IFIFO,
            stat.S_IFSOCK,
        ):
            raise _error(errno.EINVAL)
        if len(target) >= PATH_MAX:
            raise _error(errno.ENAMETOOLONG, "a symlink target is at most PATH_MAX - 1 bytes")
        now = time.time_ns()
        perms = 0o777 if kind_bits == stat.S_IFLNK else mode & 0o7777
        offset, fd = self._new_data_file() if kind_bits == stat.S_IFREG else (0, -1)
        ino = t.new(kind_bits | perms, uid, gid, len(target), now, offset, LAYER_UPPER)
        if fd >= 0:
            self._data_file_taken(ino, fd)
        if kind_bits == stat.S_IFLNK:
            t.targets[ino] = target
        if kind_bits in (stat.S_IFCHR, stat.S_IFBLK):
            t.rdev[ino] = rdev
        return ino

    def make_unnamed(self, parent: int, mode: int, flags: int, caller: Caller) -> int:
        """``open(dir, O_TMPFILE)``: a regular file with no name, as ``make_node`` would make
        it in ``parent``, which does not change. It lives while it is open; ``link`` may
        give it a name unless ``flags`` has ``O_EXCL``."""
        t = self.table
        self._check_dir(parent)
        gid = t.gid[parent] if t.mode[parent] & stat.S_ISGID else caller.gid
        mode = stat.S_IFREG | (mode & 0o7777 & ~(caller.umask & 0o777))
        ino = self._new_inode(mode, caller.uid, gid, 0, b"")
        if not flags & os.O_EXCL:
            self.linkable.add(ino)
        return ino

    def link(self, ino: int, parent: int, name: bytes) -> None:
        t = self.table
        if t.is_dir(ino):
            raise _error(errno.EPERM, "cannot hardlink a directory")
        if not t.alive(ino) or (t.nlink[ino] == 0 and ino not in self.linkable):
            raise _error(errno.ENOENT)
        self._check_new_name(parent, name)
        self.linkable.discard(ino)
        t.add_name(parent, name, ino)
        self._touch_ctime(ino)
        self._dir_modified(parent)

    def unlink(self, parent: int, name: bytes) -> int:
        """Remove a non-directory name; returns its inode (free it when unused).

        The inode's ctime moves while other names keep it.
        """
        t = self.table
        ino = self._existing(parent, name)
        if t.is_dir(ino):
            raise _error(errno.EISDIR)
        t.remove_name(parent, name)
        if t.nlink[ino]:
            self._touch_ctime(ino)
        self._dir_modified(parent)
        return ino

    def rmdir(self, parent: int, name: bytes) -> int:
        t = self.table
        ino = self._existing(parent, name)
        if not t.is_dir(ino):
            raise _error(errno.ENOTDIR)
        if t.children[ino]:
            raise _error(errno.ENOTEMPTY)
        t.remove_name(parent, name)
        t.nlink[ino] = 0
        self._dir_modified(parent)
        return ino

    def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int = 0
    ) -> int:
        """Move a name (directories from lower layers too). Returns an inode that lost
        its last name because it was replaced, else 0.

        ``flags``: ``RENAME_NOREPLACE`` and ``RENAME_EXCHANGE`` (not both), as
        renameat2(2); any other flag is EINVAL (``RENAME_WHITEOUT`` is overlayfs's).
        The moved inodes' ctime moves, and so does a replaced inode's that other
        names keep, with its link count.
        """
        t = self.table
        if flags & ~RENAME_FLAGS or flags & RENAME_FLAGS == RENAME_FLAGS:
            raise _error(errno.EINVAL, "unknown rename flags")
        src = self._existing(parent_old, name_old)
        new_names = self._check_dir(parent_new)
        dst = new_names.get(name_new, 0)
        if not dst:
            check_name(name_new)
        if whiteout.is_reserved(name_new):
            raise _error(errno.EPERM, "names starting with .wh. are reserved for whiteouts")
        if t.is_dir(src) and t.is_ancestor(src, parent_new):
            raise _error(errno.EINVAL, "cannot move a directory into itself")
        if flags & RENAME_EXCHANGE:
            if not dst:
                raise _error(errno.ENOENT)
            if t.is_dir(dst) and t.is_ancestor(dst, parent_old):
                raise _error(errno.EINVAL)
            t.remove_name(parent_old, name_old)
            t.remove_name(parent_new, name_new)
            t.add_name(parent_old, name_old, dst)
            t.add_name(parent_new, name_new, src)
            self._touch_ctime(src)
            self._touch_ctime(dst)
            self._dir_modified(parent_old, parent_new)
            return 0
        if dst and flags & RENAME_NOREPLACE:
            raise _error(errno.EEXIST)
        if dst == src:
            return 0  # two names of one inode: POSIX says do nothing
        replaced = 0
        if dst:
            if t.is_dir(src):
                if not t.is_dir(dst):
                    raise _error(errno.ENOTDIR)
                if t.children[dst]:
                    raise _error(errno.ENOTEMPTY)
            elif t.is_dir(dst):
                raise _error(errno.EISDIR)
            t.remove_name(parent_new, name_new)
            if t.is_dir(dst):
                t.nlink[dst] = 0
            if t.nlink[dst] == 0:
                replaced = dst
            else:
                self._touch_ctime(dst)
        t.remove_name(parent_old, name_old)
        t.add_name(parent_new, name_new, src)
        self._touch_ctime(src)
        self._dir_modified(*{parent_old, parent_new})
        return replaced

    # -- attributes --------------------------------------------------------------------------

    def setattr(
        self,
        ino: int,
        caller: Caller,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """One change of attributes, as chmod, chown, truncate and utimensat ask for it.

        Every change moves ctime. A new size truncates (:meth:`truncate`) and moves
        mtime. chown clears setuid, and setgid with group-execute, of anything but a
        directory, whoever asks, as Linux does; a truncation by a caller other than
        root clears them too. A request that changes nothing at all is how the
        kernel asks a server that handles setuid/setgid itself (FUSE's
        HANDLE_KILLPRIV) to clear them before another user's write, and what
        ``chown(path, -1, -1)`` sends: both clear them and move ctime. (A kernel
        that clears them itself, as for pyfuse3, whose libfuse does not ask for
        HANDLE_KILLPRIV, sends the cleared mode along: the same result.) The kernel
        has checked permissions (``default_permissions``) and cleared setgid of a
        chmod by someone outside the file's group.
        """
        t = self.table
        if not t.alive(ino):
            raise _error(errno.ENOENT)
        now = time.time_ns()
        if size is not None:
            self.truncate(ino, size, now)
            if not caller.privileged:
                self._drop_privs(ino, now)
        changes: dict[str, int] = {}
        if mode is not None:
            changes["mode"] = mode
        if uid is not None:
            changes["uid"] = uid
        if gid is not None:
            changes["gid"] = gid
        if atime_ns is not None:
            changes["atime_ns"] = atime_ns
        if mtime_ns is not None:
            changes["mtime_ns"] = mtime_ns
        if changes:
            t.set_attrs(ino, ctime_ns=now, **changes)
        # A mode sent with the new owner is the mode wanted (no syscall sends both).
        owner_changed = (uid is not None or gid is not None) and mode is None
        nothing = size is None and not changes
        if nothing:
            t.set_attrs(ino, ctime_ns=now)
        if (owner_changed or nothing) and not t.is_dir(ino):
            self._drop_privs(ino, now)

    def set_xattr(self, ino: int, name: str, value: bytes, flags: int = 0) -> None:
        """setxattr(2): ``flags`` XATTR_CREATE (EEXIST) or XATTR_REPLACE (ENODATA).

        Setting the value an attribute has changes nothing, as on ext4.
        """
        t = self.table
        if not t.alive(ino):
            raise _error(errno.ENOENT)
        check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise _error(errno.E2BIG)
        current = t.xattrs.get(ino) or {}
        if flags & os.XATTR_CREATE and name in current:
            raise _error(errno.EEXIST)
        if flags & os.XATTR_REPLACE and name not in current:
            raise _error(errno.ENODATA)
        if current.get(name) == value:
            return
        xattrs = dict(current)
        xattrs[name] = value
        t.set_attrs(ino, ctime_ns=time.time_ns())
        t.xattrs[ino] = xattrs

    def remove_xattr(self, ino: int, name: str) -> None:
        t = self.table
        if not t.alive(ino):
            raise _error(errno.ENOENT)
        check_xattr_name(name)
        current = t.xattrs.get(ino) or {}
        if name not in current:
            raise _error(errno.ENODATA)
        xattrs = {k: v for k, v in current.items() if k != name}
        t.set_attrs(ino, ctime_ns=time.time_ns())
        if xattrs:
            t.xattrs[ino] = xattrs
        else:
            t.xattrs.pop(ino, None)
