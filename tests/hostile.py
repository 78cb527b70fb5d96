"""Builders of hostile inputs for tests: decompression bombs made without writing them out.

A bomb here is a layer tar of one file of zeros (its size in a base-256 header, as
GNU tar writes sizes past 8 GiB), compressed. Zeros compress so well that the
compressed stream is built from one compressed piece repeated: a gzip layer of
20 GiB of zeros is ~20 MB and takes a second to write, a zstd one ~1 MB. Its diff ID
and CRC are those of the real uncompressed stream, so the layer is exactly what a
producer would have made; computing the diff ID means hashing every byte once, and
:func:`bomb_digests` caches it in pytest's cache.
"""

from __future__ import annotations

import hashlib
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import zstandard

BOMB_SIZE = 20 << 30  # bytes of zeros in the file
_PIECE = 1 << 20  # zeros per repeated compressed piece


def bomb_header(size: int) -> bytes:
    """The ustar header of a file of ``size`` bytes, the size in base-256 (GNU)."""
    info = tarfile.TarInfo("zeros")
    info.mtime = 1_700_000_000
    info.mode = 0o644
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _tail(size: int) -> int:
    """Zero bytes after the header: the data, its padding, the two end blocks."""
    return size + (-size % 512) + 1024


def bomb_digests(size: int = BOMB_SIZE, cache: Any = None) -> tuple[str, int]:
    """(diff ID, CRC-32) of the uncompressed bomb tar; ``cache`` is pytest's config.cache."""
    key = f"layerfs/bomb-digests/{size}"
    if cache is not None:
        known = cache.get(key, None)
        if known is not None:
            return str(known[0]), int(known[1])
    try:
        from isal import isal_zlib

        crc32 = isal_zlib.crc32  # 4x zlib's on zeros
    except ImportError:  # pragma: no cover
        crc32 = zlib.crc32
    header = bomb_header(size)
    sha = hashlib.sha256(header)
    crc = crc32(header)
    zeros = bytes(_PIECE)
    left = _tail(size)
    while left:
        chunk = zeros if left >= _PIECE else bytes(left)
        sha.update(chunk)
        crc = crc32(chunk, crc)
        left -= len(chunk)
    result = ("sha256:" + sha.hexdigest(), crc)
    if cache is not None:
        cache.set(key, list(result))
    return result


def write_gzip_bomb(path: Path, size: int = BOMB_SIZE, crc: int = 0) -> Path:
    """A gzip member whose raw deflate data is one compressed piece of zeros repeated.

    A full flush ends each piece on a byte boundary with no reference to earlier
    data, so the pieces can be laid end to end; the last one is a final block.
    """
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = first.compress(bomb_header(size)) + first.flush(zlib.Z_FULL_FLUSH)
    piece = first.compress(bytes(_PIECE)) + first.flush(zlib.Z_FULL_FLUSH)
    pieces, rest = divmod(_tail(size), _PIECE)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = last.compress(bytes(rest)) + last.flush(zlib.Z_FINISH)
    with open(path, "wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip, deflate, no name
        out.write(head)
        for _ in range(pieces):
            out.write(piece)
        out.write(end)
        out.write(struct.pack("<II", crc, (_tail(size) + 512) & 0xFFFFFFFF))
    return path


def write_zstd_bomb(path: Path, size: int = BOMB_SIZE) -> Path:
    """zstd frames laid end to end: the header, then a frame of zeros repeated."""
    compressor = zstandard.ZstdCompressor(level=19, write_checksum=True)
    piece = compressor.compress(bytes(_PIECE))
    pieces, rest = divmod(_tail(size), _PIECE)
    with open(path, "wb") as out:
        out.write(compressor.compress(bomb_header(size)))
        for _ in range(pieces):
            out.write(piece)
        if rest:
            out.write(compressor.compress(bytes(rest)))
    return path


# -- tar streams that are never held whole ----------------------------------------------------


_EMPTY_FILE = tarfile.TarInfo("x")
_EMPTY_FILE.mtime = 1_700_000_000
_TEMPLATE = _EMPTY_FILE.tobuf(tarfile.USTAR_FORMAT)
_TEMPLATE_SUM = sum(_TEMPLATE[100:148]) + 8 * 32 + sum(_TEMPLATE[156:])


class EmptyEntries:
    """A tar stream of ``count`` empty files ``d/f0000000``... made as it is read.

    A million of them is a 512 MB tar that never exists anywhere: each ``read``
    makes the next headers (their checksums from a precomputed sum of the rest).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._next = 0
        self._end = bytes(1024)

    def _header(self, number: int) -> bytes:
        name = b"d/f%07d" % number
        checksum = _TEMPLATE_SUM + sum(name)
        return name.ljust(100, b"\0") + _TEMPLATE[100:148] + b"%06o\0 " % checksum + _TEMPLATE[156:]

    def read(self, size: int = -1) -> bytes:
        wanted = max(size, 512) // 512 if size > 0 else self.count
        stop = min(self.count, self._next + wanted)
        data = b"".join(self._header(n) for n in range(self._next, stop))
        self._next = stop
        if stop == self.count and self._end:
            data, self._end = data + self._end, b""
        return data


class Endless:
    """``head`` then a byte pattern forever: a header that promises more than anyone reads."""

    def __init__(self, head: bytes, fill: bytes = b"a") -> None:
        self._head = head
        self._fill = fill * (1 << 16)
        self.served = 0

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
        else:
            data = (self._fill * (size // len(self._fill) + 1))[:size]
        self.served += len(data)
        return data
