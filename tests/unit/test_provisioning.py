"""The Vagrant VM and `make test` install the same things the same way.

Parses vagrant/Vagrantfile (its provisioners and their inline shell scripts), the
Makefile (the recipes of `test` and its prerequisites) and tools/debian-packages.txt,
and checks that there is one install step and one package list: the provisioning runs
tools/install-deps.sh exactly as `make test` does, names no package itself, and then
runs `make test` itself; the list parses the way install-deps.sh reads it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"
MAKEFILE = REPO / "Makefile"
PACKAGE_LIST = REPO / "tools" / "debian-packages.txt"
INSTALL_DEPS = "tools/install-deps.sh"

# Commands that install software; none may appear in the provisioning.
INSTALLERS = re.compile(
    r"\b(apt-get|apt|aptitude|dpkg|dnf|yum|zypper|apk|snap)\s+(-\S+\s+)*(install|-i)\b"
    r"|\bpip3?\s+install\b|\bpython3?\s+-m\s+pip\b"
)


# --- parsing -------------------------------------------------------------------------


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


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provisioners() -> list[tuple[str, str]]:
    return vagrant_provisioners(VAGRANTFILE.read_text())


@pytest.fixture(scope="module")
def rules() -> dict[str, tuple[list[str], list[str]]]:
    return make_rules(MAKEFILE.read_text())


@pytest.fixture(scope="module")
def packages() -> dict[str, list[tuple[str, bool]]]:
    return package_list(PACKAGE_LIST.read_text())


# --- the checks -----------------------------------------------------------------------


def test_provisioners_are_deps_then_root_then_user(provisioners: list[tuple[str, str]]):
    assert [name for name, _ in provisioners] == ["deps", "test-root", "test-user"]


def test_make_test_installs_through_install_deps_only(
    rules: dict[str, tuple[list[str], list[str]]],
):
    lines = make_install_commands(rules, "test")

    assert [shlex.split(line) for line in lines] == [["bash", INSTALL_DEPS]]
    assert not any(INSTALLERS.search(line) for line in rules["test"][1])


def test_provisioning_runs_the_install_step_of_make_test(
    provisioners: list[tuple[str, str]], rules: dict[str, tuple[list[str], list[str]]]
):
    deps_script = dict(provisioners)["deps"]
    make_commands = [shlex.split(line) for line in make_install_commands(rules, "test")]

    vm_commands = [cmd for cmd in shell_commands(deps_script) if INSTALL_DEPS in " ".join(cmd)]

    # Same script, same arguments (no --vm: the VM never installs the host's group).
    assert vm_commands == make_commands
    assert shell_commands(deps_script)[1] == ["cd", "/vagrant"]  # the synced repository


def test_provisioning_names_no_package_and_runs_no_installer(
    provisioners: list[tuple[str, str]], packages: dict[str, list[tuple[str, bool]]]
):
    listed = {name for group in packages.values() for name, _ in group}
    for name, script in provisioners:
        assert not INSTALLERS.search(script), f"provisioner {name} installs something itself"
        words = {word for cmd in shell_commands(script) for word in cmd if "/" not in word}
        # `make` runs make; any other package name in a provisioner's commands is the
        # start of a second list.
        named = (words & listed) - {"make"}
        assert not named, f"provisioner {name} names packages {sorted(named)}"


def test_vm_runs_make_test_as_root_under_ci_and_fuse_tests_as_a_user(
    provisioners: list[tuple[str, str]], rules: dict[str, tuple[list[str], list[str]]]
):
    scripts = dict(provisioners)
    root_commands = shell_commands(scripts["test-root"])
    assert ["make", "test"] in root_commands
    assert ["export", "CI=true"] in root_commands
    assert "test" in rules and "deps" in rules["test"][0]

    runuser = next(cmd for cmd in shell_commands(scripts["test-user"]) if cmd[0] == "runuser")
    user = runuser[runuser.index("-u") + 1]
    assert user != "root"
    pytest_args = runuser[runuser.index("pytest") + 1 :]
    assert pytest_args[pytest_args.index("-m") + 1] == "fuse"
    # The user's pytest is the .venv that install-deps.sh made, not a second install.
    assert ".venv/bin/python" in runuser
    assert any(arg.startswith("--junitxml=") for arg in pytest_args)
    assert "usermod" in scripts["deps"] and "fuse" in scripts["deps"]


def test_package_list_groups(packages: dict[str, list[tuple[str, bool]]]):
    assert set(packages) == {"build", "test", "vm"}
    names = {group: [name for name, _ in pkgs] for group, pkgs in packages.items()}
    # Needed inside the VM before and by `make test` itself.
    assert {"make", "python3-venv", "libfuse3-dev"} <= set(names["build"])
    assert "fuse3" in names["test"]
    # `make test` (so CI) installs vagrant for test_vagrant.py; only the host that
    # runs `make vm-test` gets libvirt and qemu.
    assert {"vagrant", "vagrant-libvirt"} <= set(names["test"])
    assert {"libvirt-daemon-system", "qemu-system-x86", "mmdebstrap"} <= set(names["vm"])
    # vagrant-libvirt recommends libguestfs-tools (a second kernel): never that.
    assert dict(packages["test"])["vagrant-libvirt"] is False
    every = [name for pkgs in names.values() for name in pkgs]
    assert len(every) == len(set(every)), "a package is listed twice"


def test_install_deps_reads_the_same_list(packages: dict[str, list[tuple[str, bool]]]):
    """install-deps.sh's own parser agrees with the one above, line for line."""
    script = (REPO / INSTALL_DEPS).read_text()
    start = script.index("read_package_list() {")
    end = script.index("\n}\n", start) + 3
    program = (
        f"set -euo pipefail\npackage_list={shlex.quote(str(PACKAGE_LIST))}\n"
        'die() { echo "$*" >&2; exit 1; }\n' + script[start:end] + "read_package_list\n"
    )
    result = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, check=True, timeout=30
    )

    from_bash = [tuple(line.split()) for line in result.stdout.splitlines()]
    expected = [
        (group, name, "yes" if recommends else "no")
        for group, pkgs in packages.items()
        for name, recommends in pkgs
    ]
    assert from_bash == expected


def test_box_builder_takes_test_packages_from_the_list(
    packages: dict[str, list[tuple[str, bool]]],
):
    """The local box pre-installs the list's packages; it must not keep a list of its own."""
    script = (REPO / "tools" / "build-vagrant-box.sh").read_text()
    assert re.search(r'install-deps\.sh"?\s+--list', script)
    base = re.search(r"^packages=\((.*?)^\)", script, re.M | re.S)
    assert base, "build-vagrant-box.sh has no packages=( ... ) array"
    base_packages = set(base[1].split())
    listed = {name for group in ("build", "test") for name, _ in packages[group]}
    # Its own array is the bootable system only (kernel, boot loader, ssh, sudo, rsync).
    assert not base_packages & listed, base_packages & listed
