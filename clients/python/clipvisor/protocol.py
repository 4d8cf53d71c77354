"""Wire layer of the client ↔ supervisor protocol (docs/protocol.md, version 1).

Every message is a 4-byte little-endian length followed by that many bytes of UTF-8 JSON
(1 ≤ N ≤ 1 MiB); a message may carry one fd (SCM_RIGHTS) attached to its first byte.

:class:`Connection` wraps a non-blocking Unix stream socket. Every operation takes an absolute
``time.monotonic()`` deadline and never waits past it. Reads never go past the end of the
current message, so an fd that arrives belongs to the message being read: the kernel attaches
SCM_RIGHTS to the first byte of the sender's ``sendmsg`` and does not merge data across it.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import block as _block
from .errors import ProtocolError, SupervisorUnavailable

__all__ = ["PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "Connection", "ConnectionClosed", "encode"]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
_LEN = struct.Struct("<I")
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
# Room for a few fds, so that a peer sending more than one is detected, not silently truncated.
_ANCILLARY = socket.CMSG_SPACE(4 * array.array("i").itemsize)


class ConnectionClosed(SupervisorUnavailable):
    """The supervisor closed the connection (it exited, crashed, or dropped us).

    ``delivered`` is False when raised by :meth:`Connection.send` before any byte of the message
    left (the connection was already closed, or the first write failed with EPIPE/ECONNRESET):
    the supervisor never saw the request, so it may safely be sent again on a new connection."""

    def __init__(self, message: str, delivered: bool = True):
        super().__init__(message)
        self.delivered = delivered


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays as plain Python values (numpy is not imported here: a numpy
    value can only exist when numpy already is)."""
    module = type(value).__module__ or ""
    if module == "numpy" or module.startswith("numpy."):
        tolist = getattr(value, "tolist", None)  # ndarray → nested lists; np.generic → a scalar
        if callable(tolist):
            return tolist()
        item = getattr(value, "item", None)
        if callable(item):
            return item()
    raise TypeError(f"a value of type {type(value).__name__} is not JSON serialisable")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)


