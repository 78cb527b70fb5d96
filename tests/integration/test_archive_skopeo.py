"""skopeo reads what layerfs saves and layerfs loads what skopeo writes, digests agreeing.

Every layerfs output (docker-archive, OCI tar, OCI directory) is inspected by skopeo and
copied by skopeo into every file transport it has (docker-archive:, oci-archive:, oci:);
layerfs loads each copy. ``skopeo inspect --raw`` must name the config and layer digests
layerfs computed; the image layerfs loads from a skopeo copy must have the config digest
skopeo reports and the diff IDs its config lists. skopeo converts a Docker config to OCI
when the destination is an OCI layout (a new config, so a new image ID), which is why the
IDs are compared with what skopeo says, and with the original where skopeo keeps it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.archive_builders import docker_members, make_image, make_layer, pack
from tests.helpers import BUSYBOX, write_busybox_rootfs_tar

if TYPE_CHECKING:
    from .conftest import LayerfsCli

pytestmark = [pytest.mark.integration, pytest.mark.skopeo]


def skopeo(*args: str) -> bytes:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    result = subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def loaded(layerfs_cli: LayerfsCli, tmp_path: Path) -> dict[str, Any]:
    """Two images sharing a busybox base layer, loaded into the test's store."""
    if not BUSYBOX.exists():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    rootfs = write_busybox_rootfs_tar(tmp_path / "rootfs.tar").read_bytes()
    one = make_image([rootfs, make_layer("one")], ["lfs/one:one"])
    two = make_image([rootfs, make_layer("one"), make_layer("two")], ["lfs/two:two"])
    archive = tmp_path / "in.tar"
    archive.write_bytes(pack(docker_members([one, two])))
    layerfs_cli("load", "-q", "-i", archive)
    return {"one": one, "two": two}


def _inspect_raw(reference: str) -> tuple[str, list[str]]:
    """(config digest, layer digests) of skopeo's view of an image."""
    manifest = json.loads(skopeo("inspect", "--raw", reference))
    return manifest["config"]["digest"], [layer["digest"] for layer in manifest["layers"]]


def _skopeo_config(reference: str) -> bytes:
    return skopeo("inspect", "--config", "--raw", reference)


SAVES = {
    "docker": ("out.tar", "docker-archive:{p}:lfs/{n}:{n}"),
    "oci": ("out.tar", "oci-archive:{p}:{n}"),
    "oci-dir": ("out", "oci:{p}:{n}"),
}


@pytest.mark.parametrize("fmt", list(SAVES))
def test_skopeo_agrees_on_every_digest_of_what_layerfs_saves(
    layerfs_cli: LayerfsCli, loaded: dict[str, Any], tmp_path: Path, fmt: str
) -> None:
    name, spec = SAVES[fmt]
    out = tmp_path / name
    layerfs_cli("save", "-q", "--format", fmt, "-o", out, "lfs/one:one", "lfs/two:two")

    for key, image in loaded.items():
        reference = spec.format(p=out, n=key)
        config_digest, layers = _inspect_raw(reference)
        assert config_digest == sha256(image.config)
        assert layers == image.diff_ids  # layers are saved uncompressed: digest = diff ID
        assert _skopeo_config(reference) == image.config


DESTINATIONS = {
    "docker-archive": "docker-archive:{p}.tar:lfs/copied:1",
    "oci-archive": "oci-archive:{p}.tar:copied",
    "oci": "oci:{p}:copied",
}


@pytest.mark.parametrize("dest", list(DESTINATIONS))
@pytest.mark.parametrize("fmt", list(SAVES))
def test_layerfs_loads_what_skopeo_copies_from_layerfs(
    layerfs_cli: LayerfsCli, loaded: dict[str, Any], tmp_path: Path, fmt: str, dest: str
) -> None:
    name, spec = SAVES[fmt]
    out = tmp_path / name
    layerfs_cli("save", "-q", "--format", fmt, "-o", out, "lfs/two:two")
    target = DESTINATIONS[dest].format(p=tmp_path / "copy")
    skopeo("copy", "-q", spec.format(p=out, n="two"), target)
    config_digest, _ = _inspect_raw(target)
    config = _skopeo_config(target)
    assert sha256(config) == config_digest

    path = target.split(":", 2)[1]
    result = layerfs_cli("load", "-q", "-i", f"{target.split(':', 1)[0]}:{path}")

    loaded_id = config_digest
    document = json.loads(layerfs_cli("inspect", loaded_id).stdout)[0]
    assert document["Id"] == config_digest
    assert document["RootFS"]["Layers"] == json.loads(config)["rootfs"]["diff_ids"]
    assert document["RootFS"]["Layers"] == loaded["two"].diff_ids  # the same layer bytes
    if dest == "docker-archive":
        # skopeo keeps a Docker config as it is: the very same image.
        assert config_digest == sha256(loaded["two"].config)
        assert result.stdout.decode().splitlines() == ["Loaded image: lfs/copied:1"]
    assert b"clean" in layerfs_cli("fsck").stdout


def test_skopeo_copy_of_a_layerfs_archive_to_a_docker_archive_is_byte_stable(
    layerfs_cli: LayerfsCli, loaded: dict[str, Any], tmp_path: Path
) -> None:
    layerfs_cli("save", "-q", "-o", tmp_path / "a.tar", "lfs/one:one")
    skopeo(
        "copy",
        "-q",
        f"docker-archive:{tmp_path / 'a.tar'}",
        f"docker-archive:{tmp_path / 'b.tar'}:lfs/one:one",
    )
    layerfs_cli("rmi", "lfs/one:one")

    out = layerfs_cli("load", "-i", tmp_path / "b.tar").stdout.decode().splitlines()

    assert out == ["Loaded image: lfs/one:one"]
    document = json.loads(layerfs_cli("inspect", "lfs/one:one").stdout)[0]
    assert document["Id"] == sha256(loaded["one"].config)
