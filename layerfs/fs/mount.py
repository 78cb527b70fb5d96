"""Mounting an image: holds, the merged tree, FUSE init, the server process, clean unmount.

:func:`mount` does everything that can fail with a clear message in the
calling process: it checks the mountpoint, resolves the image, holds its
chain and layers against ``rmi`` (shared flocks that live as long as the
server), builds the merged tree, opens the layer tars, takes the upper
directory and mounts (``pyfuse3.init``). Then it forks the server, which
detaches (new session, cwd ``/``, output to the store's ``logs/``) and runs
one trio loop: pyfuse3's workers, a signal watcher (SIGTERM, SIGINT, SIGHUP
unmount cleanly) and, for a writable mount, a task that saves the upper's
state a moment after changes. The caller returns once the server's loop is
running. When the file system is unmounted (``layerfs umount``,
``fusermount3 -u``, a signal) the server saves the upper, releases its holds,
removes its record and exits.

Control requests come in as ``getxattr`` of ``user.layerfs.<what>`` on the
mount's root (as s3ql's control file does): ``info``, ``sync`` (save the
upper now) and ``stats`` (requests per handler so far, when the
server runs with ``LAYERFS_COUNT_REQUESTS=1``) answer JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from layerfs.errors import LayerfsError, MountError, UsageError
from layerfs.fs.host import MountRecord, Records, check_mountpoint, unmount
from layerfs.fs.lower import Lower, from_archive, from_store, is_archive
from layerfs.fs.operations import Operations, counting
from layerfs.fs.upper import Upper
from layerfs.model.digest import hex_of
from layerfs.model.image import now_rfc3339
from layerfs.store.files import FileLock
from layerfs.store.store import Store

log = logging.getLogger(__name__)

SAVE_DELAY = 1.0  # seconds of quiet before the upper's state is saved
SAVE_MAX_DELAY = 5.0  # ...but never later than this after the first unsaved change
READY_TIMEOUT = 30.0
READ_AHEAD_KB = 1024
# pyfuse3.main's worker tasks. Its default pool hands every request from one task to
# the next through a lock, which makes each round trip dearer (docs/benchmarks.md,
# Mount: the two pyfuse3 floor columns). One worker is enough where the only handler
# that waits is a big cold read (in a worker thread; sequential reads lose nothing);
# a writable mount keeps the pool so that one copy-up or fsync never holds up every
# other request.
WORKERS_READ_ONLY = 1
WORKERS_WRITABLE = 99  # pyfuse3's default
_UPPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class MountRequest:
    image: str
    mountpoint: Path
    writable: bool = False
    upper: str | None = None
    init: bool = True
    allow_other: bool = False
    suid: bool = False
    dev: bool = False
    foreground: bool = False
    debug: bool = False
    container: bool = False  # apply Docker's container depth rule (layerfs run)
    extra_options: list[str] = field(default_factory=list)


def fuse_options(request: MountRequest, fsname: str) -> set[str]:
    options = {f"fsname={fsname}", "subtype=layerfs", "default_permissions"}
    options.add("rw" if request.writable else "ro")
    options.add("suid" if request.suid else "nosuid")
    options.add("dev" if request.dev else "nodev")
    if request.allow_other:
        options.add("allow_other")
    options.update(request.extra_options)
    return options


def validate_upper_name(name: str) -> str:
    if not _UPPER_NAME.match(name):
        raise UsageError(f"invalid upper name {name!r}: use letters, digits, '_', '.', '-' "
                         "(at most 128, starting with a letter or digit)")
    return name


class _Server:
    """Everything a mount holds; :meth:`close` gives it all back."""

    def __init__(self, store: Store, request: MountRequest) -> None:
        self.store = store
        self.request = request
        self.id = secrets.token_hex(8)
        self.session = f"mount-{self.id}"
        self.records = Records(store.subdir("mounts"), store.tmp)
        self.lock: FileLock | None = None
        self.tars: list[int] = []
        self.upper: Upper | None = None
        self.lower: Lower | None = None
        self.record: MountRecord | None = None
        self.log_path = store.subdir("logs") / f"mount-{self.id}.log"
        self.mounted = False
        self.ops: Operations | None = None

    def prepare(self) -> Operations:
        store, request = self.store, self.request
        mountpoint = check_mountpoint(request.mountpoint)
        if is_archive(request.image):
            return self._prepare_archive(mountpoint)
        image = store.tags.lookup_image(request.image)
        if request.container:
            store.graph.check_depth(image)
        self.lock = self.records.hold(self.id)
        chain = store.graph.walk_history(image)
        layers = [hex_of(i.layer) for i in chain if i.layer]
        store.graph.retain(self.session, *(i.id for i in chain), *layers)
        if not store.graph.exists(image.id):
            raise MountError(f"cannot mount {request.image}: the image was deleted while it "
                             "was being mounted")
        self.lower = from_store(store, image, request.image, init=request.init)
        self.tars = self.lower.open_tars()
        upper_name = None
        if request.writable:
            upper_name = validate_upper_name(request.upper or f"mount-{self.id}")
            self.upper = Upper.open(self.lower.tree, store.subdir("upper") / upper_name,
                                    image_id=image.id, diff_ids=self.lower.diff_ids,
                                    tars=self.tars, init=request.init, tmp_root=store.tmp)
        self.record = MountRecord(
            id=self.id, mountpoint=str(mountpoint), image=image.id, reference=request.image,
            mode="rw" if request.writable else "ro", upper=upper_name,
            upper_path=str(self.upper.directory) if self.upper else None, pid=os.getpid(),
            started=now_rfc3339(), log=str(self.log_path),
            options=sorted(fuse_options(request, "layerfs")),
        )
        return _operations()(self.lower.tree, self.tars, upper=self.upper, control=self.control,
                          data_size=self.lower.data_size)

    def _prepare_archive(self, mountpoint: Path) -> Operations:
        """An image in a docker-archive or OCI layout, mounted from the file: read-only."""
        request = self.request
        if request.writable:
            raise UsageError(f"cannot mount {request.image} writable: an archive is mounted "
                             "read-only", hint="load it (layerfs load) to mount it with --rw")
        self.lock = self.records.hold(self.id)
        self.lower = from_archive(request.image, self.store.tmp, init=request.init)
        self.tars = self.lower.open_tars()
        self.record = MountRecord(
            id=self.id, mountpoint=str(mountpoint), image=self.lower.image_id,
            reference=request.image, mode="ro", pid=os.getpid(), started=now_rfc3339(),
            log=str(self.log_path), options=sorted(fuse_options(request, "layerfs")))
        return _operations()(self.lower.tree, self.tars, control=self.control)

    def control(self, what: bytes) -> bytes:
        assert self.record is not None
        if what == b"stats":
            assert self.ops is not None
            return json.dumps(self.ops.counts, sort_keys=True).encode()
        doc = {"id": self.id, "image": self.record.image, "reference": self.record.reference,
               "mode": self.record.mode, "upper": self.record.upper,
               "upper_path": self.record.upper_path, "store": str(self.store.root),
               "pid": os.getpid()}
        if what == b"sync" and self.upper is not None:
            if self.upper.dirty or not (self.upper.directory / "state").exists():
                self.upper.save()
            doc["state"] = str(self.upper.directory / "state")
        elif what not in (b"info", b"sync"):
            raise OSError(61, "no such control request")  # ENODATA
        return json.dumps(doc, sort_keys=True).encode()

    def close(self) -> None:
        """Give back everything, even after a partial :meth:`prepare`."""
        try:
            if self.upper is not None:
                try:
                    self.upper.close()
                except Exception:
                    log.exception("cannot save the upper directory's state")
        finally:
            for fd in self.tars:
                os.close(fd)
            self.tars = []
            self.store.graph.release(self.session)
            if self.record is not None:
                self.records.remove(self.id)
            if self.lock is not None:
                self.lock.release()


def mount(store: Store, request: MountRequest) -> MountRecord:
    """Mount an image; returns once the server answers (or after it ends, in the foreground)."""
    server = _Server(store, request)
    try:
        ops = server.ops = server.prepare()
        assert server.record is not None
        options = fuse_options(request, f"layerfs:{server.record.image[:12]}")
        try:
            pyfuse3.init(ops, server.record.mountpoint, options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount on {server.record.mountpoint}: {exc} (the FUSE "
                             "library printed why above)") from None
        server.mounted = True
    except BaseException:
        server.close()
        raise
    record = server.record
    server.records.write(record)
    if request.foreground:
        _configure_logging(server.log_path, request.debug, also_stderr=True)
        _serve(server, None)
        return record
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(ready_r)
        code = 0
        try:
            _detach(server.log_path)
            _configure_logging(server.log_path, request.debug, also_stderr=False)
            record.pid = os.getpid()
            server.records.write(record)
            _serve(server, ready_w)
        except BaseException:
            log.exception("the mount server failed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(ready_w)
    record.pid = pid
    if not _wait_ready(ready_r):
        try:
            unmount(record.mountpoint, lazy=True)
        except MountError:
            pass
        server.records.remove(record.id)
        raise MountError(f"the mount server for {record.mountpoint} exited during start-up",
                         hint=f"see its log: {server.log_path}")
    return record


def _operations() -> type[Operations]:
    """The handler class: counting requests too when LAYERFS_COUNT_REQUESTS is set."""
    return counting(Operations) if os.environ.get("LAYERFS_COUNT_REQUESTS") else Operations


def _raise_read_ahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB at a time on this mount, as root may.

    A FUSE mount starts with the default 128 KiB window, which the file system
    cannot raise at init; the device's ``read_ahead_kb`` can (best effort).
    """
    try:
        dev = os.stat(mountpoint).st_dev
        knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if int(knob.read_text()) < READ_AHEAD_KB:
            knob.write_text(f"{READ_AHEAD_KB}\n")
    except (OSError, ValueError) as exc:
        log.debug("read-ahead left as it is: %s", exc)


