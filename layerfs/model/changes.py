"""Dockerfile-style ``--change`` instructions applied to an image's run config.

Supported, as ``docker import --change`` and ``docker commit --change`` accept
them: CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE (plus VOLUME and
STOPSIGNAL). JSON arrays are exec form; anything else is shell form.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from layerfs.errors import UsageError

SUPPORTED = (
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "WORKDIR",
    "USER",
    "LABEL",
    "EXPOSE",
    "VOLUME",
    "STOPSIGNAL",
)


def _command(value: str) -> list[str]:
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return parsed
    return ["/bin/sh", "-c", text]


def _pairs(value: str, instruction: str) -> list[tuple[str, str]]:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"invalid --change {instruction}: {exc}") from None
    if instruction == "ENV" and words and "=" not in words[0]:
        if len(words) < 2:
            raise UsageError("ENV needs a value: ENV KEY VALUE or ENV KEY=VALUE")
        return [(words[0], value.strip()[len(words[0]) :].strip())]
    pairs = []
    for word in words:
        key, sep, val = word.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --change {instruction} {word!r}: expected KEY=VALUE")
        pairs.append((key, val))
    if not pairs:
        raise UsageError(f"--change {instruction} needs at least one KEY=VALUE")
    return pairs


def apply_change(config: dict[str, Any], change: str) -> None:
    """Apply one instruction (``'CMD ["/bin/sh"]'``) to ``config`` in place."""
    instruction, _, value = change.strip().partition(" ")
    instruction = instruction.upper()
    value = value.strip()
    if instruction not in SUPPORTED:
        raise UsageError(
            f"unsupported --change instruction {instruction or change!r}: "
            f"use one of {', '.join(SUPPORTED)}"
        )
    if not value:
        raise UsageError(f"--change {instruction} needs an argument")
    if instruction == "CMD":
        config["Cmd"] = _command(value)
    elif instruction == "ENTRYPOINT":
        config["Entrypoint"] = _command(value)
    elif instruction == "WORKDIR":
        config["WorkingDir"] = value
    elif instruction == "USER":
        config["User"] = value
    elif instruction == "STOPSIGNAL":
        config["StopSignal"] = value
    elif instruction == "ENV":
        env = [e for e in config.get("Env") or [] if isinstance(e, str)]
        for key, val in _pairs(value, "ENV"):
            env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={val}"]
        config["Env"] = env
    elif instruction == "LABEL":
        labels = dict(config.get("Labels") or {})
        labels.update(_pairs(value, "LABEL"))
        config["Labels"] = labels
    elif instruction == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for port in value.split():
            number, _, proto = port.partition("/")
            if (
                not number.isdigit()
                or not 0 < int(number) < 65536
                or proto not in ("", "tcp", "udp", "sctp")
            ):
                raise UsageError(f"invalid --change EXPOSE port {port!r}")
            ports[f"{number}/{proto or 'tcp'}"] = {}
        config["ExposedPorts"] = ports
    elif instruction == "VOLUME":
        paths = _command(value) if value.startswith("[") else value.split()
        volumes = dict(config.get("Volumes") or {})
        for path in paths if paths[:2] != ["/bin/sh", "-c"] else value.split():
            volumes[path] = {}
        config["Volumes"] = volumes


def apply_changes(config: dict[str, Any], changes: list[str]) -> dict[str, Any]:
    result = dict(config)
    for change in changes:
        apply_change(result, change)
    return result
