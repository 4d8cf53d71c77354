"""The connection to the supervisor, and the requests multiplexed on it.

A :class:`Multiplexer` (one per :class:`~clipvisor.Client`) keeps at most one :class:`Session`
(a live connection) per process, opened at first use; requests from several threads are
multiplexed on it by id: whichever waiting thread is free reads the socket and hands each
response to its requester (blocks are decompressed by the requester, with the GIL released). A
connection inherited across ``fork`` is never used: the child closes its copy and connects
anew. Every wait is bounded, by the request's deadline plus the session's ``margin``; a
supervisor that goes away fails the requests in flight at once with
:class:`~clipvisor.SupervisorUnavailable`, and the next call reconnects (or restarts the
private one).

Also here, because every request kind needs them: passing a clip's fd, and the back-off of
``overloaded`` answers.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import weakref
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from . import block as _block
from . import spawn as _spawn
from ._version import __version__
from .errors import (
    ClipNotFound,
    ClipPermission,
    InvalidRequest,
    Overloaded,
    ProtocolError,
    SupervisorTimeout,
    SupervisorUnavailable,
)
from .protocol import PROTOCOL_VERSION, Connection, ConnectionClosed
from .slabs import DEFAULT_SLABS, BlockRef, SlabLease, SlabTable

__all__ = ["Session", "Multiplexer", "close_fd", "open_for_passing", "error_of", "retry_pause"]

#: The margin when the supervisor does not say how long a clip may wait in its queue.
_FALLBACK_MARGIN_S = 70.0
_OVERLOADED_FIRST_BACKOFF = 0.05
_OVERLOADED_MAX_BACKOFF = 2.0

Answer = Tuple[Dict[str, Any], Optional[BlockRef]]


def close_fd(fd: Optional[BlockRef]) -> None:
    """Closes a block fd that came with an answer (tracked by the block module until closed),
    or gives back the slab of a block that will not be read."""
    if isinstance(fd, SlabLease):
        fd.release()
    elif fd is not None:
        _block.close_fd(fd)


def error_of(reply: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``error`` object of a failed answer ({} when missing or malformed)."""
    error = reply.get("error")
    return error if isinstance(error, dict) else {}


class Session:
    """One live connection, its hello, and the requests in flight on it (answers queued by id)."""

    def __init__(self, conn: Connection, hello: Dict[str, Any]):
        self.conn = conn
        self.hello = hello
        self.pid = os.getpid()
        self.next_id = 1
        self.pending: Dict[int, Deque[Answer]] = {}
        #: Block slabs the supervisor granted in the hello (docs/protocol.md, "Block slabs").
        self.slabs = SlabTable()
        #: Whether a thread is reading the connection for everyone (one at a time).
        self.reading = False
        #: The condition of the call waiting for each request id (under the multiplexer's lock):
        #: an answer wakes only the thread that waits for it.
        self.waiters: Dict[int, threading.Condition] = {}
        self.dead: Optional[BaseException] = None
        self.margin = _FALLBACK_MARGIN_S

    def usable(self) -> bool:
        return self.dead is None and not self.conn.closed and self.pid == os.getpid()


