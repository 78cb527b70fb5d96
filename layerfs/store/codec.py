"""The only module that imports msgpack: fixed options and a version field.

Layer indexes are msgpack maps ``{"version": N, ...}``. Binary strings stay
``bytes`` (paths in tar files need not be UTF-8), text stays ``str``.
"""

from __future__ import annotations

from typing import Any

import msgpack

from layerfs.errors import CorruptIndexError


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes, *, what: str) -> Any:
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
