"""`make test` installs through one step from one package list.

The Makefile's `test` recipe and its prerequisites run tools/install-deps.sh and no
installer of their own; tools/debian-packages.txt parses the way install-deps.sh reads
it. (That the Vagrant VM provisions through the same step is checked by
vagrant/checks/test_provisioning.py, which `make vm-test` runs.)
"""

from __future__ import annotations

import shlex
import subprocess

from tests.provisioning import (
    INSTALL_DEPS,
    INSTALLERS,
    PACKAGE_LIST,
    REPO,
    listed_packages,
    make_install_commands,
    makefile_rules,
)


def test_make_test_installs_through_install_deps_only():
    rules = makefile_rules()
    lines = make_install_commands(rules, "test")

    assert [shlex.split(line) for line in lines] == [["bash", INSTALL_DEPS]]
    assert not any(INSTALLERS.search(line) for line in rules["test"][1])


def test_package_list_groups():
    packages = listed_packages()
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


def test_install_deps_reads_the_same_list():
    """install-deps.sh's own parser agrees with the one above, line for line."""
    packages = listed_packages()
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