_multiplexers: "weakref.WeakSet[Multiplexer]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for mux in list(_multiplexers):
        mux.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Multiplexer:
    """Connects on demand (discovery, or the private supervisor) and carries requests by id.

    Args:
        socket_path: the only socket to try, else discovery (docs/protocol.md).
        spawn: start the private supervisor when nothing answers (and no `socket_path`).
        margin: seconds past a deadline before giving up on an answer; ``None``: the
            supervisor's queue bound + 10 s.
        connect_timeout: bound on connecting, the hello, starting a private supervisor, sends.
        slabs: block slabs to ask for (0: a fresh memfd per block).
    """

    def __init__(self, socket_path: Optional[str], spawn: bool, margin: Optional[float], connect_timeout: float,
                 slabs: int = DEFAULT_SLABS):
        self.socket_path = socket_path
        self.slabs = slabs
        self.spawn = spawn
        self.margin = margin
        self.connect_timeout = connect_timeout
        self.current: Optional[Session] = None
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        _multiplexers.add(self)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Drops the connection; requests in flight fail with SupervisorUnavailable(`reason`)."""
        with self._lock:
            session, self.current = self.current, None
            if session is not None:
                self._kill(session, SupervisorUnavailable(reason))

    def close_quietly(self) -> None:
        """Closes this process's connection without waking anyone (finalisers)."""
        session = self.current
        if session is not None and session.pid == os.getpid():
            session.conn.close()

    def forget_after_fork(self) -> None:
        """In a forked child: fresh locks (a parent thread may have held them) and no connection."""
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        session, self.current = self.current, None
        if session is not None:
            session.conn.abandon()
            session.slabs.forget_after_fork()
            for queue in session.pending.values():
                for _, fd in queue:
                    if isinstance(fd, int):  # block.py's own after-fork hook may have closed it: not twice
                        _block.close_tracked_fd(fd)

    # -- connecting ----------------------------------------------------------------------------

    def session(self) -> Session:
        """The live session of this process, connecting (or starting the private supervisor)
        when there is none."""
        with self._connect_lock:
            with self._lock:
                s = self.current
                if s is not None and s.usable():
                    return s
                if s is not None and s.pid != os.getpid():
                    self.current = None
                    s.conn.abandon()
            s = self._connect()
            with self._lock:
                self.current = s
            return s

    def _connect(self) -> Session:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                return self._connect_once(deadline)
            except ConnectionClosed:
                # Connected to a supervisor that was exiting (its listening socket not yet
                # closed): look again, which may find or start a live one.
                if time.monotonic() + 0.05 >= deadline:
                    raise
                time.sleep(0.05)

    def _connect_once(self, deadline: float) -> Session:
        sock = None
        path = None
        tried: List[str] = []
        candidates = [self.socket_path] if self.socket_path is not None else _spawn.candidate_sockets()
        for candidate in candidates:
            tried.append(candidate)
            sock = _spawn.try_connect(candidate, max(0.05, deadline - time.monotonic()))
            if sock is not None:
                path = candidate
                break
        if sock is None:
            if not self.spawn or self.socket_path is not None:
                # The service's socket refusing this user is the answer, not "nobody answers".
                refused = _spawn.refused_system_socket() if self.socket_path is None else None
                nobody = "no clipvisor supervisor answers at " + ", ".join(tried)
                raise SupervisorUnavailable(f"{refused}; {nobody}" if refused else nobody)
            private = _spawn.private_supervisor()
            sock = private.ensure(max(1.0, deadline - time.monotonic()))
            path = private.socket_path
        assert path is not None
        conn = Connection(sock, path)
        try:
            hello_message: Dict[str, Any] = {"op": "hello", "protocol": PROTOCOL_VERSION,
                                             "client": f"clipvisor-python/{__version__}", "pid": os.getpid()}
            if self.slabs > 0:
                hello_message["slabs"] = self.slabs
            conn.send(hello_message, deadline)
            got = conn.recv(deadline)
            if got is None:
                raise SupervisorUnavailable(f"no hello from the supervisor at {path} within {self.connect_timeout} s")
            hello, fd = got
            close_fd(fd)
            if hello.get("op") != "hello" or hello.get("ok") is not True:
                err = hello.get("error") or {}
                msg = err.get("message") if isinstance(err, dict) else None
                raise ProtocolError(f"the supervisor at {path} refused the hello: {msg or hello}")
            if hello.get("protocol") != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"the supervisor at {path} speaks protocol {hello.get('protocol')}, this client {PROTOCOL_VERSION}")
            session = Session(conn, hello)
            session.margin = self._server_margin(session, deadline)
        except BaseException:
            conn.close()
            raise
        return session

    def _server_margin(self, s: Session, deadline: float) -> float:
        """`margin`, else how long the supervisor lets a clip wait in its queue (its hello's
        ``queue_wait_ms``; servers before 0.1.0 say it only in ``status``) plus 10 s."""
        if self.margin is not None:
            return float(self.margin)
        limit = s.hello.get("queue_wait_ms")
        if not isinstance(limit, (int, float)):
            s.conn.send({"op": "status", "id": 0}, deadline)
            got = s.conn.recv(deadline)
            if got is None:
                raise SupervisorUnavailable(f"no status from the supervisor at {s.conn.path}")
            reply, fd = got
            close_fd(fd)
            status = reply.get("status")
            queue = status.get("queue") if isinstance(status, dict) else None
            limit = queue.get("wait_limit_ms") if isinstance(queue, dict) else None
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 0:
            return limit / 1000.0 + 10.0
        return _FALLBACK_MARGIN_S

    def _kill(self, s: Session, exc: BaseException) -> None:
        """Marks a session dead (lock held): closes it and wakes every waiter."""
        if s.dead is None:
            s.dead = exc
        s.conn.close()
        for queue in s.pending.values():
            while queue:
                close_fd(queue.popleft()[1])
        s.slabs.close()
        if self.current is s:
            self.current = None
        for waiter in set(s.waiters.values()):
            waiter.notify_all()

    # -- requests ------------------------------------------------------------------------------

    def send(self, s: Session, message: Dict[str, Any], fd: Optional[int] = None,
             resend: bool = True) -> Tuple[Session, int]:
        """Registers and sends a request; returns the session it went out on and its id.

        A connection found closed before any byte of the request left (typically an idle
        connection to a supervisor that exited or was restarted: the write fails with EPIPE)
        delivered nothing, so with `resend` the request goes once more on a new connection
        (which may start the private supervisor again)."""
        while True:
            with self._lock:
                rid = s.next_id
                s.next_id += 1
                s.pending[rid] = collections.deque()
            message["id"] = rid
            # Slabs whose blocks were copied out go back with whatever is sent next.
            releases = s.slabs.take_releases()
            if releases:
                message["release_slabs"] = releases
            else:
                message.pop("release_slabs", None)
            try:
                s.conn.send(message, time.monotonic() + self.connect_timeout, fd)
            except ValueError as exc:  # too large, or a value JSON cannot carry; the connection is intact
                with self._lock:
                    s.pending.pop(rid, None)
                s.slabs.restore_releases(releases)
                message.pop("release_slabs", None)
                raise InvalidRequest("invalid_request", message.get("path"), str(exc)) from None
            except BaseException as exc:
                with self._lock:
                    s.pending.pop(rid, None)
                    if isinstance(exc, SupervisorUnavailable):
                        self._kill(s, exc)
                    elif s.conn.closed:
                        self._kill(s, SupervisorUnavailable("send interrupted"))
                if resend and isinstance(exc, ConnectionClosed) and not exc.delivered:
                    resend = False
                    s = self.session()
                    continue
                raise
            return s, rid

    def next(self, s: Session, rids: Iterable[int], deadline: float) -> Tuple[int, Dict[str, Any], Optional[BlockRef]]:
        """The next message for any of `rids`: (id, message, fd). Raises SupervisorUnavailable
        when the connection dies and SupervisorTimeout when `deadline` passes.

        One calling thread at a time reads the connection for everyone. It keeps reading until
        an answer of its own has come, waking only the thread each other answer is for, and then
        hands reading over to one waiting thread: a message costs one wake-up, not one per thread
        (with 4 loader threads, half the context switches per call: bench/client_cpu.py)."""
        ids: Set[int] = set(rids)
        me = threading.Condition(self._lock)
        with self._lock:
            for rid in ids:
                s.waiters[rid] = me
        try:
            return self._next(s, ids, me, deadline)
        finally:
            with self._lock:
                for rid in ids:
                    if s.waiters.get(rid) is me:
                        del s.waiters[rid]
                if not s.reading and s.waiters:
                    # Nobody reads now: one waiting thread takes over.
                    next(iter(s.waiters.values())).notify()

    def _next(self, s: Session, ids: Set[int], me: threading.Condition,
              deadline: float) -> Tuple[int, Dict[str, Any], Optional[BlockRef]]:
        reader = False  # whether this call holds the connection's reading
        while True:
            if not reader:
                with self._lock:
                    for rid in ids:
                        queue = s.pending.get(rid)
                        if queue:
                            message, fd = queue.popleft()
                            return rid, message, fd
                    if s.dead is not None:
                        raise SupervisorUnavailable(f"lost the supervisor at {s.conn.path}: {s.dead}")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise SupervisorTimeout(
                            f"no answer from the supervisor at {s.conn.path} within the deadline plus "
                            f"{s.margin:g} s margin")
                    if s.reading:
                        # Woken by an answer, a hand-over or the connection's end; the timeout
                        # bounds any wake-up lost to a race.
                        me.wait(min(remaining, 1.0))
                        continue
                    s.reading = reader = True
            try:
                got = s.conn.recv(deadline)
            except BaseException as exc:
                with self._lock:
                    s.reading = reader = False
                    if isinstance(exc, (SupervisorUnavailable, ProtocolError)) or s.conn.closed:
                        self._kill(s, exc)
                if isinstance(exc, (SupervisorUnavailable, ProtocolError)):
                    # What killed the session first (close(), another thread's timeout) says why.
                    raise SupervisorUnavailable(f"lost the supervisor at {s.conn.path}: {s.dead or exc}") from exc
                raise
            with self._lock:
                if got is not None:
                    message, fd = got
                    block: Optional[BlockRef] = fd
                    if "slab" in message:
                        try:
                            block = s.slabs.lease(message, fd)
                        except ProtocolError as exc:
                            s.reading = reader = False
                            self._kill(s, exc)
                            raise SupervisorUnavailable(f"lost the supervisor at {s.conn.path}: {exc}") from exc
                    answer_id = message.get("id")
                    queue = s.pending.get(answer_id) \
                        if isinstance(answer_id, int) and not isinstance(answer_id, bool) else None
                    if queue is not None:
                        queue.append((message, block))
                        waiter = s.waiters.get(answer_id)  # type: ignore[arg-type]
                        if waiter is not None and waiter is not me:
                            waiter.notify()
                    else:
                        close_fd(block)  # an answer nobody waits for (cancelled, timed out)
                # Reading is given up once an answer of ours is there, the deadline has passed
                # (`recv` returned nothing) or the session died; else this thread reads on.
                if got is None or s.dead is not None or any(s.pending.get(rid) for rid in ids):
                    s.reading = reader = False

    def finish(self, s: Session, rid: int) -> None:
        """Forgets a request whose last answer came (closing any fd of answers left unread)."""
        with self._lock:
            queue = s.pending.pop(rid, None)
            if queue:
                for _, fd in queue:
                    close_fd(fd)

    def abandon(self, s: Session, rids: Iterable[int], kill: bool = False) -> None:
        """Gives up on requests: cancels them on the supervisor (best effort) and forgets them.
        With `kill`, drops the connection (the supervisor then cancels everything of ours)."""
        rids = list(rids)
        for rid in rids:
            self.finish(s, rid)
        if kill:
            with self._lock:
                self._kill(s, SupervisorTimeout("gave up waiting for the supervisor"))
            return
        for rid in rids:
            if not s.usable():
                return
            try:
                _, cid = self.send(s, {"op": "cancel", "target": rid}, resend=False)
                self.finish(s, cid)  # its answer is dropped when it comes
            except Exception:
                return

    def release_now(self, s: Session) -> None:
        """Sends the slabs whose blocks were copied out at once, in a ``release`` request of their
        own, instead of with the next request: while a sample's clips come in, its clips not yet
        started can then have them. Its answer is dropped when it comes. A connection lost
        meanwhile is reported by the caller's next wait, not here."""
        if not s.slabs.has_releases():
            return
        try:
            _, rid = self.send(s, {"op": "release"}, resend=False)
        except SupervisorUnavailable:
            return
        self.finish(s, rid)

    def exchange(self, s: Session, message: Dict[str, Any], fd: Optional[int], until: float) -> Answer:
        """Sends one request and waits until `until` for its answer (and the fd that came with it).
        `fd`, if any, is closed once sent: the kernel holds its own reference while in flight.
        A request whose answer does not come in time is abandoned (the connection is dropped, so
        the supervisor cancels it)."""
        try:
            s, rid = self.send(s, message, fd)
        finally:
            close_fd(fd)
        try:
            _, reply, got = self.next(s, [rid], until)
        except SupervisorTimeout:
            self.abandon(s, [rid], kill=True)
            raise
        except BaseException:
            self.abandon(s, [rid])
            raise
        self.finish(s, rid)
        return reply, got

    def simple(self, op: Dict[str, Any]) -> Dict[str, Any]:
        """A request answered at once by one message without a block (status, skips)."""
        s = self.session()
        message, fd = self.exchange(s, op, None, time.monotonic() + self.connect_timeout + s.margin)
        close_fd(fd)
        return message


