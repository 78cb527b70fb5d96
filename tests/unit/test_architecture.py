"""The package's dependencies run one way (docs/architecture.md), and every transport is typed.

Each import in layerfs -- at the top of a module or inside a function, which the CLI uses
to start fast -- is read with ``ast`` and mapped to the unit it names (a subpackage such
as ``layerfs.store``, or a top-level module such as ``layerfs.copy``). A unit may import
only units of its own tier or a lower one:

    base ← model ← store ← registry ← transports ← copy ← operations ← cli

and the units import no cycle among them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import layerfs
import layerfs.transports
from layerfs.transports.base import ImageDestination, ImageSource

PACKAGE = Path(layerfs.__file__).parent

TIERS: list[tuple[str, set[str]]] = [
    (
        "base",
        {
            "layerfs",
            "layerfs.errors",
            "layerfs.compression",
            "layerfs.progress",
            "layerfs.formatting",
        },
    ),
    ("model", {"layerfs.model"}),
    ("store", {"layerfs.store"}),
    ("registry", {"layerfs.registry"}),
    ("transports", {"layerfs.transports"}),
    ("copy", {"layerfs.copy"}),
    (
        "operations",
        {
            "layerfs.fs",
            "layerfs.rootfs",
            "layerfs.transfer",
            "layerfs.container",
            "layerfs.inspect",
            "layerfs.listing",
            "layerfs.prune",
            "layerfs.diskusage",
        },
    ),
    ("cli", {"layerfs.cli", "layerfs.__main__"}),
]
TIER_OF = {unit: number for number, (_, units) in enumerate(TIERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """``layerfs.store.graph`` → ``layerfs.store``; ``layerfs.copy`` stays."""
    return ".".join(module.split(".")[:2])


def imports_of(path: Path) -> Iterator[tuple[str, int]]:
    """Every layerfs module ``path`` imports (absolute or relative), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (package or module_name(path)).split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield name, node.lineno


def dependencies() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) → the places, for every import between units."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(module_name(path))
        for name, line in imports_of(path):
            if name != "layerfs" and not name.startswith("layerfs."):
                continue
            target = unit_of(name)
            if target != unit:
                where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
                found.setdefault((unit, target), []).append(where)
    return found


def test_every_unit_has_a_tier():
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(TIER_OF) == set(), "place the new unit in a tier here and in the doc"


def test_imports_point_down_the_tiers():
    wrong = [
        f"{where} ({TIERS[TIER_OF[a]][0]} may not depend on {TIERS[TIER_OF[b]][0]})"
        for (a, b), places in dependencies().items()
        if a in TIER_OF and b in TIER_OF and TIER_OF[b] > TIER_OF[a]
        for where in places
    ]
    assert wrong == []


def test_units_import_no_cycle():
    graph: dict[str, set[str]] = {}
    for a, b in dependencies():
        graph.setdefault(a, set()).add(b)

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph.get(start, ()))
        while todo:
            unit = todo.pop()
            if unit not in seen:
                seen.add(unit)
                todo.extend(graph.get(unit, ()))
        return seen

    assert sorted(unit for unit in graph if unit in reachable(unit)) == []


def test_the_check_sees_imports_inside_functions():
    """What the CLI imports late to start fast still counts as a dependency."""
    found = {name for name, _ in imports_of(PACKAGE / "cli" / "registry.py")}
    assert {"layerfs.transfer", "layerfs.registry.login"} <= found  # inside cmd_pull, cmd_login
    assert ("layerfs.cli", "layerfs.transfer") in dependencies()


def transport_classes() -> Iterator[type]:
    for info in pkgutil.iter_modules(layerfs.transports.__path__, "layerfs.transports."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                yield cls


SOURCES = {"DockerArchiveSource", "OciLayoutSource", "StoreSource", "RegistrySource"}
DESTINATIONS = {
    "DockerArchiveDestination",
    "OciLayoutDestination",
    "StoreDestination",
    "RegistryDestination",
}


def test_every_source_and_destination_derives_from_the_contract():
    """So that mypy checks each against ImageSource/ImageDestination, optional parts too."""
    classes = list(transport_classes())
    sources = [c for c in classes if hasattr(c, "open_layer")]
    destinations = [c for c in classes if hasattr(c, "put_layer")]
    assert {c.__name__ for c in sources} >= SOURCES | {"PlatformSource"}
    assert {c.__name__ for c in destinations} >= DESTINATIONS
    assert [c.__name__ for c in sources if not issubclass(c, ImageSource)] == []
    assert [c.__name__ for c in destinations if not issubclass(c, ImageDestination)] == []
    named = [c for c in classes if c.__name__ in SOURCES | DESTINATIONS]
    assert [c.__name__ for c in named if inspect.isabstract(c)] == []


def graph_publishing_calls() -> list[str]:
    """Every call of ``<graph>.register(...)`` or ``<graph>.create(...)`` in the package
    outside the graph itself, as ``path:line``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent).as_posix()
        if where == "layerfs/store/graph.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), where)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if node.func.attr in {"register", "create"} and name == "graph":
                found.append(f"{where}:{node.lineno}")
    return found


def test_images_enter_the_store_through_the_store_destination_only():
    """Load, pull, import and commit all publish in StoreDestination.put_image (one journal
    record, one set of checks): nothing else makes image nodes."""
    calls = graph_publishing_calls()
    assert [c for c in calls if not c.startswith("layerfs/transports/local.py:")] == []
    assert calls != []  # the search finds the one that is meant to be there