def _detach(log_path: Path) -> None:
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


class _Warnings(logging.Handler):
    """Remembers whether anything worth keeping the log for was logged."""

    seen = False

    def emit(self, record: logging.LogRecord) -> None:
        _Warnings.seen = True


def _configure_logging(log_path: Path, debug: bool, *, also_stderr: bool) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_Warnings(logging.WARNING))
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if also_stderr:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("layerfs: %(levelname)s: %(message)s"))
        root.addHandler(console)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _wait_ready(fd: int) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    try:
        while time.monotonic() < deadline:
            chunk = os.read(fd, 64)
            if not chunk:
                break
            data += chunk
            if b"\n" in data:
                break
    finally:
        os.close(fd)
    return data.startswith(b"ready")


def _serve(server: _Server, ready_fd: int | None) -> None:
    record = server.record
    assert record is not None
    log.info("serving %s (image %s, %s) on %s", record.reference, record.image[:12],
             record.mode, record.mountpoint)
    try:
        trio.run(_main, server, ready_fd)
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("closing the FUSE session")
        server.close()
        log.info("unmounted %s", record.mountpoint)
        if not _Warnings.seen and not server.request.debug:
            # A clean run leaves no log behind; one with warnings keeps it.
            logging.shutdown()
            server.log_path.unlink(missing_ok=True)


