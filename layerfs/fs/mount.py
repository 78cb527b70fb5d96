"""Mounting an image: holds, the merged tree, the engine, the server process, clean unmount.

:func:`mount` does everything that can fail with a clear message in the
calling process: it checks the mountpoint, resolves the image, holds its
chain and layers against ``rmi`` (shared flocks that live as long as the
server), builds the merged tree, opens the layer tars, takes the upper
directory and mounts through the chosen engine (:data:`ENGINES`: ``native``,
layerfs's own FUSE protocol engine, or ``pyfuse3``). Then it forks the
server, which detaches (new session, cwd ``/``, output to the store's
``logs/``) and serves: the engine's workers, signals (SIGTERM, SIGINT, SIGHUP
unmount cleanly) and, for a writable mount, saving the upper's state a moment
after changes. The caller returns once the server answers requests. When the
file system is unmounted (``layerfs umount``, ``fusermount3 -u``, a signal)
the server saves the upper, releases its holds, removes its record and exits.

The default engine, ``auto``, is the native one; should the kernel speak a
FUSE protocol older than it serves, the mount is made again with pyfuse3.

Control requests come in as ``getxattr`` of ``user.layerfs.<what>`` on the
mount's root (as s3ql's control file does): ``info``, ``sync`` (save the
upper now) and ``stats`` (requests served so far; the native engine always
counts them, pyfuse3 when the server runs with ``LAYERFS_COUNT_REQUESTS=1``)
answer JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from layerfs.errors import LayerfsError, MountError, UsageError
from layerfs.fs import ENGINES
from layerfs.fs.host import MountRecord, Records, check_mountpoint, unmount
from layerfs.fs.lower import Lower, from_archive, from_store, is_archive
from layerfs.fs.operations import Operations
from layerfs.fs.upper import Upper
from layerfs.model.digest import hex_of
from layerfs.model.image import now_rfc3339
from layerfs.store.files import FileLock
from layerfs.store.store import Store

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
READ_AHEAD_KB = 1024
_UPPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_UNSUPPORTED = "unsupported: "


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
    engine: str = "auto"  # "auto", "native" or "pyfuse3"
    extra_options: list[str] = field(default_factory=list)


class Engine(Protocol):
    """What mounting needs of an engine (``native.engine.NativeEngine``,
    ``pyfuse3_engine.Pyfuse3Session``): ``mount`` in the calling process (its options
    differ by engine), then ``serve`` in the server."""

    name: str

    def serve(self, ready: Callable[[], None], tick: Callable[[], None] | None) -> None: ...

    def counts(self) -> dict[str, int]: ...

    def info(self) -> dict[str, Any]: ...


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
        raise UsageError(
            f"invalid upper name {name!r}: use letters, digits, '_', '.', '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


def validate_engine(name: str) -> str:
    if name != "auto" and name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}: use auto, {', '.join(ENGINES)}")
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
        self.engine: Engine | None = None

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
            raise MountError(
                f"cannot mount {request.image}: the image was deleted while it was being mounted"
            )
        self.lower = from_store(store, image, request.image, init=request.init, chain=chain)
        self.tars = self.lower.open_tars()
        upper_name = None
        if request.writable:
            upper_name = validate_upper_name(request.upper or f"mount-{self.id}")
            self.upper = Upper.open(
                self.lower.tree,
                store.subdir("upper") / upper_name,
                image_id=image.id,
                diff_ids=self.lower.diff_ids,
                tars=self.tars,
                init=request.init,
                tmp_root=store.tmp,
            )
        self.record = MountRecord(
            id=self.id,
            mountpoint=str(mountpoint),
            image=image.id,
            reference=request.image,
            mode="rw" if request.writable else "ro",
            upper=upper_name,
            upper_path=str(self.upper.directory) if self.upper else None,
            pid=os.getpid(),
            started=now_rfc3339(),
            log=str(self.log_path),
            options=sorted(fuse_options(request, "layerfs")),
        )
        return Operations(
            self.lower.tree,
            self.tars,
            upper=self.upper,
            control=self.control,
            data_size=self.lower.data_size,
        )

    def _prepare_archive(self, mountpoint: Path) -> Operations:
        """An image in a docker-archive or OCI layout, mounted from the file: read-only."""
        request = self.request
        if request.writable:
            raise UsageError(
                f"cannot mount {request.image} writable: an archive is mounted read-only",
                hint="load it (layerfs load) to mount it with --rw",
            )
        self.lock = self.records.hold(self.id)
        self.lower = from_archive(request.image, self.store.tmp, init=request.init)
        self.tars = self.lower.open_tars()
        self.record = MountRecord(
            id=self.id,
            mountpoint=str(mountpoint),
            image=self.lower.image_id,
            reference=request.image,
            mode="ro",
            pid=os.getpid(),
            started=now_rfc3339(),
            log=str(self.log_path),
            options=sorted(fuse_options(request, "layerfs")),
        )
        return Operations(self.lower.tree, self.tars, control=self.control)

    def control(self, what: bytes) -> bytes:
        assert self.record is not None and self.engine is not None
        if what == b"stats":
            return json.dumps(self.engine.counts(), sort_keys=True).encode()
        doc: dict[str, Any] = {
            "id": self.id,
            "image": self.record.image,
            "reference": self.record.reference,
            "mode": self.record.mode,
            "upper": self.record.upper,
            "upper_path": self.record.upper_path,
            "store": str(self.store.root),
            "pid": os.getpid(),
            "engine": self.engine.name,
        }
        if what == b"info":
            doc["engine_info"] = self.engine.info()
        elif what == b"sync":
            if self.upper is not None:
                self.sync()
                doc["state"] = str(self.upper.directory / "state")
        else:
            raise OSError(61, "no such control request")  # ENODATA
        return json.dumps(doc, sort_keys=True).encode()

    def save(self) -> None:
        """Save the upper's state now (the periodic saver); errors are logged."""
        upper, ops = self.upper, self.ops
        assert upper is not None and ops is not None
        try:
            with ops.lock:
                ops.take_over_data_changes()
                upper.save()
        except (OSError, LayerfsError):
            log.exception("cannot save the upper directory's state")

    def sync(self) -> None:
        """Save the upper's state if it changed or was never saved (``commit`` asks)."""
        upper, ops = self.upper, self.ops
        assert upper is not None and ops is not None
        with ops.lock:
            ops.take_over_data_changes()
            if upper.dirty or not (upper.directory / "state").exists():
                upper.save()

    def pending(self) -> tuple[bool, int]:
        """Whether the upper has unsaved changes, and its change counter."""
        upper, ops = self.upper, self.ops
        assert upper is not None and ops is not None
        with ops.lock:
            ops.take_over_data_changes()
            return upper.dirty, upper.generation

    def close(self) -> None:
        """Give back everything, even after a partial :meth:`prepare`."""
        try:
            if self.upper is not None:
                try:
                    if self.ops is not None:
                        with self.ops.lock:
                            self.ops.take_over_data_changes()
                            self.upper.close()
                    else:
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
    validate_engine(request.engine)
    engine = "native" if request.engine == "auto" else request.engine
    try:
        return _mount(store, request, engine)
    except _UnsupportedKernel as exc:
        if request.engine != "auto":
            raise MountError(
                f"cannot mount with the native engine: {exc}", hint="mount with --engine pyfuse3"
            ) from exc
        log.info("%s: mounting with pyfuse3", exc)
        return _mount(store, request, "pyfuse3")


