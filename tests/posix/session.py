"""The host side of differential runs: starting tree, image, mounts, runner, commit, export.

A :class:`Session` owns one work directory (traversable by every user, so that the
unprivileged run reaches the trees), a store with the starting image (two layers whose
merged tree is :data:`~tests.posix.generator.TREE`, with a whiteout and an opaque
directory on the way), and a Python for the runner. For each sequence,
:meth:`Session.run` makes

- the host tree: a fresh directory built from the same description, bind-mounted on
  itself ``noatime,nodev,nosuid`` as the mount is (``nodev``/``nosuid`` are layerfs's
  defaults; ``noatime`` is what a mount does for lower files, see the guide), and
- a fresh writable mount of the image (``--no-init``, ``-o allow_other``, a new upper),

runs the runner on both (as root, or as :data:`~tests.posix.generator.USER` through
``setpriv`` with a virtualenv of the system's Python, ``tests.helpers.make_user_venv``,
since root's Python may live where that user cannot go), then commits the mount,
exports the committed image and compares the export with the host tree. Sockets are
left out of that comparison: a layer never holds one (docs/guide.md).

Needs root: it builds root-owned trees, device nodes and bind mounts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.posix.calls import RECENT_NS, Call
from tests.posix.generator import TREE, TREE_TIME_NS, USER, Node

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
RUNNER_TIMEOUT = 600
_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LC_ALL": "C.UTF-8"}


def _as_user() -> list[str]:
    return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]


@dataclass(frozen=True)
class Engine:
    """A FUSE engine a writable mount can be served by, and what it cannot offer."""

    name: str
    mount_args: tuple[str, ...] = ()
    traits: dict[str, bool] = field(default_factory=dict)


ENGINES = {
    "native": Engine("native", ("--engine", "native")),
    # pyfuse3 has no lseek, fallocate or tmpfile handler (docs/guide.md says what it means).
    "pyfuse3": Engine(
        "pyfuse3", ("--engine", "pyfuse3"), {"lseek": False, "fallocate": False, "tmpfile": False}
    ),
}


@dataclass
class Outcome:
    name: str
    report: dict[str, Any]  # the runner's
    commit: list[str]  # how the export of the committed mount differs from the host tree

    @property
    def ok(self) -> bool:
        return self.report.get("difference") is None and not self.commit

    def explain(self) -> str:
        lines = [f"sequence {self.name}: {self.report.get('steps')} steps"]
        difference = self.report.get("difference")
        if difference is not None:
            lines.append("calls before it:")
            lines += [f"  {json.dumps(call)}" for call in difference.get("before") or []]
            if difference.get("case"):
                lines.append(f"in case {difference['case']!r}")
            lines.append(f"step {difference['step']}: {json.dumps(difference['call'])}")
            lines.append(f"  host answered  {difference.get('host')}")
            lines.append(f"  mount answered {difference.get('mount')}")
            if difference.get("expected") != difference.get("host"):
                lines.append(f"  mount must answer {difference.get('expected')} (its engine)")
            lines += [f"  state: {line}" for line in difference.get("state") or []]
        if self.commit:
            lines.append("commit/export differs from the host tree:")
            lines += [f"  {line}" for line in self.commit[:40]]
        return "\n".join(lines)


class Session:
    """One store with the starting image; :meth:`run` runs a sequence on fresh trees."""

    def __init__(self, work: Path, engine: Engine, *, user: bool = False) -> None:
        if os.geteuid() != 0:
            raise PermissionError("the differential POSIX test needs root")
        self.work = work
        self.engine = engine
        self.user = user
        self.store = work / "store"
        self.count = 0
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o755)
        if user:
            for parent in work.parents:
                if not parent.stat().st_mode & 0o001:
                    raise PermissionError(
                        f"{parent} is closed to other users: {USER} cannot "
                        f"reach the trees in {work}"
                    )
        self.image = self._build_image()
        self.python = self._user_python() if user else [sys.executable]

    # -- the starting image and the runner's Python -----------------------------------------

    def cli(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
        argv = [sys.executable, "-m", "layerfs", "--root", str(self.store), *map(str, args)]
        # From "/": the layerfs under test is the installed one, not one in the cwd.
        result = subprocess.run(
            argv, capture_output=True, check=False, stdin=subprocess.DEVNULL, timeout=300, cwd="/"
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr.decode()}")
        return result

    def _build_image(self) -> str:
        from tests.integration.mounting import build_image

        tars = [self.work / "layer0.tar", self.work / "layer1.tar"]
        _write_layers(*tars)
        return build_image(self.store, tars, tag="posix:start")

    def _user_python(self) -> list[str]:
        """A virtualenv of the system's Python that :data:`USER` can run the runner from."""
        from tests.helpers import make_user_venv

        python = make_user_venv(self.work)
        probe = subprocess.run(
            [*_as_user(), python, "-c", "import tests.posix.runner"],
            capture_output=True,
            check=False,
            cwd="/",
            env=_ENV,
        )
        if probe.returncode != 0:
            raise PermissionError(
                f"uid {USER} cannot run the runner from {python}: {probe.stderr.decode()}"
            )
        return [python]

    # -- one sequence ---------------------------------------------------------------------

    def run(self, name: str, calls: list[Call]) -> Outcome:
        self.count += 1
        number = self.count
        # Each tree in a directory of its own: what a symlink reaches above a tree's
        # root ("../f" from the top) stays apart for the two and inside the work area.
        host = self.work / f"host{number}" / "tree"
        mnt = self.work / f"mnt{number}" / "tree"
        for side in (host.parent, mnt.parent):
            side.mkdir(mode=0o755)
            side.chmod(0o755)
        mnt.mkdir(mode=0o755)
        make_host_tree(host)
        with _bind_noatime(host):
            self.cli(
                "mount",
                "--rw",
                "--no-init",
                "--upper",
                f"posix-{number}",
                "-o",
                "allow_other",
                *self.engine.mount_args,
                "posix:start",
                mnt,
            )
            try:
                report = self._runner(host, mnt, calls)
                self.cli("commit", "-q", mnt, f"posix:result{number}")
            finally:
                self.cli("umount", mnt)
        export = self.work / f"export{number}.tar"
        self._export(f"posix:result{number}", export)
        commit = compare_export(export, host, untimed=report.get("untimed") or [])
        export.unlink()
        shutil.rmtree(host.parent)
        shutil.rmtree(mnt.parent)
        return Outcome(name, report, commit)

    def _export(self, reference: str, path: Path) -> None:
        """``layerfs export``, in this process (the mount and the commit were the CLI's)."""
        from layerfs.progress import Progress
        from layerfs.rootfs import export_image
        from layerfs.store.store import Store

        store = Store.open(self.store)
        with open(path, "wb") as out:
            export_image(store, store.tags.lookup_image(reference), out, Progress(quiet=True))

    def _runner(self, host: Path, mnt: Path, calls: list[Call]) -> dict[str, Any]:
        argv = [
            *self.python,
            "-m",
            "tests.posix.runner",
            "--host",
            str(host),
            "--mount",
            str(mnt),
            "--traits",
            json.dumps(self.engine.traits),
        ]
        env = dict(_ENV)
        if self.user:
            argv = [*_as_user(), *argv]
        else:
            env["PYTHONPATH"] = str(REPO)
        result = subprocess.run(
            argv,
            input=json.dumps({"calls": calls}).encode(),
            capture_output=True,
            check=False,
            cwd="/",
            env=env,
            timeout=RUNNER_TIMEOUT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"the runner failed:\n{result.stderr.decode()[-4000:]}")
        report: dict[str, Any] = json.loads(result.stdout)
        return report


