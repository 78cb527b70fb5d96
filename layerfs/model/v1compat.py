"""Legacy v1 IDs and JSON of a modern image, byte for byte as ``docker save`` writes them.

Docker 1.10-24 saves one ``<v1id>/`` directory per layer (FORMATS §3.3, §5.2). The v1 ID
is ``v1.CreateID``: Go's ``json.Marshal`` of a ``V1Image`` with ``id`` cleared, decoded
into a map, ``layer_id`` (the chain ID) and ``parent`` (``sha256:<parent v1 id>``) added,
marshalled again with sorted keys, hashed. Lower layers use a stub whose only field is
``created`` = 1970-01-01T00:00:00Z; the top layer uses the image's own legacy fields.

To get the same bytes, this module decodes the config the way Go decodes it into
Docker 20.10's ``image.V1Image`` and ``container.Config`` (fields matched exactly, then
case-insensitively; unknown fields dropped; a value of the wrong type left at its zero
value) and encodes them the way ``encoding/json`` does (struct field order,
``omitempty``, HTML-safe string escapes, ``time.Time`` in RFC 3339 with trailing zeros
of the fraction removed and a zero offset written ``Z``). Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

STUB_CREATED = "1970-01-01T00:00:00Z"
ZERO_TIME = "0001-01-01T00:00:00Z"

_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})\Z")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID of every prefix of ``diff_ids`` (FORMATS §3.3)."""
    result: list[str] = []
    for diff_id in diff_ids:
        if not result:
            result.append(diff_id)
        else:
            text = f"{result[-1]} {diff_id}".encode()
            result.append("sha256:" + hashlib.sha256(text).hexdigest())
    return result


def go_quote(text: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe, Go < 1.22 escapes)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\u{code:04x}"))
        elif ch in "<>&" or code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")  # a lone surrogate decodes to U+FFFD in Go
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_time(value: Any) -> str:
    """An RFC 3339 time as Go re-formats it after parsing; the zero time if it cannot."""
    if not isinstance(value, str):
        return ZERO_TIME
    match = _TIME.match(value)
    if match is None:
        return ZERO_TIME
    whole, fraction, zone = match.groups()
    fraction = (fraction or "")[:9].rstrip("0")
    if zone in ("+00:00", "-00:00"):
        zone = "Z"
    return whole + ("." + fraction if fraction else "") + zone


# -- decoding the way Go decodes into a struct -------------------------------------------


