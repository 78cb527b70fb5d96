"""The starting tree of every sequence, and seeded random sequences of calls over it.

The tree has a bit of everything a call can meet: files (empty, small, bigger than a
copy chunk, read-only, setuid/setgid), a hard-link group spread over two directories,
symlinks (to a directory, to a file, dangling, looping), a sticky directory with files
of three owners, a setgid directory, a directory of the normal user the unprivileged
run is (``USER``), a directory only root may enter, a FIFO, device nodes, extended
attributes on a file and a directory, and a name of exactly NAME_MAX bytes. The
session builds it as a host directory and as a layer tar from :data:`TREE`.

A sequence is generated from its seed alone, before it runs: both trees get the same
calls, whatever they answer.

Standard library only (see ``calls.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tests.posix.calls import Call, data_of

USER = 65534
"""The normal user of the unprivileged run (and owner of some of the tree)."""
OTHER = 1000
"""Another user, owning a file in the sticky directory."""
TREE_TIME_NS = 1_500_000_000 * 10**9
LONG_NAME = "L" * 255  # NAME_MAX
TOO_LONG_NAME = "M" * 256


@dataclass
class Node:
    path: str
    kind: str  # f d l p c b, or "h" (hard link to ``target``)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


TREE = [
    Node("f", "f", data=b"hello world\n"),
    Node("big", "f", data=data_of([70_000, 1])),
    Node("empty", "f"),
    Node("ro", "f", 0o444, data=b"read only\n"),
    Node("suid", "f", 0o6755, USER, USER, data=b"#!/bin/sh\necho suid\n"),
    Node("hl1", "f", data=b"linked\n"),
    Node("hl2", "h", target="hl1"),
    Node("sl", "l", 0o777, target="d"),
    Node("slf", "l", 0o777, target="f"),
    Node("dangling", "l", 0o777, target="nowhere"),
    Node("selfloop", "l", 0o777, target="selfloop"),
    Node("d", "d", 0o755),
    Node("d/g", "f", data=b"gee\n"),
    Node("d/hl3", "h", target="hl1"),
    Node("d/e", "d", 0o755),
    Node("d/e/h", "f", data=b"aitch\n"),
    Node("tmp", "d", 0o1777),
    Node("tmp/mine", "f", 0o644, USER, USER, data=b"mine\n"),
    Node("tmp/other", "f", 0o666, OTHER, OTHER, data=b"other\n"),
    Node("tmp/rootf", "f", 0o644, data=b"root's\n"),
    Node("sg", "d", 0o2775, 0, USER),
    Node("sg/in", "f", 0o664, 0, USER, data=b"in\n"),
    Node("home", "d", 0o755, USER, USER),
    Node("home/a", "f", 0o644, USER, USER, data=b"user file\n"),
    Node("home/x", "f", 0o6775, USER, USER, data=b"setid\n"),
    Node("home/sub", "d", 0o755, USER, USER),
    Node("priv", "d", 0o700),
    Node("priv/secret", "f", 0o600, data=b"secret\n"),
    Node("fifo", "p", 0o644),
    Node("null", "c", 0o666, dev=(1, 3)),
    Node("blk", "b", 0o660, dev=(7, 0)),
    Node("xf", "f", xattrs={"user.a": b"1", "trusted.t": b"x"}, data=b"xattrs\n"),
    Node("xd", "d", 0o755, xattrs={"user.d": b"dir"}),
    Node(LONG_NAME, "f", data=b"long name\n"),
]

_USER_DIRS = ("home", "tmp", "sg")
_DIRS = [
    "",
    "d",
    "d/e",
    "tmp",
    "sg",
    "home",
    "home/sub",
    "priv",
    "xd",
    "sl",
    "f",
    "new",
    "home/new",
    "sg/new",
]
_NEW = ["n", "m", "new", "deep"]
PATHS = sorted(
    {n.path for n in TREE}
    | {f"{d}/{n}" if d else n for d in _DIRS for n in _NEW}
    | {"new/deep/n", "home/new/deep/n", "d/" + LONG_NAME, TOO_LONG_NAME, "home/" + TOO_LONG_NAME}
)
MODES = [0o644, 0o600, 0o755, 0o777, 0o4755, 0o2755, 0o6775, 0o1777, 0o2775, 0o444, 0o000, 0o7777]
UIDS = [0, USER, OTHER, -1]
SIZES = [0, 1, 7, 4096, 5000, 70_000, 1 << 20]
OFFSETS = [0, 3, 4096, 65_536, 70_001, 1 << 20, (1 << 20) + 5]
LENGTHS = [1, 5, 100, 4096, 70_000]
TIMES = [1_000_000_000 * 10**9 + 123_456_789, 1_234_567_890 * 10**9 + 1, "now", "omit"]
XATTR_NAMES = ["user.a", "user.b", "trusted.t", "security.s"]
FALLOCATE = [
    [],
    ["KEEP_SIZE"],
    ["PUNCH_HOLE", "KEEP_SIZE"],
    ["PUNCH_HOLE"],
    ["ZERO_RANGE"],
    ["ZERO_RANGE", "KEEP_SIZE"],
]
SLOTS = 4

_WEIGHTS = {
    "open": 14,
    "close": 4,
    "read": 3,
    "pread": 3,
    "write": 7,
    "pwrite": 6,
    "lseek": 3,
    "ftruncate": 3,
    "fallocate": 2,
    "fchmod": 1,
    "fchown": 1,
    "fstat": 3,
    "truncate": 3,
    "link": 4,
    "symlink": 3,
    "rename": 7,
    "unlink": 5,
    "rmdir": 3,
    "mkdir": 5,
    "mknod": 2,
    "mkfifo": 1,
    "chmod": 3,
    "chown": 3,
    "utimensat": 4,
    "setxattr": 4,
    "removexattr": 2,
    "getxattr": 1,
    "listxattr": 1,
    "readlink": 1,
    "stat": 2,
    "access": 1,
    "listdir": 1,
    "umask": 1,
}


def sequence(seed: int, steps: int, *, user: bool = False) -> list[Call]:
    """``steps`` calls, the same for the same seed on every machine.

    ``user``: for the unprivileged run, aim most calls at what :data:`USER` may change
    (``home``, ``tmp``, ``sg``), so that permission errors do not make up the sequence.
    """
    return _Generator(seed, user).calls(steps)


class _Generator:
    """Calls drawn mostly from what probably exists (a rough guess, no file system)."""

    def __init__(self, seed: int, user: bool) -> None:
        self.rng = random.Random(seed)
        self.user = user
        self.files = {n.path for n in TREE if n.kind in "fh"}
        self.dirs = {n.path for n in TREE if n.kind == "d"}
        self.others = {n.path for n in TREE if n.kind not in "fhd"}
        self.open_slots: list[int] = []

    def calls(self, steps: int) -> list[Call]:
        names = list(_WEIGHTS)
        weights = list(_WEIGHTS.values())
        return [self._call(self.rng.choices(names, weights)[0]) for _ in range(steps)]

    def path(self, *kinds: set[str]) -> str:
        """A path of one of ``kinds`` (as guessed) mostly, else any path of the pool."""
        pool = sorted(set().union(*kinds)) if kinds else []
        if self.user and self.rng.random() < 0.75:
            pool = [p for p in pool if p.startswith(_USER_DIRS)] or [
                p for p in PATHS if p.startswith(_USER_DIRS)
            ]
        if pool and self.rng.random() < 0.75:
            return self.rng.choice(pool)
        return self.rng.choice(PATHS)

    def any_path(self) -> str:
        return self.path(self.files, self.dirs, self.others)

    def new_path(self) -> str:
        """Where something new may go: a new name in a directory that probably exists."""
        if self.rng.random() < 0.3:
            return self.path()
        dirs = sorted(d for d in self.dirs if not self.user or d.startswith(_USER_DIRS))
        if self.user:
            dirs += ["home", "tmp", "sg"]
        else:
            dirs.append("")
        parent = self.rng.choice(dirs)
        name = self.rng.choice(_NEW)
        return f"{parent}/{name}" if parent else name

    def slot(self) -> int:
        if self.open_slots and self.rng.random() < 0.85:
            return self.rng.choice(self.open_slots)
        return self.rng.randrange(SLOTS)

    def _forget(self, path: str) -> None:
        for group in (self.files, self.dirs, self.others):
            for known in list(group):
                if known == path or known.startswith(path + "/"):
                    group.discard(known)

    def _call(self, name: str) -> Call:
        rng = self.rng
        c = rng.choice
        call = _call(rng, name)
        # Aim the call at what probably exists, and keep the guess up to date.
        if name == "open":
            call[1] = self.path(self.files) if rng.random() < 0.8 else self.any_path()
            if "O_CREAT" in call[2]:
                self.files.add(call[1])
            if call[4] not in self.open_slots:
                self.open_slots.append(call[4])
        elif name in (
            "read",
            "pread",
            "write",
            "pwrite",
            "lseek",
            "ftruncate",
            "fallocate",
            "fchmod",
            "fchown",
            "fstat",
            "close",
        ):
            call[1] = self.slot()
            if name == "close" and call[1] in self.open_slots:
                self.open_slots.remove(call[1])
        elif name == "truncate":
            call[1] = self.path(self.files)
        elif name in ("mkdir",):
            call[1] = self.new_path()
            self.dirs.add(call[1])
        elif name in ("mknod", "mkfifo", "symlink"):
            where = 2 if name == "symlink" else 1
            call[where] = self.new_path()
            self.others.add(call[where])
        elif name == "link":
            call[1] = self.path(self.files, self.others)
            call[2] = self.new_path()
            self.files.add(call[2])
        elif name == "rename":
            call[1] = self.any_path()
            call[2] = self.any_path() if rng.random() < 0.4 else self.new_path()
            if not call[3]:
                for group in (self.files, self.dirs, self.others):
                    if call[1] in group:
                        self._forget(call[2])
                        group.add(call[2])
                self._forget(call[1])
        elif name == "unlink":
            call[1] = self.path(self.files, self.others)
            self._forget(call[1])
        elif name == "rmdir":
            call[1] = self.path(self.dirs)
            if not any(p.startswith(call[1] + "/") for p in self.files | self.others):
                self._forget(call[1])
        elif name in (
            "chmod",
            "chown",
            "utimensat",
            "setxattr",
            "removexattr",
            "getxattr",
            "listxattr",
            "stat",
            "access",
        ):
            call[1] = self.any_path()
        del c
        return call


def _call(rng: random.Random, name: str) -> Call:
    path = rng.choice(PATHS)
    slot = rng.randrange(SLOTS)
    c = rng.choice
    if name == "open":
        flags = [c(["O_RDONLY", "O_WRONLY", "O_RDWR"])]
        for flag, chance in (
            ("O_CREAT", 0.45),
            ("O_EXCL", 0.15),
            ("O_TRUNC", 0.3),
            ("O_APPEND", 0.2),
            ("O_NOFOLLOW", 0.1),
            ("O_DIRECTORY", 0.05),
            ("O_TMPFILE", 0.03),
        ):
            if rng.random() < chance:
                flags.append(flag)
        return ["open", path, flags, c(MODES), slot]
    if name in ("close", "fstat", "fsync"):
        return [name, slot]
    if name == "read":
        return ["read", slot, c(LENGTHS)]
    if name == "pread":
        return ["pread", slot, c(LENGTHS), c(OFFSETS)]
    if name == "write":
        return ["write", slot, [c(LENGTHS), rng.randrange(100)]]
    if name == "pwrite":
        return ["pwrite", slot, [c(LENGTHS), rng.randrange(100)], c(OFFSETS)]
    if name == "lseek":
        return [
            "lseek",
            slot,
            c(OFFSETS),
            c(["SEEK_SET", "SEEK_CUR", "SEEK_END", "SEEK_DATA", "SEEK_HOLE"]),
        ]
    if name == "ftruncate":
        return ["ftruncate", slot, c(SIZES)]
    if name == "fallocate":
        return ["fallocate", slot, c(FALLOCATE), c(OFFSETS), c(LENGTHS) + 1]
    if name == "fchmod":
        return ["fchmod", slot, c(MODES)]
    if name == "fchown":
        return ["fchown", slot, c(UIDS), c(UIDS)]
    if name == "truncate":
        return ["truncate", path, c(SIZES)]
    if name == "link":
        return ["link", path, rng.choice(PATHS)]
    if name == "symlink":
        # Never an absolute target: the runner does not chroot, and "/" would be the
        # machine's. "../f" from the top leads to the tree's own parent (session.py).
        return ["symlink", c(["f", "d", "../f", "nowhere", "sl/g", path]), path]
    if name == "rename":
        flags = c([[], [], [], ["RENAME_NOREPLACE"], ["RENAME_EXCHANGE"]])
        return ["rename", path, rng.choice(PATHS), flags]
    if name in ("unlink", "rmdir", "readlink", "listdir", "listxattr"):
        return [name, path]
    if name == "mkdir":
        return ["mkdir", path, c(MODES)]
    if name == "mknod":
        kind = c(["reg", "fifo", "sock", "chr", "blk"])
        return ["mknod", path, kind, c(MODES) & 0o7777, 1, c([3, 5])]
    if name == "mkfifo":
        return ["mkfifo", path, c(MODES)]
    if name == "chmod":
        return ["chmod", path, c(MODES)]
    if name == "chown":
        return ["chown", path, c(UIDS), c(UIDS), rng.random() < 0.5]
    if name == "utimensat":
        return ["utimensat", path, c(TIMES), c(TIMES), rng.random() < 0.5]
    if name == "setxattr":
        flags = c([[], [], ["CREATE"], ["REPLACE"]])
        return ["setxattr", path, c(XATTR_NAMES), c(["", "v", "value two"]), flags]
    if name in ("removexattr", "getxattr"):
        return [name, path, c(XATTR_NAMES)]
    if name == "stat":
        return ["stat", path, rng.random() < 0.5]
    if name == "access":
        return ["access", path, c([0, 1, 2, 4, 6, 7])]
    if name == "umask":
        return ["umask", c([0o022, 0o077, 0o002, 0o000, 0o027])]
    raise ValueError(name)
