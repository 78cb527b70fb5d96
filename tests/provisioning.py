"""Parsers of the build and provisioning files, for the checks that they agree.

vagrant/Vagrantfile (its provisioners and their inline shell scripts), the Makefile (the
recipes of a target and its prerequisites) and tools/debian-packages.txt (read the way
tools/install-deps.sh reads it). Used by tests/unit/test_provisioning.py (make test and
the package list) and vagrant/checks/test_provisioning.py (the VM's provisioning).
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"
MAKEFILE = REPO / "Makefile"
PACKAGE_LIST = REPO / "tools" / "debian-packages.txt"
INSTALL_DEPS = "tools/install-deps.sh"

# Commands that install software; none may appear in the provisioning.
INSTALLERS = re.compile(
    r"\b(apt-get|apt|aptitude|dpkg|dnf|yum|zypper|apk|snap)\s+(-\S+\s+)*(install|-i)\b"
    r"|\bpip3?\s+install\b|\bpython3?\s+-m\s+pip\b"
)


def vagrantfile_heredocs(text: str) -> dict[str, str]:
    """NAME -> body for every ``NAME = <<~SHELL ... SHELL`` in the Vagrantfile.

    Ruby's ``#{CONSTANT}`` is replaced by the constant's value when it is a plain string,
    by its name when it is computed (``TEST_TIMEOUT = ... ? 900 : 3600``); a constant the
    Vagrantfile does not define is an error.
    """
    constants = dict(re.findall(r'^([A-Z_]+)\s*=\s*"([^"#\\]*)"\s*$', text, re.M))
    computed = set(re.findall(r"^([A-Z_]+)\s*=", text, re.M))

    def interpolate(match: re.Match[str]) -> str:
        name = match[1]
        if name in constants:
            return constants[name]
        if name in computed:
            return name
        raise KeyError(f"the Vagrantfile uses #{{{name}}} but does not define it")

    docs = {}
    for match in re.finditer(
        r"^(?P<name>[A-Z_]+)\s*=\s*<<~(?P<tag>[A-Z]+)\n(?P<body>.*?)^\s*(?P=tag)\s*$",
        text,
        re.M | re.S,
    ):
        lines = match["body"].splitlines()
        indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
        body = "\n".join(line[indent:] for line in lines)
        docs[match["name"]] = re.sub(r"#\{([A-Z_]+)\}", interpolate, body)
    return docs


def vagrant_provisioners(text: str) -> list[tuple[str, str]]:
    """(name, inline script) for each ``config.vm.provision``, in file order."""
    docs = vagrantfile_heredocs(text)
    found = []
    for match in re.finditer(
        r'^\s*config\.vm\.provision\s+"(?P<name>[^"]+)",\s*(?P<opts>.*)$', text, re.M
    ):
        opts = match["opts"]
        if re.search(r'type:\s*"file"', opts):
            continue  # uploads (the extra CA certificates), not scripts
        assert re.search(r'type:\s*"shell"', opts), f"{match['name']}: not a shell provisioner"
        inline = re.search(r"inline:\s*([A-Z_]+)", opts)
        assert inline, f"provisioner {match['name']} has no inline script constant: {opts}"
        found.append((match["name"], docs[inline[1]]))
    return found


def shell_commands(script: str) -> list[list[str]]:
    """The script's simple commands as argument lists (continuations joined)."""
    joined = re.sub(r"\\\n", " ", script)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
            if part:
                commands.append(shlex.split(part, comments=True))
    return commands


def make_rules(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines) for the Makefile's explicit rules."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: str | None = None
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("\t") and current is not None:
            rules[current][1].append(line.strip().lstrip("@-+"))
            continue
        current = None
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)\s*(.*)$", line)
        if match and not match[1].startswith("."):
            current = match[1]
            rules[current] = (match[2].split(), [])
    return rules


def make_install_commands(rules: dict[str, tuple[list[str], list[str]]], target: str) -> list[str]:
    """Every recipe line that runs install-deps.sh, for *target* and what it depends on."""
    seen: set[str] = set()
    lines: list[str] = []

    def visit(name: str) -> None:
        if name in seen or name not in rules:
            return
        seen.add(name)
        prerequisites, recipe = rules[name]
        for prerequisite in prerequisites:
            visit(prerequisite)
        lines.extend(line for line in recipe if INSTALL_DEPS in line)

    visit(target)
    return lines


def package_list(text: str) -> dict[str, list[tuple[str, bool]]]:
    """group -> [(package, with recommends)], read the way install-deps.sh reads it."""
    groups: dict[str, list[tuple[str, bool]]] = {}
    group, recommends = None, True
    for line in text.splitlines():
        header = re.match(r"^#@\s*([A-Za-z0-9_-]+)\s*([A-Za-z-]*)", line)
        if header:
            group, recommends = header[1], header[2] != "no-recommends"
            assert header[2] in ("", "no-recommends"), line
            continue
        name = re.sub(r"\s", "", line.split("#", 1)[0])
        if name:
            assert group is not None, f"package {name} before any '#@ GROUP' line"
            groups.setdefault(group, []).append((name, recommends))
    return groups


@functools.cache
def makefile_rules() -> dict[str, tuple[list[str], list[str]]]:
    """The Makefile's rules (:func:`make_rules`), read once."""
    return make_rules(MAKEFILE.read_text())


@functools.cache
def listed_packages() -> dict[str, list[tuple[str, bool]]]:
    """tools/debian-packages.txt by group (:func:`package_list`), read once."""
    return package_list(PACKAGE_LIST.read_text())