def _bad_key(value: Any, where: str = "") -> Optional[Tuple[str, BaseException]]:
    """The key path (``fps``, ``clips[1].width``) of the first value that cannot be encoded."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return (where or "<top>", TypeError(f"key {key!r} is not a string"))
            found = _bad_key(item, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _bad_key(item, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    try:
        _dumps(value)
    except (TypeError, ValueError) as exc:
        return (where or "<top>", exc)
    return None


def encode(message: Dict[str, Any]) -> bytes:
    """A framed message: length prefix + compact UTF-8 JSON. A value that cannot be sent (not
    JSON, NaN, infinite) raises ValueError naming its key; numpy scalars are sent as numbers."""
    try:
        body = _dumps(message).encode("utf-8")
    except (TypeError, ValueError) as exc:
        found = _bad_key(message)
        if found is None:
            raise ValueError(f"the request cannot be encoded: {exc}") from None
        where, why = found
        raise ValueError(f"invalid option {where!r}: {why}") from None
    if not 1 <= len(body) <= MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds the protocol's {MAX_MESSAGE_BYTES}-byte limit")
    return _LEN.pack(len(body)) + body


def _close_fds(fds: List[int]) -> None:
    for fd in fds:
        _block.close_fd(fd)


class Connection:
    """One framed, fd-passing connection. Sends are serialised by a lock; receives are meant
    for one reader at a time (the client's demultiplexer guarantees it)."""

    def __init__(self, sock: socket.socket, path: str):
        sock.setblocking(False)
        self.sock = sock
        self.path = path
        self.pid = os.getpid()
        self._send_lock = threading.Lock()
        self._closed = False
        # The socket's fd is released (closed) only once no thread is inside send() or recv():
        # a thread polling the fd number must never find it reused by another file.
        self._state_lock = threading.Lock()
        self._users = 0
        self._released = False
        # Receive state, kept across calls so that a timeout mid-message loses nothing.
        self._prefix = bytearray()
        self._body: Optional[bytearray] = None
        self._got = 0
        self._fds: List[int] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self.sock.fileno()

    def _enter(self, delivered: bool = True) -> None:
        """Marks a thread as using the socket: its fd stays open (not reused) until _leave()."""
        with self._state_lock:
            if self._closed:
                raise ConnectionClosed(f"connection to {self.path} is closed", delivered=delivered)
            self._users += 1

    def _leave(self) -> None:
        with self._state_lock:
            self._users -= 1
            release = self._closed and self._users == 0
        if release:
            self._release()

    # -- waiting -------------------------------------------------------------------------------

    def _wait(self, events: int, deadline: float) -> bool:
        """Waits until the socket is ready for `events` or the deadline passes. Called between
        _enter() and _leave(), so the fd polled is this socket's (close() shuts the socket down,
        which wakes the poll, and leaves the fd open until the last user leaves)."""
        if self._closed:
            return True  # the caller sees it and raises
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = poller.poll(max(1, int(remaining * 1000 + 0.999)))
            if ready or self._closed:
                return True

    # -- sending -------------------------------------------------------------------------------

    def send(self, message: Dict[str, Any], deadline: float, fd: Optional[int] = None) -> None:
        """Sends one message (with `fd` attached to its first byte). On a timeout or error the
        stream can no longer be trusted: the connection is closed and the error raised."""
        data = memoryview(encode(message))
        with self._send_lock:
            self._enter(delivered=False)
            pending_fd = fd
            ok = False
            sent = 0
            try:
                while data:
                    if self._closed:
                        raise ConnectionClosed(f"connection to {self.path} is closed", delivered=sent > 0)
                    try:
                        if pending_fd is not None:
                            n = self.sock.sendmsg(
                                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pending_fd]))],
                                _MSG_NOSIGNAL)
                            pending_fd = None
                        else:
                            n = self.sock.send(data, _MSG_NOSIGNAL)
                    except (BlockingIOError, InterruptedError):
                        if not self._wait(select.POLLOUT, deadline):
                            raise SupervisorUnavailable(
                                f"timed out sending to the supervisor at {self.path}") from None
                        continue
                    data = data[n:]
                    sent += n
                ok = True
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"the supervisor at {self.path} closed the connection ({exc.strerror})",
                                       delivered=sent > 0) from None
            except OSError as exc:
                if self._closed:  # closed by another thread (EBADF after shutdown/close)
                    raise ConnectionClosed(f"connection to {self.path} is closed", delivered=sent > 0) from None
                raise SupervisorUnavailable(f"sending to the supervisor at {self.path}: {exc}") from None
            finally:
                # Whatever stopped a send half-way (an error, a timeout, KeyboardInterrupt) left
                # the stream in an unknown state: never write to it again.
                if not ok:
                    self.close()
                self._leave()

    # -- receiving -----------------------------------------------------------------------------

    def _recv_some(self, into: memoryview) -> int:
        # Under the fork guard: an fd received is tracked before any fork can copy it; a forked
        # child closes its copies of tracked fds (block.py). The socket is non-blocking, so a
        # fork waits at most for one recvmsg.
        with _block.fork_guard():
            n, ancdata, flags, _ = self.sock.recvmsg_into([into], _ANCILLARY, _MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        _block.track_fd(fd, cloexec=not _MSG_CMSG_CLOEXEC)
                    self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self.close()
            raise ProtocolError("the supervisor sent more file descriptors than one message may carry")
        return n

    def recv(self, deadline: float) -> Optional[Tuple[Dict[str, Any], Optional[int]]]:
        """The next message and its fd (or None), or None when the deadline passes first (a
        partial message is kept for the next call). Raises ConnectionClosed at end of stream
        and ProtocolError on a malformed message (the connection is then closed)."""
        self._enter()
        try:
            return self._recv(deadline)
        finally:
            self._leave()

    def _recv(self, deadline: float) -> Optional[Tuple[Dict[str, Any], Optional[int]]]:
        while True:
            if self._closed:
                raise ConnectionClosed(f"connection to {self.path} is closed")
            if self._body is None:
                want = 4 - len(self._prefix)
                buf = bytearray(want)
                target = memoryview(buf)
            else:
                target = memoryview(self._body)[self._got:]
            try:
                n = self._recv_some(target)
            except (BlockingIOError, InterruptedError):
                if not self._wait(select.POLLIN, deadline):
                    return None
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                raise ConnectionClosed(f"the supervisor at {self.path} reset the connection ({exc.strerror})") from None
            except OSError as exc:
                if self._closed:
                    raise ConnectionClosed(f"connection to {self.path} is closed") from None
                self.close()
                raise SupervisorUnavailable(f"reading from the supervisor at {self.path}: {exc}") from None
            if n == 0:
                partial = bool(self._prefix) or self._body is not None
                self.close()
                raise ConnectionClosed(
                    f"the supervisor at {self.path} closed the connection" + (" mid-message" if partial else ""))
            if self._body is None:
                self._prefix += buf[:n]
                if len(self._prefix) < 4:
                    continue
                length = _LEN.unpack(bytes(self._prefix))[0]
                if not 1 <= length <= MAX_MESSAGE_BYTES:
                    self.close()
                    raise ProtocolError(f"the supervisor sent a message length of {length}")
                self._body = bytearray(length)
                self._got = 0
                continue
            self._got += n
            if self._got < len(self._body):
                continue
            body, fds = self._body, self._fds
            self._prefix, self._body, self._got, self._fds = bytearray(), None, 0, []
            if len(fds) > 1:
                _close_fds(fds)
                self.close()
                raise ProtocolError("the supervisor attached more than one fd to a message")
            try:
                message = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                _close_fds(fds)
                self.close()
                raise ProtocolError(f"the supervisor sent a message that is not JSON: {exc}") from None
            if not isinstance(message, dict):
                _close_fds(fds)
                self.close()
                raise ProtocolError("the supervisor sent a message that is not a JSON object")
            return message, (fds[0] if fds else None)

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the connection: shuts the socket down at once (the supervisor sees the
        disconnect, and a thread blocked in send() or recv() wakes up and gets ConnectionClosed),
        then closes the fd and any fd received for a message not yet complete, once no thread is
        using the socket any more."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            if self.pid == os.getpid():  # never cut a connection inherited across fork
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            release = self._users == 0
        if release:
            self._release()

    def _release(self) -> None:
        with self._state_lock:
            if self._released:
                return
            self._released = True
            fds, self._fds = self._fds, []
        _close_fds(fds)
        try:
            self.sock.close()
        except OSError:
            pass

    def abandon(self) -> None:
        """Forgets a connection inherited across fork: closes this process's copy of the fd
        without shutdown(), which would also cut the parent's connection. Takes no lock (a
        parent thread may have held one at the fork): only the forking thread exists here."""
        self._closed = True
        self._released = True
        fds, self._fds = self._fds, []
        for fd in fds:  # block.py's after-fork hook may have closed them already: not twice
            _block.close_tracked_fd(fd)
        try:
            self.sock.close()
        except OSError:
            pass
