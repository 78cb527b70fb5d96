"""What ``inspect``, ``history`` and ``images`` show about an image.

:func:`inspect_document` is docker's ``image inspect`` object, field for field in the
order and shape docker's API writes it (``Config`` with every field of a container
config, ``null`` for an empty list or map, ``Size`` the whole chain as overlay2 measures
it). :func:`typed_document` is the same seen through Go's types, which is what
``inspect -f`` templates evaluate: ``{{.Config.Env}}`` of an image without environment
prints ``[]``, ``{{.Config.Labels}}`` prints ``map[]``, an unknown field is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerfs.model.image import Image, parse_created
from layerfs.store.store import Store

# container.Config as docker's API writes it: (field, kind, omitempty).
CONFIG_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("Hostname", "string", False),
    ("Domainname", "string", False),
    ("User", "string", False),
    ("AttachStdin", "bool", False),
    ("AttachStdout", "bool", False),
    ("AttachStderr", "bool", False),
    ("ExposedPorts", "set", True),
    ("Tty", "bool", False),
    ("OpenStdin", "bool", False),
    ("StdinOnce", "bool", False),
    ("Env", "slice", False),
    ("Cmd", "slice", False),
    ("Healthcheck", "health", True),
    ("ArgsEscaped", "bool", True),
    ("Image", "string", False),
    ("Volumes", "set", False),
    ("WorkingDir", "string", False),
    ("Entrypoint", "slice", False),
    ("NetworkDisabled", "bool", True),
    ("MacAddress", "string", True),
    ("OnBuild", "slice", False),
    ("Labels", "map", False),
    ("StopSignal", "string", True),
    ("StopTimeout", "int_ptr", True),
    ("Shell", "slice", True),
)
HEALTH_FIELDS: tuple[tuple[str, str], ...] = (
    ("Test", "slice"),
    ("Interval", "duration"),
    ("Timeout", "duration"),
    ("StartPeriod", "duration"),
    ("StartInterval", "duration"),
    ("Retries", "int"),
)
ZERO_TIME = "0001-01-01T00:00:00Z"
_CONTAINERS: dict[str, type] = {"slice": list, "map": dict, "set": dict}


def image_ref_id(image: Image) -> str:
    return "sha256:" + image.id


def virtual_size(store: Store, image: Image) -> int:
    return image.size + store.graph.get_parents_size(image)


def container_config(raw: Any, *, nullable: bool) -> dict[str, Any] | None:
    """A stored config as docker's API writes a container.Config (all fields, its order)."""
    if not isinstance(raw, dict):
        if nullable:
            return None
        raw = {}
    doc: dict[str, Any] = {}
    for name, kind, omitempty in CONFIG_FIELDS:
        value = raw.get(name)
        if kind == "string" and not isinstance(value, str):
            value = ""
        elif kind == "bool" and not isinstance(value, bool):
            value = False
        elif kind in _CONTAINERS and not isinstance(value, _CONTAINERS[kind]):
            value = None
        elif kind == "health":
            value = _health(value)
        elif kind == "int_ptr" and not (isinstance(value, int) and not isinstance(value, bool)):
            value = None
        if omitempty and not value:
            continue
        doc[name] = value
    return doc


