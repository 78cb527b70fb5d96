"""Run one sequence of calls on a host directory and on a mount; report the first difference.

``python -m tests.posix.runner --host DIR --mount DIR [--traits JSON] < sequence.json``
reads ``{"calls": [...]}`` and prints one JSON report: the number of steps run and, if
the trees ever disagreed, the step, its call, both answers and every path whose state
differs. After each call it compares the two answers and the two complete states
(``snapshot.py``); it stops at the first difference, since what follows would only
repeat it.

Two calls are the runner's own: ``["case", NAME]`` names the hand-written case the
calls after it belong to, and ``["expect", ANSWER, CALL]`` makes CALL on the mount
alone and requires ANSWER, for a difference the guide documents where the host's
answer would change the host tree (a name reserved for whiteouts, ``RENAME_WHITEOUT``).

Both trees are driven from this one process, call by call, with the same umask and the
same working directory relative to each root, as the user this process runs as.

``--traits`` names what the mount's engine cannot offer (``{"lseek": false,
"fallocate": false, "tmpfile": false}``); such a call is held to the engine's
documented answer instead of the host's (docs/guide.md, "Where a mount differs from a
local file system"):

- without lseek, the kernel treats a whole file as data: ``SEEK_DATA`` at an offset
  inside the file answers that offset, ``SEEK_HOLE`` the file's size. Afterwards both
  descriptors are set to the mount's answer so that the sequence goes on comparably;
- without O_TMPFILE or fallocate, a call that passes the kernel's checks gets
  ``EOPNOTSUPP`` and is then not made on the host; one the kernel refuses must be
  refused alike.

Two differences hold for every FUSE file system, and the mount is held to them too:

- the kernel seeks in a FUSE directory itself, by its generic rules (ext4 has its own
  for directories): such an lseek must answer what those rules give, and the host's
  descriptor is then put where the mount's is;
- the kernel reads and writes a FIFO itself, and a FUSE server never hears of it: the
  times of a FIFO that was read or written are not compared from then on.

Standard library only (see ``calls.py``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from typing import Any

from tests.posix.calls import Answer, Call, Tree
from tests.posix.snapshot import Snapshot, differences, snapshot

_EOPNOTSUPP = errno.errorcode[errno.EOPNOTSUPP]


def check_contained(call: Call) -> None:
    """Refuse a call that could reach outside the trees: this process is not chrooted.

    Paths and symlink targets must be relative; a target may climb one level (to the
    tree's own directory, see session.py), a path not at all.
    """
    name, args = call[0], call[1:]
    paths = [a for a in args if isinstance(a, str) and ("/" in a or a[:1] in ".")]
    if name == "symlink":
        target, paths = args[0], [args[1]]
        if target.startswith("/") or target.split("/").count("..") > 1:
            raise ValueError(f"a symlink target must stay near the tree: {call}")
    for path in paths:
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"a path must stay in the tree: {call}")


class Run:
    def __init__(self, host: str, mount: str, traits: dict[str, bool]) -> None:
        self.host = Tree(host)
        self.mount = Tree(mount)
        self.traits = traits
        self.umask = 0o022
        self.case = ""  # the hand-written case under way (named by a "case" call)
        self.tally: dict[str, dict[str, int]] = {}  # call -> answer -> how often
        self.untimed: tuple[set[int], set[int]] = (set(), set())  # FIFO inodes: host, mount

    def answers(self, call: Call) -> tuple[Answer, Answer, Answer]:
        """(host's answer, mount's answer, what the mount must answer)."""
        name = call[0]
        if name == "case":
            self.case = call[1]
            return ["ok", None], ["ok", None], ["ok", None]
        if name == "expect":
            # A documented difference: the mount alone, held to its documented answer.
            return ["not called"], self._on(self.mount, call[2]), call[1]
        if name == "open" and "O_TMPFILE" in call[2] and not self.traits.get("tmpfile", True):
            # As fallocate below; the host's slot is closed as the mount's was.
            got = self._on(self.mount, call)
            if got == ["err", _EOPNOTSUPP]:
                self._on(self.host, ["close", call[4]])
                return ["not called"], got, got
            want = self._on(self.host, call)
            return want, got, want
        if name == "fallocate" and not self.traits.get("fallocate", True):
            # The kernel's own checks come first and must agree with the host's; what
            # reaches the engine is refused, and then the host is not asked.
            got = self._on(self.mount, call)
            if got == ["err", _EOPNOTSUPP]:
                return ["not called"], got, got
            want = self._on(self.host, call)
            return want, got, want
        if name == "lseek" and self._is_dir(call[1]):
            want = self._generic_dir_seek(call)
            host, got = self._on(self.host, call), self._on(self.mount, call)
            # Where ext4 left its descriptor (far past the end, at times) would make the
            # next calls differ too: it goes where the mount's went.
            position = os.lseek(self.mount.fds[call[1]], 0, os.SEEK_CUR)
            os.lseek(self.host.fds[call[1]], position, os.SEEK_SET)
            return host, got, want
        want = self._on(self.host, call)
        got = self._on(self.mount, call)
        if name in ("read", "write") and got[0] == "ok" and got[1]:
            self._note_fifo(call[1])
        if name == "fstat":
            want, got = (
                self._untimed(self.host, 0, call[1], want),
                self._untimed(self.mount, 1, call[1], got),
            )
        seeks_holes = name == "lseek" and call[3] in ("SEEK_DATA", "SEEK_HOLE")
        if seeks_holes and not self.traits.get("lseek", True):
            want = self._whole_file_is_data(call, want)
        return want, got, want

    def _note_fifo(self, slot: int) -> None:
        for tree, inodes in zip((self.host, self.mount), self.untimed, strict=True):
            st = os.fstat(tree.fds[slot])
            if stat.S_ISFIFO(st.st_mode):
                inodes.add(st.st_ino)

    def _untimed(self, tree: Tree, side: int, slot: int, answer: Answer) -> Answer:
        """An fstat answer without the times of an inode whose times are not compared."""
        if answer[0] == "ok" and os.fstat(tree.fds[slot]).st_ino in self.untimed[side]:
            return ["ok", [*answer[1][:-2], "untimed", "untimed"]]
        return answer

    def _is_dir(self, slot: int) -> bool:
        fd = self.mount.fds.get(slot)
        return fd is not None and stat.S_ISDIR(os.fstat(fd).st_mode)

    def _generic_dir_seek(self, call: Call) -> Answer:
        """What the kernel's generic llseek answers on a directory of the mount.

        Seeking in a directory is the kernel's own business on FUSE: no server sees it.
        The mount's directories have size 0 (ext4 refuses SEEK_END on small ones).
        """
        slot, offset, whence = call[1:]
        fd = self.mount.fds[slot]
        size = os.fstat(fd).st_size
        position = os.lseek(fd, 0, os.SEEK_CUR)
        if whence in ("SEEK_DATA", "SEEK_HOLE"):
            if offset < 0 or offset >= size:
                return ["err", "ENXIO"]
            return ["ok", offset if whence == "SEEK_DATA" else size]
        base = {"SEEK_SET": 0, "SEEK_CUR": position, "SEEK_END": size}[whence]
        if base + offset < 0:
            return ["err", "EINVAL"]
        return ["ok", base + offset]

    def _whole_file_is_data(self, call: Call, host_answer: Answer) -> Answer:
        slot, offset, whence = call[1:]
        fd = self.host.fds.get(slot)
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            return host_answer  # no file: the kernel's checks answer alike
        size = os.fstat(fd).st_size
        if offset < 0 or offset >= size:
            return ["err", "ENXIO"]
        answer = offset if whence == "SEEK_DATA" else size
        os.lseek(self.host.fds[slot], answer, os.SEEK_SET)
        return ["ok", answer]

    def _on(self, tree: Tree, call: Call) -> Answer:
        check_contained(call)
        os.chdir(tree.root)
        os.umask(self.umask)
        try:
            return tree.run(call)
        finally:
            self.umask = os.umask(self.umask)
            os.umask(self.umask)
            os.chdir("/")

    def sequence(self, calls: list[Call]) -> dict[str, Any]:
        host_before = snapshot(self.host.root)
        mount_before = snapshot(self.mount.root)
        report: dict[str, Any] = {"steps": 0, "answers": self.tally, "difference": None}
        diffs = differences(host_before, None, mount_before, None)
        if diffs:
            report["difference"] = {"step": -1, "call": None, "state": diffs}
            return report
        try:
            for step, call in enumerate(calls):
                want_host, got, want = self.answers(call)
                tally = self.tally.setdefault(call[0], {})
                outcome = got[1] if got[0] == "err" else "ok"
                tally[outcome] = tally.get(outcome, 0) + 1
                host_now = snapshot(self.host.root)
                mount_now = snapshot(self.mount.root)
                diffs = differences(host_now, host_before, mount_now, mount_before, self.untimed)
                report["steps"] = step + 1
                if got != want or diffs:
                    report["untimed"] = self._untimed_paths(host_now)
                    report["difference"] = {
                        "step": step,
                        "case": self.case,
                        "call": call,
                        "host": want_host,
                        "mount": got,
                        "expected": want,
                        "state": diffs,
                        "before": calls[max(0, step - 8) : step],
                    }
                    return report
                host_before, mount_before = host_now, mount_now
        finally:
            self.host.close_all()
            self.mount.close_all()
        report["untimed"] = self._untimed_paths(host_before)
        return report

    def _untimed_paths(self, host: Snapshot) -> list[str]:
        return sorted(path for path, entry in host.items() if entry.ino in self.untimed[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--traits", default="{}")
    args = parser.parse_args(argv)
    doc = json.load(sys.stdin)
    run = Run(os.path.abspath(args.host), os.path.abspath(args.mount), json.loads(args.traits))
    json.dump(run.sequence(doc["calls"]), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