# -- the starting tree, on the host and as layers ---------------------------------------------


def make_host_tree(root: Path) -> None:
    """Build :data:`TREE` under ``root`` with its owners, modes, xattrs and times."""
    root.mkdir(mode=0o755)
    for node in TREE:
        path = os.path.join(root, node.path)
        if node.kind == "d":
            os.mkdir(path)
        elif node.kind == "f":
            with open(path, "wb") as out:
                out.write(node.data)
        elif node.kind == "h":
            os.link(os.path.join(root, node.target), path)
            continue
        elif node.kind == "l":
            os.symlink(node.target, path)
        elif node.kind == "p":
            os.mkfifo(path)
        else:
            kind = stat.S_IFCHR if node.kind == "c" else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(*node.dev))
        os.chown(path, node.uid, node.gid, follow_symlinks=False)
        if node.kind != "l":
            os.chmod(path, node.mode)
        for key, value in node.xattrs.items():
            os.setxattr(path, key, value, follow_symlinks=False)
    for node in sorted(TREE, key=lambda n: n.path.count("/"), reverse=True):
        path = os.path.join(root, node.path)
        os.utime(path, ns=(TREE_TIME_NS, TREE_TIME_NS), follow_symlinks=False)
    os.chmod(root, 0o755)
    os.utime(root, ns=(TREE_TIME_NS, TREE_TIME_NS))


