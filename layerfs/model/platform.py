"""Platforms (``os/arch[/variant]``) and choosing one entry of a manifest list or OCI index.

The rules follow containerd's ``platforms`` package, which Docker uses (FORMATS §8.4):
names are normalised (``x86_64`` → ``amd64``, ``aarch64`` → ``arm64``, ``armhf`` →
``arm/v7``...), the OS must match, and the candidates are ordered: the wanted platform
first, then what it can also run (``amd64/v3`` → v2 → v1 → ``386``; ``arm/v7`` → v6 → v5;
``arm64/v8.2`` → v8.1 → v8). Entries are ranked by that order, ties keep index order,
attestation manifests are never picked. Pure functions, no I/O.
"""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass
from typing import Any

from layerfs.errors import InvalidReferenceError, NotFoundError


class PlatformNotFoundError(NotFoundError):
    """The index has no manifest for the wanted platform."""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/amd64``, ``linux/arm/v7``, or just an architecture (``arm64``)."""
        parts = [p for p in text.strip().split("/")]
        if not text.strip() or any(not p for p in parts) or len(parts) > 3:
            raise InvalidReferenceError(
                f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64"
            )
        if len(parts) == 1:
            os_name, arch, variant = "linux", parts[0], ""
        else:
            os_name, arch = parts[0], parts[1]
            variant = parts[2] if len(parts) == 3 else ""
        return normalize(cls(os_name, arch, variant))

    @classmethod
    def from_json(cls, doc: Any) -> Platform | None:
        if not isinstance(doc, dict):
            return None
        os_name, arch = doc.get("os"), doc.get("architecture")
        if not isinstance(os_name, str) or not isinstance(arch, str):
            return None
        variant = doc.get("variant")
        return normalize(cls(os_name, arch, variant if isinstance(variant, str) else ""))


def normalize_os(os_name: str) -> str:
    os_name = os_name.lower()
    return "darwin" if os_name == "macos" else os_name


def normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's ``normalizeArch``."""
    arch, variant = arch.lower(), variant.lower()
    if arch in ("i386", "i486", "i586", "i686"):
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            return "arm64", ""
        if variant in ("9", "9.0", "v9.0"):
            return "arm64", "v9"
        if variant and variant[0].isdigit():
            return "arm64", "v" + variant
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
        return "arm", variant
    return arch, variant


def normalize(p: Platform) -> Platform:
    arch, variant = normalize_arch(p.architecture, p.variant)
    return Platform(normalize_os(p.os), arch, variant)


def host_platform() -> Platform:
    """The platform of this machine, as Docker names it."""
    machine = _platform.machine() or "amd64"
    return normalize(Platform("linux", machine, ""))


def _version(variant: str) -> tuple[int, int] | None:
    text = variant[1:] if variant.startswith("v") else variant
    major, _, minor = text.partition(".")
    if not major.isdigit() or (minor and not minor.isdigit()):
        return None
    return int(major), int(minor or 0)


def candidates(wanted: Platform) -> list[Platform]:
    """The platforms ``wanted`` can run, best first."""
    p = normalize(wanted)
    out = [p]
    if p.architecture == "amd64":
        level = _version(p.variant or "v1")
        top = level[0] if level else 1
        out += [Platform(p.os, "amd64", f"v{n}") for n in range(top - 1, 1, -1)]
        if p.variant:
            out.append(Platform(p.os, "amd64", ""))
        out.append(Platform(p.os, "386", ""))
    elif p.architecture == "arm":
        level = _version(p.variant or "v7")
        top = level[0] if level else 7
        out += [Platform(p.os, "arm", f"v{n}") for n in range(top - 1, 4, -1)]
    elif p.architecture == "arm64":
        level = _version(p.variant or "v8")
        if level is not None:
            major, minor = level
            if major >= 9:
                # v9.x also runs v8.(x+5) and below, as containerd has it.
                out += [Platform(p.os, "arm64", f"v9.{m}") for m in range(minor - 1, 0, -1)]
                if minor:
                    out.append(Platform(p.os, "arm64", "v9"))
                minor, major = minor + 5, 8
                out.append(Platform(p.os, "arm64", f"v8.{minor}"))
            out += [Platform(p.os, "arm64", f"v8.{m}") for m in range(minor - 1, 0, -1)]
            if p.variant:
                out.append(Platform(p.os, "arm64", ""))
    seen: list[Platform] = []
    for c in out:
        if c not in seen:
            seen.append(c)
    return seen


def matches(found: Platform | None, wanted: Platform) -> bool:
    """An image for ``found`` is one for ``wanted`` (``load``/``save --platform``): the same
    os and architecture, and the same variant when one is wanted."""
    if found is None:
        return False
    return (
        found.os == wanted.os
        and found.architecture == wanted.architecture
        and (not wanted.variant or found.variant == wanted.variant)
    )


def is_attestation(entry: dict[str, Any]) -> bool:
    annotations = entry.get("annotations")
    if isinstance(annotations, dict) and (
        annotations.get("vnd.docker.reference.type") == "attestation-manifest"
    ):
        return True
    plat = entry.get("platform")
    return (
        isinstance(plat, dict)
        and plat.get("os") == "unknown"
        and (plat.get("architecture") == "unknown")
    )


def select(entries: list[dict[str, Any]], wanted: Platform, what: str) -> dict[str, Any]:
    """The entry of an index's ``manifests`` to pull for ``wanted``."""
    order = candidates(wanted)
    best: tuple[int, int] | None = None
    chosen: dict[str, Any] | None = None
    for index, entry in enumerate(entries):
        if is_attestation(entry):
            continue
        plat = Platform.from_json(entry.get("platform"))
        if plat is None or plat not in order:
            continue
        rank = (order.index(plat), index)
        if best is None or rank < best:
            best, chosen = rank, entry
    if chosen is None:
        # An index entry without a platform (common in single-image OCI layouts) is taken
        # only when no entry names one that fits.
        chosen = next((e for e in entries if not is_attestation(e) and not e.get("platform")), None)
    if chosen is None:
        available = sorted(
            {
                str(p)
                for e in entries
                if not is_attestation(e) and (p := Platform.from_json(e.get("platform")))
            }
        )
        raise PlatformNotFoundError(
            f"{what}: no manifest for platform {wanted}; available: "
            + (", ".join(available) if available else "none"),
            hint="choose one with --platform os/arch[/variant]",
        )
    return chosen
