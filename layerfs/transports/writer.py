"""Writing image archives and layouts: a tar stream or a directory, byte-for-byte repeatable.

:class:`TarWriter` writes members one after another to a stream (a file written under a
temporary name and renamed into place when finished, or standard output); headers carry
fixed owners (0:0, no names) and the modes and times the caller gives, so the same input
gives the same bytes. :class:`DirWriter` writes the same members into a directory, each
file under a temporary name first. :func:`write_layer` streams one layer into either,
uncompressed, checking its digests as it goes; a compressed blob, or one of unknown size,
is spooled (decompressed) to a temporary file first because a tar header needs the size.
:class:`LayoutDestination` is what the docker-archive and OCI destinations share; what
the members are is decided by ``archive.py``/``oci.py``.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.compression import open_decompressed
from layerfs.errors import DigestMismatchError, FormatError, UsageError
from layerfs.model.config import config_diff_ids
from layerfs.model.digest import HashingReader
from layerfs.model.image import parse_created
from layerfs.model.reference import Reference
from layerfs.progress import ReportingReader
from layerfs.store.faults import fault
from layerfs.store.files import fsync_dir, temp_path
from layerfs.transports.base import ImageDestination, LayerDesc, ProgressFn, SourceImage

_CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE


class LayoutWriter:
    """Members of an archive or layout, written in the order they are added."""

    def existing_size(self, name: str) -> int | None:
        """The size of a file member already written (or already there), else None."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return self.existing_size(name) is not None

    def add_dir(self, name: str, mtime: int) -> None:
        raise NotImplementedError

    def add_bytes(self, name: str, data: bytes, mtime: int) -> None:
        raise NotImplementedError

    def add_symlink(self, name: str, target: str, mtime: int) -> None:
        raise NotImplementedError

    def add_stream(
        self, name: str, stream: Any, size: int, mtime: int, verify: Callable[[], None]
    ) -> None:
        """Copy exactly ``size`` bytes; ``verify`` runs before the member is kept."""
        raise NotImplementedError

    def finish(self) -> None:
        """Make the output complete and visible."""
        raise NotImplementedError

    def abort(self) -> None:
        """Remove what was written (as far as the output allows)."""
        raise NotImplementedError


def copy_exact(stream: Any, out: Any, size: int, what: str) -> None:
    left = size
    while left > 0:
        chunk = stream.read(min(_CHUNK, left))
        if not chunk:
            raise FormatError(f"{what}: data ended after {size - left} of {size} bytes")
        out.write(chunk)
        left -= len(chunk)


