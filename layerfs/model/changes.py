"""Dockerfile-style ``--change`` instructions applied to an image's run config.

Supported, as ``docker import --change`` and ``docker commit --change`` accept
them: CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE, VOLUME, STOPSIGNAL,
ONBUILD and HEALTHCHECK. JSON arrays are exec form; anything else is shell form.
HEALTHCHECK takes Dockerfile's options (``--interval=30s --timeout=5s
--start-period=1m --start-interval=2s --retries=3``, durations in Go's syntax) and
stores them as docker does: durations in nanoseconds, only the ones given.
"""

from __future__ import annotations

import json
import re
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
    "ONBUILD",
    "HEALTHCHECK",
)
_HEALTH_DURATIONS = {
    "interval": "Interval",
    "timeout": "Timeout",
    "start-period": "StartPeriod",
    "start-interval": "StartInterval",
}
_NOT_ONBUILD_TRIGGERS = ("ONBUILD", "FROM", "MAINTAINER")


def _exec_form(value: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return parsed
    return None


def _command(value: str) -> list[str]:
    exec_form = _exec_form(value)
    return exec_form if exec_form is not None else ["/bin/sh", "-c", value.strip()]


def _pairs(value: str, instruction: str) -> list[tuple[str, str]]:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"invalid --change {instruction}: {exc}") from exc
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
    elif instruction == "ONBUILD":
        trigger = value.split(None, 1)[0].upper()
        if trigger == "ONBUILD":
            raise UsageError("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
        if trigger in _NOT_ONBUILD_TRIGGERS:
            raise UsageError(f"{trigger} isn't allowed as an ONBUILD trigger")
        config["OnBuild"] = [*(config.get("OnBuild") or []), value]
    elif instruction == "HEALTHCHECK":
        config["Healthcheck"] = _healthcheck(value)
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


def _healthcheck(value: str) -> dict[str, Any]:
    """``HEALTHCHECK [--opt=v ...] CMD command`` or ``HEALTHCHECK NONE`` as docker stores it."""
    options: dict[str, str] = {}
    rest = value
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, sep, option = word[2:].partition("=")
        if name not in (*_HEALTH_DURATIONS, "retries"):
            raise UsageError(f"unknown flag for --change HEALTHCHECK: --{name}")
        if not sep:
            raise UsageError(f"missing a value on flag --{name} of --change HEALTHCHECK")
        options[name] = option
    kind, _, command = rest.partition(" ")
    kind, command = kind.upper(), command.strip()
    if kind == "NONE":
        if command or options:
            raise UsageError("HEALTHCHECK NONE takes no arguments")
        return {"Test": ["NONE"]}
    if kind != "CMD":
        raise UsageError(f"Unknown type {kind!r} in HEALTHCHECK (try CMD)")
    if not command:
        raise UsageError("Missing command after HEALTHCHECK CMD")
    exec_form = _exec_form(command)
    test = ["CMD-SHELL", command] if exec_form is None else ["CMD", *exec_form]
    health: dict[str, Any] = {"Test": test}
    for name, key in _HEALTH_DURATIONS.items():
        if name in options:
            nanoseconds = _duration_ns(options[name], name)
            if nanoseconds:
                health[key] = nanoseconds
    if "retries" in options:
        text = options["retries"]
        if not text.lstrip("-").isdigit():
            raise UsageError(f"invalid --change HEALTHCHECK --retries {text!r}: not a number")
        if int(text) < 0:
            raise UsageError(f"--retries cannot be negative ({text})")
        if int(text):
            health["Retries"] = int(text)
    return health


_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_MINIMUM_NS = 10**6  # docker's container.MinimumDuration, 1 ms


def _duration_ns(text: str, name: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds, as HEALTHCHECK checks it."""
    pos, total = 0, 0.0
    body = text.lstrip("+")
    negative = body.startswith("-")
    body = body.lstrip("-")
    if body == "0":
        return 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_NS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise UsageError(f"invalid --change HEALTHCHECK --{name} {text!r}: not a duration")
    nanoseconds = -int(total) if negative else int(total)
    if nanoseconds and nanoseconds < _MINIMUM_NS:
        raise UsageError(f"Interval {name!r} cannot be less than 1ms")
    return nanoseconds
