"""The global options (--root, --debug, --quiet) come before the command, for ``layerfs``
and the stand-alone ``layerfs-load``/``layerfs-save`` alike; every command module is part
of the command line (one that cannot be imported is an error, never a missing command)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from layerfs import cli


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["images"], "images"),
        (["--root", "/s", "images"], "images"),
        (["--root=/s", "--debug", "--quiet", "pull", "x"], "pull"),
        (["--debug", "--root", "images"], None),  # "images" is the value of --root
        (["--version"], None),
        (["--help", "images"], None),
        ([], None),
    ],
)
def test_the_command_is_found_past_the_global_options(argv: list[str], command: str | None) -> None:
    assert cli._command_of(argv) == command


def test_the_standalone_tools_take_every_form_of_the_global_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for root in (["--root", str(tmp_path / "a")], [f"--root={tmp_path / 'b'}"]):
        assert cli.save_main([*root, "--debug", "-o", str(tmp_path / "x.tar"), "nope:1"]) == 1
        assert "layerfs-save: error:" in capsys.readouterr().err
    assert (tmp_path / "a").is_dir()
    assert (tmp_path / "b").is_dir()


def test_a_command_module_that_cannot_be_imported_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "layerfs.cli.images", None)  # import raises
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser(["images"])
