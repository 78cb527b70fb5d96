"""Repository operations of the v2 API: manifests, blob downloads and blob uploads.

A :class:`Repository` is a client plus a repository name and the actions it
needs (``pull`` or ``pull,push``). Downloads are :class:`BlobReader` streams
that resume a dropped connection with an HTTP ``Range`` request from the byte
where it broke, so the consumer (decompressor, hashes, indexer) never notices.
Uploads are a ``POST`` then either one ``PUT`` (monolithic) or ``PATCH``
chunks and a closing ``PUT`` (FORMATS §8.1); both ``Range`` forms are parsed
(§9.7). Digests of downloads are checked by the consumer; this module only
enforces the announced size.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote, urljoin

import requests
import urllib3

from layerfs.errors import DigestMismatchError, RegistryError
from layerfs.model.manifest import ACCEPT, MAX_MANIFEST_SIZE
from layerfs.registry.auth import repository_scope
from layerfs.registry.client import RegistryClient, safe_url
from layerfs.registry.pace import StalledError

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^(?:bytes=)?(\d+)-(\d+)\Z")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)\Z")
_READ_ERRORS = (
    urllib3.exceptions.HTTPError,
    requests.RequestException,
    OSError,
    ValueError,  # http.client raises it on a connection closed under a read
)


def read_failure(exc: BaseException) -> str:
    """Why a read broke, in words: a stall of the registry's pace says so itself."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StalledError):
            return str(current)
        for arg in getattr(current, "args", ()):
            if isinstance(arg, StalledError):
                return str(arg)
        current = current.__cause__ or current.__context__
    return f"{type(exc).__name__}: {str(exc)[:120]}"


def parse_range(value: str | None) -> int | None:
    """The last byte a ``Range: 0-<n>`` (or ``bytes=0-<n>``) reports; None if absent."""
    if not value:
        return None
    m = _RANGE.match(value.strip())
    return int(m.group(2)) if m else None


