"""Download locks: one process fetches a blob into the store, the others wait and share it.

Two pulls of the same image (or of images sharing layers) must not download a layer
twice. ``downloads/<hex>`` is an ``flock`` file per blob (keyed by the compressed digest,
or the diff ID when a source has no other): whoever holds it fetches the blob; a second
process finds it held, says "Waiting" and waits for it.

What the waiter gets: the fetching process stages its layer under tmp/ and publishes it
only with its image (a layer and its node appear together), so when it has verified the
layer it writes the staging directory's path into the lock file before releasing the
lock. The waiter then hard-links that staging directory's files into a staging
directory of its own (no copy; both processes own a complete, verified copy and publish
or discard it independently) or, if the layer has been published meanwhile, holds the
published one. A staging directory is only taken from a process that is still alive
(its owner, named in the directory's name, still holds its lock; see
:mod:`layerfs.store.files`): what a dead process left is not trusted.

A process that dies while fetching drops its lock with it (the kernel releases an
``flock`` when its holder exits), so nobody waits for a dead downloader: the next waiter
gets the lock, finds nothing to take and fetches the blob itself. Lock files are
reused; ``gc`` removes the ones nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from layerfs.errors import IntegrityError
from layerfs.model.digest import hex_of, is_sha256_digest
from layerfs.store.files import (
    make_temp_dir,
    owner_alive,
    owner_of,
    remove_tree,
    remove_unheld_lock_files,
)
from layerfs.store.layers import LayerInfo, LayerStore, StagedLayer

POLL = 0.05  # seconds between two tries of a held lock (a waiting thread stays interruptible)


class Claim:
    """What a claim found once it holds the lock, and what its holder fetched."""

    def __init__(self, advertised: str) -> None:
        self.advertised = advertised  # a staging directory another process wrote, or ""
        self.waited = False
        self.fetched: StagedLayer | None = None  # set by the holder once it staged the layer


class DownloadLocks:
    def __init__(self, root: Path, layers: LayerStore) -> None:
        self.root = root
        self.layers = layers

    def path(self, key: str) -> Path | None:
        return self.root / hex_of(key) if is_sha256_digest(key) else None

    @contextlib.contextmanager
    def claim(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[Claim]:
        """Hold the download lock of ``key`` (waiting for another process if needed).

        The caller fetches the blob unless the claim lets it take the layer (see
        :meth:`take`); if it sets ``claim.fetched``, that staging directory is offered to
        the next process when the lock is released.
        """
        path = self.path(key)
        if path is None:
            yield Claim("")
            return
        self.root.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited and on_wait is not None:
                        on_wait()
                    waited = True
                    time.sleep(POLL)
            claim = Claim(os.pread(fd, 4096, 0).decode("utf-8", "replace").strip())
            claim.waited = waited
            yield claim
            if claim.fetched is not None:
                text = str(claim.fetched.staging).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, text, 0)  # no fsync: it is only worth anything while we live
        finally:
            os.close(fd)  # drops the lock

    def take(
        self, claim: Claim, tmp_root: Path, *, diff_id: str | None, blob_digest: str | None
    ) -> StagedLayer | None:
        """A staging copy of the layer another live process fetched, or None.

        The other staging directory's files are hard-linked into a fresh one of ours after
        checking that it holds the expected layer, complete.
        """
        source = Path(claim.advertised) if claim.advertised else None
        if source is None or source.parent != tmp_root:
            return None
        owner = owner_of(source.name)
        if owner is None or not owner_alive(tmp_root, owner):
            return None
        try:
            info = LayerInfo.from_json((source / "info.json").read_bytes(), str(source))
            if (diff_id is not None and info.diff_id != diff_id) or (
                blob_digest is not None
                and blob_digest != info.diff_id
                and blob_digest not in info.blob_digests
            ):
                return None
            if (source / "layer.tar").stat().st_size != info.tar_size:
                return None
        except (OSError, IntegrityError):
            return None
        staging = make_temp_dir(tmp_root, "layer")
        try:
            for name in ("layer.tar", "index", "info.json"):
                os.link(source / name, staging / name)
        except OSError:
            remove_tree(staging)  # published or discarded under us
            return None
        return StagedLayer(self.layers, staging, info)

    def prune(self) -> int:
        """Remove lock files nobody holds (store lock held by the caller)."""
        return remove_unheld_lock_files(self.root)
