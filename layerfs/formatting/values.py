"""Go values as templates see them: how Go prints, compares, formats and JSON-encodes them.

Templates run on plain Python data (str, int, float, bool, None, list, dict) plus a few
wrappers for what plain data cannot say:

- :class:`GoStruct`: a struct with ordered fields (docker's typed documents and listing
  contexts); an unknown field is an error, not ``<no value>``;
- :class:`GoMap`: a typed map whose missing keys index to a zero value (``map[string]string``);
- :class:`GoNil`: a typed nil, printed ``[]`` (slice), ``map[]`` (map) or ``<nil>`` (pointer),
  encoded ``null``;
- :class:`GoTime` and :class:`GoDuration`: ``time.Time`` and ``time.Duration``.

``MISSING`` is Go's invalid value (a map key that is not there): it prints ``<no value>``.
``None`` is a nil interface: it prints ``<nil>``. Printing follows ``fmt.Sprint``: slices
``[a b]``, maps ``map[k:v]`` in key order, structs ``{v1 v2}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any


class _Missing:
    """Go's invalid reflect.Value: what a missing map key evaluates to."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class GoNil:
    """A typed nil: ``kind`` is "slice", "map" or "ptr"."""

    # Plain classes, not dataclasses: listing commands import this module, and defining a
    # dataclass costs about a millisecond at start-up.
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


NIL_SLICE = GoNil("slice")
NIL_MAP = GoNil("map")
NIL_PTR = GoNil("ptr")


class GoMap:
    """A typed map: ``index`` of a missing key gives ``zero`` (None: an invalid value)."""

    __slots__ = ("items", "zero")

    def __init__(self, items: Mapping[Any, Any], zero: Any = None) -> None:
        self.items = items
        self.zero = zero


class GoStruct:
    """A struct value: ordered fields, JSON names equal to field names.

    ``type_name`` names it in errors ("can't evaluate field X in type T"); None makes a
    missing field read like a missing key of a JSON map ("map has no entry for key"), as
    docker's ``inspect`` reports it. ``omitempty`` fields are left out of JSON when empty.
    ``context=True`` marks docker's listing contexts: their JSON has sorted keys with
    ``<``, ``>`` and ``&`` escaped, as ``json.Marshal`` of a map writes them.
    """

    __slots__ = ("context", "omitempty", "type_name", "values")

    def __init__(
        self,
        values: dict[str, Any],
        type_name: str | None = None,
        omitempty: frozenset[str] = frozenset(),
        context: bool = False,
    ) -> None:
        self.values = values
        self.type_name = type_name
        self.omitempty = omitempty
        self.context = context


class GoTime:
    """A ``time.Time`` given as RFC 3339 text (JSON) and printed as Go's Time.String()."""

    __slots__ = ("rfc3339",)

    def __init__(self, rfc3339: str) -> None:
        self.rfc3339 = rfc3339

    def __str__(self) -> str:
        match = re.fullmatch(
            r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", self.rfc3339
        )
        if match is None:
            return self.rfc3339
        day, clock, frac, zone = match.groups()
        frac = (frac or "").rstrip("0").rstrip(".")
        if zone == "Z":
            return f"{day} {clock}{frac} +0000 UTC"
        offset = zone.replace(":", "")
        return f"{day} {clock}{frac} {offset} {offset}"


class GoDuration:
    """A ``time.Duration`` in nanoseconds."""

    __slots__ = ("nanoseconds",)

    def __init__(self, nanoseconds: int) -> None:
        self.nanoseconds = nanoseconds

    def __str__(self) -> str:
        return duration_string(self.nanoseconds)


# -- printing ------------------------------------------------------------------------------


def sprint(value: Any) -> str:
    """``fmt.Sprint(value)`` for one value (what ``{{.X}}`` prints)."""
    if value is MISSING:
        return "<no value>"
    return _format(value)


def _format(value: Any) -> str:
    if value is None:
        return "<nil>"
    if value is MISSING:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return float_string(value)
    if isinstance(value, str):
        return value
    if isinstance(value, GoNil):
        return {"slice": "[]", "map": "map[]"}.get(value.kind, "<nil>")
    if isinstance(value, list | tuple):
        return "[" + " ".join(_format(v) for v in value) + "]"
    if isinstance(value, GoMap):
        value = value.items
    if isinstance(value, Mapping):
        return (
            "map["
            + " ".join(f"{_format(k)}:{_format(value[k])}" for k in _sorted_keys(value))
            + "]"
        )
    if isinstance(value, GoStruct):
        return "{" + " ".join(_format(v) for v in value.values.values()) + "}"
    return str(value)


