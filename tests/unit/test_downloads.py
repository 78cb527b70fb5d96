"""Download locks: a layer fetched by one copy is waited for and taken by another.

Two ``StoreDestination`` objects on one store stand for two processes: an ``flock`` is
held per open file, so two opens of one lock file exclude each other within a process
as they do across processes. A child process stands for a downloader that dies.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from layerfs.copy import WAITING_FOR_OTHER, copy
from layerfs.model.manifest import MEDIA_DOCKER_LAYER_GZIP
from layerfs.store.check import fsck
from layerfs.store.store import Store
from layerfs.transports.base import ImageSource, LayerDesc, SourceImage
from layerfs.transports.local import StoreDestination
from tests.helpers import build_tar, tar_file

TARS = [build_tar(tar_file(f"layer{i}", f"data {i}".encode() * 100)) for i in range(2)]
BLOBS = [gzip.compress(t, mtime=0) for t in TARS]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image(name: str) -> SourceImage:
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in TARS]},
        }
    ).encode()
    layers = [
        LayerDesc(digest(t), digest(b), len(b), MEDIA_DOCKER_LAYER_GZIP)
        for t, b in zip(TARS, BLOBS, strict=True)
    ]
    return SourceImage(config=config, layers=layers, references=[name], name=name)


class Source(ImageSource):
    """Serves the blobs; counts how often each is opened; may hold one until released."""

    def __init__(self, name: str, gate: threading.Event | None = None) -> None:
        self._image = image(name)
        self.gate = gate
        self.opened: list[int] = []
        self.started = threading.Event()

    def images(self) -> list[SourceImage]:
        return [self._image]

    def open_layer(self, image: SourceImage, index: int) -> io.BytesIO:
        self.opened.append(index)
        if self.gate is not None and index == 0:
            self.started.set()
            assert self.gate.wait(30)
        return io.BytesIO(BLOBS[index])

    def close(self) -> None:
        pass


class Statuses:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def start(self, key: str, label: str, total: int | None = None, status: str = "") -> None:
        self.lines.append((key, status))

    def status(self, key: str, status: str) -> None:
        self.lines.append((key, status))

    def finish(self, key: str, status: str = "Done") -> None:
        self.lines.append((key, status))

    def advance(self, key: str, n: int) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def test_a_second_copy_waits_for_the_first_and_fetches_nothing(store: Store) -> None:
    gate = threading.Event()
    first = Source("one:1", gate)
    errors: list[BaseException] = []

    def run_first() -> None:
        try:
            copy(first, StoreDestination(store), keep_going=False)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run_first)
    thread.start()
    assert first.started.wait(30)  # the first holds layer 0's lock, its blob not yet read
    second = Source("two:1")
    statuses = Statuses()
    waiter = threading.Thread(
        target=copy,
        args=(second, StoreDestination(Store.open(store.root))),
        kwargs={"progress": statuses, "keep_going": False},
    )
    waiter.start()
    key = digest(TARS[0])
    deadline = 300
    while (key, WAITING_FOR_OTHER) not in statuses.lines and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert (key, WAITING_FOR_OTHER) in statuses.lines
    gate.set()
    thread.join(30)
    waiter.join(30)
    assert not errors
    assert first.opened[0] == 0 and 0 not in second.opened  # waited for, then taken
    for index in (0, 1):  # whoever fetched a layer, nobody fetched it twice
        assert first.opened.count(index) + second.opened.count(index) == 1
    assert statuses.lines.index((key, WAITING_FOR_OTHER)) < statuses.lines.index((key, "Complete"))
    fresh = Store.open(store.root)
    assert fresh.tags.lookup_image("one:1").id == fresh.tags.lookup_image("two:1").id
    assert fsck(fresh, verify=True).clean
    assert list(store.tmp.iterdir()) == []


def test_a_layer_staged_by_a_live_process_is_taken_without_waiting(store: Store) -> None:
    first = StoreDestination(store)
    layer = image("x:1").layers[0]
    with first.claim_layer(layer) as needed:
        assert needed
        first.put_layer(io.BytesIO(BLOBS[0]), layer, "layer")
    second = StoreDestination(Store.open(store.root))
    other = image("x:1").layers[0]
    with second.claim_layer(other) as needed:
        assert not needed  # staged by the first (still alive), linked, not fetched
    staged = second._staged[digest(TARS[0])]
    assert (staged.staging / "layer.tar").read_bytes() == TARS[0]
    assert os.stat(staged.staging / "layer.tar").st_nlink == 2
    first.close()
    second.close()
    assert list(store.tmp.iterdir()) == []


def test_what_a_dead_process_staged_is_not_taken(store: Store) -> None:
    layer = image("x:1").layers[0]
    dead = store.tmp / "layer-999999999-deadbeef"  # no such PID
    dead.mkdir()
    (dead / "info.json").write_text("{}")
    lock = store.root / "downloads" / digest(BLOBS[0])[7:]
    lock.parent.mkdir()
    lock.write_text(str(dead))
    with StoreDestination(store).claim_layer(layer) as needed:
        assert needed


def test_a_dead_downloader_blocks_nobody(store: Store) -> None:
    lock = store.root / "downloads" / digest(BLOBS[0])[7:]
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        waits: list[int] = []
        destination = StoreDestination(store)

        def kill_holder() -> None:
            waits.append(1)
            holder.send_signal(signal.SIGKILL)

        with destination.claim_layer(image("x:1").layers[0], kill_holder) as needed:
            assert needed  # the lock died with its holder; nothing to take
        assert waits == [1]
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_gc_removes_the_lock_files_nobody_holds(store: Store) -> None:
    from layerfs.store.check import gc

    destination = StoreDestination(store)
    layers = image("x:1").layers
    with destination.claim_layer(layers[0]):
        pass  # released: its file stays for the next pull
    assert layers[1].digest is not None
    with destination.claim_layer(layers[1]):
        gc(store)  # the released one goes, the held one stays
        assert [p.name for p in (store.root / "downloads").iterdir()] == [layers[1].digest[7:]]
    gc(store)
    assert list((store.root / "downloads").iterdir()) == []