class Repository:
    def __init__(self, client: RegistryClient, name: str, actions: str = "pull") -> None:
        self.client = client
        self.name = name  # the remote name: library/busybox, team/app
        self.scopes = [repository_scope(name, actions)]

    def _path(self, kind: str, ref: str) -> str:
        return f"/v2/{self.name}/{kind}/{quote(ref, safe=':')}"

    def _manifest_name(self, ref: str) -> str:
        """``registry/name:tag`` or ``registry/name@digest``, as errors name a manifest."""
        sep = "@" if ":" in ref else ":"
        return f"{self.client.registry}/{self.name}{sep}{ref}"

    # -- manifests -------------------------------------------------------------------------

    def get_manifest(self, ref: str) -> tuple[bytes, str, str | None]:
        """(bytes, content type, Docker-Content-Digest) of a manifest by tag or digest."""
        response = self.client.request(
            "GET",
            self._path("manifests", ref),
            scopes=self.scopes,
            headers={"Accept": ACCEPT},
            stream=True,
            what=f"manifest for {self._manifest_name(ref)}",
        )
        what = f"manifest {self.name}:{ref}"
        with response:
            ctype = response.headers.get("Content-Type", "")
            digest = response.headers.get("Docker-Content-Digest")
            try:
                data = response.raw.read(MAX_MANIFEST_SIZE + 1, decode_content=True) or b""
            except _READ_ERRORS as exc:
                raise RegistryError(f"{what}: the download failed: {read_failure(exc)}") from exc
        if len(data) > MAX_MANIFEST_SIZE:
            raise RegistryError(f"{what} is larger than {MAX_MANIFEST_SIZE} bytes")
        return data, ctype, digest

    def manifest_digest(self, ref: str) -> str | None:
        """HEAD a manifest: the digest of what the registry holds under ``ref``, or None."""
        response = self.client.request(
            "HEAD",
            self._path("manifests", ref),
            scopes=self.scopes,
            headers={"Accept": ACCEPT},
            expected=(200, 404),
            what=f"check manifest {self._manifest_name(ref)}",
        )
        with response:
            if response.status_code == 404:
                return None
            return response.headers.get("Docker-Content-Digest")

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str | None:
        response = self.client.request(
            "PUT",
            self._path("manifests", ref),
            scopes=self.scopes,
            headers={"Content-Type": media_type},
            data=data,
            expected=(200, 201, 202),
            what=f"push manifest {self.name}:{ref}",
        )
        with response:
            return response.headers.get("Docker-Content-Digest")

    # -- blobs in ----------------------------------------------------------------------------

    def get_blob(self, digest: str, limit: int) -> bytes:
        """A small blob (a config), whole; the caller verifies its digest."""
        reader = BlobReader(self, digest, None)
        try:
            data = reader.read(limit + 1)
            while len(data) <= limit:
                more = reader.read(limit + 1 - len(data))
                if not more:
                    break
                data += more
        finally:
            reader.close()
        if len(data) > limit:
            raise RegistryError(f"blob {digest} of {self.name} is larger than {limit} bytes")
        return data

    def open_blob(
        self, digest: str, size: int | None, on_eof: Callable[[], None] | None = None
    ) -> BlobReader:
        return BlobReader(self, digest, size, on_eof)

    def blob_size(self, digest: str, scopes: Iterable[str] | None = None) -> int | None:
        """HEAD a blob: its size if the repository has it, None if not."""
        response = self.client.request(
            "HEAD",
            self._path("blobs", digest),
            scopes=scopes or self.scopes,
            expected=(200, 404),
            what=f"check blob {digest[:19]} in {self.name}",
        )
        with response:
            if response.status_code == 404:
                return None
            length = response.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else -1

    # -- blobs out ---------------------------------------------------------------------------

    def mount_blob(self, digest: str, source: str) -> bool:
        """Cross-repository mount; True if mounted (201). A started upload is cancelled."""
        scopes = [*self.scopes, repository_scope(source, "pull")]
        response = self.client.request(
            "POST",
            f"/v2/{self.name}/blobs/uploads/",
            scopes=scopes,
            params={"mount": digest, "from": source},
            headers={"Content-Length": "0"},
            expected=(201, 202),
            what=f"mount blob {digest[:19]} from {source}",
        )
        with response:
            if response.status_code == 201:
                return True
            location = response.headers.get("Location")
        if location:
            self._cancel(location)
        return False

    def start_upload(self) -> str:
        response = self.client.request(
            "POST",
            f"/v2/{self.name}/blobs/uploads/",
            scopes=self.scopes,
            headers={"Content-Length": "0"},
            expected=(202,),
            what=f"start upload to {self.name}",
        )
        with response:
            return self._location(response)

    def _location(self, response: requests.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.client.registry} sent no upload Location")
        return urljoin(self.client.base_url() + "/", location)

    def _cancel(self, location: str) -> None:
        try:
            self.client.request(
                "DELETE", location, scopes=self.scopes, expected=(200, 202, 204, 404), retry=False
            ).close()
        except RegistryError:
            log.debug("could not cancel upload %s", safe_url(location), exc_info=True)

    def upload_status(self, location: str) -> tuple[str, int]:
        """Where an upload stands: (location, bytes received)."""
        response = self.client.request(
            "GET", location, scopes=self.scopes, expected=(204,), what="upload status"
        )
        with response:
            last = parse_range(response.headers.get("Range"))
            # "0-0" is what distribution says of an empty upload, and also of one byte
            # (FORMATS §9.7): read it as empty; a one-byte chunk is never sent alone.
            received = 0 if not last else last + 1
            return self._location(
                response
            ) if "Location" in response.headers else location, received

    def patch(self, location: str, chunk: bytes, offset: int) -> tuple[str, int]:
        """Send ``chunk`` at ``offset``; resumes from what the registry has after a failure."""
        sent = 0
        failures = 0
        while sent < len(chunk):
            start = offset + sent
            body = chunk[sent:]
            try:
                response = self.client.request(
                    "PATCH",
                    location,
                    scopes=self.scopes,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(body) - 1}",
                    },
                    data=body,
                    expected=(202,),
                    what=f"upload to {self.name}",
                    retry=False,
                )
            except RegistryError as exc:
                failures += 1
                if failures > self.client.options.retries or exc.status not in (
                    None,
                    *range(500, 600),
                ):
                    raise
                time.sleep(self.client._backoff(failures - 1))
                location, have = self.upload_status(location)
                if not offset <= have <= offset + len(chunk):
                    raise
                sent = have - offset
                continue
            with response:
                location = self._location(response)
                last = parse_range(response.headers.get("Range"))
            end = start + len(body) - 1
            if last is not None and last != end:
                raise RegistryError(
                    f"upload to {self.name}: registry reports bytes 0-{last}, expected 0-{end}"
                )
            sent = len(chunk)
        return location, offset + len(chunk)

    def finish_upload(self, location: str, digest: str, data: bytes = b"") -> None:
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}digest={quote(digest, safe='')}"
        try:
            self.client.request(
                "PUT",
                url,
                scopes=self.scopes,
                headers={"Content-Type": "application/octet-stream"},
                data=data,
                expected=(201, 204),
                what=f"finish upload of {digest[:19]} to {self.name}",
            ).close()
        except RegistryError:
            # A retried PUT after a lost answer finds the upload closed: check the blob.
            if self.blob_size(digest) is None:
                raise

    def upload_bytes(self, data: bytes, digest: str) -> None:
        """A monolithic upload: POST, then PUT with the whole blob."""
        self.finish_upload(self.start_upload(), digest, data)

    def upload_stream(
        self,
        pieces: Iterator[bytes],
        digest: Callable[[], str],
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Upload a blob whose digest is known only at the end; returns that digest.

        Small blobs (under one chunk) go in one PUT; larger ones as PATCH chunks.
        """
        chunk_size = self.client.options.chunk_size
        buffer = bytearray()
        location: str | None = None
        offset = 0
        for piece in pieces:
            buffer += piece
            if len(buffer) >= chunk_size:
                if location is None:
                    location = self.start_upload()
                location, offset = self.patch(location, bytes(buffer), offset)
                if progress is not None:
                    progress(len(buffer))
                buffer.clear()
        final = digest()
        if location is None:
            self.upload_bytes(bytes(buffer), final)
        else:
            if buffer:
                location, offset = self.patch(location, bytes(buffer), offset)
            self.finish_upload(location, final)
        if progress is not None and buffer:
            progress(len(buffer))
        return final


class BlobReader:
    """A blob download that resumes where it broke (``Range``), as a file-like ``read``."""

    def __init__(
        self,
        repository: Repository,
        digest: str,
        size: int | None,
        on_eof: Callable[[], None] | None = None,
    ) -> None:
        self.repository = repository
        self.digest = digest
        self.size = size
        self.offset = 0
        self.resumes = 0  # how many times the download was picked up again
        self._failures = 0  # consecutive failures without progress
        self._response: requests.Response | None = None
        self._on_eof = on_eof
        self._done = False

    def _open(self) -> None:
        client = self.repository.client
        headers = {"Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        response = client.request(
            "GET",
            f"/v2/{self.repository.name}/blobs/{self.digest}",
            scopes=self.repository.scopes,
            headers=headers,
            stream=True,
            expected=(200, 206),
            what=f"download blob {self.digest[:19]} of {self.repository.name}",
        )
        if self.offset and response.status_code == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != self.offset:
                response.close()
                raise RegistryError(
                    f"download of blob {self.digest[:19]}: the server resumed at the wrong "
                    f"offset ({response.headers.get('Content-Range')!r}, wanted {self.offset})"
                )
        elif self.offset:
            # No Range support: skip what we already have (still no restart for the consumer).
            log.info(
                "%s: the server ignored Range; skipping %d bytes", self.digest[:19], self.offset
            )
            skip = self.offset
            while skip:
                data = response.raw.read(min(skip, 1 << 20), decode_content=False)
                if not data:
                    response.close()
                    raise RegistryError(f"download of blob {self.digest[:19]}: blob got shorter")
                skip -= len(data)
        if self.size is None and response.status_code == 200:
            length = response.headers.get("Content-Length")
            if length and length.isdigit():
                self.size = int(length)
        self._response = response

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        if self._done or size == 0:
            return b""
        while True:
            if self._response is None:
                self._open()
            assert self._response is not None
            try:
                data = self._response.raw.read(size, decode_content=False)
            except _READ_ERRORS as exc:
                self._dropped(exc)
                continue
            if data:
                self.offset += len(data)
                self._failures = 0
                if self.size is not None and self.offset > self.size:
                    raise DigestMismatchError(
                        f"blob {self.digest} is longer than the {self.size} bytes announced"
                    )
                return data
            if self.size is not None and self.offset < self.size:
                self._dropped(EOFError(f"connection closed at byte {self.offset} of {self.size}"))
                continue
            self._done = True
            self.close()
            if self._on_eof is not None:
                self._on_eof()
            return b""

    def _dropped(self, exc: BaseException) -> None:
        self.close()
        self._failures += 1
        client = self.repository.client
        if self._failures > client.options.retries:
            raise RegistryError(
                f"download of blob {self.digest[:19]} of {self.repository.name} failed at "
                f"byte {self.offset}: {read_failure(exc)}"
            ) from exc
        delay = client._backoff(self._failures - 1)
        log.info(
            "download of %s dropped at byte %d (%s); resuming in %.1f s",
            self.digest[:19],
            self.offset,
            type(exc).__name__,
            delay,
        )
        self.resumes += 1
        time.sleep(delay)

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
