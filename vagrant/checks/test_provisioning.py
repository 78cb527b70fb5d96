"""The Vagrant VM and `make test` install the same things the same way.

Parses vagrant/Vagrantfile (its provisioners and their inline shell scripts), the
Makefile and tools/debian-packages.txt (tests/provisioning.py), and checks that there
is one install step and one package list: the provisioning runs tools/install-deps.sh
exactly as `make test` does, names no package itself, and then runs `make check-host`
and `make test`; the box builder takes its packages from the list. These are checks of
the VM set-up, not of layerfs: `make vm-test` runs them before it starts a VM.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.provisioning import (
    INSTALL_DEPS,
    INSTALLERS,
    REPO,
    VAGRANTFILE,
    listed_packages,
    make_install_commands,
    makefile_rules,
    shell_commands,
    vagrant_provisioners,
)


@pytest.fixture(scope="module")
def provisioners() -> list[tuple[str, str]]:
    return vagrant_provisioners(VAGRANTFILE.read_text())


def test_provisioners_are_deps_then_root_then_user(provisioners: list[tuple[str, str]]):
    assert [name for name, _ in provisioners] == ["deps", "test-root", "test-user"]


def test_provisioning_runs_the_install_step_of_make_test(provisioners: list[tuple[str, str]]):
    rules = makefile_rules()
    deps_script = dict(provisioners)["deps"]
    make_commands = [shlex.split(line) for line in make_install_commands(rules, "test")]

    vm_commands = [cmd for cmd in shell_commands(deps_script) if INSTALL_DEPS in " ".join(cmd)]

    # Same script, same arguments (no --vm: the VM never installs the host's group).
    assert vm_commands == make_commands
    assert shell_commands(deps_script)[1] == ["cd", "/vagrant"]  # the synced repository


def test_provisioning_names_no_package_and_runs_no_installer(provisioners: list[tuple[str, str]]):
    packages = listed_packages()
    listed = {name for group in packages.values() for name, _ in group}
    for name, script in provisioners:
        assert not INSTALLERS.search(script), f"provisioner {name} installs something itself"
        words = {word for cmd in shell_commands(script) for word in cmd if "/" not in word}
        # `make` runs make; any other package name in a provisioner's commands is the
        # start of a second list.
        named = (words & listed) - {"make"}
        assert not named, f"provisioner {name} names packages {sorted(named)}"


def test_vm_runs_make_test_as_root_under_ci_and_fuse_tests_as_a_user(
    provisioners: list[tuple[str, str]],
):
    rules = makefile_rules()
    scripts = dict(provisioners)
    root_commands = shell_commands(scripts["test-root"])
    # The host first: when Docker or a registry does not work here, say so before the suite.
    assert root_commands.index(["make", "check-host"]) < root_commands.index(["make", "test"])
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


def test_box_builder_takes_test_packages_from_the_list():
    """The local box pre-installs the list's packages; it must not keep a list of its own."""
    packages = listed_packages()
    script = (REPO / "tools" / "build-vagrant-box.sh").read_text()
    assert re.search(r'install-deps\.sh"?\s+--list', script)
    base = re.search(r"^packages=\((.*?)^\)", script, re.M | re.S)
    assert base, "build-vagrant-box.sh has no packages=( ... ) array"
    base_packages = set(base[1].split())
    listed = {name for group in ("build", "test") for name, _ in packages[group]}
    # Its own array is the bootable system only (kernel, boot loader, ssh, sudo, rsync).
    assert not base_packages & listed, base_packages & listed