def _decode_fields(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Map JSON keys to struct fields: exact name first, else case-insensitive; last wins."""
    folded = {name.lower(): name for name in names}
    found: dict[str, Any] = {}
    for key, value in doc.items():
        name = key if key in names else folded.get(key.lower())
        if name is not None:
            found[name] = value
    return found


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else False


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value if -(1 << 63) <= value < (1 << 63) else 0


def _str_list(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [v if isinstance(v, str) else "" for v in value]


def _str_slice(value: Any) -> list[str] | None:
    """Docker's strslice.StrSlice: an array of strings, or one string."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _set(value: Any) -> list[str] | None:
    """A map[string]struct{} (ports, volumes) as its sorted keys."""
    return sorted(value) if isinstance(value, dict) else None


def _labels(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {k: v if isinstance(v, str) else "" for k, v in value.items()}


# -- encoding the way Go encodes ----------------------------------------------------------


def _enc_str_list(value: list[str] | None) -> str:
    return "null" if value is None else "[" + ",".join(go_quote(v) for v in value) + "]"


def _enc_set(value: list[str] | None) -> str:
    return "null" if value is None else "{" + ",".join(go_quote(k) + ":{}" for k in value) + "}"


def _enc_labels(value: dict[str, str] | None) -> str:
    if value is None:
        return "null"
    return "{" + ",".join(go_quote(k) + ":" + go_quote(value[k]) for k in sorted(value)) + "}"


def _empty(value: Any) -> bool:
    return (
        value is None
        or value == ""
        or value is False
        or value == 0
        or value == []
        or (isinstance(value, dict) and not value)
    )


def _nil(value: Any) -> bool:
    """omitempty on a pointer: only nil is left out (a pointer to 0 is kept)."""
    return value is None


# A field: (JSON name, decoder, encoder, omitempty test or None when always written).
Field = tuple[str, Callable[[Any], Any], Callable[[Any], str], Callable[[Any], bool] | None]


def _health_decode(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return _decode_struct(value, _HEALTH_FIELDS)


def _health_encode(value: dict[str, Any] | None) -> str:
    return "null" if value is None else _encode_struct(value, _HEALTH_FIELDS)


def _config_decode(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return _decode_struct(value, CONFIG_FIELDS)


def _config_encode(value: dict[str, Any] | None) -> str:
    return "null" if value is None else _encode_struct(value, CONFIG_FIELDS)


def _int_ptr(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


_S: tuple[Callable[[Any], Any], Callable[[Any], str]] = (_str, go_quote)
_B: tuple[Callable[[Any], Any], Callable[[Any], str]] = (
    _bool,
    lambda v: "true" if v else "false",
)
_I: tuple[Callable[[Any], Any], Callable[[Any], str]] = (_int, str)
_OMIT = _empty

_HEALTH_FIELDS: list[Field] = [
    ("Test", _str_list, _enc_str_list, _OMIT),
    ("Interval", *_I, _OMIT),
    ("Timeout", *_I, _OMIT),
    ("StartPeriod", *_I, _OMIT),
    ("Retries", *_I, _OMIT),
]

# Docker 20.10's api/types/container.Config, in declaration order.
CONFIG_FIELDS: list[Field] = [
    ("Hostname", *_S, None),
    ("Domainname", *_S, None),
    ("User", *_S, None),
    ("AttachStdin", *_B, None),
    ("AttachStdout", *_B, None),
    ("AttachStderr", *_B, None),
    ("ExposedPorts", _set, _enc_set, _OMIT),
    ("Tty", *_B, None),
    ("OpenStdin", *_B, None),
    ("StdinOnce", *_B, None),
    ("Env", _str_list, _enc_str_list, None),
    ("Cmd", _str_slice, _enc_str_list, None),
    ("Healthcheck", _health_decode, _health_encode, _nil),
    ("ArgsEscaped", *_B, _OMIT),
    ("Image", *_S, None),
    ("Volumes", _set, _enc_set, None),
    ("WorkingDir", *_S, None),
    ("Entrypoint", _str_slice, _enc_str_list, None),
    ("NetworkDisabled", *_B, _OMIT),
    ("MacAddress", *_S, _OMIT),
    ("OnBuild", _str_list, _enc_str_list, None),
    ("Labels", _labels, _enc_labels, None),
    ("StopSignal", *_S, _OMIT),
    ("StopTimeout", _int_ptr, lambda v: "null" if v is None else str(v), _nil),
    ("Shell", _str_slice, _enc_str_list, _OMIT),
]

# Docker 20.10's image.V1Image. "parent" is shadowed by image.Image's own Parent when a
# config is decoded, so a config never fills it.
V1_FIELDS: list[Field] = [
    ("id", *_S, _OMIT),
    ("parent", *_S, _OMIT),
    ("comment", *_S, _OMIT),
    ("created", go_time, go_quote, None),
    ("container", *_S, _OMIT),
    (
        "container_config",
        lambda v: _decode_struct(v if isinstance(v, dict) else {}, CONFIG_FIELDS),
        _config_encode,
        None,
    ),
    ("docker_version", *_S, _OMIT),
    ("author", *_S, _OMIT),
    ("config", _config_decode, _config_encode, _nil),
    ("architecture", *_S, _OMIT),
    ("variant", *_S, _OMIT),
    ("os", *_S, _OMIT),
    ("Size", *_I, _OMIT),
]


def _decode_struct(doc: dict[str, Any], fields: list[Field]) -> dict[str, Any]:
    found = _decode_fields(doc, [f[0] for f in fields])
    return {name: decode(found.get(name)) for name, decode, _, _ in fields}


def _struct_members(value: dict[str, Any], fields: list[Field]) -> list[tuple[str, str]]:
    members = []
    for name, _, encode, omit in fields:
        item = value.get(name)
        if omit is not None and omit(item):
            continue
        members.append((name, encode(item)))
    return members


def _encode_struct(value: dict[str, Any], fields: list[Field]) -> str:
    members = _struct_members(value, fields)
    return "{" + ",".join(go_quote(k) + ":" + v for k, v in members) + "}"


def marshal_v1_image(doc: dict[str, Any]) -> bytes:
    """Go's ``json.Marshal`` of the ``image.V1Image`` it decodes from ``doc``.

    Docker 1.10+ passes pre-1.8.3 schema1 history through this before making a config.
    """
    return _encode_struct(_decode_struct(doc, V1_FIELDS), V1_FIELDS).encode()


# -- v1 IDs ---------------------------------------------------------------------------------


def v1_image_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The V1Image Go decodes from a modern config (``parent`` stays empty, shadowed)."""
    fields = _decode_struct(config, V1_FIELDS)
    fields["parent"] = ""
    return fields


def create_id(v1_image: dict[str, Any], chain_id: str, parent_id: str) -> str:
    """Docker's ``v1.CreateID``: the v1 ID (hex) of a layer's legacy image."""
    members = dict(_struct_members({**v1_image, "id": ""}, V1_FIELDS))
    members["layer_id"] = go_quote(chain_id)
    if parent_id:
        members["parent"] = go_quote("sha256:" + parent_id)
    text = "{" + ",".join(go_quote(k) + ":" + members[k] for k in sorted(members)) + "}"
    return hashlib.sha256(text.encode()).hexdigest()


def v1_layers(config: dict[str, Any], diff_ids: list[str]) -> list[tuple[str, bytes]]:
    """(v1 ID, ``json`` file bytes) for each layer of a modern image, base first."""
    top = v1_image_from_config(config)
    result: list[tuple[str, bytes]] = []
    parent = ""
    chain = chain_ids(diff_ids)
    for index, chain_id in enumerate(chain):
        if index == len(chain) - 1:
            image = dict(top)
        else:
            image = _decode_struct({}, V1_FIELDS)
            image["created"] = STUB_CREATED
        v1_id = create_id(image, chain_id, parent)
        image["id"] = v1_id
        image["parent"] = parent
        image["os"] = top["os"]  # set after hashing, as Docker does
        result.append((v1_id, _encode_struct(image, V1_FIELDS).encode()))
        parent = v1_id
    return result
