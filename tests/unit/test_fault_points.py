"""Every named step of every store command, killed with SIGKILL there (LAYERFS_FAULT).

Each command runs once in a forked child with ``LAYERFS_FAULT_TRACE`` to list the steps
it passes; then, from the same starting store each time, once per step with
``LAYERFS_FAULT=NAME:N`` so that it dies there. After each death the invariants of
``docs/store-format.md`` are checked: the child died by SIGKILL; the store as the next
command sees it is the state before the command or the state after it (for a multi-image
load also the state after its first image: archives load image by image), nothing in
between; ``fsck --verify`` finds nothing new; tmp/ and journal/ are empty; nothing
was written outside the store but the requested output, which is whole or absent; and
the same command run again succeeds and gives the state after. A fork keeps this fast:
no interpreter start per run.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import ssl
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from layerfs.cli import main as cli_main
from layerfs.fs.commit import commit_upper
from layerfs.fs.upper import STATE_VERSION
from layerfs.registry.client import RegistryOptions
from layerfs.store import codec
from layerfs.store.check import fsck
from layerfs.store.faults import FAULT_ENV, POINTS, TRACE_ENV
from layerfs.store.store import Store
from layerfs.transfer import pull
from tests.archive_builders import docker_members, make_image, make_layer, pack
from tests.fake_registry import FakeRegistry, image_documents, running

BASE = make_layer("base")
MID = make_layer("mid")
TOP = make_layer("top")
OTHER = make_layer("other")
ROOTFS = make_layer("rootfs", ("a", b"1"), ("b", b"22"))


# -- the stores -------------------------------------------------------------------------------


def _start(root: Path) -> None:
    """The store every run starts from: two images sharing a base, tagged."""
    store = Store.open(root)
    archive = root.parent / "start.tar"
    archive.write_bytes(
        pack(
            docker_members(
                [
                    make_image([BASE], ["base/img:1"]),
                    make_image([BASE, MID], ["keep/img:1"], created="2024-02-02T00:00:00Z"),
                ]
            )
        )
    )
    assert cli_main(["--root", str(store.root), "load", "-q", "-i", str(archive)]) == 0
    archive.unlink()


State = tuple[tuple[str, ...], tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]]


def state(root: Path) -> State:
    """What a user can see, without image IDs (an import's ID has its time in it)."""
    store = Store.open(root)
    names = store.tags.by_id()
    images = []
    for image_id, image in store.graph.map().items():
        chain = tuple(store.graph.layers_of(image))
        images.append((chain, tuple(names.get(image_id, []))))
    return tuple(store.layers.diff_ids()), tuple(sorted(images))


def outside(work: Path) -> dict[str, bytes]:
    """Every file of the work directory outside the store, with its content."""
    found = {}
    for path in sorted(work.rglob("*")):
        if path.is_file() and "store" not in path.relative_to(work).parts:
            found[str(path.relative_to(work))] = path.read_bytes()
    return found


# -- the commands -----------------------------------------------------------------------------


@dataclass
class Command:
    name: str
    run: Callable[[Path, Path], int]  # (store root, work dir) -> exit status
    prepare: Callable[[Path], None] = lambda root: None
    output: str | None = None  # a file the command writes outside the store
    removes: bool = False  # rmi/gc/repair: again after it finished is not expected to pass
    partial: Callable[[Path, Path], int] | None = None  # an allowed state between the two
    one_by_one: bool = False  # gc: each layer's removal stands alone
    extra: dict[str, Any] = field(default_factory=dict)


def _cli(*argv: str) -> Callable[[Path, Path], int]:
    def run(root: Path, work: Path) -> int:
        args = [a.replace("{work}", str(work)) for a in argv]
        return cli_main(["--root", str(root), "--quiet", *args])

    return run


def _write_archive(work: Path, images: list[Any], name: str) -> None:
    (work / name).write_bytes(pack(docker_members(images)))


TWO_IMAGES = [
    make_image([BASE, TOP], ["new/top:1"], created="2024-03-03T00:00:00Z"),
    make_image([OTHER], ["new/other:1"], created="2024-04-04T00:00:00Z"),
]


def _prepare_load(root: Path) -> None:
    _write_archive(root.parent, TWO_IMAGES, "two.tar")
    _write_archive(root.parent, TWO_IMAGES[:1], "first.tar")


def _prepare_import(root: Path) -> None:
    (root.parent / "rootfs.tar").write_bytes(ROOTFS)


def _prepare_unused(root: Path) -> None:
    store = Store.open(root)
    for data in (OTHER, ROOTFS):
        store.layers.ingest(io.BytesIO(data)).publish()


def _prepare_damage(root: Path) -> None:
    store = Store.open(root)
    image = store.tags.lookup_image("keep/img:1")
    assert image.layer is not None
    tar = store.layers.tar_path(image.layer)
    tar.write_bytes(tar.read_bytes().replace(b"midmidmid", b"MIDMIDMID"))


def _prepare_upper(root: Path) -> None:
    store = Store.open(root)
    image = store.tags.lookup_image("keep/img:1")
    upper = root.parent / "upper"
    (upper / "data").mkdir(parents=True)
    (upper / "data" / "0").write_bytes(b"hello\n")
    row = [b"hello", "f", 0o644, 0, 0, 6, 1_700_000_000 * 10**9, 0, b"", 0, 0, None, None]
    doc = {"version": STATE_VERSION, "image": image.id, "init": False, "rows": [row]}
    (upper / "state").write_bytes(codec.pack(doc))


def _commit(root: Path, work: Path) -> int:
    store = Store.open(root)
    image = store.tags.lookup_image("keep/img:1")
    commit_upper(store, work / "upper", image.id, "committed/img:1", message="m")
    return 0


def _pull(root: Path, work: Path) -> int:
    host = (work / "registry").read_text()
    options = RegistryOptions(insecure_registries=(host,), retries=0, use_config=False)
    pull(Store.open(root), f"{host}/lib/pulled:1", options=options, max_concurrent=1)
    return 0


COMMANDS = [
    Command("import", _cli("import", "{work}/rootfs.tar", "imported/img:1"), _prepare_import),
    Command(
        "load",
        _cli("load", "-i", "{work}/two.tar"),
        _prepare_load,
        partial=_cli("load", "-i", "{work}/first.tar"),
    ),
    Command("pull", _pull),
    Command("commit", _commit, _prepare_upper),
    Command("tag", _cli("tag", "-f", "keep/img:1", "keep/img:again")),
    Command("rmi", _cli("rmi", "keep/img:1"), removes=True),
    Command("gc", _cli("gc"), _prepare_unused, removes=True, one_by_one=True),
    Command("repair", _cli("fsck", "--verify", "--repair"), _prepare_damage, removes=True),
    Command("save", _cli("save", "-o", "{work}/out.tar", "keep/img:1"), output="out.tar"),
]


# -- running in a child -----------------------------------------------------------------------


def in_child(command: Callable[[Path, Path], int], root: Path, env: dict[str, str]) -> int:
    """Run ``command`` in a forked child; its exit status, or -signal when it was killed."""
    log = root.parent / "child.log"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with the registry's thread
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115
            os.environ.update(env)
            status = command(root, root.parent)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(status)
    _, raw = os.waitpid(pid, 0)
    if os.WIFSIGNALED(raw):
        return -os.WTERMSIG(raw)
    return os.WEXITSTATUS(raw)


@pytest.fixture(scope="module")
def registry() -> Iterator[FakeRegistry]:
    with running() as reg, pytest.MonkeyPatch.context() as patch:
        # A plain-HTTP registry needs no certificates; loading the system's costs 0.1 s
        # per client, twice per step here.
        patch.setattr(
            "layerfs.registry.client.ssl.create_default_context",
            lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
        )
        blobs = [__import__("gzip").compress(x, mtime=0) for x in (BASE, TOP)]
        from tests.archive_builders import sha256

        config, manifest = image_documents(blobs, [sha256(BASE), sha256(TOP)])
        for blob in blobs:
            reg.add_blob("lib/pulled", blob)
        reg.add_blob("lib/pulled", config)
        reg.add_manifest(
            "lib/pulled", "1", manifest, "application/vnd.docker.distribution.manifest.v2+json"
        )
        yield reg


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("start") / "store"
    _start(root)
    return root


def fresh(start: Path, work: Path, command: Command, registry: FakeRegistry) -> Path:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    root = work / "store"
    shutil.copytree(start, root, symlinks=True)
    (work / "registry").write_text(registry.host)
    command.prepare(root)
    return root


def problems(root: Path) -> list[str]:
    return sorted(fsck(Store.open(root), verify=True).problems)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_a_kill_at_every_named_step_leaves_the_store_whole(
    command: Command, start: Path, tmp_path: Path, registry: FakeRegistry
) -> None:
    work = tmp_path / "work"
    # The states a kill may leave: before, after, and (image by image) after a first part.
    root = fresh(start, work, command, registry)
    before, before_outside, before_problems = state(root), outside(work), problems(root)
    root = fresh(start, work, command, registry)
    allowed = {before}
    if command.partial is not None:
        assert in_child(command.partial, root, {}) == 0, (work / "child.log").read_text()
        allowed.add(state(root))
        root = fresh(start, work, command, registry)
    trace = tmp_path / "trace"
    trace.unlink(missing_ok=True)
    assert in_child(command.run, root, {TRACE_ENV: str(trace)}) == 0, (
        work / "child.log"
    ).read_text()
    after = state(root)
    allowed.add(after)
    assert after != before or command.output is not None  # save changes no image
    output = (work / command.output).read_bytes() if command.output else None
    steps = [tuple(line.split()) for line in trace.read_text().splitlines()]
    assert steps, "the command passed no named step"
    for name, count in steps:
        where = f"{command.name} killed at {name}:{count}"
        root = fresh(start, work, command, registry)
        status = in_child(command.run, root, {FAULT_ENV: f"{name}:{count}"})
        assert status == -signal.SIGKILL, f"{where}: exit {status}"
        seen = state(root)  # opening the store settles what the kill left pending
        if command.one_by_one:
            assert seen[1] == before[1] and set(after[0]) <= set(seen[0]) <= set(before[0])
        else:
            assert seen in allowed, f"{where}: a state between before and after: {seen}"
        assert problems(root) == before_problems or (command.removes and problems(root) == []), (
            f"{where}: {problems(root)}"
        )
        assert os.listdir(root / "tmp") == [], where
        assert os.listdir(root / "journal") == [], where
        now = outside(work)
        if command.output is not None and command.output in now:
            assert now.pop(command.output) == output, f"{where}: a half-written output"
        for ignored in ("child.log",):
            now.pop(ignored, None)
        expected = {k: v for k, v in before_outside.items() if k != "child.log"}
        assert now == expected, f"{where}: files outside the store changed"
        if command.removes and (seen == after or command.one_by_one):
            continue  # already done: rmi of a removed name fails, as docker's does
        status = in_child(command.run, root, {})
        log = (work / "child.log").read_text()
        assert status == 0, f"{where}, then again: exit {status}: {log}"
        if seen != after:  # (an import done twice leaves the first image untagged, as docker)
            assert state(root) == after, where
        assert fsck(Store.open(root)).clean or command.name == "repair", where


def test_every_named_step_is_reached_by_some_command(
    start: Path, tmp_path: Path, registry: FakeRegistry
) -> None:
    reached: set[str] = set()
    for command in COMMANDS:
        work = tmp_path / command.name
        root = fresh(start, work, command, registry)
        trace = work / "trace"
        assert in_child(command.run, root, {TRACE_ENV: str(trace)}) == 0
        reached |= {line.split()[0] for line in trace.read_text().splitlines()}
    assert reached == set(POINTS)
