"""Digests (``sha256:<hex>``) and readers that hash what passes through them."""

from __future__ import annotations

import re
from typing import BinaryIO, Protocol

from layerfs.errors import DigestMismatchError, InvalidReferenceError

SHA256_HEX = re.compile(r"^[a-f0-9]{64}\Z")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}\Z")
# The OCI digest grammar; only sha256 is produced or verified by layerfs.
_OCI_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z")

EMPTY_TAR_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
EMPTY_GZIP_TAR_DIGEST = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"


def is_sha256_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST.match(value) is not None


def is_oci_digest(value: object) -> bool:
    return isinstance(value, str) and _OCI_DIGEST.match(value) is not None


def validate_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is ``sha256:`` + 64 lower-case hex, else raise."""
    if not is_sha256_digest(value):
        shown = repr(value)[:90]
        raise InvalidReferenceError(
            f"invalid {what} {shown}: expected sha256: and 64 lower-case hex"
        )
    assert isinstance(value, str)
    return value


def hex_of(digest: str) -> str:
    """``sha256:abc…`` → ``abc…`` (a bare hex string is returned as is)."""
    return digest.split(":", 1)[1] if ":" in digest else digest


def sha256_digest(data: bytes) -> str:
    import hashlib  # loads OpenSSL: only for commands that hash

    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_image_id(value: object) -> bool:
    return isinstance(value, str) and SHA256_HEX.match(value) is not None


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class HashingReader:
    """Wraps a byte stream; hashes and counts every byte read from it."""

    def __init__(self, stream: Readable | BinaryIO) -> None:
        self._stream = stream
        import hashlib

        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if data:
            self._hash.update(data)
            self.count += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def verify(self, expected: str, what: str) -> None:
        if self.digest != expected:
            raise DigestMismatchError(
                f"{what}: digest mismatch: expected {expected}, got {self.digest}"
            )
