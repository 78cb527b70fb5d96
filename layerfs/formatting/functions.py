"""The functions Go templates may call: Go's builtins and docker's additions.

Go's (``and or not len index slice eq ne lt le gt ge print printf println html js
urlquery``; ``and``/``or`` are evaluated lazily by the executor) and docker's (``json join
split lower upper title pad truncate``, from docker's templates package), plus docker's
header versions of its own, which pass their first argument through to make a table's
header row. A function that refuses its arguments raises :class:`FunctionError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from layerfs.formatting import values as gv
from layerfs.formatting.values import MISSING, GoMap, GoNil

Function = Callable[..., Any]


class FunctionError(Exception):
    """A function refused its arguments; the template reports "error calling NAME: ..."."""


def _string_arg(value: Any, what: str = "string") -> str:
    if isinstance(value, str):
        return value
    raise FunctionError(f"wrong type for value; expected {what}; got {gv.type_name(value)}")


def _int_arg(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise FunctionError(f"wrong type for value; expected int; got {gv.type_name(value)}")


def _strings_arg(value: Any) -> list[str]:
    if isinstance(value, GoNil) or value is None:
        return []
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise FunctionError(f"wrong type for value; expected []string; got {gv.type_name(value)}")


def _json(value: Any) -> str:
    return gv.to_json(value)


def _join(items: Any, sep: Any) -> str:
    return _string_arg(sep).join(_strings_arg(items))


def _split(text: Any, sep: Any) -> list[str]:
    whole, separator = _string_arg(text), _string_arg(sep)
    if separator == "":
        return list(whole)
    return whole.split(separator)


def _title(text: Any) -> str:
    """Go's strings.Title: the first letter of every word upper-cased."""
    out = []
    previous = " "
    for ch in _string_arg(text):
        separator = not (previous.isalnum() or previous == "_")
        out.append(ch.upper() if separator else ch)
        previous = ch
    return "".join(out)


def _pad(text: Any, prefix: Any, suffix: Any) -> str:
    value = _string_arg(text)
    if value == "":
        return value
    return " " * _int_arg(prefix) + value + " " * _int_arg(suffix)


def _truncate(text: Any, length: Any) -> str:
    """docker's truncate: the first ``length`` bytes of a string."""
    data = _string_arg(text).encode()
    length = _int_arg(length)
    if length < 0 or len(data) < length:
        return _string_arg(text)
    return data[:length].decode(errors="ignore")


def _len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())  # Go counts a string's bytes
    if isinstance(value, list | tuple | Mapping):
        return len(value)
    if isinstance(value, GoMap):
        return len(value.items)
    if isinstance(value, GoNil) and value.kind in ("slice", "map"):
        return 0
    raise FunctionError(f"len of type {gv.type_name(value)}")


