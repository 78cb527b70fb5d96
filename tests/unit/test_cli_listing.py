"""The everyday commands in-process, as a docker user types them: images, history,
inspect, tag, rmi, image prune, system df, mounts, and docker's ``image`` aliases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from layerfs.cli import build_parser, main
from layerfs.cli.system import IMAGE_COMMANDS
from tests.helpers import build_tar, tar_file, tar_symlink

TAR = build_tar(tar_file("etc/motd", b"hello\n"), tar_symlink("bin/sh", "busybox"))


class Cli:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.capsys = capsys

    def __call__(self, *args: str, status: int = 0) -> str:
        code = main(["--root", str(self.root), *args])
        out, err = self.capsys.readouterr()
        assert code == status, err
        self.err = err
        return out


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    tar = tmp_path / "rootfs.tar"
    tar.write_bytes(TAR)
    run = Cli(tmp_path / "store", capsys)
    run("import", "-q", "-m", "first", "-c", "LABEL tier=back", str(tar), "ex/app:1")
    run("tag", "ex/app:1", "ex/app:2")
    run("tag", "ex/app:1", "other/app:1")
    return run


def image_id(cli: Cli) -> str:
    return cli("images", "-q", "--no-trunc", "ex/app:1").strip().removeprefix("sha256:")


def test_images_default_table(cli: Cli) -> None:
    lines = cli("images").splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["ex/app", "1"],
        ["ex/app", "2"],
        ["other/app", "1"],
    ]
    # Docker's tabwriter: columns are the widest cell plus 3, at least 10 (TAG).
    assert lines[1].startswith("ex/app       1         ")


def test_images_quiet_prints_an_id_per_row_as_docker(cli: Cli) -> None:
    ids = cli("images", "-q").split()
    assert len(ids) == 3 and len(set(ids)) == 1 and len(ids[0]) == 12


def test_images_repository_tag_argument_and_filters(cli: Cli) -> None:
    fmt = ["--format", "{{.Repository}}:{{.Tag}}"]
    assert cli("images", "ex/app:2", *fmt).split() == ["ex/app:2"]
    assert cli("images", "ex/app", *fmt).split() == ["ex/app:1", "ex/app:2"]
    assert cli("images", "*/app", "--filter", "reference=other/*", *fmt).split() == [
        "ex/app:1",
        "ex/app:2",
        "other/app:1",
    ]
    assert cli("images", "-f", "label=tier=back", "-f", "dangling=false", *fmt).split() == [
        "ex/app:1",
        "ex/app:2",
        "other/app:1",
    ]
    assert cli("images", "-f", "dangling=true", *fmt) == ""
    cli("images", "-f", "colour=red", status=2)
    assert "invalid filter 'colour'" in cli.err


def test_images_json_and_table_templates(cli: Cli) -> None:
    rows = [json.loads(line) for line in cli("images", "--format", "json").splitlines()]
    assert {r["Repository"] + ":" + r["Tag"] for r in rows} == {
        "ex/app:1",
        "ex/app:2",
        "other/app:1",
    }
    assert rows[0]["Digest"] == "<none>" and len(rows[0]["ID"]) == 12
    table = cli("images", "--format", "table {{.ID}}\\t{{.Tag}}", "--no-trunc", "ex/app:1")
    assert table.splitlines()[0].split() == ["IMAGE", "ID", "TAG"]
    assert table.splitlines()[1].startswith("sha256:")
    cli("images", "--format", "{{.Nope}}", status=2)
    assert cli.err.startswith("layerfs: error: template parsing error: template: :1:2:")
    assert len(cli.err.splitlines()) == 1


def test_history_human_and_formats(cli: Cli) -> None:
    name = "ex/app:1"
    assert cli("history", name).splitlines()[0].split() == [
        "IMAGE",
        "CREATED",
        "CREATED",
        "BY",
        "SIZE",
        "COMMENT",
    ]
    raw = cli("history", "-H=false", name).splitlines()
    assert raw[0].split()[:3] == ["IMAGE", "CREATED", "AT"]
    size = len(b"hello\n") + len("busybox")  # files plus symlink targets, as overlay2
    assert str(size) in raw[1].split()
    # pflag's -H takes no separate value: a word after it is the IMAGE.
    assert cli("history", "-H", name, "--format", "{{.Comment}}") == "first\n"
    assert cli("history", "--human=false", "--format", "{{.Size}}", name) == f"{size}\n"
    assert cli("history", "-q", "--no-trunc", name).startswith("sha256:")


def test_inspect_templates_and_missing_images(cli: Cli) -> None:
    out = cli("inspect", "-f", "{{.Config.Labels}} {{.Config.Env}} {{json .RepoTags}}", "ex/app:2")
    assert out == 'map[tier:back] [] ["ex/app:1","ex/app:2","other/app:1"]\n'
    doc = json.loads(cli("inspect", "ex/app:1"))[0]
    assert list(doc["Config"])[:3] == ["Hostname", "Domainname", "User"]
    assert doc["Config"]["Env"] is None and doc["ContainerConfig"]["Cmd"] is None
    assert doc["Size"] == len(b"hello\n") + len("busybox")
    found = cli("inspect", "--format", "{{.Comment}}", "ex/app:1", "nope", status=1)
    assert found == "first\n" and cli.err == "layerfs: error: No such image: nope\n"


def test_tag_moves_an_existing_tag(cli: Cli, tmp_path: Path) -> None:
    other = tmp_path / "other.tar"
    other.write_bytes(build_tar(tar_file("x", b"x")))
    cli("import", "-q", str(other), "ex/other:1")
    assert cli("tag", "ex/other:1", "ex/app:2") == ""
    assert cli("tag", "-f", "ex/other:1", "ex/app:1") == ""
    assert cli("images", "--format", "{{.Tag}}", "ex/app").split() == ["1", "2"]
    assert cli("images", "-q", "ex/app:1") == cli("images", "-q", "ex/other:1")


def test_rmi_of_several_names(cli: Cli) -> None:
    full = image_id(cli)
    out = cli("rmi", "ex/app:2", "nope", "other/app:1", status=1)
    assert out.splitlines() == ["Untagged: ex/app:2", "Untagged: other/app:1"]
    assert cli.err == "layerfs: error: No such image: nope\n"
    out = cli("image", "rm", "ex/app:1").splitlines()
    assert out[:2] == ["Untagged: ex/app:1", f"Deleted: sha256:{full}"]
    assert out[2].startswith("Deleted: sha256:")  # its layer


def test_image_prune(cli: Cli, tmp_path: Path) -> None:
    other = tmp_path / "other.tar"
    other.write_bytes(build_tar(tar_file("x", b"x" * 100)))
    cli("import", "-q", str(other))  # a dangling image
    assert cli("image", "prune", "-f").splitlines()[0] == "Deleted Images:"
    assert cli("image", "prune", "-f") == "Total reclaimed space: 0B\n"
    out = cli("image", "prune", "-a", "-f", "--filter", "until=1h")
    assert out == "Total reclaimed space: 0B\n"  # all were made less than an hour ago
    out = cli("image", "prune", "-a", "-f").splitlines()
    assert out[0] == "Deleted Images:" and out[-1].startswith("Total reclaimed space: ")
    assert "untagged: ex/app:1" in out and cli("images", "-q") == ""


def test_image_prune_asks_first(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    out = cli("image", "prune", "-a")
    assert out.startswith("WARNING! This will remove all images not mounted")
    assert len(cli("images", "-q").split()) == 3


def test_system_df_and_mounts(cli: Cli) -> None:
    lines = cli("system", "df").splitlines()
    assert lines[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
    assert [line.split()[0] for line in lines[1:]] == ["Images", "Layers", "Mounts", "Upper"]
    assert lines[1].split()[1:3] == ["1", "0"]
    assert cli("system", "df", "--format", "{{.Type}}={{.TotalCount}}").splitlines()[1] == (
        "Layers=1"
    )
    assert cli("mounts") == (
        "MOUNTPOINT   IMAGE     IMAGE ID   MODE      UPPER     PID       STATUS\n"
    )
    assert cli("mounts", "--format", "json") == ""


def _handler(argv: list[str]) -> object:
    args: argparse.Namespace = build_parser().parse_args(argv)
    return args.handler


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(IMAGE_COMMANDS))
def test_every_image_alias_is_the_command_it_names(name: str) -> None:
    command, aliases = IMAGE_COMMANDS[name]
    top = _commands(build_parser())
    original, image = top[command], _commands(top["image"])
    copy = image[name]
    assert copy.get_default("handler") is original.get_default("handler")
    assert {a.dest for a in copy._actions} == {a.dest for a in original._actions}
    assert copy.description == original.description
    for alias in aliases:
        assert image[alias] is copy


def test_image_aliases_parse_like_their_commands() -> None:
    assert _handler(["image", "ls", "-a", "--filter", "dangling=true"]) is _handler(["images"])
    assert _handler(["image", "list"]) is _handler(["images"])
    assert _handler(["image", "remove", "x"]) is _handler(["rmi", "x"])
    assert _handler(["image", "inspect", "-f", "{{.Id}}", "x"]) is _handler(["inspect", "x"])
    assert _handler(["image", "pull", "-a", "x"]) is _handler(["pull", "x"])
    assert _handler(["image", "push", "-a", "x"]) is _handler(["push", "x"])