class _UnsupportedKernel(Exception):
    pass


def _make_engine(name: str, ops: Operations) -> Any:
    if name == "native":
        from layerfs.fs.native.engine import NativeEngine

        return NativeEngine(ops)
    from layerfs.fs.pyfuse3_engine import Pyfuse3Session

    return Pyfuse3Session(ops, count=bool(os.environ.get("LAYERFS_COUNT_REQUESTS")))


def _mount(store: Store, request: MountRequest, engine_name: str) -> MountRecord:
    server = _Server(store, request)
    try:
        ops = server.ops = server.prepare()
        assert server.record is not None
        engine = server.engine = _make_engine(engine_name, ops)
        server.record.engine = engine.name
        fsname = f"layerfs:{server.record.image[:12]}"
        if engine.name == "native":
            from layerfs.fs.native.device import MountOptions

            engine.mount(
                server.record.mountpoint,
                MountOptions(
                    fsname=fsname,
                    read_only=not request.writable,
                    nosuid=not request.suid,
                    nodev=not request.dev,
                    allow_other=request.allow_other,
                    extra=list(request.extra_options),
                ),
            )
        else:
            engine.mount(server.record.mountpoint, fuse_options(request, fsname))
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
    if hasattr(engine, "close_in_parent"):
        engine.close_in_parent()
    record.pid = pid
    answer = _wait_ready(ready_r)
    if answer != "ready":
        try:
            unmount(record.mountpoint, lazy=True)
        except MountError:
            pass
        server.records.remove(record.id)
        if answer.startswith(_UNSUPPORTED):
            raise _UnsupportedKernel(answer.removeprefix(_UNSUPPORTED))
        raise MountError(
            f"the mount server for {record.mountpoint} exited during start-up",
            hint=f"see its log: {server.log_path}",
        )
    return record


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


def _wait_ready(fd: int) -> str:
    """The server's first line: "ready", "unsupported: ..." or "" (it died)."""
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    try:
        while time.monotonic() < deadline:
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
            if b"\n" in data:
                break
    finally:
        os.close(fd)
    return data.partition(b"\n")[0].decode(errors="replace")


def _serve(server: _Server, ready_fd: int | None) -> None:
    record, engine = server.record, server.engine
    assert record is not None and engine is not None
    log.info(
        "serving %s (image %s, %s) on %s with the %s engine",
        record.reference,
        record.image[:12],
        record.mode,
        record.mountpoint,
        engine.name,
    )

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        _raise_read_ahead(record.mountpoint)

    try:
        _serve_with(server, engine, ready, ready_fd)
    finally:
        server.close()
        log.info("unmounted %s", record.mountpoint)
        if not _Warnings.seen and not server.request.debug:
            # A clean run leaves no log behind; one with warnings keeps it.
            logging.shutdown()
            server.log_path.unlink(missing_ok=True)


def _serve_with(server: _Server, engine: Any, ready: Any, ready_fd: int | None) -> None:
    """Serve with the engine until the mount ends; a writable mount saves its upper's
    state a moment after changes stop (every engine calls ``tick`` once a second)."""
    from layerfs.fs.native.session import UnsupportedKernelError
    from layerfs.fs.saving import SaveClock

    tick = None
    if server.upper is not None:
        clock = SaveClock()

        def tick() -> None:
            dirty, generation = server.pending()
            if clock.due(dirty, generation, time.monotonic()):
                server.save()

    try:
        engine.serve(ready, tick)
    except UnsupportedKernelError as exc:
        log.warning("%s", exc)
        if ready_fd is not None:
            os.write(ready_fd, f"{_UNSUPPORTED}{exc}\n".encode())
            os.close(ready_fd)
            return
        raise MountError(str(exc)) from exc
