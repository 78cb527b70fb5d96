"""The conformance checker itself: it passes well-formed images and fails each kind of
broken one (a checker that cannot fail would pass every transport's output)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from layerfs.model.manifest import MEDIA_OCI_LAYER_ZSTD
from layerfs.transports import open_source
from layerfs.transports.base import ImageSource, SourceImage
from tests import archive_builders as builders
from tests.conformance import assert_valid_image

LAYERS = [builders.make_layer("base"), builders.make_layer("top", ("f", b"data"))]


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_well_formed_layouts_and_archives_pass(tmp_path: Path, compression: str) -> None:
    image = builders.make_image(LAYERS, ["app:1"])
    layout = builders.write_dir(
        builders.oci_members([image], layer_compression=compression), tmp_path / "oci"
    )
    (checked,) = assert_valid_image(open_source(f"oci:{layout}"))
    assert checked.config == image.config
    archive = tmp_path / "a.tar"
    archive.write_bytes(
        builders.pack(builders.docker_members([image], layer_compression=compression))
    )
    (checked,) = assert_valid_image(open_source(f"docker-archive:{archive}"))
    assert checked.references == ["app:1"]


def _archive(tmp_path: Path, history: list[dict[str, object]]) -> str:
    image = builders.make_image(LAYERS, ["app:1"], history=False)
    image.config = json.dumps({**image.config_doc, "history": history}).encode()
    archive = tmp_path / "a.tar"
    archive.write_bytes(builders.pack(builders.docker_members([image])))
    return f"docker-archive:{archive}"


def test_history_that_disagrees_with_the_layers_fails(tmp_path: Path) -> None:
    spec = _archive(tmp_path, [{"created_by": "one step"}])
    with pytest.raises(AssertionError, match="1 history entries that are not empty layers"):
        assert_valid_image(open_source(spec))
    spec = _archive(
        tmp_path, [{"created_by": "a"}, {"created_by": "env", "empty_layer": True}, {"x": 1}]
    )
    assert_valid_image(open_source(spec))  # empty layers are not counted


class _Tampered:
    """A source whose images are changed after the real source checked them."""

    def __init__(self, source: ImageSource, tamper: Callable[[SourceImage], None]) -> None:
        self.source = source
        self.tamper = tamper

    def images(self) -> list[SourceImage]:
        images = self.source.images()
        self.originals = {id(image): copy.deepcopy(image) for image in images}
        for image in images:
            self.tamper(image)
        return images

    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        return self.source.open_layer(self.originals[id(image)], index)

    def close(self) -> None:
        self.source.close()


def _edit_json(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(data)
    edit(doc)
    return json.dumps(doc).encode()


TAMPERING: dict[str, tuple[Callable[[SourceImage], None], str]] = {
    "config diff IDs": (
        lambda i: setattr(
            i, "config", _edit_json(i.config, lambda d: d["rootfs"]["diff_ids"].reverse())
        ),
        "uncompressed digest .* config says",
    ),
    "layer diff ID": (
        lambda i: setattr(i.layers[1], "diff_id", builders.sha256(b"other")),
        "layer 2: diff ID .* described",
    ),
    "layer digest": (
        lambda i: setattr(i.layers[1], "digest", builders.sha256(b"other")),
        "layer 2: blob digest is not",
    ),
    "layer size": (
        lambda i: setattr(i.layers[0], "size", (i.layers[0].size or 0) + 1),
        "layer 1: blob of .* bytes, described",
    ),
    "layer media type": (
        lambda i: setattr(i.layers[1], "media_type", MEDIA_OCI_LAYER_ZSTD),
        "a gzip blob described as .*zstd",
    ),
    "manifest digest": (
        lambda i: setattr(i, "manifest_digest", builders.sha256(b"other")),
        "manifest digest is not",
    ),
    "manifest config size": (
        lambda i: setattr(
            i, "manifest", _edit_json(i.manifest or b"", lambda d: d["config"].update(size=1))
        ),
        "config size differs",
    ),
    "manifest layers": (
        lambda i: setattr(
            i, "manifest", _edit_json(i.manifest or b"", lambda d: d["layers"].pop())
        ),
        "the manifest lists 1 layers, the image has 2",
    ),
}


@pytest.mark.parametrize("change", sorted(TAMPERING))
def test_each_kind_of_broken_image_fails(tmp_path: Path, change: str) -> None:
    image = builders.make_image(LAYERS, ["app:1"])
    layout = builders.write_dir(
        builders.oci_members([image], layer_compression="gzip"), tmp_path / "oci"
    )
    tamper, message = TAMPERING[change]
    with pytest.raises(AssertionError, match=message):
        assert_valid_image(_Tampered(open_source(f"oci:{layout}"), tamper))
