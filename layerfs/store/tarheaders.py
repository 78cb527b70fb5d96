"""The header reader of a layer tar: blocks in, one checked :class:`Header` per entry out.

It reads ustar, PAX (per-entry and global) and GNU long-name headers itself (not
``tarfile``) so that it knows the exact data offset of every entry, keeps names as
bytes (tar names need not be UTF-8) and bounds every header it buffers. What it checks
is the tar itself: checksums, numbers and their ranges, PAX records, entry types
(sparse and multi-volume entries are refused), and that names stay under the root.

The rules of a layer across its entries (links, repeated paths, name lengths) belong to
the indexer, ``layerfs.store.tarindex``.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, TypeVar

from layerfs.errors import FormatError, UnsafePathError

BLOCK = 512
_CHUNK = 1 << 20
MAX_PAX_HEADER = 1 << 20
MAX_LONG_NAME = 1 << 16
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


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> Any: ...


@dataclass(slots=True)
class Header:
    """One entry's header, every extension applied: PAX records, GNU long names, prefix."""

    path: bytes  # normalised: relative, no "." or empty components; b"" is the root
    type: str
    mode: int  # permission bits with setuid/setgid/sticky (0o7777)
    uid: int
    gid: int
    size: int  # of the data; 0 for every type but REG
    mtime_ns: int
    offset: int  # where the entry's data starts in the tar
    linkname: bytes = b""  # symlink target verbatim; hardlink target normalised
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] | None = None


H = TypeVar("H", bound=Header)


class _EndOfData(FormatError):
    """The tar stream ended early (the source's own errors are not caught as this)."""


class TarStream:
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


def read_headers(stream: TarStream, make: type[H]) -> Iterator[H]:
    """Every entry's header, as a ``make``, up to the end-of-archive blocks; the entry's
    data is skipped when the next one is asked for.

    Extension headers (PAX, GNU long names) are folded into the entry they precede.
    What comes after the end-of-archive blocks is left in ``stream``.
    """
    pax_global: dict[bytes, bytes] = {}
    pax: dict[bytes, bytes] = {}
    kept_bytes = {b"x": 0, b"g": 0}  # size of the records held in pax and pax_global
    long_name: bytes | None = None
    long_link: bytes | None = None
    seen_header = False
    while True:
        header = _read_block(stream, seen_header)
        if header == bytes(BLOCK):
            return
        if not _checksum_ok(header):
            if not seen_header:
                raise FormatError("not a tar archive (bad header checksum)")
            raise FormatError(f"corrupt tar: bad header checksum at offset {stream.offset - BLOCK}")
        seen_header = True
        typeflag = header[156:157]
        size = _parse_number(header[124:136], "size")
        if size < 0:
            raise FormatError("corrupt tar: negative entry size")
        padded = _padded(size)
        if typeflag in (b"x", b"g"):
            if size > MAX_PAX_HEADER:
                raise FormatError(f"PAX header of {size} bytes exceeds the {MAX_PAX_HEADER} limit")
            records = _parse_pax(stream.read_exact(size, "a PAX header"))
            stream.skip(padded - size, "padding")
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
            value = stream.read_exact(size, "a GNU long name").split(b"\0", 1)[0]
            stream.skip(padded - size, "padding")
            if typeflag == b"L":
                long_name = value
            else:
                long_link = value
            continue
        if typeflag == b"S" or (pax and any(k.startswith(b"GNU.sparse.") for k in pax)):
            raise FormatError("sparse tar entries are not supported in layers")
        merged = {**pax_global, **pax} if pax or pax_global else _NO_RECORDS
        entry = _entry_header(make, header, size, merged, long_name, long_link, stream.offset)
        yield entry
        # Only regular files have data: like Go's archive/tar and Python's tarfile, the
        # size field of link, directory, device and FIFO headers is ignored.
        stream.skip(_padded(entry.size) if entry.type == REG else 0, "entry data")
        pax = {}
        kept_bytes[b"x"] = 0
        long_name = long_link = None


def _read_block(stream: TarStream, seen_header: bool) -> bytes:
    try:
        return stream.read_exact(BLOCK, "a header")
    except _EndOfData:
        if not seen_header and stream.total == 0:
            raise FormatError("not a tar archive: the input is empty") from None
        if stream.buffered and not seen_header:
            raise FormatError(
                f"not a tar archive: the input ends inside its first header ({stream.total} bytes)"
            ) from None
        if stream.buffered:
            raise FormatError("truncated tar: unexpected end of data in a header") from None
        raise FormatError("truncated tar: the end-of-archive marker is missing") from None


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _entry_header(
    make: type[H],
    header: bytes,
    size: int,
    records: dict[bytes, bytes],
    long_name: bytes | None,
    long_link: bytes | None,
    offset: int,
) -> H:
    """The entry a header block (of data ``size``) describes, with the PAX ``records``
    and GNU long names that came before it."""
    typeflag = header[156:157]
    kind = _TYPEFLAGS.get(typeflag)
    if kind is None:
        raise FormatError(f"unsupported tar entry type {typeflag.decode('latin-1')!r}")
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix and header[257:263] == b"ustar\0":
            name = prefix + b"/" + name
    if long_name is not None:
        name = long_name
    name = records.get(b"path", name)
    linkname = header[157:257].split(b"\0", 1)[0]
    if long_link is not None:
        linkname = long_link
    linkname = records.get(b"linkpath", linkname)
    if b"size" in records:
        size = _pax_int(records[b"size"], "size")
    if size > MAX_SIZE:
        raise FormatError(f"corrupt tar: entry size {size} is out of range")
    mode = _parse_number(header[100:108], "mode") & 0o7777
    uid = (
        _pax_int(records[b"uid"], "uid")
        if b"uid" in records
        else _parse_number(header[108:116], "uid")
    )
    gid = (
        _pax_int(records[b"gid"], "gid")
        if b"gid" in records
        else _parse_number(header[116:124], "gid")
    )
    if b"mtime" in records:
        mtime_ns = _pax_time_ns(records[b"mtime"])
    else:
        mtime_ns = _parse_number(header[136:148], "mtime") * 1_000_000_000
    mtime_ns = min(max(mtime_ns, _NS_RANGE[0]), _NS_RANGE[1])
    xattrs: dict[str, bytes] | None = None
    for key, value in records.items():
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
                f"entry {show_name(path)} has {what} {number}, out of range (0 to {MAX_ID})"
            )
    is_dev = kind in (CHAR, BLOCKDEV)
    return make(
        path,
        kind,
        mode,
        uid,
        gid,
        size if kind == REG else 0,
        mtime_ns,
        offset,
        linkname if kind in (SYMLINK, HARDLINK) else b"",
        _device_number(header[329:337], "devmajor", path) if is_dev else 0,
        _device_number(header[337:345], "devminor", path) if is_dev else 0,
        xattrs,
    )


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
                raise UnsafePathError(f"entry {show_name(name)} escapes the root with '..'")
            parts.pop()
            continue
        parts.append(part)
    return b"/".join(parts)


def show_name(name: bytes) -> str:
    """A tar name for an error message: decoded where it can be, cut at 120 characters."""
    text = name.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= 120 else text[:117] + "...")


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


def _device_number(field_bytes: bytes, what: str, path: bytes) -> int:
    value = _parse_number(field_bytes, what)
    if not 0 <= value <= MAX_ID:
        raise FormatError(f"device {show_name(path)} has {what} {value}, out of range")
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
