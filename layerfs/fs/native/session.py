"""One FUSE session on /dev/fuse: INIT, then worker threads until the kernel ends it.

:meth:`Session.negotiate` answers INIT on the mounted descriptor: the minor
both sides speak, the intersection of the flags the kernel offers and the
dispatcher wants, request sizes (``max_pages``), the kernel's readahead.
:meth:`Session.serve` then starts the workers. Each has its own clone of the
device where the kernel allows it (``FUSE_DEV_IOC_CLONE``; a reply must go
back on the descriptor its request came from), its own request buffer and its
own request counters; it reads a request, decodes it, calls the dispatcher's
handler for the opcode and writes the reply with one ``os.writev``.

What the session answers itself:

- a request that does not decode: EIO (or nothing, when even its header is
  unreadable), logged; the session goes on;
- an opcode without a handler: ENOSYS (the kernel remembers it for most);
- INTERRUPT: the request it names, if a handler waits in
  :meth:`Session.run_blocking`, stops waiting and is answered EINTR; the work
  it waited for finishes unseen in the I/O pool;
- DESTROY: an empty reply; the kernel then ends the session.

A handler returns ``None`` (no reply), a buffer, or a list of buffers (the
reply's body); it raises to answer an error (:func:`errno_of`).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from layerfs.fs.native import device, protocol
from layerfs.fs.native.protocol import Request
from layerfs.fs.operations import errno_of

log = logging.getLogger(__name__)

T = TypeVar("T")
Reply = None | bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
Handler = Callable[[Request], Reply]

PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_PAGES = 256  # the kernel's FUSE_MAX_MAX_PAGES: 1 MiB requests with 4 KiB pages
IO_THREADS = 4
WORKERS = 8
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_EARLY_INTERRUPTS = 256  # INTERRUPTs remembered for requests not waiting (yet)
_FLAGS2 = struct.Struct("=I")  # fuse_init_in.flags2, after the 7.23 part
_out = protocol.OUT_HEADER.pack
_OUT_SIZE = protocol.OUT_HEADER.size


class UnsupportedKernelError(Exception):
    """The kernel speaks a FUSE protocol older than this engine serves."""


@dataclass
class Wanted:
    """What a dispatcher asks for at INIT."""

    flags: int
    max_pages: int = MAX_PAGES
    max_background: int = 0  # 0: the kernel's default
    congestion_threshold: int = 0
    max_stack_depth: int = 0  # for passthrough: how deep the backing files may be stacked


@dataclass
class Negotiated:
    """What INIT settled."""

    major: int
    minor: int  # the minor both sides speak
    kernel_minor: int
    kernel_flags: int
    flags: int  # what both want
    max_readahead: int
    max_write: int
    max_pages: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


class Dispatcher:
    """What a session serves: the INIT wishes and a handler per opcode."""

    def wanted(self, kernel_minor: int, kernel_flags: int) -> Wanted:
        raise NotImplementedError

    def handlers(self, negotiated: Negotiated, session: Session) -> dict[int, Handler]:
        raise NotImplementedError


class Session:
    def __init__(
        self, conn: device.Connection, dispatcher: Dispatcher, *, workers: int = WORKERS
    ) -> None:
        self.conn = conn
        self.fd = conn.fd
        self.dispatcher = dispatcher
        self.workers = workers
        self.negotiated: Negotiated | None = None
        self._table: dict[int, Handler] = {}
        self._counts: list[list[int]] = []
        self._threads: list[threading.Thread] = []
        self._fds: list[int] = []
        self._pool: ThreadPoolExecutor | None = None
        self._ilock = threading.Lock()
        self._lead = threading.Lock()  # held by the worker that reads the device
        self._local = threading.local()
        self._waiting: dict[int, threading.Event] = {}
        self._early: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._bufsize = (MAX_PAGES + 1) * PAGE
        self.destroyed = False
        self.started = time.monotonic()

    # -- INIT ---------------------------------------------------------------------------------

    def negotiate(self) -> Negotiated:
        """Read and answer INIT; raises UnsupportedKernelError for a kernel too old."""
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        while True:
            n = self._read(self.fd, buf)
            if n is None:
                raise OSError(errno.ENODEV, "the mount went away before INIT")
            req = protocol.decode(view[:n])
            if req.opcode != protocol.INIT:
                log.warning("%s before INIT: refused", req.name)
                self._write(self.fd, [protocol.error_reply(req.unique, errno.EIO)])
                continue
            major, minor, max_readahead, flags = req.args
            if major > protocol.KERNEL_VERSION:
                # The kernel tries again with our major (the header's rules).
                body = protocol.INIT_OUT.pack(
                    protocol.KERNEL_VERSION, protocol.OUR_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
                )[:8]
                self._write(self.fd, [protocol.reply_header(req.unique, len(body)), body])
                continue
            if major < protocol.KERNEL_VERSION or minor < protocol.MIN_MINOR:
                self._write(self.fd, [protocol.error_reply(req.unique, errno.EPROTO)])
                raise UnsupportedKernelError(
                    f"the kernel speaks FUSE {major}.{minor}; this engine needs "
                    f"{protocol.KERNEL_VERSION}.{protocol.MIN_MINOR} or later"
                )
            return self._answer_init(req, minor, max_readahead, flags)

    def _answer_init(
        self, req: Request, kernel_minor: int, max_readahead: int, flags: int
    ) -> Negotiated:
        if flags & protocol.INIT_EXT and len(req.data) >= 4:
            flags |= _FLAGS2.unpack_from(req.data)[0] << 32
        wanted = self.dispatcher.wanted(kernel_minor, flags)
        ours = wanted.flags & flags
        if ours >> 32:
            ours |= protocol.INIT_EXT
        max_pages = min(wanted.max_pages, MAX_PAGES) if ours & protocol.MAX_PAGES else 32
        max_write = max_pages * PAGE
        minor = min(kernel_minor, protocol.OUR_MINOR)
        body = protocol.INIT_OUT.pack(
            protocol.KERNEL_VERSION,
            protocol.OUR_MINOR,
            max_readahead,
            ours & 0xFFFFFFFF,
            wanted.max_background,
            wanted.congestion_threshold,
            max_write,
            1,
            max_pages,
            0,
            ours >> 32,
            wanted.max_stack_depth if ours & protocol.PASSTHROUGH else 0,
        )[: protocol.init_reply_size(minor)]
        self._write(self.fd, [protocol.reply_header(req.unique, len(body)), body])
        self._bufsize = max(protocol.MIN_READ_BUFFER, max_write + PAGE)
        self.negotiated = Negotiated(
            protocol.KERNEL_VERSION,
            minor,
            kernel_minor,
            flags,
            ours,
            max_readahead,
            max_write,
            max_pages,
        )
        log.info(
            "FUSE %d.%d (kernel %d.%d): %s; max_write %d, readahead %d",
            protocol.KERNEL_VERSION,
            minor,
            protocol.KERNEL_VERSION,
            kernel_minor,
            ", ".join(protocol.flag_names(ours)),
            max_write,
            max_readahead,
        )
        return self.negotiated

    # -- serving -----------------------------------------------------------------------------

    def serve(
        self,
        ready: Callable[[], None],
        tick: Callable[[], None] | None = None,
        tick_every: float = 1.0,
    ) -> None:
        """Serve until the kernel ends the session or a signal asks to unmount.

        ``ready`` runs once the workers answer; ``tick`` every ``tick_every`` seconds
        on this thread (the writable mount's saver). SIGTERM, SIGINT and SIGHUP
        unmount lazily: the session ends when the last user of the mount leaves, or
        after two seconds, whichever comes first.
        """
        assert self.negotiated is not None, "negotiate() first"
        self._table = self.dispatcher.handlers(self.negotiated, self)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # workers inherit it
        try:
            self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="layerfs-io")
            for index in range(self.workers):
                fd = device.clone(self.fd) if index else self.fd
                if fd < 0:
                    fd = self.fd
                elif index:
                    self._fds.append(fd)
                counts = [0] * 64
                self._counts.append(counts)
                thread = threading.Thread(
                    target=self._work, args=(fd, counts), name=f"layerfs-fuse-{index}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            ready()
            self._wait(tick, tick_every)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def _wait(self, tick: Callable[[], None] | None, tick_every: float) -> None:
        """Wait for the workers to end, for a signal, and run ``tick`` now and then."""
        deadline = 0.0
        next_tick = time.monotonic() + tick_every
        while any(t.is_alive() for t in self._threads):
            now = time.monotonic()
            if deadline and now > deadline:
                log.info("the mount is still in use: leaving it to the kernel")
                return
            if now >= next_tick:
                next_tick = now + tick_every
                if tick is not None:
                    try:
                        tick()
                    except Exception:
                        log.exception("internal error in the periodic task")
            # The workers end only when the kernel ends the session: a quarter of a
            # second is how long noticing that may take.
            wait = min(0.25, max(0.01, next_tick - time.monotonic()))
            info = signal.sigtimedwait(_SIGNALS, wait)
            # A debugger attaching (ptrace) can end the wait with no signal in it.
            if info is not None and info.si_signo in _SIGNALS and not deadline:
                log.info("%s: unmounting", signal.Signals(info.si_signo).name)
                device.unmount_lazily(self.conn.mountpoint)
                deadline = time.monotonic() + 2.0

    def counts(self) -> dict[str, int]:
        """Requests served so far, by opcode name."""
        total = [sum(column) for column in zip(*self._counts, strict=True)] if self._counts else []
        return {protocol.OPCODE_NAMES.get(op, f"opcode {op}"): n for op, n in enumerate(total) if n}

    # -- the worker ---------------------------------------------------------------------------

    @staticmethod
    def _read(fd: int, buf: bytearray) -> int | None:
        """One request into ``buf``: its length, or None when the session is over."""
        while True:
            try:
                return os.readv(fd, [buf])
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # a request the kernel withdrew (interrupted) before we read it
                if exc.errno in (errno.ENODEV, errno.EBADF, errno.ECONNABORTED):
                    return None
                raise

    def _write(self, fd: int, parts: list[Any]) -> None:
        try:
            os.writev(fd, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted and the kernel no longer waits for it.
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("cannot write a reply of %d bytes: %s", sum(map(len, parts)), exc)

    def _work(self, fd: int, counts: list[int]) -> None:
        """Leader and followers: one worker at a time reads the device (the leader) and
        answers what it read itself, so that a stream of quick requests is served by one
        thread that stays awake; a worker about to wait (:meth:`step_aside`) hands the
        reading over first. Were all of them to read at once, the kernel would wake the
        one that has slept longest for each request, every round trip a cold one: twice
        the latency here."""
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        local = self._local
        self._lead.acquire()
        local.leading = True
        try:
            while True:
                n = self._read(fd, buf)
                if n is None:
                    return
                self._handle(fd, view[:n], counts)
                if not local.leading:
                    self._lead.acquire()
                    local.leading = True
        except Exception:
            log.exception("a FUSE worker failed")
        finally:
            if local.leading:
                local.leading = False
                self._lead.release()

    def step_aside(self) -> None:
        """The calling worker is about to wait: another one reads the device meanwhile."""
        local = self._local
        if getattr(local, "leading", False):
            local.leading = False
            self._lead.release()

    def _handle(self, fd: int, data: memoryview, counts: list[int]) -> None:
        try:
            req = protocol.decode(data)
        except protocol.ProtocolError as exc:
            log.error("malformed request: %s", exc)
            if exc.unique:
                self._write(fd, [protocol.error_reply(exc.unique, errno.EIO)])
            return
        opcode = req.opcode
        counts[opcode if opcode < 64 else 0] += 1
        if opcode == protocol.IOCTL:
            # Python's open() asks isatty() of every file it opens: the kernel forwards
            # it each time (it never remembers an answer to IOCTL). No file here is a
            # terminal or anything else an ioctl could ask about.
            self._write(fd, [protocol.error_reply(req.unique, errno.ENOTTY)])
            return
        if opcode == protocol.INTERRUPT:
            self._interrupt(req.args[0])
            return
        handler = self._table.get(opcode)
        try:
            if handler is None:
                if opcode == protocol.DESTROY:
                    self.destroyed = True
                    result: Reply = b""
                elif opcode in protocol.NO_REPLY:
                    return
                else:
                    raise OSError(errno.ENOSYS, f"{req.name} is not implemented")
            else:
                result = handler(req)
        except Exception as exc:
            if opcode in protocol.NO_REPLY:
                errno_of(exc, req.name, req.nodeid)
                return
            code = (
                errno.ENOSYS
                if isinstance(exc, OSError) and exc.errno == errno.ENOSYS
                else errno_of(exc, req.name, req.nodeid, *req.names, *req.args[:2])
            )
            self._write(fd, [protocol.error_reply(req.unique, code)])
            return
        if result is None:
            return
        if isinstance(result, list | tuple):
            parts = list(result)
            self._write(fd, [_out(_OUT_SIZE + sum(map(len, parts)), 0, req.unique), *parts])
        else:
            self._write(fd, [_out(_OUT_SIZE + len(result), 0, req.unique), result])

    # -- blocking work and INTERRUPT ----------------------------------------------------------

    def run_blocking(self, req: Request, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the I/O pool; raises InterruptedError if the kernel interrupts
        ``req`` first (the work then finishes unseen)."""
        assert self._pool is not None
        self.step_aside()
        future = self._pool.submit(fn, *args)
        event = threading.Event()
        with self._ilock:
            if req.unique in self._early:
                del self._early[req.unique]
                req.interrupted = True
            else:
                self._waiting[req.unique] = event
        if not req.interrupted:
            future.add_done_callback(lambda _: event.set())
            event.wait()
            with self._ilock:
                self._waiting.pop(req.unique, None)
        if future.done():
            return future.result()
        req.interrupted = True
        raise InterruptedError(errno.EINTR, "interrupted")

    def _interrupt(self, unique: int) -> None:
        with self._ilock:
            event = self._waiting.get(unique)
            if event is not None:
                log.debug("request %d interrupted", unique)
                event.set()
                return
            # Not waiting (yet): remember it for a while, in case it starts to.
            self._early[unique] = None
            while len(self._early) > _EARLY_INTERRUPTS:
                self._early.popitem(last=False)
