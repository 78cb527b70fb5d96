"""The same ``--format``/``--filter`` commands through ``docker`` and through layerfs.

One private Docker engine and one layerfs store get the same images from one
docker-archive (built here: a base, a child whose manifest entry names the base as its
Parent, a dangling image; labels, symlinks, long ``created_by`` lines), and every command
below runs in both. Where the fields mean the same thing the output must be the same,
line by line: docker's own client (``/usr/bin/docker``) is the reference. Rows of one
image in several repositories come in map order from docker, so those listings are
compared as sorted lines, with the order of the images checked on its own.

The legacy case: an archive as Docker 1.8/1.9 wrote it, whose ``repositories`` file
holds a digest key beside a tag. The test engine refuses it ("invalid tag format");
layerfs loads it and keeps the digest, and the same archive without the digest key
lists the same way in both.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.archive_builders import BuiltImage, docker_members, legacy_members, make_image, pack
from tests.helpers import build_tar, fake_image_id, tar_dir, tar_file, tar_symlink

from .conftest import LayerfsCli, running_docker_engine

if TYPE_CHECKING:
    from .conftest import DockerEngine

pytestmark = [pytest.mark.integration, pytest.mark.docker]

LONG_STEP = (
    "/bin/sh -c #(nop) COPY file:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a697887 in "
    "/usr/local/share/app/ "
)


def _images() -> list[BuiltImage]:
    base_layer = build_tar(
        tar_dir("bin"),
        tar_file("bin/busybox", b"\x7fELF" + bytes(3000)),
        tar_symlink("bin/sh", "busybox"),
        tar_file("etc/motd", b"base\n"),
    )
    app_layer = build_tar(
        tar_dir("srv"),
        tar_file("srv/index.html", b"<h1>hi</h1>\n" * 50),
        tar_symlink("srv/current", "/srv/index.html"),
    )
    lone_layer = build_tar(tar_file("lone", b"x" * 1234))
    base = make_image(
        [base_layer],
        ["fmt/base:1"],
        created="2024-01-02T03:04:05.123456789Z",
        config={"Env": ["PATH=/bin"], "Cmd": ["sh"], "Labels": {"tier": "base"}},
    )
    base.config_doc["history"] = [
        {"created": "2024-01-02T03:04:05.123456789Z", "created_by": "/bin/sh -c #(nop) ADD x"}
    ]
    app = make_image(
        [base_layer, app_layer],
        ["fmt/app:1", "fmt/app:2", "other/app:1"],
        created="2024-02-03T04:05:06Z",
        config={
            "Env": ["PATH=/bin", "MODE=prod"],
            "Cmd": ["httpd", "-f"],
            "WorkingDir": "/srv",
            "Labels": {"tier": "app", "owner": "web<team>"},
            "ExposedPorts": {"8080/tcp": {}},
        },
        comment="the app",
    )
    app.config_doc["history"] = [
        *base.config_doc["history"],
        {"created": "2024-02-03T04:05:06Z", "created_by": LONG_STEP, "comment": "copy it"},
    ]
    lone = make_image([lone_layer], [], created="2024-03-04T05:06:07Z")
    for image in (base, app, lone):
        image.config = json.dumps(image.config_doc, sort_keys=True).encode()
    return [base, app, lone]


@dataclass
class Both:
    docker: DockerEngine
    layerfs: LayerfsCli
    ids: dict[str, str]

    def run(self, *args: str, check: bool = True) -> tuple[str, str]:
        theirs = self.docker.run(*args, check=check).stdout.decode()
        ours = self.layerfs(*args, check=check).stdout.decode()
        return theirs, ours


@pytest.fixture(scope="module")
def both() -> Iterator[Both]:
    """A private engine and a store holding the same three images."""
    work = Path(tempfile.mkdtemp(prefix="layerfs-format-"))
    try:
        images = _images()
        base, app, lone = images
        members = docker_members(images)
        manifest = json.loads(members["manifest.json"])  # type: ignore[arg-type]
        manifest[1]["Parent"] = "sha256:" + base.image_id
        members["manifest.json"] = json.dumps(manifest).encode()
        archive = work / "images.tar"
        archive.write_bytes(pack(members))
        with running_docker_engine() as engine:
            engine.run("load", "-i", archive)
            cli = LayerfsCli(work / "store")
            cli("load", "-q", "-i", archive)
            ids = {"base": base.image_id, "app": app.image_id, "lone": lone.image_id}
            yield Both(engine, cli, ids)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def same_lines(theirs: str, ours: str) -> None:
    assert ours.splitlines() == theirs.splitlines()


def same_rows(theirs: str, ours: str, *, header: bool) -> None:
    """The same lines (a header first when asked), rows in any order."""
    t, o = theirs.splitlines(), ours.splitlines()
    if header:
        assert o[:1] == t[:1]
        t, o = t[1:], o[1:]
    assert sorted(o) == sorted(t)


def image_order(text: str) -> list[str]:
    ids: list[str] = []
    for line in text.splitlines():
        if not ids or ids[-1] != line:
            ids.append(line)
    return ids


def test_the_parent_link_is_the_same(both: Both) -> None:
    theirs, ours = both.run("inspect", "-f", "{{.Parent}}", "fmt/app:1")
    assert ours == theirs == f"sha256:{both.ids['base']}\n"


@pytest.mark.parametrize(
    ("args", "fmt"),
    [
        ([], None),
        (["-a"], None),
        (["--digests"], None),
        (["--no-trunc"], None),
        (["fmt/app"], None),
        (["fmt/app:2"], None),
        (["*/app"], None),
        (["--filter", "dangling=true"], None),
        (["--filter", "dangling=false"], None),
        (["--filter", "label=tier"], None),
        (["--filter", "label=tier=app"], None),
        (["-f", "label=owner=web<team>", "-f", "label=tier"], None),
        (["--filter", "before=fmt/app:1"], None),
        (["--filter", "since=fmt/base:1"], None),
        (["--filter", "reference=fmt/*"], None),
        (["--filter", "reference=*/app:1", "--filter", "reference=fmt/base"], None),
        ([], "{{.Repository}}:{{.Tag}} {{.ID}} {{.Digest}} {{.CreatedAt}} {{.Size}}"),
        (["-a"], "{{.CreatedSince}}|{{.VirtualSize}}|{{.Containers}}|{{.SharedSize}}"),
        ([], "{{json .}}"),
        (["--digests"], "{{json .}}"),
        ([], "table {{.ID}}\\t{{.Repository}}\\t{{.Tag}}\\t{{.Size}}"),
        (["--digests"], "table {{.Repository}}:{{.Tag}}\\t{{upper .Tag}}"),
        ([], '{{if eq .Tag "<none>"}}dangling {{.ID}}{{else}}{{lower .Repository}}{{end}}'),
        (["--no-trunc"], "{{.ID}} {{truncate .ID 10}} {{pad .Tag 1 1}}|{{title .Repository}}"),
        (["-q"], "{{.Repository}}"),  # a format of one's own wins over -q, as in docker
    ],
)
def test_images(both: Both, args: list[str], fmt: str | None) -> None:
    format_args = ["--format", fmt] if fmt else []
    theirs, ours = both.run("images", *args, *format_args)
    same_rows(theirs, ours, header=fmt is None or fmt.startswith("table"))
    # The images themselves come in the same order (newest first).
    theirs, ours = both.run("images", *args, "--format", "{{.ID}}")
    assert image_order(ours) == image_order(theirs)


def test_images_quiet(both: Both) -> None:
    for args in (["-q"], ["-q", "--no-trunc"], ["-qa"]):
        theirs, ours = both.run("images", *args)
        same_rows(theirs, ours, header=False)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--no-trunc"],
        ["-H=false"],
        ["--human=false", "--no-trunc"],
        ["-q"],
        ["-q", "--no-trunc"],
        ["--format", "{{json .}}"],
        ["--format", "table {{.ID}}\\t{{.CreatedBy}}\\t{{.Comment}}"],
        ["--format", "{{.ID}}: {{.CreatedAt}} {{.Size}} {{len .CreatedBy}}"],
    ],
)
def test_history(both: Both, args: list[str]) -> None:
    theirs, ours = both.run("history", *args, "fmt/app:1")
    same_lines(theirs, ours)


@pytest.mark.parametrize(
    "template",
    [
        "{{.Id}} {{.Parent}} {{json .RepoTags}} {{json .RepoDigests}}",
        "{{.Size}} {{.VirtualSize}} {{.Os}}/{{.Architecture}} {{.Comment}} {{.Created}}",
        "{{.Config.Env}} {{.Config.Cmd}} {{.Config.Entrypoint}} {{.Config.WorkingDir}}",
        '{{.Config.Labels}} {{json .Config.Labels}} {{index .Config.Labels "tier"}}',
        "{{.Config.ExposedPorts}} {{.Config.Volumes}} {{.Config.Healthcheck}} {{.Config.OnBuild}}",
        "{{json .Config}}",
        "{{json .ContainerConfig}}",
        "{{.Config}}",
        "{{json .RootFS}} {{len .RootFS.Layers}} {{.RootFS.Type}}",
        "{{range $k, $v := .Config.Labels}}{{$k}}={{$v}};{{end}}",
        "{{range .RepoTags}}{{println .}}{{end}}",
        "{{with .Config.User}}user {{.}}{{else}}root{{end}}",
        "{{.Container}}|{{.DockerVersion}}|{{.Author}}",
    ],
)
def test_inspect(both: Both, template: str) -> None:
    theirs, ours = both.run("inspect", "-f", template, "fmt/app:1", "fmt/base:1")
    same_lines(theirs, ours)


def test_a_template_error_is_the_same_line(both: Both) -> None:
    for args in (
        ["images", "--format", "{{.Nope}}"],
        ["history", "--format", "{{.ID | printf}}x{{.Nope}}", "fmt/base:1"],
        ["inspect", "-f", "{{.Config.Nope}}", "fmt/app:1"],
        ["images", "--format", "{{nope .ID}}"],  # a parse error: ours names the column too
        ["images", "--format", "{{.ID"],
    ):
        theirs = both.docker.run(*args, check=False)
        ours = both.layerfs(*args, check=False)
        assert theirs.returncode != 0 and ours.returncode != 0
        line = ours.stderr.decode().removeprefix("layerfs: error: ")
        expected = theirs.stderr.decode()
        if "executing" not in line:
            line = re.sub(r"^(template parsing error: template: :\d+):\d+:", r"\1:", line)
        # docker names its Go type (*formatter.imageContext); layerfs says "image".
        expected = re.sub(r"in type \*\w+\.(\w+)Context$", r"in type \1", expected.strip())
        assert line.strip() == expected


# -- the legacy archive with a digest key ------------------------------------------------------


def test_a_legacy_archive_with_digest_keys(
    both: Both, tmp_path: Path, layerfs_cli: LayerfsCli
) -> None:
    base, top = fake_image_id("fmt-legacy-base"), fake_image_id("fmt-legacy-top")
    digest = "sha256:" + "c" * 64
    nodes = [
        (base, {"created": "2015-06-01T00:00:00Z"}, build_tar(tar_file("b", b"base"))),
        (
            top,
            {
                "parent": base,
                "created": "2015-06-02T00:00:00Z",
                "container_config": {"Cmd": ["/bin/sh", "-c", "echo top"]},
            },
            build_tar(tar_file("t", b"top!!"), tar_symlink("l", "t")),
        ),
    ]
    with_digest = tmp_path / "with-digest.tar"
    with_digest.write_bytes(pack(legacy_members(nodes, {"old/box": {"latest": top, digest: top}})))
    without = tmp_path / "without.tar"
    without.write_bytes(pack(legacy_members(nodes, {"old/box": {"latest": top}})))

    out = layerfs_cli("load", "-i", with_digest).stdout.decode().splitlines()
    assert out[-2:] == ["Loaded image: old/box:latest", f"Loaded image: old/box@{digest}"]
    rows = layerfs_cli(
        "images", "--digests", "--format", "{{.Repository}} {{.Tag}} {{.Digest}}", "old/box"
    ).stdout.decode()
    assert rows == f"old/box latest {digest}\n"
    tags = layerfs_cli("inspect", "-f", "{{json .RepoDigests}}", f"old/box@{digest}").stdout
    assert json.loads(tags) == [f"old/box@{digest}"]

    docker = both.docker
    refused = docker.run("load", "-i", with_digest, check=False)
    assert refused.returncode != 0  # the test engine refuses the digest key
    docker.run("load", "-i", without)
    try:
        fmt = "{{.Repository}} {{.Tag}} {{.CreatedSince}} {{.Size}}"
        theirs = docker.run("images", "-a", "--format", fmt, "old/*").stdout.decode()
        ours = layerfs_cli("images", "-a", "--format", fmt, "old/*").stdout.decode()
        assert ours.splitlines() == theirs.splitlines()
        fmt = "{{.CreatedSince}} {{.CreatedBy}} {{.Size}}"
        theirs = docker.run("history", "--format", fmt, "old/box").stdout.decode()
        ours = layerfs_cli("history", "--format", fmt, "old/box").stdout.decode()
        assert ours.splitlines() == theirs.splitlines()
    finally:
        docker.run("rmi", "old/box:latest")  # the module's engine is shared by its tests
