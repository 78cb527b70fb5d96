"""Recognise and undo the compressions layers and archives arrive in.

gzip, zstd, bzip2 and xz are detected by their magic bytes; anything else is
passed through as is. Every decompressing reader enforces an expansion cap so
a small hostile input cannot fill the disk (a decompression bomb); the store's
free-space reserve (:class:`layerfs.store.files.SpaceGuard`) is the second net.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import queue
import threading
import zlib
from typing import Any, BinaryIO, cast

import zstandard

from layerfs.errors import ExpansionLimitError, FormatError

_GzipFile: Any
_ISAL_ERRORS: tuple[type[Exception], ...] = ()
try:  # ISA-L's igzip inflates 2-3x faster than zlib here (docs/benchmarks.md, Pull and push)
    from isal.igzip import IGzipFile as _GzipFile
    from isal.igzip_lib import IsalError

    # A corrupt deflate stream (an Exception, not an OSError as zlib's); stubbed as a value.
    _ISAL_ERRORS = (cast(type[Exception], IsalError),)
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    _GzipFile = gzip.GzipFile
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
    *_ISAL_ERRORS,
)

_CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"

# Output may exceed the input by this factor once it is past FREE_OUTPUT bytes.
# Real layers measured here (tools/expansion-ratios.py, docs/store-format.md)
# expand at most 5x, at any point of the stream; deflate cannot exceed ~1032x
# (a file of zeros), zstd goes far beyond. 100x leaves 20 times the worst real
# layer seen and stops a gzip bomb of zeros after FREE_OUTPUT bytes, before it
# has cost a second. LAYERFS_MAX_EXPANSION_RATIO (0: no cap) and
# LAYERFS_EXPANSION_FREE_BYTES change them.
DEFAULT_MAX_RATIO = 100
FREE_OUTPUT = 16 << 20
RATIO_VARIABLE = "LAYERFS_MAX_EXPANSION_RATIO"


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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        return default


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


class _ZstdFrames:
    """Follows the frame structure of a zstd stream (RFC 8878) as it is read.

    zstandard's stream reader ends quietly when its input stops in the middle of
    a frame; this walks the frame and block headers (skipping block contents) so
    a truncated stream can be told from a complete one.
    """

    _MAGIC = 0xFD2FB528

    def __init__(self, source: Any) -> None:
        self._source = source
        self._state = "magic"  # magic, descriptor, block, skippable; or invalid
        self._field = b""  # the fixed-size field being collected
        self._skip = 0  # bytes to pass over before the next field
        self._checksum = False

    @property
    def complete(self) -> bool:
        # An invalid frame is left to the decoder, which reports it as corrupt.
        return self._state == "invalid" or (
            self._state == "magic" and not self._field and not self._skip
        )

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._source.read(size)
        pos = 0
        while pos < len(data) and self._state != "invalid":
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            want = {"magic": 4, "descriptor": 1, "block": 3, "skippable": 4}[self._state]
            take = min(want - len(self._field), len(data) - pos)
            self._field += data[pos : pos + take]
            pos += take
            if len(self._field) == want:
                self._advance(int.from_bytes(self._field, "little"))
                self._field = b""
        return data

    def _advance(self, value: int) -> None:
        if self._state == "magic":
            if value == self._MAGIC:
                self._state = "descriptor"
            elif value & 0xFFFFFFF0 == 0x184D2A50:
                self._state = "skippable"
            else:
                self._state = "invalid"
        elif self._state == "descriptor":
            single_segment = bool(value & 0x20)
            self._checksum = bool(value & 0x04)
            content_size = (1 if single_segment else 0, 2, 4, 8)[value >> 6]
            self._skip = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 3] + content_size
            self._state = "block"
        elif self._state == "block":
            block_type = (value >> 1) & 3
            self._skip = 1 if block_type == 1 else value >> 3  # an RLE block holds one byte
            if value & 1:  # the last block of the frame
                self._skip += 4 if self._checksum else 0
                self._state = "magic"
        else:  # skippable: its length, then that many bytes
            self._skip = value
            self._state = "magic"


# Compressed bytes handed to a decoder at a time: small enough that the count of
# bytes consumed, which the expansion cap divides by, follows the decoder closely.
_INPUT_CHUNK = 64 << 10


class _ReadInto:
    """``read`` plus the ``readinto`` igzip's reader asks its file object for."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def read(self, size: int = -1) -> bytes:
        return bytes(self._source.read(size))

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(min(len(buffer), _INPUT_CHUNK))
        buffer[: len(data)] = data
        return len(data)


