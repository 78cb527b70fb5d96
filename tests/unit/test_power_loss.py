"""A power cut at every fsync and rename of a load: what the disk kept is a whole store.

The test runs a load in this process with ``os.fsync`` and ``os.rename`` watched. It
models what survives a power cut: a file's bytes as of its last fsync (nothing, if it
was never fsynced) and a directory's entries as of its last fsync (the store as it was
before the load counts as synced). At every fsync and before and after every rename
it builds that surviving store in a new directory, opens it (which settles any pending
record) and checks it: ``fsck --verify`` finds nothing, and the images and tags are those
before the load, after it, or after its first image (archives load image by image). So
no metadata ever points at bytes that were not made durable first.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from layerfs.cli import main as cli_main
from layerfs.store.check import fsck
from layerfs.store.store import Store
from tests.archive_builders import docker_members, make_image, make_layer, pack
from tests.unit.test_fault_points import state

BASE = make_layer("base")
TOP = make_layer("top", ("a", b"a" * 3000), ("b", b"b" * 10))
OTHER = make_layer("other")


class Disk:
    """What the disk holds for sure: entries and bytes as of their last fsync."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listing: dict[int, dict[str, tuple[int, bool]]] = {}
        self.content: dict[int, bytes] = {}
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                self._sync_dir(path)
            elif path.is_file():
                self.content[path.stat().st_ino] = path.read_bytes()

    def _sync_dir(self, path: Path) -> None:
        self.listing[path.stat().st_ino] = {
            e.name: (e.inode(), e.is_dir(follow_symlinks=False)) for e in os.scandir(path)
        }

    def fsynced(self, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not path.is_relative_to(self.root):
            return
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self._sync_dir(path)
        else:
            self.content[os.fstat(fd).st_ino] = path.read_bytes()

    def survivor(self, into: Path) -> Path:
        """The store a power cut now would leave, written under ``into``."""
        self._build(self.root.stat().st_ino, into)
        return into

    def _build(self, ino: int, path: Path) -> None:
        path.mkdir(mode=0o700)
        for name, (child, is_dir) in self.listing.get(ino, {}).items():
            if is_dir:
                self._build(child, path / name)
            else:
                (path / name).write_bytes(self.content.get(child, b""))


def test_a_power_cut_at_any_fsync_or_rename_of_a_load_leaves_a_whole_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    first = make_image([BASE, TOP], ["new/top:1"], created="2024-03-03T00:00:00Z")
    second = make_image([BASE, OTHER], ["new/other:1"], created="2024-04-04T00:00:00Z")
    archive = tmp_path / "two.tar"
    archive.write_bytes(pack(docker_members([first, second])))
    first_only = tmp_path / "first.tar"
    first_only.write_bytes(pack(docker_members([first])))
    seed = tmp_path / "seed.tar"
    seed.write_bytes(pack(docker_members([make_image([BASE], ["base/img:1"])])))

    def load(where: Path, what: Path) -> None:
        assert cli_main(["--root", str(where), "--quiet", "load", "-q", "-i", str(what)]) == 0

    load(root, seed)
    before = state(root)
    partial = tmp_path / "partial"
    load(partial, seed)
    load(partial, first_only)
    allowed = {before, state(partial)}

    disk = Disk(root)
    snapshots: list[str] = []
    checked: list[tuple[str, Any]] = []

    checking: list[bool] = []  # set while a survivor is checked: its own writes pass

    def boundary(what: str) -> None:
        if checking:
            return
        checking.append(True)
        try:
            survivor = disk.survivor(tmp_path / f"cut{len(snapshots)}")
            snapshots.append(what)
            store = Store.open(survivor)  # settles what was pending
            report = fsck(store, verify=True)
            checked.append((what, (report.problems, report.leftovers, state(survivor))))
        finally:
            checking.clear()

    real_fsync: Callable[[int], None] = os.fsync
    real_rename = os.rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if not checking:
            disk.fsynced(fd)
            boundary(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        boundary(f"before rename {src} -> {dst}")
        real_rename(src, dst, **kw)
        boundary(f"after rename {src} -> {dst}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    load(root, archive)
    monkeypatch.undo()
    allowed.add(state(root))

    assert len(snapshots) > 40  # every layer, node, record and tag write was cut
    for what, (problems, leftovers, seen) in checked:
        assert problems == [], f"power cut at {what}: {problems}"
        assert leftovers == [], f"power cut at {what}: {leftovers}"
        assert seen in allowed, f"power cut at {what}: a state between before and after"
    assert {seen for _, (_, _, seen) in checked} == allowed  # each state was met
