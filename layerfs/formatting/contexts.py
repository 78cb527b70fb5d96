"""The rows ``--format`` templates see, with docker's field names, headers and defaults.

Each listing has a context builder (its fields, as docker's CLI computes them), the
headers of a table (``{{.ID}}`` is ``IMAGE ID`` in ``images``, ``IMAGE`` in ``history``)
and its default table format. ``images`` and ``history`` follow docker's imageContext and
historyContext; ``mounts`` is layerfs's ``ps`` (its fields are named after docker ps
where they mean the same); ``system df`` follows docker's disk usage context.
"""

from __future__ import annotations

from layerfs.formatting.output import (
    QUIET_FORMAT,
    context,
    ellipsis,
    go_time_string,
    human_size,
    listing_size,
    rfc3339,
    since,
    truncate_id,
)
from layerfs.formatting.values import GoStruct

# -- images ------------------------------------------------------------------------------------

IMAGE_HEADERS = {
    "ID": "IMAGE ID",
    "Repository": "REPOSITORY",
    "Tag": "TAG",
    "Digest": "DIGEST",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "Size": "SIZE",
    "Containers": "CONTAINERS",
    "VirtualSize": "VIRTUAL SIZE",
    "SharedSize": "SHARED SIZE",
    "UniqueSize": "UNIQUE SIZE",
}
IMAGE_TABLE = "table {{.Repository}}\\t{{.Tag}}\\t{{.ID}}\\t{{.CreatedSince}}\\t{{.Size}}"
IMAGE_TABLE_DIGESTS = (
    "table {{.Repository}}\\t{{.Tag}}\\t{{.Digest}}\\t{{.ID}}\\t{{.CreatedSince}}\\t{{.Size}}"
)


def image_format(fmt: str | None, *, digests: bool, quiet: bool) -> str:
    """docker's NewImageFormat: the default table (``-q``: IDs only; ``--digests``: with a
    DIGEST column, also added to a custom table that lacks it)."""
    if not fmt or fmt == "table":
        if quiet:
            return QUIET_FORMAT
        return IMAGE_TABLE_DIGESTS if digests else IMAGE_TABLE
    if fmt.startswith("table") and digests and "{{.Digest}}" not in fmt:
        return fmt + "\\t{{.Digest}}"
    return fmt


def image_context(
    image_id: str,
    repository: str,
    tag: str,
    digest: str,
    created: int,
    size: int,
    *,
    trunc: bool,
    now: float | None = None,
) -> GoStruct:
    """One row of ``images`` (``image_id`` with its ``sha256:``)."""
    return context(
        "image",
        {
            "Containers": "N/A",
            "CreatedAt": go_time_string(created),
            "CreatedSince": since(created, now),
            "Digest": digest,
            "ID": truncate_id(image_id) if trunc else image_id,
            "Repository": repository,
            "SharedSize": "N/A",
            "Size": listing_size(size),
            "Tag": tag,
            "UniqueSize": "N/A",
            "VirtualSize": human_size(size),
        },
    )


# -- history -----------------------------------------------------------------------------------

HISTORY_HEADERS = {
    "ID": "IMAGE",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "CreatedBy": "CREATED BY",
    "Size": "SIZE",
    "Comment": "COMMENT",
}
HISTORY_TABLE = "table {{.ID}}\\t{{.CreatedSince}}\\t{{.CreatedBy}}\\t{{.Size}}\\t{{.Comment}}"
HISTORY_TABLE_NOT_HUMAN = (
    "table {{.ID}}\\t{{.CreatedAt}}\\t{{.CreatedBy}}\\t{{.Size}}\\t{{.Comment}}"
)
CREATED_BY_WIDTH = 45


def history_context(
    image_id: str,
    created: int,
    created_by: str,
    size: int,
    comment: str,
    *,
    trunc: bool,
    human: bool,
    now: float | None = None,
) -> GoStruct:
    """One row of ``history`` (``image_id`` with ``sha256:``, or ``<missing>``)."""
    created_by = created_by.replace("\t", " ")
    created_at = rfc3339(created)
    return context(
        "history",
        {
            "Comment": comment,
            "CreatedAt": created_at,
            "CreatedBy": ellipsis(created_by, CREATED_BY_WIDTH) if trunc else created_by,
            "CreatedSince": since(created, now) if human else created_at,
            "ID": truncate_id(image_id) if trunc and image_id != "<missing>" else image_id,
            "Size": listing_size(size) if human else str(size),
        },
    )


# -- mounts ------------------------------------------------------------------------------------

MOUNT_HEADERS = {
    "Mountpoint": "MOUNTPOINT",
    "Image": "IMAGE",
    "ID": "IMAGE ID",
    "Mode": "MODE",
    "Upper": "UPPER",
    "Pid": "PID",
    "Status": "STATUS",
    "Log": "LOG",
}
MOUNT_TABLE = (
    "table {{.Mountpoint}}\\t{{.Image}}\\t{{.ID}}\\t{{.Mode}}\\t{{.Upper}}\\t{{.Pid}}\\t{{.Status}}"
)
MOUNT_QUIET = "{{.Mountpoint}}"


def mount_context(
    mountpoint: str,
    image: str,
    image_id: str,
    mode: str,
    upper: str,
    pid: int,
    status: str,
    log: str,
    *,
    trunc: bool,
) -> GoStruct:
    return context(
        "mount",
        {
            "ID": truncate_id(image_id) if trunc else image_id,
            "Image": image,
            "Log": log,
            "Mode": mode,
            "Mountpoint": mountpoint,
            "Pid": pid,
            "Status": status,
            "Upper": upper,
        },
    )


# -- system df ---------------------------------------------------------------------------------

DF_HEADERS = {
    "Type": "TYPE",
    "TotalCount": "TOTAL",
    "Active": "ACTIVE",
    "Size": "SIZE",
    "Reclaimable": "RECLAIMABLE",
}
DF_TABLE = "table {{.Type}}\\t{{.TotalCount}}\\t{{.Active}}\\t{{.Size}}\\t{{.Reclaimable}}"
DF_QUIET = "{{.Type}}"


def df_context(kind: str, total: int, active: int, size: int, reclaimable: int) -> GoStruct:
    """One row of ``system df``; reclaimable as docker writes it, ``12MB (40%)``."""
    text = human_size(reclaimable)
    if size > 0:
        text += f" ({reclaimable * 100 // size}%)"
    return context(
        "disk usage",
        {
            "Active": str(active),
            "Reclaimable": text,
            "Size": human_size(size),
            "TotalCount": str(total),
            "Type": kind,
        },
    )