async def _main(server: _Server, ready_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals)
        if server.upper is not None:
            nursery.start_soon(_save_when_quiet, server.upper)
        assert server.record is not None
        nursery.start_soon(_announce, ready_fd, server.record.mountpoint)
        workers = WORKERS_READ_ONLY if server.upper is None else WORKERS_WRITABLE
        await pyfuse3.main(min_tasks=1, max_tasks=workers)
        nursery.cancel_scope.cancel()


async def _announce(fd: int | None, mountpoint: str) -> None:
    await trio.sleep(0)  # the session loop is scheduled first
    if fd is not None:
        os.write(fd, b"ready\n")
        os.close(fd)
    # stat() of the mountpoint is a request to this very loop: never call it from here.
    await trio.to_thread.run_sync(_raise_read_ahead, mountpoint)


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _save_when_quiet(upper: Upper) -> None:
    first_unsaved = 0.0
    seen = upper.generation
    while True:
        await trio.sleep(SAVE_DELAY)
        if not upper.dirty:
            first_unsaved = 0.0
            continue
        now = time.monotonic()
        first_unsaved = first_unsaved or now
        quiet = upper.generation == seen
        seen = upper.generation
        if quiet or now - first_unsaved >= SAVE_MAX_DELAY:
            try:
                upper.save()
            except (OSError, LayerfsError):
                log.exception("cannot save the upper directory's state")
            first_unsaved = 0.0
