"""One streaming pass over a layer tar: copy it byte for byte, hash it, index it.

The parser reads ustar, PAX and GNU long-name headers itself (not ``tarfile``)
so that it knows the exact data offset of every entry, keeps names as bytes
(tar names need not be UTF-8), bounds every header it buffers, and refuses
entries that a container runtime must never apply: names escaping the root,
entries written through a link of the same layer, hardlinks to something that
is not an earlier entry of the same layer, names Linux cannot create, numbers
out of range. Like Docker it takes ``/etc/passwd`` for ``etc/passwd``; like
Docker's extractor and containerd (not ``docker load``, whose tar-split record
refuses a path seen twice) it lets the last of several entries of one path win.

What this module leaves to others: decompression (``layerfs.compression``),
where the bytes go (the caller's sink), and layer semantics across layers
(whiteouts are kept as plain entries here; ``layerfs.fs.union`` applies them).
"""

from __future__ import annotations

import hashlib
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from layerfs.errors import FormatError, UnsafePathError

BLOCK = 512
_CHUNK = 1 << 20
MAX_PAX_HEADER = 1 << 20
MAX_LONG_NAME = 1 << 16
# What Linux can create (PATH_MAX, NAME_MAX): Docker's extraction fails past these.
MAX_PATH = 4095
MAX_NAME = 255
MAX_ID = (1 << 32) - 1  # uid_t, gid_t; Docker's lchown would truncate larger ones
MAX_SIZE = (1 << 63) - 1
_NS_RANGE = (-(1 << 63), (1 << 63) - 1)  # mtimes past ~2262 are clamped to this

# Entry types as stored in the index.
REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO = "f", "d", "l", "h", "c", "b", "p"

_TYPEFLAGS = {
    b"0": REG,
    b"\0": REG,
    b"7": REG,
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": CHAR,
    b"4": BLOCKDEV,
    b"5": DIR,
    b"6": FIFO,
}

# Index types back to tarfile's, for the writers (export, commit).
TARFILE_TYPES = {
    REG: tarfile.REGTYPE,
    DIR: tarfile.DIRTYPE,
    SYMLINK: tarfile.SYMTYPE,
    HARDLINK: tarfile.LNKTYPE,
    CHAR: tarfile.CHRTYPE,
    BLOCKDEV: tarfile.BLKTYPE,
    FIFO: tarfile.FIFOTYPE,
}


def open_pax_writer(out: BinaryIO) -> tarfile.TarFile:
    """A streaming tar writer as Docker writes layers: PAX, names kept as raw bytes."""
    return tarfile.open(
        fileobj=out,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    )


WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


