"""Random access to the files of an image archive or layout directory, never extracting it.

docker-archive and OCI layout readers see an archive as a small set of named files
(:class:`ArchiveFiles`). Two kinds exist:

* :class:`TarFiles` -- an uncompressed tar on disk. One pass over its headers (seeking
  over the data) records where each member's data starts; a member is then read with
  ``pread`` at that offset. Standard input and compressed archives are first spooled,
  decompressed, into one temporary file (the store's tmp/), then read the same way.
* :class:`DirFiles` -- a directory (an OCI layout, or an extracted ``docker save``).

Names are confined to the archive: a path with ``..`` that leaves it, an absolute path,
or a symlink whose target leaves it is refused. Symlinks are resolved relative to the
directory holding them (Docker writes repeated layers as ``layer.tar ->
../<id>/layer.tar``). What the files mean is left to ``archive.py`` and ``oci.py``.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.compression import PeekableReader, detect, open_decompressed
from layerfs.errors import FormatError, NotFoundError, UnsafePathError
from layerfs.store.files import SpaceGuard, temp_path

_CHUNK = 1 << 20
_MAX_HOPS = 40  # symlinks followed while resolving one name, as Linux's MAXSYMLINKS
# manifests, configs, index.json: far below this in practice. Parsed, 8 MiB of the
# worst JSON (``[{},{},...]``) takes ~200 MB; the registry's limit for configs is the same.
MAX_DOCUMENT = 8 << 20


def split_name(name: str, where: str) -> list[str]:
    """A member name as clean components; refuses absolute names and escapes with ``..``."""
    if name.startswith("/"):
        raise UnsafePathError(f"{where}: {name!r} is an absolute path")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafePathError(f"{where}: {name!r} leads outside the archive")
            parts.pop()
            continue
        parts.append(part)
    return parts


class ArchiveFiles:
    """Named files of an archive: lookup, symlink resolution, bounded reads."""

    description = "archive"

    def _kind(self, name: str) -> tuple[str, str]:
        """(kind, symlink target) of a resolved name; kind is file, dir, symlink or missing."""
        raise NotImplementedError

    def _open_resolved(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def _size_resolved(self, name: str) -> int:
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every member name (files, dirs, links), as stored."""
        raise NotImplementedError

    def head(self, name: str, n: int) -> bytes:
        """The first ``n`` bytes of a resolved file name."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def resolve(self, name: str, where: str) -> str:
        """The name with every symlink followed, confined to the archive."""
        pending = split_name(name, where)
        resolved: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if not resolved:
                    raise UnsafePathError(f"{where}: {name!r} leads outside the archive")
                resolved.pop()
                continue
            candidate = "/".join([*resolved, part])
            kind, target = self._kind(candidate)
            if kind == "symlink":
                hops += 1
                if hops > _MAX_HOPS:
                    raise FormatError(f"{where}: too many levels of symlinks in {name!r}")
                if target.startswith("/"):
                    raise UnsafePathError(
                        f"{where}: {name!r} is a symlink to the absolute path {target!r}"
                    )
                pending = [p for p in target.split("/") if p not in ("", ".")] + pending
                continue
            resolved.append(part)
        return "/".join(resolved)

    def exists(self, name: str, where: str = "archive") -> bool:
        try:
            return self._kind(self.resolve(name, where))[0] == "file"
        except (FormatError, NotFoundError):
            return False

    def _file(self, name: str, where: str) -> str:
        resolved = self.resolve(name, where)
        kind, _ = self._kind(resolved)
        if kind == "missing":
            raise FormatError(f"{where} names {name!r}, which is not in the archive")
        if kind != "file":
            raise FormatError(f"{where} names {name!r}, which is not a regular file")
        return resolved

    def size(self, name: str, where: str = "archive") -> int:
        return self._size_resolved(self._file(name, where))

    def open(self, name: str, where: str = "archive") -> BinaryIO:
        """A reader of the file's bytes; it raises FormatError if the data is cut short."""
        return self._open_resolved(self._file(name, where))

    def read(self, name: str, where: str, limit: int = MAX_DOCUMENT) -> bytes:
        resolved = self._file(name, where)
        size = self._size_resolved(resolved)
        if size > limit:
            raise FormatError(f"{where}: {name!r} is {size} bytes, more than {limit} allowed")
        with self._open_resolved(resolved) as handle:
            return handle.read()


