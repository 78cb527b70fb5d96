"""`layerfs run` refuses what it cannot do before it touches anything."""

from __future__ import annotations

from pathlib import Path

import pytest

import layerfs.cli.mount as cli_mount
from layerfs.cli import main


def test_run_refuses_the_root_of_a_user_namespace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli_mount.os, "geteuid", lambda: 0)
    monkeypatch.setattr("layerfs.store.store.in_user_namespace", lambda: True)  # used by run
    status = main(["--root", str(tmp_path / "store"), "run", "busybox:1", "true"])
    assert status == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "layerfs: error: layerfs run needs the host's root; it does not run inside a user namespace"
    )
    assert [line for line in lines[1:] if not line.startswith("hint: ")] == []
    assert not (tmp_path / "store").exists()
