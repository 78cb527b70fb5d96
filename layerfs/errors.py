"""The one exception tree of layerfs.

Every error a user can cause or meet is a :class:`LayerfsError`: it carries a
one-line message, an optional hint and the exit code the command line uses.
Foreign exceptions (``OSError``, ``msgpack``, ``requests``) are wrapped where
they enter, keeping the cause with ``raise ... from``.
"""

from __future__ import annotations


class LayerfsError(Exception):
    """Base of every layerfs error: a one-line message for the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LayerfsError):
    """Bad arguments, a malformed reference, a refused operation."""

    exit_code = 2


class InvalidReferenceError(UsageError):
    """A name, tag, digest or image ID that does not follow Docker's rules."""


class TemplateError(UsageError):
    """A --format template that does not parse or cannot run on the data."""


class ConflictError(LayerfsError):
    """The operation conflicts with the store's state (tag set, image held, has children)."""


class ImageHeldError(ConflictError):
    """The image or layer is held by a pull, a load or a mount in some process."""


class NotFoundError(LayerfsError):
    """An image, tag, layer or file that does not exist."""


class ImageNotFoundError(NotFoundError):
    pass


class LayerNotFoundError(NotFoundError):
    pass


class TagNotFoundError(NotFoundError):
    pass


class DigestNotSetError(NotFoundError):
    """Docker's ErrDigestNotSet: no registry digest is recorded for a layer."""


class AmbiguousIDError(UsageError):
    """An ID prefix that matches several images."""


class IntegrityError(LayerfsError):
    """Stored or received data does not match what it claims to be."""


class DigestMismatchError(IntegrityError):
    pass


class CorruptIndexError(IntegrityError):
    pass


class FormatError(LayerfsError):
    """Malformed input: a tarball, a manifest, a JSON document."""


class UnsafePathError(FormatError):
    """A tar entry that escapes the root or writes through a link."""


class ExpansionLimitError(FormatError):
    """Decompressed data grew past the configured cap (a decompression bomb)."""


class DepthLimitError(LayerfsError):
    """An image chain deeper than Docker's MaxImageDepth allows."""


class StoreError(LayerfsError):
    """The store itself cannot be used (permissions, layout version)."""


class StoreLockedError(StoreError):
    pass


class NoSpaceError(StoreError):
    """The store's file system is full (or over quota), or would drop below the free-space
    reserve: nothing was published."""


class RegistryError(LayerfsError):
    """A registry answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        status: int | None = None,
        codes: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.codes = codes


class AuthenticationError(RegistryError):
    pass


class FuseUnavailableError(LayerfsError):
    """FUSE cannot be used here: no /dev/fuse, no permission, no pyfuse3."""


class MountError(LayerfsError):
    """Mounting or unmounting failed."""


class MountpointBusyError(MountError):
    pass