class TarWriter(LayoutWriter):
    """A tar stream; with ``final`` it is a temporary file renamed to ``final`` at the end."""

    def __init__(
        self,
        out: BinaryIO,
        *,
        final: Path | None = None,
        temp: Path | None = None,
        close: bool = False,
    ):
        self._out = out
        self._final = final
        self._temp = temp
        self._close = close  # ``out`` is this writer's to close (a device or FIFO it opened)
        self._sizes: dict[str, int] = {}
        self._done = False
        self._anonymous = False  # an O_TMPFILE file: linked to ``temp`` only when finished

    @classmethod
    def to_file(cls, path: Path) -> TarWriter:
        """Write beside ``path`` under a temporary name; ``finish`` renames it into place."""
        path = path.absolute()
        if path.is_dir():
            raise UsageError(f"cannot write {path}: it is a directory")
        if path.exists() and not path.is_file():
            # A device or FIFO (-o /dev/null, a named pipe): written into, never replaced.
            try:
                return cls(open(path, "wb"), close=True)  # closed by finish or abort
            except OSError as exc:
                raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
        temp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            # A file with no name until it is finished: a process killed while writing
            # leaves nothing beside the output. Named temp file where O_TMPFILE is refused.
            fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
        else:
            writer = cls(open(fd, "wb"), final=path, temp=temp)  # noqa: SIM115 - see finish
            writer._anonymous = True
            return writer
        try:
            out = open(temp, "xb")  # noqa: SIM115 - closed by finish/abort
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
        return cls(out, final=path, temp=temp)

    def existing_size(self, name: str) -> int | None:
        return self._sizes.get(name)

    def _header(self, name: str, kind: bytes, mode: int, mtime: int, size: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = mtime
        info.size = size
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self._sizes[name] = size

    def _pad(self, size: int) -> None:
        if size % BLOCK:
            self._out.write(bytes(BLOCK - size % BLOCK))

    def add_dir(self, name: str, mtime: int) -> None:
        self._header(name, tarfile.DIRTYPE, 0o755, mtime)

    def add_bytes(self, name: str, data: bytes, mtime: int) -> None:
        self._header(name, tarfile.REGTYPE, 0o644, mtime, len(data))
        self._out.write(data)
        self._pad(len(data))

    def add_symlink(self, name: str, target: str, mtime: int) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
        info.mtime = mtime
        info.uname = info.gname = ""
        self._out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self._sizes[name] = 0

    def add_stream(
        self, name: str, stream: Any, size: int, mtime: int, verify: Callable[[], None]
    ) -> None:
        self._header(name, tarfile.REGTYPE, 0o644, mtime, size)
        copy_exact(stream, self._out, size, name)
        self._pad(size)
        verify()  # too late to take the bytes back: a failure aborts the whole output

    def finish(self) -> None:
        fault("save.mid-output")
        self._out.write(bytes(2 * BLOCK))
        self._out.flush()
        if self._final is not None and self._temp is not None:
            os.fsync(self._out.fileno())
            if self._anonymous:
                _link_anonymous(self._out.fileno(), self._temp)
            self._out.close()
            os.rename(self._temp, self._final)
            fsync_dir(self._final.parent)
        elif self._close:
            self._out.close()
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        if self._temp is not None:
            self._out.close()
            self._temp.unlink(missing_ok=True)
        elif self._close:
            self._out.close()
        self._done = True


def _link_anonymous(fd: int, path: Path) -> None:
    """Give the O_TMPFILE file ``fd`` the name ``path`` (linkat AT_EMPTY_PATH, else /proc)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_empty_path = -100, 0x1000
    if libc.linkat(fd, b"", at_fdcwd, os.fsencode(path), at_empty_path) == 0:
        return
    try:
        os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
        return
    except OSError:
        pass
    # Neither is allowed here: copy the finished bytes to a named file beside it.
    with open(path, "xb") as out:
        offset = 0
        while chunk := os.pread(fd, _CHUNK, offset):
            out.write(chunk)
            offset += len(chunk)
        out.flush()
        os.fsync(out.fileno())


class DirWriter(LayoutWriter):
    """Members as files under ``root``; what this writer created goes again on ``abort``."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self._created_root = False
        if not self.root.exists():
            try:
                self.root.mkdir(parents=True)
            except OSError as exc:
                raise UsageError(f"cannot create {self.root}: {exc.strerror}") from exc
            self._created_root = True
        elif not self.root.is_dir():
            raise UsageError(f"cannot write a layout to {self.root}: it is not a directory")
        self._created: list[Path] = []
        self._done = False

    def existing_size(self, name: str) -> int | None:
        path = self.root / name
        try:
            return path.lstat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _target(self, name: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _temp(self, path: Path) -> Path:
        return path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"

    def _publish(self, temp: Path, path: Path) -> None:
        existed = path.exists()
        os.rename(temp, path)
        if not existed:
            self._created.append(path)

    def add_dir(self, name: str, mtime: int) -> None:
        path = self.root / name
        if not path.is_dir():
            path.mkdir(parents=True)
            self._created.append(path)

    def add_bytes(self, name: str, data: bytes, mtime: int) -> None:
        path = self._target(name)
        temp = self._temp(path)
        with open(temp, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        self._publish(temp, path)

    def add_symlink(self, name: str, target: str, mtime: int) -> None:
        path = self._target(name)
        temp = self._temp(path)
        os.symlink(target, temp)
        self._publish(temp, path)

    def add_stream(
        self, name: str, stream: Any, size: int, mtime: int, verify: Callable[[], None]
    ) -> None:
        path = self._target(name)
        temp = self._temp(path)
        try:
            with open(temp, "xb") as out:
                copy_exact(stream, out, size, name)
                out.flush()
                os.fsync(out.fileno())
            verify()
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._publish(temp, path)

    def finish(self) -> None:
        fsync_dir(self.root)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._created_root:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in reversed(self._created):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# -- layers -------------------------------------------------------------------------------


@dataclass
class WrittenLayer:
    diff_id: str
    size: int  # of the uncompressed tar, as written
    name: str


def write_layer(
    writer: LayoutWriter,
    name_for: Callable[[str], str],
    stream: BinaryIO,
    layer: LayerDesc,
    what: str,
    *,
    mtime: int,
    tmp_dir: Path | None,
    progress: ProgressFn | None = None,
) -> WrittenLayer:
    """Write a layer uncompressed under ``name_for(diff_id)``, verifying its digests.

    The blob digest is checked against ``layer.digest`` and the uncompressed tar's sha256
    against ``layer.diff_id`` (each when known) before the member is kept.
    """
    blob = HashingReader(stream)
    counted = blob if progress is None else ReportingReader(blob, progress)
    reader, kind = open_decompressed(counted, what)

    def verify_blob() -> None:
        if reader.read(1):
            raise FormatError(f"{what}: the blob is longer than its {layer.size} bytes")
        if layer.digest and blob.digest != layer.digest:
            raise DigestMismatchError(
                f"{what}: blob digest mismatch: expected {layer.digest}, got {blob.digest}"
            )

    if kind == "none" and layer.size is not None and layer.diff_id is not None:
        diff_id, size = layer.diff_id, layer.size

        def verify() -> None:
            verify_blob()
            if blob.digest != diff_id:
                raise DigestMismatchError(
                    f"{what}: diff ID mismatch: expected {diff_id}, got {blob.digest}"
                )

        name = name_for(diff_id)
        writer.add_stream(name, reader, size, mtime, verify)
        return WrittenLayer(diff_id, size, name)

    # The size is not known before the end: spool the uncompressed tar first.
    handle: BinaryIO
    if tmp_dir is not None:
        spool = temp_path(tmp_dir, "layer")
        handle = open(spool, "xb+")  # noqa: SIM115 - closed below
    else:
        fd, name = tempfile.mkstemp(prefix="layerfs-layer-")
        spool = Path(name)
        handle = open(fd, "wb+")  # noqa: SIM115 - closed below
    try:
        tar = HashingReader(reader)
        while chunk := tar.read(_CHUNK):
            handle.write(chunk)
        verify_blob()
        diff_id, size = tar.digest, tar.count
        if layer.diff_id is not None and diff_id != layer.diff_id:
            raise DigestMismatchError(
                f"{what}: diff ID mismatch: expected {layer.diff_id}, got {diff_id}"
            )
        handle.seek(0)
        name = name_for(diff_id)
        writer.add_stream(name, handle, size, mtime, lambda: None)
    finally:
        handle.close()
        spool.unlink(missing_ok=True)
    layer.diff_id = layer.diff_id or diff_id
    return WrittenLayer(diff_id, size, name)


# -- destinations ---------------------------------------------------------------------------


def repo_tags(references: list[str]) -> list[Reference]:
    """Parsed ``name:tag`` references; digests are skipped, a bare name means ``latest``."""
    tags = []
    for ref in references:
        parsed = Reference.parse(ref)
        if parsed.digest is None:
            tags.append(parsed)
    return tags


class ImagePlan:
    """What a destination needs of an image before its layers arrive."""

    def __init__(self, image: SourceImage, override: Reference | None) -> None:
        self.image = image
        config = image.config_json()
        self.diff_ids = config_diff_ids(config, f"{image.name}: config")
        if len(self.diff_ids) != len(image.layers):
            raise FormatError(
                f"{image.name}: config lists {len(self.diff_ids)} diff_ids but the image has "
                f"{len(image.layers)} layers"
            )
        when = parse_created(config.get("created"))
        self.mtime = int(when.timestamp()) if when is not None else 0  # tar times: seconds
        self.tags = [override] if override is not None else repo_tags(image.references)
        self.config = config

    def index_of(self, layer: LayerDesc) -> int:
        for index, candidate in enumerate(self.image.layers):
            if candidate is layer:
                return index
        return self.diff_ids.index(layer.diff_id or "")


class LayoutDestination(ImageDestination):
    """An image destination writing one archive or layout through a :class:`LayoutWriter`.

    Images come one at a time (``begin_image``, layers, ``put_image``); each layer goes
    through :func:`write_layer`. Subclasses name the members. Nothing is visible until
    ``commit`` finishes the writer; ``close`` without it removes what was written.
    """

    kind = "archive"

    def __init__(
        self, writer: LayoutWriter, *, tmp_dir: Path | None = None, reference: str | None = None
    ) -> None:
        self.writer = writer
        self.tmp_dir = tmp_dir
        self.reference = reference
        self._plan: ImagePlan | None = None
        self._images = 0
        self._committed = False

    def _override(self) -> Reference | None:
        """The name every image is saved under instead of its own (a REF in the spec)."""
        return None

    def _start_image(self, plan: ImagePlan) -> None:
        pass

    def _layer_name(self, plan: ImagePlan, index: int, diff_id: str) -> str:
        raise NotImplementedError

    def _layer_written(self, plan: ImagePlan, index: int, written: WrittenLayer) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def begin_image(self, image: SourceImage) -> None:
        self._images += 1
        if self.reference is not None and self._images > 1:
            raise UsageError(f"a {self.kind} reference names one image; {image.name} is another")
        self._plan = ImagePlan(image, self._override())
        self._start_image(self._plan)

    def _current(self, image: SourceImage | None = None) -> ImagePlan:
        plan = self._plan
        if plan is None or (image is not None and plan.image is not image):
            raise RuntimeError("begin_image() must come before the image's layers")
        return plan

    def put_layer(
        self, stream: BinaryIO, layer: LayerDesc, what: str, progress: ProgressFn | None = None
    ) -> None:
        plan = self._current()
        index = plan.index_of(layer)
        layer.diff_id = layer.diff_id or plan.diff_ids[index]
        written = write_layer(
            self.writer,
            lambda diff_id: self._layer_name(plan, index, diff_id),
            stream,
            layer,
            what,
            mtime=plan.mtime,
            tmp_dir=self.tmp_dir,
            progress=progress,
        )
        self._layer_written(plan, index, written)

    def commit(self) -> None:
        self._finish()
        self.writer.finish()
        self._committed = True

    def close(self) -> None:
        if not self._committed:
            self.writer.abort()
