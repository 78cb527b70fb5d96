"""The only module that imports msgpack: fixed options and a version field.

Layer indexes are msgpack maps ``{"version": N, ...}``. Binary strings stay
``bytes`` (paths in tar files need not be UTF-8), text stays ``str``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from layerfs.errors import CorruptIndexError

# msgpack is imported where it is used: a command that reads no index does not load it.


def pack(obj: Any) -> bytes:
    import msgpack

    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def pack_streaming(
    out: BinaryIO, items: dict[str, Any], stream_key: str, rows: Iterable[Any], count: int
) -> None:
    """Write the map ``items`` plus ``stream_key`` → the ``count`` rows, one row at a time.

    The same bytes as ``pack({**items, stream_key: list(rows)})``, without the list
    or the whole document in memory: what a layer of a million entries needs.
    """
    import msgpack

    packer = msgpack.Packer(use_bin_type=True)
    buffer = bytearray(packer.pack_map_header(len(items) + 1))
    for key, value in items.items():
        buffer += packer.pack(key)
        buffer += packer.pack(value)
    buffer += packer.pack(stream_key)
    buffer += packer.pack_array_header(count)
    for row in rows:
        buffer += packer.pack(row)
        if len(buffer) >= 1 << 20:  # written in big pieces, held in small ones
            out.write(bytes(buffer))
            buffer.clear()
    out.write(bytes(buffer))


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
