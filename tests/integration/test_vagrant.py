"""`vagrant validate` accepts vagrant/Vagrantfile for every box it offers.

With Debian's vagrant-libvirt installed the libvirt provider's settings are validated
too (vagrant rejects unknown or malformed ones); the virtualbox block is checked only
for syntax, VirtualBox not being in Debian. Vagrant runs with its own VAGRANT_HOME
and dot-file directory under tmp_path, so the user's boxes and the repository's
vagrant/.vagrant are never touched, and with its version check off (no network).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
BOX_KEYS = ("debian12", "ubuntu2404", "local")


@pytest.fixture(scope="module")
def vagrant() -> str:
    path = shutil.which("vagrant")
    if path is None:
        pytest.skip("vagrant is not installed (apt-get install --no-install-recommends vagrant)")
    return path


def run_vagrant(
    vagrant: str, tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LAYERFS_", "VAGRANT_"))
    }
    full_env.update(
        VAGRANT_HOME=str(tmp_path / "vagrant.d"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_NO_COLOR="1",
        **env,
    )
    return subprocess.run(
        [vagrant, *args],
        cwd=VAGRANT_DIR,
        env=full_env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def libvirt_plugin(vagrant: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    result = run_vagrant(vagrant, tmp_path_factory.mktemp("plugins"), "plugin", "list")
    if "vagrant-libvirt" not in result.stdout:
        pytest.skip(
            "vagrant-libvirt is not installed (apt-get install --no-install-recommends "
            f"vagrant-libvirt); vagrant plugin list said: {result.stdout.strip()}"
        )


@pytest.mark.parametrize("box", BOX_KEYS)
def test_vagrantfile_validates_with_the_libvirt_provider(
    vagrant: str, libvirt_plugin: None, tmp_path: Path, box: str
):
    result = run_vagrant(
        vagrant, tmp_path, "validate", LAYERFS_BOX=box, VAGRANT_DEFAULT_PROVIDER="libvirt"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully" in result.stdout


@pytest.mark.parametrize("box", BOX_KEYS)
def test_vagrantfile_validates_without_provider_settings(vagrant: str, tmp_path: Path, box: str):
    result = run_vagrant(vagrant, tmp_path, "validate", "--ignore-provider", LAYERFS_BOX=box)

    assert result.returncode == 0, result.stdout + result.stderr


def test_software_emulation_settings_validate(vagrant: str, libvirt_plugin: None, tmp_path: Path):
    result = run_vagrant(
        vagrant,
        tmp_path,
        "validate",
        LAYERFS_BOX="local",
        LAYERFS_LIBVIRT_DRIVER="qemu",
        LAYERFS_VM_CPUS="2",
        LAYERFS_VM_MEMORY="3072",
        VAGRANT_DEFAULT_PROVIDER="libvirt",
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_box_is_refused_with_the_choices(vagrant: str, tmp_path: Path):
    result = run_vagrant(vagrant, tmp_path, "validate", "--ignore-provider", LAYERFS_BOX="nope")

    assert result.returncode != 0
    assert "LAYERFS_BOX=nope is not one of debian12, ubuntu2404, local" in (
        result.stdout + result.stderr
    )