def _index(item: Any, *indexes: Any) -> Any:
    for index in indexes:
        zero: Any = MISSING
        if isinstance(item, GoMap):
            item, zero = item.items, item.zero
        if isinstance(item, GoNil):
            if item.kind == "map":
                return MISSING
            raise FunctionError(f"index out of range: {gv.sprint(index)}")
        if isinstance(item, Mapping):
            item = item.get(index, zero)
        elif isinstance(item, list | tuple | str):
            if not isinstance(index, int) or isinstance(index, bool):
                raise FunctionError(f"cannot index slice/array with type {gv.type_name(index)}")
            if not 0 <= index < len(item):
                raise FunctionError(f"index out of range: {index}")
            item = item[index] if not isinstance(item, str) else item.encode()[index]
        elif item is None or item is MISSING:
            raise FunctionError("index of untyped nil")
        else:
            raise FunctionError(f"can't index item of type {gv.type_name(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if not isinstance(item, str | list | tuple):
        raise FunctionError(f"can't slice item of type {gv.type_name(item)}")
    if len(indexes) > 3 or (len(indexes) == 3 and isinstance(item, str)):
        raise FunctionError("too many slice indexes")
    data = item.encode() if isinstance(item, str) else item  # Go slices a string's bytes
    bounds = [_int_arg(i) for i in indexes]
    start = bounds[0] if bounds else 0
    end = bounds[1] if len(bounds) > 1 else len(data)
    if not 0 <= start <= end <= len(data):
        raise FunctionError(f"index out of range: {end if end > len(data) else start}")
    if isinstance(data, bytes):
        return data[start:end].decode(errors="replace")
    return data[start:end]


def _not(value: Any) -> bool:
    return not gv.is_true(value)


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise FunctionError("missing argument for comparison")
    return any(_compare_equal(first, other) for other in others)


def _compare_equal(a: Any, b: Any) -> bool:
    kind_a, kind_b = gv.basic_kind(a), gv.basic_kind(b)
    if a is None or b is None or a is MISSING or b is MISSING:
        return (a is None or a is MISSING) and (b is None or b is MISSING)
    if kind_a is None or kind_b is None:
        raise FunctionError("invalid type for comparison")
    if kind_a != kind_b:
        raise FunctionError("incompatible types for comparison")
    return bool(a == b)


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _ordered(a: Any, b: Any) -> tuple[Any, Any]:
    kind_a, kind_b = gv.basic_kind(a), gv.basic_kind(b)
    if kind_a in (None, "bool") or kind_b in (None, "bool"):
        raise FunctionError("invalid type for comparison")
    if kind_a != kind_b:
        raise FunctionError("incompatible types for comparison")
    return a, b


def _lt(a: Any, b: Any) -> bool:
    x, y = _ordered(a, b)
    return bool(x < y)


def _le(a: Any, b: Any) -> bool:
    x, y = _ordered(a, b)
    return bool(x <= y)


def _gt(a: Any, b: Any) -> bool:
    x, y = _ordered(a, b)
    return bool(x > y)


def _ge(a: Any, b: Any) -> bool:
    x, y = _ordered(a, b)
    return bool(x >= y)


def _printf(fmt: Any, *args: Any) -> str:
    return gv.sprintf(_string_arg(fmt), list(args))


def _js(*args: Any) -> str:
    text = gv.sprint_args(args)
    out = []
    for ch in text:
        if ch in "\\'\"":
            out.append("\\" + ch)
        elif ch in "<>&=" or ch < " ":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def _html(*args: Any) -> str:
    import html

    text = html.escape(gv.sprint_args(args), quote=True)
    return text.replace("&#x27;", "&#39;").replace("&quot;", "&#34;")


def _urlquery(*args: Any) -> str:
    import urllib.parse

    return urllib.parse.quote_plus(gv.sprint_args(args))


BUILTINS: dict[str, Function] = {
    "and": lambda *a: a[-1],  # evaluated lazily by the executor
    "or": lambda *a: a[-1],
    "not": _not,
    "len": _len,
    "index": _index,
    "slice": _slice,
    "eq": _eq,
    "ne": _ne,
    "lt": _lt,
    "le": _le,
    "gt": _gt,
    "ge": _ge,
    "print": lambda *a: gv.sprint_args(a),
    "printf": _printf,
    "println": lambda *a: gv.sprintln_args(a),
    "html": _html,
    "js": _js,
    "urlquery": _urlquery,
}

DOCKER_FUNCTIONS: dict[str, Function] = {
    "json": _json,
    "split": _split,
    "join": _join,
    "title": _title,
    "lower": lambda s: _string_arg(s).lower(),
    "upper": lambda s: _string_arg(s).upper(),
    "pad": _pad,
    "truncate": _truncate,
}

HEADER_FUNCTIONS: dict[str, Function] = {
    "json": lambda v: v,
    "split": lambda v, _sep: v,
    "join": lambda v, _sep: v,
    "title": lambda v: v,
    "lower": lambda v: v,
    "upper": lambda v: v,
    "truncate": lambda v, _n: v,
    "pad": lambda v, _a, _b: v,
}
"""docker's functions for a table's header row: each passes its first argument through."""