class DecompressingReader:
    """Streams the decompressed form of a (possibly multi-member) compressed input.

    Every read is bounded, so a small input never expands into memory at once,
    and the expansion cap is checked after each read.
    """

    def __init__(self, source: PeekableReader, kind: str, what: str) -> None:
        self._source = source
        self._kind = kind
        self._what = what
        self._reader: Any
        raw: Any = source  # the decoders want a file object; a reader with read() is enough
        self._frames: _ZstdFrames | None = None
        if kind == "gzip":
            self._reader = _GzipFile(fileobj=_ReadInto(raw), mode="rb")
        elif kind == "zstd":
            self._frames = raw = _ZstdFrames(source)
            self._reader = zstandard.ZstdDecompressor().stream_reader(
                raw, read_size=_INPUT_CHUNK, read_across_frames=True
            )
        elif kind == "bzip2":
            self._reader = bz2.BZ2File(raw)
        else:
            self._reader = lzma.LZMAFile(raw)  # noqa: SIM115 - lives as long as this reader
        self.produced = 0
        self._max_ratio = _env_int(RATIO_VARIABLE, DEFAULT_MAX_RATIO)
        self._free_output = _env_int("LAYERFS_EXPANSION_FREE_BYTES", FREE_OUTPUT)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts: list[bytes] = []
            while chunk := self.read(_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        try:
            data: bytes = self._reader.read(min(size, _CHUNK))
        except EOFError:
            raise FormatError(f"{self._what}: truncated {self._kind} stream") from None
        except _DECODE_ERRORS as exc:
            raise FormatError(f"{self._what}: corrupt {self._kind} data: {exc}") from exc
        if not data and size and self._frames is not None and not self._frames.complete:
            raise FormatError(f"{self._what}: truncated {self._kind} stream")
        self.produced += len(data)
        if (
            self._max_ratio > 0
            and self.produced > self._free_output
            and self.produced > self._max_ratio * max(self._source.consumed, 1)
        ):
            raise ExpansionLimitError(
                f"{self._what}: {self._kind} data grew past {self._max_ratio}x its "
                f"compressed size ({self.produced} bytes from {self._source.consumed}): a "
                f"decompression bomb? Real layers expand less than 10x; set "
                f"{RATIO_VARIABLE}=N to allow N times (0: no cap)"
            )
        return data


def open_decompressed(stream: BinaryIO | Any, what: str) -> tuple[Any, str]:
    """Return a reader of the uncompressed bytes of ``stream`` and the kind detected."""
    source = PeekableReader(stream)
    kind = detect(source.peek(6))
    if kind == "none":
        return source, kind
    return DecompressingReader(source, kind, what), kind


class ReadAheadReader:
    """Reads ``source`` in a worker thread, up to ``depth`` chunks ahead of the consumer.

    Inflating (isal, zlib, zstd) and hashing release the GIL, so while the consumer
    parses and hashes one chunk the next ones are being decompressed on the other
    core. An error of the source is raised by the consumer's next read. ``close``
    stops the worker; it must be called (ingest does, whatever happens).
    """

    def __init__(self, source: Any, *, chunk: int = _CHUNK, depth: int = 8) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._rest = b""  # the chunk being handed out, from offset _at
        self._at = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="layerfs-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(self._chunk), b""))
        if self._at == len(self._rest):
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return b""
            self._rest, self._at = item, 0
        if self._at == 0 and size >= len(self._rest):
            data = self._rest
        else:
            data = self._rest[self._at : self._at + size]
        self._at += len(data)
        return data

    def close(self) -> None:
        """Stop the worker and wait for it (a source that never answers is left behind)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
