"""The only module that imports msgpack: fixed options and a version field.

Layer indexes are msgpack maps ``{"version": N, ...}``. Binary strings stay
``bytes`` (paths in tar files need not be UTF-8), text stays ``str``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from layerfs.errors import CorruptIndexError

# msgpack is imported where it is used: a command that reads no index does not load it.


def pack(obj: Any) -> bytes:
    import msgpack

    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes, *, what: str) -> Any:
    import msgpack

    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise CorruptIndexError(f"cannot read {what}: {exc}") from exc


def iter_map_items(data: bytes, *, what: str, stream_key: str) -> Iterator[tuple[str, Any]]:
    """The (key, value) pairs of a top-level map, in order, without unpacking it whole.

    The array under ``stream_key`` is yielded one item at a time, as
    ``(stream_key, item)``: a big layer index never sits in memory twice.
    """
    import msgpack

    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, use_list=True, max_buffer_size=max(len(data), 1)
    )
    unpacker.feed(data)
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == stream_key:
                for _ in range(unpacker.read_array_header()):
                    yield key, unpacker.unpack()
            else:
                yield key, unpacker.unpack()
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        msgpack.OutOfData,
    ) as exc:
        raise CorruptIndexError(f"cannot read {what}: {exc}") from exc