def _health(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    doc: dict[str, Any] = {}
    for name, kind in HEALTH_FIELDS:
        value = raw.get(name)
        wanted = list if kind == "slice" else int
        if isinstance(value, wanted) and not isinstance(value, bool) and value:
            doc[name] = value
    return doc


def inspect_document(store: Store, image: Image) -> dict[str, Any]:
    """Docker's ``image inspect`` object for one image."""
    refs = store.tags.references(image.id)
    diff_ids = store.graph.layers_of(image)
    size = virtual_size(store, image)
    doc: dict[str, Any] = {
        "Id": image_ref_id(image),
        "RepoTags": [r for r in refs if "@" not in r],
        "RepoDigests": [r for r in refs if "@" in r],
        "Parent": image_ref_id(store.graph.get(image.parent)) if image.parent else "",
        "Comment": image.comment,
        "Created": image.created,
        "Container": _text(image.data.get("container")),
        "ContainerConfig": container_config(image.data.get("container_config"), nullable=False),
        "DockerVersion": _text(image.data.get("docker_version")),
        "Author": image.author,
        "Config": container_config(image.data.get("config"), nullable=True),
        "Architecture": image.architecture,
    }
    if _text(image.data.get("variant")):
        doc["Variant"] = image.data["variant"]
    doc["Os"] = image.os
    if _text(image.data.get("os.version")):
        doc["OsVersion"] = image.data["os.version"]
    doc.update(
        {
            "Size": size,
            "VirtualSize": size,
            "GraphDriver": {
                "Data": {
                    "LayerTars": ":".join(str(store.layers.tar_path(d)) for d in diff_ids),
                    "Store": str(store.root),
                },
                "Name": "layerfs",
            },
            "RootFS": {"Type": "layers", "Layers": diff_ids},
            "Metadata": {"LastTagTime": ZERO_TIME},
        }
    )
    return doc


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def typed_document(doc: dict[str, Any]) -> Any:
    """The inspect object as Go's types show it to a template (see the module docstring)."""
    from layerfs.formatting.values import (
        NIL_MAP,
        NIL_PTR,
        NIL_SLICE,
        GoMap,
        GoStruct,
        GoTime,
    )

    def config(value: Any) -> Any:
        if value is None:
            return NIL_PTR
        fields: dict[str, Any] = {}
        for name, kind, _ in CONFIG_FIELDS:
            item = value.get(name)
            if kind == "slice":
                fields[name] = list(item) if isinstance(item, list) else NIL_SLICE
            elif kind == "map":
                fields[name] = GoMap(item, zero="") if isinstance(item, dict) else NIL_MAP
            elif kind == "set":
                fields[name] = (
                    GoMap({k: GoStruct({}) for k in item}, zero=GoStruct({}))
                    if isinstance(item, dict)
                    else NIL_MAP
                )
            elif kind == "health":
                fields[name] = health(item)
            elif kind == "int_ptr":
                fields[name] = item if isinstance(item, int) else NIL_PTR
            else:
                fields[name] = item if item is not None else ("" if kind == "string" else False)
        omit = frozenset(name for name, _, omitempty in CONFIG_FIELDS if omitempty)
        return GoStruct(fields, omitempty=omit)

    def health(value: Any) -> Any:
        from layerfs.formatting.values import GoDuration

        if not isinstance(value, dict):
            return NIL_PTR
        fields: dict[str, Any] = {}
        for name, kind in HEALTH_FIELDS:
            item = value.get(name)
            if kind == "slice":
                fields[name] = list(item) if isinstance(item, list) else NIL_SLICE
            elif kind == "duration":
                fields[name] = GoDuration(item if isinstance(item, int) else 0)
            else:
                fields[name] = item if isinstance(item, int) else 0
        return GoStruct(fields, omitempty=frozenset(fields))

    typed: dict[str, Any] = {}
    for key, value in doc.items():
        if key in ("Config", "ContainerConfig"):
            typed[key] = config(value)
        elif key in ("RepoTags", "RepoDigests"):
            typed[key] = list(value)
        elif key == "GraphDriver":
            typed[key] = GoStruct(
                {"Data": GoMap(dict(value["Data"]), zero=""), "Name": value["Name"]}
            )
        elif key == "RootFS":
            typed[key] = GoStruct(
                {"Type": value["Type"], "Layers": list(value["Layers"]), "BaseLayer": ""},
                omitempty=frozenset({"BaseLayer"}),
            )
        elif key == "Metadata":
            typed[key] = GoStruct({"LastTagTime": GoTime(value["LastTagTime"])})
        else:
            typed[key] = value
    for optional in ("Variant", "OsVersion"):
        typed.setdefault(optional, "")
    return GoStruct(typed, omitempty=frozenset({"Variant", "OsVersion"}))


@dataclass
class HistoryRow:
    id: str  # full ID, or "<missing>"
    created: str
    created_by: str
    size: int
    comment: str
    tags: list[str]


def history_rows(store: Store, image: Image) -> list[HistoryRow]:
    """Newest first, one row per history entry (empty layers included) down to the base."""
    rows: list[HistoryRow] = []
    for node in store.graph.walk_history(image):
        parent_len = 0
        if node.parent:
            parent = store.graph.get(node.parent)
            parent_len = len(parent.history) if parent.is_config else 0
        own = node.history[parent_len:] if node.is_config else []
        tags = store.tags.references(node.id)
        if not own:
            rows.append(
                HistoryRow(node.id, node.created, node.created_by(), node.size, node.comment, tags)
            )
            continue
        first = True
        for entry in reversed(own):
            empty = bool(entry.get("empty_layer"))
            rows.append(
                HistoryRow(
                    node.id if first else "<missing>",
                    str(entry.get("created", "")),
                    str(entry.get("created_by", "")),
                    0 if empty else node.size,
                    str(entry.get("comment", "")),
                    tags if first else [],
                )
            )
            first = False
    return rows


def created_unix(created: str) -> int:
    when = parse_created(created)
    return int(when.timestamp()) if when else 0
