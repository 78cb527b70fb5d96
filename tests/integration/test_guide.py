"""Every runnable transcript of docs/guide.md, run for real and compared by shape.

The blocks marked ``<!-- runnable -->`` run in order in one session (see tests/guide.py):
a fresh working directory standing for the guide's ``/tmp/guide`` (``/tmp/gXXXX``, a path
as long, so that aligned columns stay aligned), a fresh store, two registries standing
for the guide's ``127.0.0.1:5000`` (plain) and ``127.0.0.1:5001`` (htpasswd, user alice).
The transcripts use mounts, ``layerfs run``, ``chroot`` and ``unshare``, so this runs as
root with FUSE. With ``LAYERFS_UPDATE_GUIDE=1`` it writes what the run printed back into
docs/guide.md instead of comparing (how the transcripts are regenerated).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guide import GUIDE_DIR, Session, parse, rewritten, same_shape, session_env
from tests.helpers import REPO_ROOT

from .conftest import RegistryFactory, kill_processes_naming, unmount_all_under

pytestmark = [pytest.mark.integration, pytest.mark.fuse, pytest.mark.registry]

GUIDE = REPO_ROOT / "docs" / "guide.md"


def _short_workdir() -> Path:
    """A fresh directory whose path is as long as the guide's /tmp/guide, so that tables
    and findmnt's columns stay aligned when one path stands for the other."""
    for _ in range(1000):
        path = Path("/tmp/g" + secrets.token_hex(2))
        assert len(str(path)) == len(GUIDE_DIR)
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            continue
        return path
    raise AssertionError("no free /tmp/gXXXX directory")


def test_the_guides_transcripts(tmp_path: Path, registry_server: RegistryFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("the guide's transcripts run as root (layerfs run, chroot, unshare)")
    for tool in ("htpasswd", "findmnt", "unshare", "chroot"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(
        subprocess.run(
            ["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True, check=True
        ).stdout
    )
    plain, auth = registry_server(), registry_server(htpasswd=htpasswd)
    workdir = _short_workdir()
    (workdir / "home").mkdir()
    bin_dir = str(Path(sys.executable).parent)
    session = Session(
        str(workdir),
        session_env(str(workdir), bin_dir),
        {GUIDE_DIR: str(workdir), "127.0.0.1:5000": plain.host, "127.0.0.1:5001": auth.host},
    )
    text = GUIDE.read_text()
    blocks = parse(text)
    assert blocks, "docs/guide.md has no runnable transcript"
    update = bool(os.environ.get("LAYERFS_UPDATE_GUIDE"))
    lines = text.split("\n")
    failures: list[str] = []
    try:
        for block in blocks:
            if block.script:
                session.script(block.body)
                continue
            new_body: list[str] = []
            for step in block.steps:
                actual = session.run(step.command).split("\n")
                if update:
                    new_body += [f"$ {step.command}", *rewritten(step.expected, actual)]
                elif not same_shape(step.expected, actual):
                    failures.append(
                        f"docs/guide.md line {step.line + 1}: $ {step.command}\n"
                        f"--- the guide shows ---\n" + "\n".join(step.expected) + "\n"
                        "--- this run printed ---\n" + "\n".join(actual).rstrip()
                    )
            if update:
                block.body = new_body
    finally:
        unmount_all_under(workdir)
        kill_processes_naming(workdir)
        unmount_all_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    if update:
        for block in reversed(blocks):
            lines[block.start + 1 : block.end] = block.body
        GUIDE.write_text("\n".join(lines))
        return
    assert not failures, "\n\n".join(failures)
