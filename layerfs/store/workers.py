"""Ingest worker processes: big compressed layers are inflated, hashed and indexed apart.

Ingesting a layer is inflating it (isal, zstd), hashing it and writing it, which run
outside Python's GIL, and parsing every tar header, which holds it. Two big layers
ingested by two threads of one process take turns at the parsing, so a pull of several
big layers used about one core. A worker process per core removes that: the pulling
process downloads each blob, checks its digest as it streams and feeds it through a
FIFO in the layer's staging directory to a worker, which runs :meth:`LayerStore.ingest`
into that staging directory (named with the puller's PID, so that it is the puller's
for every rule about staging) and sends back the layer's info. Everything else (the
digest checks, publication, cleanup) stays with the puller.

Workers are forked, never spawned (no second interpreter start-up per pull), and only
from a process that runs a single thread: forking a process with other threads could
copy a lock some thread holds. :meth:`IngestWorkers.start` says None otherwise, and the
caller ingests in its own threads as before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfs.errors import LayerfsError, StoreError
from layerfs.store.files import make_temp_dir, remove_tree
from layerfs.store.layers import LayerInfo, LayerStore, StagedLayer

if TYPE_CHECKING:
    from concurrent.futures import Future, ProcessPoolExecutor

# concurrent.futures.process (and multiprocessing under it) is imported when workers start.

MIN_SIZE = 4 << 20  # compressed bytes: a smaller layer is not worth a trip to a worker
_CHUNK = 1 << 20


class IngestWorkers:
    """A few forked processes that ingest layers streamed to them through FIFOs."""

    def __init__(self, layers: LayerStore, pool: ProcessPoolExecutor) -> None:
        self.layers = layers
        self._pool = pool

    @classmethod
    def start(cls, layers: LayerStore, count: int) -> IngestWorkers | None:
        """``count`` workers, forked now; None where forking is not safe or possible."""
        if count < 1 or threading.active_count() != 1 or not hasattr(os, "fork"):
            return None
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            pool = ProcessPoolExecutor(
                count, mp_context=multiprocessing.get_context("fork"), initializer=_quiet
            )
            for job in [pool.submit(int) for _ in range(count)]:
                job.result()  # every worker forked while this process has one thread
        except (OSError, RuntimeError):
            return None
        return cls(layers, pool)

    def ingest(
        self,
        stream: Any,
        *,
        expected_diff_id: str | None,
        what: str,
    ) -> StagedLayer:
        """``LayerStore.ingest`` of ``stream`` (compressed or not) in a worker."""
        from concurrent.futures.process import BrokenProcessPool

        staging = make_temp_dir(self.layers.tmp_root, "layer")
        fifo = staging / ".input"
        try:
            os.mkfifo(fifo, 0o600)
            job = self._pool.submit(
                _ingest,
                str(self.layers.root),
                str(self.layers.tmp_root),
                str(self.layers.blob_index),
                str(staging),
                str(fifo),
                expected_diff_id,
                what,
            )
            try:
                _feed(stream, fifo, job)
            except BrokenPipeError:
                pass  # the worker stopped reading: its error says why
            info = LayerInfo(**job.result())
        except BrokenProcessPool as exc:
            remove_tree(staging)
            raise StoreError(f"{what}: the ingest worker process died") from exc
        except BaseException:
            remove_tree(staging)
            raise
        return StagedLayer(self.layers, staging, info)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _feed(stream: Any, fifo: Path, job: Future[dict[str, Any]]) -> None:
    """Write ``stream`` into the FIFO the worker reads; fails if the worker never opens it."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if job.done():
                job.result()  # the worker failed before it read: raise its error
                raise StoreError(f"ingest worker ended without reading {fifo}") from None
            time.sleep(0.001)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHUNK)  # fewer switches between the two
        except OSError:
            pass  # the system's limit: keep the default size
        while chunk := stream.read(_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _quiet() -> None:
    """In a worker: Ctrl-C is the puller's to handle (it closes the FIFOs, workers end)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ingest(
    root: str,
    tmp_root: str,
    blob_index: str,
    staging: str,
    fifo: str,
    expected_diff_id: str | None,
    what: str,
) -> dict[str, Any]:
    """In a worker: ingest what comes through ``fifo`` into ``staging``; the layer's info."""
    layers = LayerStore(Path(root), Path(tmp_root), Path(blob_index))
    try:
        with open(fifo, "rb") as source:
            os.unlink(fifo)  # both ends are open: the name is no longer needed
            staged = layers.ingest(
                _Unbuffered(source.fileno()),
                expected_diff_id=expected_diff_id,
                what=what,
                staging=Path(staging),
            )
    except LayerfsError:
        raise  # goes back to the puller as it is (it pickles; its cause is not sent)
    except Exception as exc:  # a bug: its name and message, in an error that pickles
        raise RuntimeError(f"ingest worker: {type(exc).__name__}: {exc}") from None
    info = staged.info
    return {
        "diff_id": info.diff_id,
        "tar_size": info.tar_size,
        "content_size": info.content_size,
        "entries": info.entries,
        "blob_digests": list(info.blob_digests),
    }


class _Unbuffered:
    """The FIFO's read end: ``read(n)`` returns up to ``n`` bytes as they arrive."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: os.read(self._fd, _CHUNK), b""))
        return os.read(self._fd, size)