_OLD_F = b"the first layer's f, longer than the second's\n"


def _write_layers(first: Path, second: Path) -> None:
    """Two layers merging into :data:`TREE`: the second replaces ``f``, hides ``gone`` with
    a whiteout and ``d/e``'s first-layer contents with an opaque marker, and adds
    ``home``, ``xd`` and ``d/e/h``."""
    late = ("f", "home", "xd", "d/e/h")

    def is_late(node: Node) -> bool:
        return any(node.path == p or node.path.startswith(p + "/") for p in late)

    with _tar(first) as tar:
        _add(tar, Node(".", "d", 0o755))
        for node in TREE:
            if not is_late(node):
                _add(tar, node)
        _add(tar, Node("f", "f", 0o600, data=_OLD_F))
        _add(tar, Node("gone", "d", 0o755))
        _add(tar, Node("gone/file", "f", data=b"whited out\n"))
        _add(tar, Node("d/e/old", "f", data=b"hidden by an opaque directory\n"))
    with _tar(second) as tar:
        _add(tar, Node(".wh.gone", "f", 0o600))
        _add(tar, Node("d/e", "d", 0o755))
        _add(tar, Node("d/e/.wh..wh..opq", "f", 0o600))
        for node in TREE:
            if is_late(node):
                _add(tar, node)


@contextlib.contextmanager
def _tar(path: Path) -> Iterator[tarfile.TarFile]:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        yield tar


def _add(tar: tarfile.TarFile, node: Node) -> None:
    info = tarfile.TarInfo(node.path + ("/" if node.kind == "d" and node.path != "." else ""))
    info.type = {
        "f": tarfile.REGTYPE,
        "d": tarfile.DIRTYPE,
        "l": tarfile.SYMTYPE,
        "h": tarfile.LNKTYPE,
        "p": tarfile.FIFOTYPE,
        "c": tarfile.CHRTYPE,
        "b": tarfile.BLKTYPE,
    }[node.kind]
    info.mode = 0o777 if node.kind == "l" else node.mode
    info.uid, info.gid = node.uid, node.gid
    info.uname = info.gname = ""
    info.mtime = TREE_TIME_NS // 10**9
    info.linkname = node.target
    info.devmajor, info.devminor = node.dev
    if node.xattrs:
        info.pax_headers = {"SCHILY.xattr." + k: v.decode() for k, v in node.xattrs.items()}
    info.size = len(node.data)
    tar.addfile(info, io.BytesIO(node.data) if node.kind == "f" else None)


@contextlib.contextmanager
def _bind_noatime(path: Path) -> Iterator[None]:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,noatime,nodev,nosuid", str(path)],
            check=True,
            capture_output=True,
        )
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


