"""The ``--format`` contract of docker's listings, and the units docker prints.

A listing is rows of fields, each row a :class:`~.values.GoStruct` "context" whose field
names are docker's (``ID``, ``Repository``, ``CreatedSince``, ...). :func:`render` applies
docker's rules to a ``--format`` value:

- empty or ``table``: the listing's default table; with ``-q`` its quiet format;
- ``json``: ``{{json .}}``, one JSON object per line (docker 23's ``--format json``);
- ``table TEMPLATE``: the template per row under a header row made by running the same
  template on the header names (with docker's identity header functions), the whole
  aligned by Go's tabwriter;
- anything else: the template per row, each followed by a newline.

``\\t`` and ``\\n`` written as two characters become a tab and a newline, as docker does.
Sizes and durations are go-units': ``1.98MB`` (3 significant digits in listings, 4 in
``VirtualSize`` and ``system df``), ``About a minute ago``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from layerfs.formatting import tabwriter
from layerfs.formatting.template import HEADER_FUNCTIONS, Template
from layerfs.formatting.values import GoStruct

TABLE = "table"
JSON = "json"
QUIET_FORMAT = "{{.ID}}"


def preformat(fmt: str) -> tuple[str, bool]:
    """(template text, is a table) for a ``--format`` value, as docker's formatter reads it."""
    is_table = fmt.startswith(TABLE)
    text = fmt[len(TABLE) :] if is_table else ("{{json .}}" if fmt == JSON else fmt)
    text = text.strip(" ").replace("\\t", "\t").replace("\\n", "\n")
    return text, is_table


def render(
    rows: Iterable[GoStruct],
    fmt: str | None,
    headers: dict[str, str],
    *,
    default_table: str,
    quiet: bool = False,
    quiet_format: str = QUIET_FORMAT,
) -> str:
    """The text docker prints for ``rows`` under ``--format fmt`` (every line ends in \\n)."""
    if not fmt or fmt == TABLE:
        fmt = quiet_format if quiet else default_table
    text, is_table = preformat(fmt)
    template = Template.parse(text)
    body = "".join(template.execute(row) + "\n" for row in rows)
    if not is_table:
        return body
    header = template.with_functions(HEADER_FUNCTIONS).execute(dict(headers))
    return tabwriter.align(header + "\n" + body)


def render_each(items: Iterable[Any], fmt: str) -> str:
    """``inspect -f``: the template once per item, each followed by a newline."""
    text, _ = preformat(fmt)
    template = Template.parse(text)
    return "".join(template.execute(item) + "\n" for item in items)


def context(type_name: str, values: dict[str, Any]) -> GoStruct:
    """A listing row: fields in docker's names; ``{{json .}}`` gives them sorted, escaped."""
    return GoStruct(values, type_name=type_name, context=True)


# -- go-units ------------------------------------------------------------------------------

_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_size(size: float, precision: int = 4) -> str:
    """go-units' HumanSizeWithPrecision: decimal units, ``precision`` significant digits."""
    unit = 0
    while size >= 1000 and unit < len(_DECIMAL_UNITS) - 1:
        size /= 1000
        unit += 1
    return f"{size:.{precision}g}{_DECIMAL_UNITS[unit]}"


def listing_size(size: float) -> str:
    """The SIZE column of ``images`` and ``history``: 3 significant digits (``1.98MB``)."""
    return human_size(size, 3)


def human_duration(seconds: float) -> str:
    """go-units' HumanDuration: ``Less than a second``, ``About an hour``, ``3 weeks``."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def since(unix: int, now: float | None = None) -> str:
    """``CreatedSince``: how long ago, in docker's words."""
    now = time.time() if now is None else now
    return human_duration(now - unix) + " ago"


def go_time_string(unix: int) -> str:
    """Go's ``time.Unix(unix, 0).String()`` in local time: ``2024-05-01 12:00:00 +0000 UTC``."""
    when = datetime.fromtimestamp(unix).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S %z ") + (when.tzname() or when.strftime("%z"))


def rfc3339(unix: int) -> str:
    """Go's ``time.Unix(unix, 0).Format(time.RFC3339)`` in local time (``Z`` for UTC)."""
    when = datetime.fromtimestamp(unix).astimezone()
    text = when.isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def truncate_id(image_id: str) -> str:
    """docker's TruncateID: without ``sha256:``, the first 12 characters."""
    if ":" in image_id:
        image_id = image_id.split(":", 1)[1]
    return image_id[:12]


def ellipsis(text: str, width: int) -> str:
    """docker's Ellipsis: at most ``width`` characters, the last one ``…`` when cut."""
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    if width == 1:
        return text[0]
    return text[: width - 1] + "…"
