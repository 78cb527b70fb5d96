"""Helpers of the mount tests: images from layer tars, a reference model, tree listings.

The reference model is the kernel's overlayfs over the same layers, extracted here the
way Docker's overlay2 driver stores them (whiteouts as 0:0 character devices, opaque
directories marked with ``trusted.overlay.opaque=y``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.store.store import Store
from tests.helpers import tar_member

MTIME = 1_700_000_000
SKIP_XATTRS = ("trusted.overlay.", "security.selinux")


# -- building layers and images ------------------------------------------------------------


class Layer:
    """A layer tar under construction (written to a file: it may hold big files)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close()
            path,
            "w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )

    def add(
        self,
        name: str | bytes,
        kind: bytes = tarfile.REGTYPE,
        data: bytes | None = None,
        *,
        mode: int | None = None,
        uid: int = 0,
        gid: int = 0,
        link: str | bytes = "",
        dev: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None,
        stream: BinaryIO | None = None,
        size: int = 0,
        mtime: int = MTIME,
    ) -> Layer:
        pax = {
            "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
            for k, v in (xattrs or {}).items()
        }
        info, _ = tar_member(
            os.fsdecode(name),
            kind,
            mode=mode,
            linkname=os.fsdecode(link),
            mtime=mtime,
            uid=uid,
            gid=gid,
            devmajor=dev[0],
            devminor=dev[1],
            pax=pax,
        )
        if kind == tarfile.REGTYPE:
            if stream is not None:
                info.size = size
                self._tar.addfile(info, stream)
            else:
                info.size = len(data or b"")
                self._tar.addfile(info, io.BytesIO(data or b""))
        else:
            self._tar.addfile(info)
        return self

    def dir(self, name: str | bytes, mode: int = 0o755, **kw: Any) -> Layer:
        return self.add(name, tarfile.DIRTYPE, mode=mode, **kw)

    def file(self, name: str | bytes, data: bytes = b"", **kw: Any) -> Layer:
        return self.add(name, tarfile.REGTYPE, data, **kw)

    def symlink(self, name: str | bytes, target: str | bytes) -> Layer:
        return self.add(name, tarfile.SYMTYPE, mode=0o777, link=target)

    def hardlink(self, name: str | bytes, target: str | bytes) -> Layer:
        return self.add(name, tarfile.LNKTYPE, link=target)

    def whiteout(self, name: str | bytes) -> Layer:
        name = os.fsencode(name)
        head, _, base = name.rpartition(b"/")
        return self.file((head + b"/" if head else b"") + b".wh." + base, mode=0o600)

    def opaque(self, directory: str | bytes) -> Layer:
        directory = os.fsencode(directory)
        return self.file((directory + b"/" if directory else b"") + b".wh..wh..opq", mode=0o600)

    def close(self) -> Path:
        self._tar.close()
        return self.path


def build_image(
    store_root: Path,
    layers: Sequence[Path],
    tag: str | None = None,
    config: dict[str, Any] | None = None,
    parent: str = "",
) -> str:
    """Ingest layer tars as a chain of images (base first); returns the top image ID."""
    store = Store.open(store_root)
    if parent:
        parent = store.tags.lookup_image(parent).id
    for number, path in enumerate(layers):
        with open(path, "rb") as stream:
            staged = store.layers.ingest(stream)
        last = number == len(layers) - 1
        parent = store.graph.create(staged, parent=parent, config=config if last else None).id
    if tag:
        repo, _, name = tag.partition(":")
        store.tags.tag(repo, name or "latest", parent, force=True)
    return parent


# -- the reference model ----------------------------------------------------------------------


def extract_for_overlay(tar_path: Path, dest: Path) -> bool:
    """Extract a layer as an overlayfs lower dir; True if it has an opaque marker at its root."""
    dest.mkdir(parents=True)
    root_opaque = False
    dir_times: list[tuple[Path, int]] = []
    with tarfile.open(tar_path, encoding="utf-8", errors="surrogateescape") as tar:
        for member in tar:
            name = os.fsencode(member.name).strip(b"/")
            if name in (b"", b"."):
                continue
            path = Path(os.fsdecode(os.path.join(os.fsencode(dest), name)))
            parent, _, base = name.rpartition(b"/")
            parent_path = Path(os.fsdecode(os.path.join(os.fsencode(dest), parent)))
            if base == b".wh..wh..opq":
                if parent:
                    os.setxattr(parent_path, "trusted.overlay.opaque", b"y")
                else:
                    root_opaque = True
                continue
            if base.startswith(b".wh."):
                victim = parent_path / os.fsdecode(base[4:])
                if not os.path.lexists(victim):  # an entry of this same layer wins
                    os.mknod(victim, stat.S_IFCHR | 0o600, os.makedev(0, 0))
                continue
            if os.path.lexists(path) and not (member.isdir() and path.is_dir()):
                os.unlink(path)  # this layer's own whiteout of the name
            if member.isdir():
                path.mkdir(exist_ok=True)
            elif member.isreg():
                with open(path, "wb") as out, tar.extractfile(member) as data:  # type: ignore[union-attr]
                    _copy_sparse(data, out)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                target = os.path.join(os.fsencode(dest), os.fsencode(member.linkname))
                os.link(target, path)
                continue
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            elif member.isfifo():
                os.mkfifo(path)
            os.lchown(path, member.uid, member.gid)
            if not member.issym():
                os.chmod(path, member.mode)
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    os.setxattr(
                        path,
                        key[13:],
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )
            if member.isdir():
                dir_times.append((path, member.mtime))
            else:
                os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    for path, mtime in reversed(dir_times):
        os.utime(path, (mtime, mtime))
    return root_opaque