def open_for_passing(path: str) -> int:
    """Opens a clip to pass its fd (``pass_fd=True``); a missing or unreadable file is the
    clip's skip, as the supervisor would answer it."""
    # O_NONBLOCK: opening a FIFO for reading must not block until a writer appears (the
    # supervisor's deadline handles a FIFO that never delivers).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ClipNotFound("not_found", path, f"{path}: {exc.strerror}") from None
    except PermissionError as exc:
        raise ClipPermission("permission", path, f"{path}: {exc.strerror}") from None
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except OSError:
        pass
    return fd


def retry_pause(error: Mapping[str, Any], attempt: int, start: float, deadline_s: float, name: Optional[str]) -> float:
    """How long to wait before retrying an ``overloaded`` answer; raises ``Overloaded`` when the
    deadline would pass first, or at once when no worker can start (``detail: no_workers``:
    waiting does not help, and the operator must look at the supervisor)."""
    retry_after = error.get("retry_after_ms")
    prefix = f"{name}: " if name else ""
    if error.get("detail") == "no_workers":
        raise Overloaded(f"{prefix}{error.get('message', 'no decode worker can start')}", name, retry_after)
    pause = _backoff(attempt, retry_after)
    if time.monotonic() + pause - start >= deadline_s:
        raise Overloaded(f"{prefix}the supervisor stayed overloaded for the whole {deadline_s:g} s deadline"
                         f" ({error.get('message', 'overloaded')})", name, retry_after)
    return pause


def _backoff(attempt: int, retry_after_ms: Any) -> float:
    """Exponential back-off from 50 ms, capped at 2 s, at least the supervisor's hint, ±20%."""
    base: float = min(_OVERLOADED_MAX_BACKOFF, _OVERLOADED_FIRST_BACKOFF * (2 ** attempt))
    if isinstance(retry_after_ms, (int, float)) and retry_after_ms > 0:
        base = max(base, retry_after_ms / 1000.0)
    return base * random.uniform(0.8, 1.2)