# -- commit/export against the host tree -------------------------------------------------------


def _mtime(seconds: int) -> int | str:
    return seconds if seconds * 10**9 < RECENT_NS else "recent"


def host_listing(root: Path) -> dict[str, tuple[Any, ...]]:
    """What a layer can hold of each path under ``root`` (sockets left out), as root sees it."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, list[str]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, base))
            st = os.lstat(full)
            if stat.S_ISSOCK(st.st_mode):
                continue
            data = b""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as handle:
                    data = handle.read()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                oct(stat.S_IMODE(st.st_mode)),
                st.st_uid,
                st.st_gid,
                st.st_size if stat.S_ISREG(st.st_mode) else 0,
                hashlib.sha256(data).hexdigest()[:16],
                os.fsdecode(os.readlink(full)) if stat.S_ISLNK(st.st_mode) else "",
                st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                tuple(
                    sorted(
                        (k, os.getxattr(full, k, follow_symlinks=False))
                        for k in os.listxattr(full, follow_symlinks=False)
                    )
                ),
                _mtime(st.st_mtime_ns // 10**9),
            )
    return _with_groups(out, inodes)


def export_listing(tar_path: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    first: dict[str, str] = {}
    inodes: dict[str, list[str]] = {}
    kinds = {
        tarfile.REGTYPE: stat.S_IFREG,
        tarfile.DIRTYPE: stat.S_IFDIR,
        tarfile.SYMTYPE: stat.S_IFLNK,
        tarfile.FIFOTYPE: stat.S_IFIFO,
        tarfile.CHRTYPE: stat.S_IFCHR,
        tarfile.BLKTYPE: stat.S_IFBLK,
    }
    with tarfile.open(tar_path, encoding="utf-8", errors="surrogateescape") as tar:
        for member in tar:
            rel = member.name.rstrip("/")
            if rel in ("", "."):
                continue
            if rel.startswith("./"):
                rel = rel[2:]
            if member.islnk():
                target = member.linkname.removeprefix("./")
                out[rel] = out[target]
                key = first.setdefault(target, target)
                inodes.setdefault(key, [target]).append(rel)
                continue
            data = b""
            if member.isreg():
                extracted = tar.extractfile(member)
                assert extracted is not None
                data = extracted.read()
            xattrs = tuple(
                sorted(
                    (k[len("SCHILY.xattr.") :], v.encode("utf-8", "surrogateescape"))
                    for k, v in member.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            out[rel] = (
                kinds[member.type],
                oct(member.mode),
                member.uid,
                member.gid,
                member.size if member.isreg() else 0,
                hashlib.sha256(data).hexdigest()[:16],
                member.linkname if member.issym() else "",
                os.makedev(member.devmajor, member.devminor)
                if member.ischr() or member.isblk()
                else 0,
                xattrs,
                _mtime(int(member.mtime)),
            )
    groups = {i: names for i, names in enumerate(inodes.values())}
    return _with_groups(out, groups)


def _with_groups(
    out: dict[str, tuple[Any, ...]], inodes: dict[Any, list[str]]
) -> dict[str, tuple[Any, ...]]:
    group = {p: tuple(sorted(names)) for names in inodes.values() if len(names) > 1 for p in names}
    return {p: (*v, group.get(p)) for p, v in out.items()}


def compare_export(tar_path: Path, host: Path, untimed: list[str]) -> list[str]:
    """How the export differs from the host tree; the mtime of ``untimed`` paths aside."""
    got = export_listing(tar_path)
    want = host_listing(host)
    for path in untimed:
        for listing in (got, want):
            if path in listing:
                listing[path] = (*listing[path][:9], "untimed", *listing[path][10:])
    return [
        f"{path}: export {got.get(path)} != host {want.get(path)}"
        for path in sorted(set(got) | set(want))
        if got.get(path) != want.get(path)
    ]