def _copy_sparse(src: BinaryIO, out: BinaryIO) -> None:
    zero = bytes(1 << 20)
    while chunk := src.read(1 << 20):
        if chunk == zero[: len(chunk)]:
            out.seek(len(chunk), os.SEEK_CUR)
        else:
            out.write(chunk)
    out.truncate()


@contextlib.contextmanager
def overlay_reference(layers: Sequence[Path], work: Path) -> Iterator[Path]:
    """The kernel's overlayfs (read-only) over the layers, extracted under ``work``."""
    dirs: list[Path] = []
    for number, layer in enumerate(layers):
        if extract_for_overlay(layer, work / f"l{number}"):
            dirs = []  # an opaque root hides every layer below
        dirs.append(work / f"l{number}")
    if len(dirs) == 1:
        yield dirs[0]
        return
    mnt = work / "overlay"
    mnt.mkdir()
    lower = ":".join(str(d) for d in reversed(dirs))
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", mnt],
        check=True,
        capture_output=True,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)


# -- listing a tree -----------------------------------------------------------------------------


def xattrs_of(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    out = []
    for name in sorted(names):
        if name.startswith(SKIP_XATTRS):
            continue
        out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return out


def file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def listing(root: Path, *, content: bool = True) -> dict[bytes, tuple[Any, ...]]:
    """Path → (type, mode, uid, gid, size, sha256, link target, rdev, xattrs, mtime, group).

    ``group`` names a hardlink group by its first path; the root itself is left out.
    """
    base = os.fsencode(root)
    entries: dict[bytes, tuple[Any, ...]] = {}
    inodes: dict[int, list[bytes]] = {}
    nlinks: dict[bytes, int] = {}
    for dirpath, dirnames, filenames in os.walk(base, onerror=_raise):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            digest = file_hash(full) if content and stat.S_ISREG(st.st_mode) else None
            target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            entries[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                digest,
                target,
                rdev,
                tuple(xattrs_of(full)),
                int(st.st_mtime),
            )
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
                nlinks[rel] = st.st_nlink
    result: dict[bytes, tuple[Any, ...]] = {}
    groups = {p: min(paths) for paths in inodes.values() if len(paths) > 1 for p in paths}
    for rel, value in entries.items():
        result[rel] = (*value, groups.get(rel))
    return result


def link_counts_agree(root: Path) -> list[bytes]:
    """Paths whose st_nlink differs from the number of names of their inode."""
    base = os.fsencode(root)
    names: dict[int, list[tuple[bytes, int]]] = {}
    for dirpath, _dirnames, filenames in os.walk(base):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            names.setdefault(st.st_ino, []).append((full, st.st_nlink))
    return [path for group in names.values() for path, nlink in group if nlink != len(group)]


def _raise(exc: OSError) -> None:
    raise exc


def diff_listings(got: dict[bytes, Any], want: dict[bytes, Any]) -> list[str]:
    problems = []
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            problems.append(f"{path!r}: mount {got.get(path)} != reference {want.get(path)}")
    return problems


def fuse_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)


class PatternStream(io.RawIOBase):
    """``size`` bytes: pseudo-random 1 MiB blocks, or zeros where ``zero(index)`` says."""

    def __init__(self, seed: bytes, size: int, zero: Any = lambda index: False) -> None:
        self._block = hashlib.sha256(seed).digest() * ((1 << 20) // 32)
        self._zero = bytes(1 << 20)
        self._size = size
        self._pos = 0
        self._is_zero = zero

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if n < 0:
            n = self._size - self._pos
        n = min(n, self._size - self._pos)
        out = bytearray()
        while len(out) < n:
            index, offset = divmod(self._pos, 1 << 20)
            take = min(n - len(out), (1 << 20) - offset)
            block = self._zero if self._is_zero(index) else self._block
            # Vary blocks so equal-looking files still differ.
            piece = block[offset : offset + take]
            if block is self._block:
                piece = bytes([index & 0xFF]) + piece[1:] if offset == 0 and take else piece
            out += piece
            self._pos += take
        return bytes(out)


# -- a real distribution ------------------------------------------------------------------------

DEBIAN_ROOTFS_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "debian-rootfs.sh"


def debian_rootfs_tar(suite: str = "bookworm") -> Path:
    """A debootstrap minbase root file system as a tar, built once and cached.

    tools/debian-rootfs.sh builds it (from the Debian mirror apt uses) and keeps it in
    ~/.cache/layerfs, where the benchmarks find it too.
    """
    result = subprocess.run(
        ["bash", str(DEBIAN_ROOTFS_SCRIPT), "minbase"],
        check=True,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "DEBIAN_SUITE": suite},
    )
    return Path(result.stdout.strip())