def sprint_args(args: Iterable[Any]) -> str:
    """``fmt.Sprint(a, b, ...)``: a space between operands when neither is a string."""
    out: list[str] = []
    previous_string = True
    for index, arg in enumerate(args):
        is_string = isinstance(arg, str)
        if index > 0 and not is_string and not previous_string:
            out.append(" ")
        out.append(sprint(arg))
        previous_string = is_string
    return "".join(out)


def sprintln_args(args: Iterable[Any]) -> str:
    """``fmt.Sprintln``: operands separated by spaces, then a newline."""
    return " ".join(sprint(a) for a in args) + "\n"


def _sorted_keys(items: Mapping[Any, Any]) -> list[Any]:
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=str)


def float_string(value: float, exponent_from: int = 6) -> str:
    """``strconv.FormatFloat(f, 'g', -1, 64)``: shortest digits, an exponent from 1e6 on."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    from decimal import Decimal  # floats are rare in templates; decimal is slow to import

    number = Decimal(repr(value)).normalize()
    exp = number.adjusted()
    if exp < -4 or exp >= exponent_from:
        digits = "".join(str(d) for d in number.as_tuple().digits).rstrip("0") or "0"
        sign = "-" if value < 0 else ""
        tail = f".{digits[1:]}" if len(digits) > 1 else ""
        return f"{sign}{digits[0]}{tail}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    return format(number, "f")


def duration_string(ns: int) -> str:
    """Go's ``time.Duration.String()``: 1h2m3.5s, 1.5ms, 0s."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000_000_000:
        for unit, size in (("ns", 1), ("µs", 1_000), ("ms", 1_000_000)):
            if u < size * 1000:
                return sign + _fraction(u, size) + unit
    hours, rest = divmod(u, 3600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    text = _fraction(rest, 1_000_000_000) + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    if hours:
        text = f"{hours}h" + text
    return sign + text


def _fraction(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    width = len(str(unit)) - 1
    return f"{whole}.{str(frac).rjust(width, '0').rstrip('0')}"


def type_name(value: Any) -> str:
    """The Go type a value stands for, in error messages."""
    if value is None or value is MISSING:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "[]string" if all(isinstance(v, str) for v in value) else "[]interface {}"
    if isinstance(value, GoNil):
        return {"slice": "[]string", "map": "map[string]string"}.get(value.kind, "*struct")
    if isinstance(value, Mapping | GoMap):
        return "map[string]interface {}"
    if isinstance(value, GoStruct):
        return value.type_name or "map[string]interface {}"
    if isinstance(value, GoTime):
        return "time.Time"
    if isinstance(value, GoDuration):
        return "time.Duration"
    return type(value).__name__


def is_true(value: Any) -> bool:
    """text/template's truth: false, 0, nil, and empty strings, slices and maps are false."""
    if value is None or value is MISSING or isinstance(value, GoNil):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str | list | tuple | Mapping):
        return len(value) > 0
    if isinstance(value, GoMap):
        return len(value.items) > 0
    if isinstance(value, GoDuration):
        return value.nanoseconds != 0
    return True


# -- JSON ----------------------------------------------------------------------------------

_JSON_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}


def json_string(text: str, escape_html: bool) -> str:
    """A JSON string as Go's encoder writes it (UTF-8 kept, controls as \\u00XX)."""
    out = ['"']
    for ch in text:
        if ch in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[ch])
        elif escape_html and ch in _HTML_ESCAPES:
            out.append(_HTML_ESCAPES[ch])
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":
            out.append("\\ufffd")  # a lone surrogate (undecodable bytes), as Go escapes it
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(value: Any, escape_html: bool = False) -> str:
    """Compact JSON as ``encoding/json`` writes ``value`` (map keys sorted, structs in order)."""
    if value is None or value is MISSING or isinstance(value, GoNil):
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, str):
        return json_string(value, escape_html)
    if isinstance(value, GoTime):
        return json_string(value.rfc3339, escape_html)
    if isinstance(value, GoDuration):
        return str(value.nanoseconds)
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v, escape_html) for v in value) + "]"
    if isinstance(value, GoMap):
        value = value.items
    if isinstance(value, Mapping):
        return (
            "{"
            + ",".join(
                json_string(str(k), escape_html) + ":" + to_json(value[k], escape_html)
                for k in _sorted_keys(value)
            )
            + "}"
        )
    if isinstance(value, GoStruct):
        if value.context:
            return to_json(dict(value.values), escape_html=True)
        parts = []
        for name, item in value.values.items():
            if name in value.omitempty and not is_true(item):
                continue
            parts.append(json_string(name, escape_html) + ":" + to_json(item, escape_html))
        return "{" + ",".join(parts) + "}"
    return json_string(str(value), escape_html)


