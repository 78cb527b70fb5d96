#!/usr/bin/env python3
"""The fastest a pyfuse3 file system can answer: the floor under layerfs's mount.

Not part of layerfs. A read-only mirror of one directory, as bare as a pyfuse3
file system can be while serving the same requests layerfs serves: the whole tree
is read into dictionaries before the mount (as layerfs reads its indexes), every
handler is a dictionary lookup or one ``pread``, and the kernel gets the same
settings layerfs gives it (entry and attribute timeouts of a year, keep_cache,
readdirplus, FLUSH answered ENOSYS once, the same mount options, read-ahead raised
to 1 MiB). Whatever this costs per request is what pyfuse3 and trio cost, since
there is nothing else to pay for; ``bench_mount.py`` measures it next to layerfs.

    pyfuse3_floor.py SOURCE MOUNTPOINT [--max-tasks N]

Stays in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``); prints
"ready" on stdout once the mount answers.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

FOREVER = 24 * 3600.0 * 365
READ_AHEAD_KB = 1024


class Floor(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, source: Path) -> None:
        super().__init__()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.parent: dict[int, int] = {}
        self.links: dict[int, bytes] = {}
        self.paths: dict[int, bytes] = {}
        self.dirs: dict[int, list[tuple[bytes, int]]] = {}
        self.next_fh = 1
        self._load(os.fsencode(source))

    def _add(self, path: bytes, ino: int, st: os.stat_result) -> None:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.entry_timeout = attr.attr_timeout = FOREVER
        for field in (
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_rdev",
            "st_size",
            "st_blocks",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            setattr(attr, field, getattr(st, field))
        attr.st_blksize = 65536
        self.attrs[ino] = attr
        self.paths[ino] = path
        if stat.S_ISLNK(st.st_mode):
            self.links[ino] = os.readlink(path)

    def _load(self, root: bytes) -> None:
        """Every entry under ``root``, by its host inode number (root is inode 1)."""
        host: dict[int, int] = {}  # host inode -> ours, so hardlinks share one
        self._add(root, pyfuse3.ROOT_INODE, os.lstat(root))
        self.parent[pyfuse3.ROOT_INODE] = pyfuse3.ROOT_INODE
        pending = [(root, pyfuse3.ROOT_INODE)]
        while pending:
            path, ino = pending.pop()
            names: dict[bytes, int] = {}
            self.children[ino] = names
            with os.scandir(path) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    child = host.setdefault(st.st_ino, len(host) + 2)
                    names[entry.name] = child
                    if child not in self.attrs:
                        self._add(entry.path, child, st)
                    if entry.is_dir(follow_symlinks=False):
                        self.parent[child] = ino
                        pending.append((entry.path, child))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self.attrs[parent_inode]
        if name == b"..":
            return self.attrs[self.parent[parent_inode]]
        ino = self.children.get(parent_inode, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[ino]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.links[inode]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = [(b".", inode), (b"..", self.parent[inode]), *self.children[inode].items()]
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.dirs[fh]
        attrs = self.attrs
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            if not pyfuse3.readdir_reply(token, name, attrs[ino], index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        del self.dirs[fh]

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # The file handle is the file descriptor.
        fd = os.open(self.paths[inode], os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


def raise_read_ahead(mountpoint: str) -> None:
    dev = os.stat(mountpoint).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    if int(knob.read_text()) < READ_AHEAD_KB:
        knob.write_text(f"{READ_AHEAD_KB}\n")


async def serve(mountpoint: str, max_tasks: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main, 1, max_tasks)  # min_tasks, max_tasks
        await trio.to_thread.run_sync(raise_read_ahead, mountpoint)
        print("ready", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint")
    parser.add_argument("--max-tasks", type=int, default=99, help="pyfuse3.main's max_tasks")
    args = parser.parse_args()
    ops = Floor(args.source)
    options = {"fsname=floor", "subtype=floor", "default_permissions", "ro", "nosuid", "nodev"}
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(serve, args.mountpoint, args.max_tasks)
    finally:
        pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