# -- tar archives --------------------------------------------------------------------------


@dataclass(slots=True)
class _Member:
    kind: str  # file, dir, symlink, hardlink, other
    offset: int
    size: int
    target: str = ""


class MemberReader:
    """Reads ``size`` bytes at ``offset`` of a file descriptor with ``pread``; thread safe."""

    def __init__(self, fd: int, offset: int, size: int, what: str) -> None:
        self._fd = fd
        self._pos = offset
        self._left = size
        self._what = what
        self.closed = False

    def read(self, size: int | None = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if size is None or size < 0 else min(size, self._left)
        data = os.pread(self._fd, n, self._pos)
        if not data:
            raise FormatError(f"truncated archive: {self._what} is cut short")
        self._pos += len(data)
        self._left -= len(data)
        return data

    def extent(self) -> tuple[int, int, int]:
        """(descriptor, offset, size) of the unread bytes, for reading them in place."""
        return self._fd, self._pos, self._left

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> MemberReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TarFiles(ArchiveFiles):
    """An uncompressed tar file on disk, indexed in one pass over its headers."""

    def __init__(self, path: Path, description: str, *, remove: bool = False) -> None:
        self.path = path
        self.description = description
        self._remove = remove
        self._members: dict[str, _Member] = {}
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NotFoundError(f"cannot read {description}: {exc.strerror}") from exc
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _index(self) -> None:
        file_size = os.fstat(self._fd).st_size
        with open(self._fd, "rb", closefd=False) as handle:
            try:
                tar = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 - closed below
            except tarfile.TarError as exc:
                raise FormatError(f"{self.description} is not a tar archive: {exc}") from exc
            try:
                while True:
                    try:
                        info = tar.next()
                    except tarfile.TarError as exc:
                        raise FormatError(f"{self.description}: corrupt tar: {exc}") from exc
                    if info is None:
                        break
                    tar.members.clear()  # type: ignore[attr-defined]  # keep memory flat whatever the member count
                    self._add(info, file_size)
                end = tar.offset
            finally:
                tar.close()
        tail = os.pread(self._fd, tarfile.BLOCKSIZE, end)
        # A clean end is two zero blocks, or (as Go's reader accepts) no more data.
        if tail and tail != bytes(tarfile.BLOCKSIZE):
            if len(tail) < tarfile.BLOCKSIZE:
                raise FormatError(f"{self.description} is truncated: it ends inside a header")
            raise FormatError(f"{self.description}: corrupt tar header at offset {end}")

    def _add(self, info: tarfile.TarInfo, file_size: int) -> None:
        parts = split_name(info.name.lstrip("/"), self.description)
        if not parts:
            return  # the archive's root directory ("./")
        name = "/".join(parts)
        if info.isreg():
            if info.offset_data + info.size > file_size:
                raise FormatError(f"{self.description} is truncated: {name!r} is cut short")
            member = _Member("file", info.offset_data, info.size)
        elif info.isdir():
            member = _Member("dir", 0, 0)
        elif info.issym():
            member = _Member("symlink", 0, 0, info.linkname)
        elif info.islnk():
            target = "/".join(split_name(info.linkname.lstrip("/"), self.description))
            member = _Member("hardlink", 0, 0, target)
        else:
            member = _Member("other", 0, 0)
        self._members[name] = member

    def names(self) -> list[str]:
        return list(self._members)

    def _member(self, name: str) -> _Member | None:
        member = self._members.get(name)
        hops = 0
        while member is not None and member.kind == "hardlink":
            hops += 1
            if hops > _MAX_HOPS:
                raise FormatError(f"{self.description}: hardlink loop at {name!r}")
            member = self._members.get(member.target)
        return member

    def _kind(self, name: str) -> tuple[str, str]:
        member = self._member(name)
        if member is None:
            # Directories need no entry of their own in a tar.
            prefix = name + "/"
            if any(n.startswith(prefix) for n in self._members):
                return "dir", ""
            return "missing", ""
        return member.kind, member.target

    def _size_resolved(self, name: str) -> int:
        member = self._member(name)
        assert member is not None
        return member.size

    def _open_resolved(self, name: str) -> BinaryIO:
        member = self._member(name)
        assert member is not None
        reader = MemberReader(self._fd, member.offset, member.size, repr(name))
        return reader  # type: ignore[return-value]

    def head(self, name: str, n: int) -> bytes:
        member = self._member(name)
        assert member is not None
        return os.pread(self._fd, min(n, member.size), member.offset)

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None  # type: ignore[assignment]
        if self._remove:
            self.path.unlink(missing_ok=True)


# -- directories ---------------------------------------------------------------------------


class DirFiles(ArchiveFiles):
    """A directory read in place (an OCI layout, or an extracted docker save)."""

    def __init__(self, root: Path, description: str) -> None:
        self.root = root
        self.description = description

    def names(self) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for name in dirnames + filenames:
                found.append(name if rel == "." else f"{rel}/{name}")
        return found

    def _kind(self, name: str) -> tuple[str, str]:
        path = self.root / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return "missing", ""
        except NotADirectoryError:
            return "missing", ""
        if stat.S_ISLNK(st.st_mode):
            return "symlink", os.readlink(path)
        if stat.S_ISREG(st.st_mode):
            return "file", ""
        if stat.S_ISDIR(st.st_mode):
            return "dir", ""
        return "other", ""

    def _size_resolved(self, name: str) -> int:
        return os.lstat(self.root / name).st_size

    def _open_resolved(self, name: str) -> BinaryIO:
        fd = os.open(self.root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return _SizedFile(fd, os.fstat(fd).st_size, repr(name))  # type: ignore[return-value]

    def head(self, name: str, n: int) -> bytes:
        with open(self.root / name, "rb") as handle:
            return handle.read(n)


class _SizedFile(MemberReader):
    """A whole file by descriptor; closing it closes the descriptor."""

    def __init__(self, fd: int, size: int, what: str) -> None:
        super().__init__(fd, 0, size, what)
        self._own_fd = fd

    def close(self) -> None:
        if not self.closed:
            os.close(self._own_fd)
        super().close()


# -- opening ---------------------------------------------------------------------------------


def spool(stream: Any, tmp_dir: Path | None, what: str) -> Path:
    """Copy a stream, decompressed, to a new file under ``tmp_dir``; the caller removes it."""
    reader, _ = open_decompressed(stream, what)
    if tmp_dir is not None:
        path = temp_path(tmp_dir, "spool")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    else:
        fd, name = tempfile.mkstemp(prefix="layerfs-spool-")
        path = Path(name)
    try:
        with open(fd, "wb") as out:
            guard = SpaceGuard(out, path.parent, what)
            while chunk := reader.read(_CHUNK):
                guard.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def open_tar_path(path: Path, tmp_dir: Path | None, description: str) -> TarFiles:
    """A tar file on disk: read in place if uncompressed, else spooled decompressed first."""
    try:
        with open(path, "rb") as handle:
            kind = detect(handle.read(6))
            if kind == "none":
                return TarFiles(path, description)
            handle.seek(0)
            spooled = spool(handle, tmp_dir, f"cannot read {description}")
    except FileNotFoundError:
        raise NotFoundError(f"cannot read {description}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{description} is a directory, not an archive") from None
    except PermissionError as exc:
        raise NotFoundError(f"cannot read {description}: {exc.strerror}") from exc
    return TarFiles(spooled, description, remove=True)


def open_tar_stream(stream: Any, tmp_dir: Path | None, description: str) -> TarFiles:
    """A tar arriving on a stream (stdin): spooled, decompressed, once."""
    source = PeekableReader(stream)
    if not source.peek(1):
        raise FormatError(f"{description} is empty")
    return TarFiles(spool(source, tmp_dir, f"cannot read {description}"), description, remove=True)
