"""Recognise and undo the compressions layers and archives arrive in.

gzip, zstd, bzip2 and xz are detected by their magic bytes; anything else is
passed through as is. Every decompressing reader enforces an expansion cap so
a small hostile input cannot fill the disk (a decompression bomb).
"""

from __future__ import annotations

import bz2
import lzma
import os
import zlib
from typing import Any, BinaryIO

import zstandard

from layerfs.errors import ExpansionLimitError, FormatError

_CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"

# Output may exceed the input by this factor once it is past FREE_OUTPUT bytes.
# Real layers compress 2-10x; a file of zeros compresses ~1000x with gzip, and
# zstd far beyond. Both can be raised through the environment.
DEFAULT_MAX_RATIO = 2000
FREE_OUTPUT = 1 << 30


def detect(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(BZIP2_MAGIC):
        return "bzip2"
    if head.startswith(XZ_MAGIC):
        return "xz"
    return "none"


def _max_ratio() -> int:
    value = os.environ.get("LAYERFS_MAX_EXPANSION_RATIO")
    try:
        return int(value) if value else DEFAULT_MAX_RATIO
    except ValueError:
        return DEFAULT_MAX_RATIO


class PeekableReader:
    """A reader whose first bytes can be looked at without consuming them."""

    def __init__(self, stream: BinaryIO | Any) -> None:
        self._stream = stream
        self._head = b""
        self.consumed = 0

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            data = self._stream.read(n - len(self._head))
            if not data:
                break
            self._head += data
        return self._head[:n]

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0:
                data = self._head + self._stream.read()
                self._head = b""
            else:
                data = self._head[:size]
                self._head = self._head[size:]
        else:
            data = self._stream.read(size)
        self.consumed += len(data)
        return data


class DecompressingReader:
    """Streams the decompressed form of a (possibly multi-member) compressed input."""

    def __init__(self, source: PeekableReader, kind: str, what: str) -> None:
        self._source = source
        self._kind = kind
        self._what = what
        self._decoder: Any = self._new_decoder()
        self._pending = b""
        self._eof = False
        self.produced = 0
        self._max_ratio = _max_ratio()

    def _new_decoder(self) -> Any:
        if self._kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self._kind == "zstd":
            return zstandard.ZstdDecompressor().decompressobj()
        if self._kind == "bzip2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor()

    def _fill(self) -> None:
        while not self._pending and not self._eof:
            data = self._source.read(_CHUNK)
            if not data:
                if self._kind in ("gzip", "bzip2", "xz") and not self._decoder.eof:
                    raise FormatError(f"{self._what}: truncated {self._kind} stream")
                self._eof = True
                return
            try:
                out = self._decoder.decompress(data)
                # gzip, bzip2 and xz may hold several members back to back.
                while self._kind != "zstd" and self._decoder.eof and self._decoder.unused_data:
                    rest = self._decoder.unused_data
                    self._decoder = self._new_decoder()
                    out += self._decoder.decompress(rest)
            except (zlib.error, OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
                raise FormatError(f"{self._what}: corrupt {self._kind} data: {exc}") from exc
            self._pending = out
            self.produced += len(out)
            if self.produced > FREE_OUTPUT and self.produced > self._max_ratio * max(
                self._source.consumed, 1
            ):
                raise ExpansionLimitError(
                    f"{self._what}: decompressed data grew past {self._max_ratio}x its "
                    "compressed size (a decompression bomb?); set "
                    "LAYERFS_MAX_EXPANSION_RATIO to allow more"
                )

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts: list[bytes] = []
            while True:
                self._fill()
                if not self._pending:
                    return b"".join(parts)
                parts.append(self._pending)
                self._pending = b""
        self._fill()
        data = self._pending[:size]
        self._pending = self._pending[size:]
        return data


def open_decompressed(stream: BinaryIO | Any, what: str) -> tuple[Any, str]:
    """Return a reader of the uncompressed bytes of ``stream`` and the kind detected."""
    source = PeekableReader(stream)
    kind = detect(source.peek(6))
    if kind == "none":
        return source, kind
    return DecompressingReader(source, kind, what), kind