def _json_float(value: float) -> str:
    # encoding/json writes floats positionally between 1e-6 and 1e21.
    if value != 0 and (abs(value) < 1e-6 or abs(value) >= 1e21):
        return float_string(value, exponent_from=-99).replace("e-0", "e-").replace("e+0", "e+")
    return float_string(value, exponent_from=21)


# -- comparison ----------------------------------------------------------------------------


def basic_kind(value: Any) -> str | None:
    """ "bool", "int", "float", "string", or None when Go would not call it basic."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return None


# -- Go's fmt.Sprintf ----------------------------------------------------------------------

_VERB = re.compile(r"%([-+# 0]*)(\*|\d+)?(?:\.(\*|\d*))?([a-zA-Z%])")


def sprintf(fmt: str, args: list[Any]) -> str:
    """``fmt.Sprintf`` for the verbs templates use: v s q d x X o b c f F e E g G t %."""
    out: list[str] = []
    pos = 0
    arg_index = 0
    for match in _VERB.finditer(fmt):
        out.append(fmt[pos : match.start()])
        pos = match.end()
        flags, width_text, precision_text, verb = match.groups()
        if verb == "%":
            out.append("%")
            continue
        width: int | None = None
        precision: int | None = None
        if width_text == "*":
            if arg_index < len(args) and isinstance(args[arg_index], int):
                width = args[arg_index]
            arg_index += 1
        elif width_text:
            width = int(width_text)
        if precision_text == "*":
            if arg_index < len(args) and isinstance(args[arg_index], int):
                precision = args[arg_index]
            arg_index += 1
        elif precision_text is not None:
            precision = int(precision_text) if precision_text else 0
        if arg_index >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[arg_index]
        arg_index += 1
        out.append(_format_verb(verb, flags, width, precision, arg))
    out.append(fmt[pos:])
    if arg_index < len(args):
        extra = ", ".join(f"{type_name(a)}={sprint(a)}" for a in args[arg_index:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _bad_verb(verb: str, arg: Any) -> str:
    if arg is None:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({type_name(arg)}={sprint(arg)})"


def _pad(text: str, flags: str, width: int | None, numeric: bool = False) -> str:
    if width is None or len(text) >= width:
        return text
    if "-" in flags:
        return text.ljust(width)
    if "0" in flags and numeric:
        sign = text[0] if text[:1] in "+-" and text[:1] else ""
        return sign + text[len(sign) :].rjust(width - len(sign), "0")
    return text.rjust(width)


def _format_verb(verb: str, flags: str, width: int | None, precision: int | None, arg: Any) -> str:
    if verb == "v":
        return _pad(sprint(arg) if arg is not MISSING else "<nil>", flags, width)
    if verb == "s":
        if isinstance(arg, int | float) and not isinstance(arg, bool):
            return _bad_verb(verb, arg)
        text = sprint(arg)
        if precision is not None:
            text = text[:precision]
        return _pad(text, flags, width)
    if verb == "q":
        if isinstance(arg, str):
            return _pad(quote(arg), flags, width)
        if isinstance(arg, int) and not isinstance(arg, bool):
            return _pad("'" + chr(arg) + "'", flags, width)
        if isinstance(arg, list | tuple):
            return "[" + " ".join(quote(sprint(a)) for a in arg) + "]"
        return _bad_verb(verb, arg)
    if verb == "t":
        if isinstance(arg, bool):
            return _pad("true" if arg else "false", flags, width)
        return _bad_verb(verb, arg)
    if verb in "dxXobc":
        if isinstance(arg, str) and verb in "xX":
            text = arg.encode().hex()
            return _pad(text.upper() if verb == "X" else text, flags, width)
        if not isinstance(arg, int) or isinstance(arg, bool):
            return _bad_verb(verb, arg)
        if verb == "c":
            return _pad(chr(arg), flags, width)
        spec = {"d": "d", "x": "x", "X": "X", "o": "o", "b": "b"}[verb]
        text = format(arg, spec)
        if "+" in flags and arg >= 0:
            text = "+" + text
        elif " " in flags and arg >= 0:
            text = " " + text
        return _pad(text, flags, width, numeric=True)
    if verb in "fFeEgG":
        if not isinstance(arg, float):
            return _bad_verb(verb, arg)
        if verb in "gG" and precision is None:
            text = float_string(arg)
        else:
            text = format(arg, f".{6 if precision is None else precision}{verb}")
            if verb in "eE":
                text = re.sub(r"e([+-])(\d)$", r"e\g<1>0\2", text)
        if "+" in flags and arg >= 0:
            text = "+" + text
        return _pad(text, flags, width, numeric=True)
    return _bad_verb(verb, arg)


def quote(text: str) -> str:
    """``strconv.Quote``: a double-quoted Go string literal."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(ch)])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        elif not ch.isprintable() and code > 0x7F:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