@dataclass(slots=True)
class Entry:
    """One entry of a layer tar, as the union mount and export need it."""

    path: bytes  # normalised: relative, no "." or empty components; b"" is the root
    type: str
    mode: int  # permission bits with setuid/setgid/sticky (0o7777)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    offset: int  # where the entry's data starts in the tar
    linkname: bytes = b""  # symlink target verbatim; hardlink target normalised
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] | None = None

    def to_row(self) -> list[Any]:
        return [
            self.path,
            self.type,
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.mtime_ns,
            self.offset,
            self.linkname,
            self.devmajor,
            self.devminor,
            self.xattrs,
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> Entry:
        return cls(*row)


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> Any: ...


@dataclass
class IndexResult:
    diff_id: str
    tar_size: int
    # Docker's layer "Size" as overlay2 measures the unpacked layer: the bytes of every
    # regular file plus the length of every symlink's target (what lstat reports).
    content_size: int
    entries: list[Entry] = field(default_factory=list)


class _EndOfData(FormatError):
    """The tar stream ended early (the source's own errors are not caught as this)."""


class _Reader:
    """Pulls big chunks from the source, passing each to the hash and the sink at once."""

    def __init__(
        self, src: BinaryIO | Any, sink: Sink | None, progress: Callable[[int], None] | None
    ) -> None:
        self._src = src
        self._sink = sink
        self._progress = progress
        self._hash = hashlib.sha256()
        self._buf = b""
        self._pos = 0  # read position inside _buf
        self.offset = 0  # absolute offset of _buf[_pos] in the stream
        self.total = 0  # bytes pulled from the source so far

    def _pull(self) -> bool:
        chunk = self._src.read(_CHUNK)
        if not chunk:
            return False
        self._hash.update(chunk)
        if self._sink is not None:
            self._sink.write(chunk)
        self.total += len(chunk)
        if self._progress is not None:
            self._progress(len(chunk))
        self._buf = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk
        self._pos = 0
        return True

    def read_exact(self, n: int, what: str) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._pull():
                raise _EndOfData(f"truncated tar: unexpected end of data in {what}")
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return data

    def skip(self, n: int, what: str) -> None:
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail == 0:
                if not self._pull():
                    raise _EndOfData(f"truncated tar: unexpected end of data in {what}")
                continue
            step = min(avail, n)
            self._pos += step
            self.offset += step
            n -= step

    @property
    def buffered(self) -> int:
        """Bytes pulled from the source but not consumed yet."""
        return len(self._buf) - self._pos

    def drain(self) -> None:
        self._pos = len(self._buf)
        while self._pull():
            self._pos = len(self._buf)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def _parse_number(field_bytes: bytes, what: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:
        # GNU base-256: big-endian two's complement with the top bit as marker.
        value = field_bytes[0] & 0x7F
        for b in field_bytes[1:]:
            value = (value << 8) | b
        if field_bytes[0] & 0x40:
            value -= 1 << (8 * len(field_bytes) - 1)
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise FormatError(f"not a tar archive: bad {what} field {text[:20]!r}") from None


_HIGH_BYTES = bytes(range(128, 256))
_NO_RECORDS: dict[bytes, bytes] = {}


def _byte_sum(data: bytes) -> int:
    """The sum of the bytes of a header, at C speed.

    Adler-32's low half is 1 + the byte sum modulo 65521; a 256-byte half of a
    header sums to at most 65280, so the modulo never bites.
    """
    return (zlib.adler32(data[:256]) & 0xFFFF) + (zlib.adler32(data[256:]) & 0xFFFF) - 2


def _checksum_ok(header: bytes) -> bool:
    stored = _parse_number(header[148:156], "checksum")
    # The checksum field itself counts as eight spaces.
    unsigned = _byte_sum(header) - _byte_sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    blanked = header[:148] + b" " * 8 + header[156:]
    # Some old tars sum the header as signed chars: each byte > 127 counts 256 less.
    high = len(blanked) - len(blanked.translate(None, _HIGH_BYTES))
    return stored == unsigned - 256 * high


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise FormatError("malformed PAX header: record without length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise FormatError("malformed PAX header: bad record length") from None
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise FormatError("malformed PAX header: record length out of range")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise FormatError("malformed PAX header: record without '='")
        records[key] = value
        pos = end
    return records


def normalize_path(name: bytes) -> bytes:
    """Tar name → clean relative path, refusing anything that leaves the root.

    A leading ``/`` is dropped, as Docker's extraction (``filepath.Join(root,
    name)``) does; a ``..`` that climbs above the root is refused, also after one.
    """
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise UnsafePathError(f"entry {_show(name)} escapes the root with '..'")
            parts.pop()
            continue
        parts.append(part)
    return b"/".join(parts)


def _show(name: bytes) -> str:
    text = name.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= 120 else text[:117] + "...")


def _check_name(path: bytes, what: str = "entry", *, parts: bool = True) -> None:
    if len(path) <= MAX_NAME:
        return  # no part of it can be too long either
    if len(path) > MAX_PATH:
        raise FormatError(
            f"{what} name of {len(path)} bytes ({_show(path[:60])}) is longer than the "
            f"{MAX_PATH} bytes Linux allows in a path"
        )
    for part in path.split(b"/") if parts else ():
        # A whiteout names a file of up to MAX_NAME bytes: its own name may be 4 longer.
        limit = MAX_NAME + len(WHITEOUT_PREFIX) if part.startswith(WHITEOUT_PREFIX) else MAX_NAME
        if len(part) > limit:
            raise FormatError(
                f"{what} {_show(path)} has a name of {len(part)} bytes; Linux allows {MAX_NAME}"
            )


class _Validator:
    """Per-layer rules: no writes through links, hardlinks to earlier entries, last one wins.

    Entries of one path after the first replace it, in tar order, as Docker's
    extraction does (a directory over a directory merges); the union mount
    applies them in that order. The index keeps a repeated directory as one
    entry (its last header) and every other repeat as an entry of its own.
    """

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries  # the layer's entries so far, in index order
        # Where each path's current entry is: one dict, its type read from the entry
        # (a layer of a million entries keeps a million of these).
        self.positions: dict[bytes, int] = {}
        self.replaced: dict[bytes, int] = {}  # directory → entry count when a non-dir replaced it

    def _type(self, path: bytes) -> str | None:
        position = self.positions.get(path)
        return None if position is None else self.entries[position].type

    def _ancestors(self, path: bytes) -> Iterator[bytes]:
        slash = path.find(b"/")
        while slash >= 0:
            yield path[:slash]
            slash = path.find(b"/", slash + 1)

    def check(self, entry: Entry, entries: list[Entry]) -> bool:
        """True if the entry is new; False if it merged into an earlier directory entry."""
        path = entry.path
        if path == b"" and entry.type != DIR:
            raise UnsafePathError("an entry that is not a directory resolves to the root")
        base = path.rsplit(b"/", 1)[-1]
        if base == WHITEOUT_PREFIX:
            raise FormatError(f"entry {_show(path)} is a bare whiteout '.wh.'")
        _check_name(path)
        # Every ancestor must be a directory (or not in this layer at all).
        for ancestor in self._ancestors(path):
            kind = self._type(ancestor)
            if kind is not None and kind != DIR:
                raise UnsafePathError(
                    f"entry {_show(path)} would be written through {_show(ancestor)}, "
                    "which is not a directory in this layer"
                )
        if entry.type == HARDLINK:
            self._check_hardlink(path, entry.linkname)
        elif entry.type == SYMLINK:
            _check_name(entry.linkname, f"symlink {_show(path)}: target", parts=False)
        previous = self._type(path)
        if previous is not None:
            if previous == DIR and entry.type == DIR:
                entries[self.positions[path]] = entry  # repeated directory: last one wins
                return False
            if previous == DIR:
                self.replaced[path] = len(entries)  # its subtree goes with it
        self.positions[path] = len(entries)
        return True

    def _check_hardlink(self, path: bytes, target: bytes) -> None:
        if target == path:
            raise UnsafePathError(f"hardlink {_show(path)} points to itself")
        kind = self._type(target)
        if kind is None:
            raise UnsafePathError(
                f"hardlink {_show(path)} points to {_show(target)}, "
                "which is not an earlier entry of this layer"
            )
        if kind == DIR:
            raise UnsafePathError(f"hardlink {_show(path)} points to a directory")
        if target.rsplit(b"/", 1)[-1].startswith(WHITEOUT_PREFIX):
            # A whiteout or opaque marker is never created: there is nothing to link to.
            raise UnsafePathError(f"hardlink {_show(path)} points to the whiteout {_show(target)}")
        position = self.positions[target]
        for ancestor in self._ancestors(target):
            if self.replaced.get(ancestor, -1) > position:
                raise UnsafePathError(
                    f"hardlink {_show(path)} points to {_show(target)}, which went with "
                    f"{_show(ancestor)} when a later entry replaced that directory"
                )


def index_tar(
    src: BinaryIO | Any,
    sink: Sink | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> IndexResult:
    """Read a whole tar stream once: copy it to ``sink``, hash it and index it.

    The diff ID covers every byte of the stream, end-of-archive blocks and any
    trailing padding included, exactly as Docker computes it.
    """
    reader = _Reader(src, sink, progress)
    entries: list[Entry] = []
    validator = _Validator(entries)
    pax_global: dict[bytes, bytes] = {}
    pax: dict[bytes, bytes] = {}
    kept_bytes = {b"x": 0, b"g": 0}  # size of the records held in pax and pax_global
    long_name: bytes | None = None
    long_link: bytes | None = None
    content_size = 0
    seen_header = False
    while True:
        try:
            header = reader.read_exact(BLOCK, "a header")
        except _EndOfData:
            if not seen_header and reader.total == 0:
                raise FormatError("not a tar archive: the input is empty") from None
            if reader.buffered and not seen_header:
                raise FormatError(
                    f"not a tar archive: the input ends inside its first header "
                    f"({reader.total} bytes)"
                ) from None
            if reader.buffered:
                raise FormatError("truncated tar: unexpected end of data in a header") from None
            raise FormatError("truncated tar: the end-of-archive marker is missing") from None
        if header == bytes(BLOCK):
            break
        if not _checksum_ok(header):
            if not seen_header:
                raise FormatError("not a tar archive (bad header checksum)")
            raise FormatError(f"corrupt tar: bad header checksum at offset {reader.offset - BLOCK}")
        seen_header = True
        typeflag = header[156:157]
        size = _parse_number(header[124:136], "size")
        if size < 0:
            raise FormatError("corrupt tar: negative entry size")
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag in (b"x", b"g"):
            if size > MAX_PAX_HEADER:
                raise FormatError(f"PAX header of {size} bytes exceeds the {MAX_PAX_HEADER} limit")
            records = _parse_pax(reader.read_exact(size, "a PAX header"))
            reader.skip(padded - size, "padding")
            kept = pax_global if typeflag == b"g" else pax
            # Records of consecutive headers add up: bound what is kept, not each header.
            for key, value in records.items():
                old = kept.get(key)
                kept_bytes[typeflag] += len(value) - (len(old) if old is not None else -len(key))
                kept[key] = value
            if kept_bytes[typeflag] > MAX_PAX_HEADER:
                raise FormatError(
                    f"PAX records of more than {MAX_PAX_HEADER} bytes for one entry"
                    if typeflag == b"x"
                    else f"global PAX records of more than {MAX_PAX_HEADER} bytes"
                )
            continue
        if typeflag in (b"L", b"K"):
            if size > MAX_LONG_NAME:
                raise FormatError(
                    f"GNU long name of {size} bytes exceeds the {MAX_LONG_NAME} limit"
                )
            value = reader.read_exact(size, "a GNU long name").split(b"\0", 1)[0]
            reader.skip(padded - size, "padding")
            if typeflag == b"L":
                long_name = value
            else:
                long_link = value
            continue
        if typeflag == b"S" or (pax and any(k.startswith(b"GNU.sparse.") for k in pax)):
            raise FormatError("sparse tar entries are not supported in layers")
        if typeflag in (b"V", b"M", b"N"):
            raise FormatError(f"unsupported tar entry type {typeflag.decode('latin-1')!r}")
        kind = _TYPEFLAGS.get(typeflag)
        if kind is None:
            raise FormatError(f"unsupported tar entry type {typeflag.decode('latin-1')!r}")
        merged = {**pax_global, **pax} if pax or pax_global else _NO_RECORDS
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:263] == b"ustar\0":
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        name = merged.get(b"path", name)
        linkname = header[157:257].split(b"\0", 1)[0]
        if long_link is not None:
            linkname = long_link
        linkname = merged.get(b"linkpath", linkname)
        if b"size" in merged:
            size = _pax_int(merged[b"size"], "size")
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if size > MAX_SIZE:
            raise FormatError(f"corrupt tar: entry size {size} is out of range")
        mode = _parse_number(header[100:108], "mode") & 0o7777
        uid = (
            _pax_int(merged[b"uid"], "uid")
            if b"uid" in merged
            else _parse_number(header[108:116], "uid")
        )
        gid = (
            _pax_int(merged[b"gid"], "gid")
            if b"gid" in merged
            else _parse_number(header[116:124], "gid")
        )
        if b"mtime" in merged:
            mtime_ns = _pax_time_ns(merged[b"mtime"])
        else:
            mtime_ns = _parse_number(header[136:148], "mtime") * 1_000_000_000
        mtime_ns = min(max(mtime_ns, _NS_RANGE[0]), _NS_RANGE[1])
        xattrs: dict[str, bytes] | None = None
        for key, value in merged.items():
            if key.startswith(b"SCHILY.xattr."):
                if xattrs is None:
                    xattrs = {}
                xattrs[key[len(b"SCHILY.xattr.") :].decode("utf-8", "surrogateescape")] = value
        if name.endswith(b"/") and kind == REG:
            kind = DIR  # old tars mark directories by a trailing slash only
        path = normalize_path(name)
        if kind == HARDLINK:
            linkname = normalize_path(linkname)
        for number, what in ((uid, "uid"), (gid, "gid")):
            if not 0 <= number <= MAX_ID:
                raise FormatError(
                    f"entry {_show(path)} has {what} {number}, out of range (0 to {MAX_ID})"
                )
        is_dev = kind in (CHAR, BLOCKDEV)
        entry = Entry(
            path=path,
            type=kind,
            mode=mode,
            uid=uid,
            gid=gid,
            size=size if kind == REG else 0,
            mtime_ns=mtime_ns,
            offset=reader.offset,
            linkname=linkname if kind in (SYMLINK, HARDLINK) else b"",
            devmajor=_device_number(header[329:337], "devmajor", path) if is_dev else 0,
            devminor=_device_number(header[337:345], "devminor", path) if is_dev else 0,
            xattrs=xattrs,
        )
        if validator.check(entry, entries):
            entries.append(entry)
        if kind == REG:
            content_size += size
        elif kind == SYMLINK:
            content_size += len(linkname)
        # Only regular files have data: like Go's archive/tar and Python's tarfile, the
        # size field of link, directory, device and FIFO headers is ignored.
        reader.skip(padded if kind == REG else 0, "entry data")
        pax = {}
        kept_bytes[b"x"] = 0
        long_name = long_link = None
    reader.drain()
    return IndexResult(
        diff_id=reader.digest, tar_size=reader.total, content_size=content_size, entries=entries
    )


def _device_number(field_bytes: bytes, what: str, path: bytes) -> int:
    value = _parse_number(field_bytes, what)
    if not 0 <= value <= MAX_ID:
        raise FormatError(f"device {_show(path)} has {what} {value}, out of range")
    return value


def _pax_int(value: bytes, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise FormatError(f"malformed PAX header: bad {what} {value[:20]!r}") from None
    if number < 0:
        raise FormatError(f"malformed PAX header: negative {what}")
    return number


def _pax_time_ns(value: bytes) -> int:
    whole, _, frac = value.partition(b".")
    try:
        seconds = int(whole)
        nanos = int((frac + b"000000000")[:9]) if frac else 0
    except ValueError:
        raise FormatError(f"malformed PAX header: bad mtime {value[:30]!r}") from None
    negative = whole.strip().startswith(b"-")  # "-0.5" has a zero whole part
    return seconds * 1_000_000_000 + (-nanos if negative else nanos)
