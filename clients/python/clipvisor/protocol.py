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
    """The supervisor closed the connection (it exited, crashed, or dropped us)."""


def encode(message: Dict[str, Any]) -> bytes:
    """A framed message: length prefix + compact UTF-8 JSON."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if not 1 <= len(body) <= MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds the protocol's {MAX_MESSAGE_BYTES}-byte limit")
    return _LEN.pack(len(body)) + body


def _close_fds(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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

    # -- waiting -------------------------------------------------------------------------------

    def _wait(self, events: int, deadline: float) -> bool:
        """Waits until the socket is ready for `events` or the deadline passes."""
        fileno = self.sock.fileno()
        if self._closed or fileno < 0:
            raise ConnectionClosed(f"connection to {self.path} is closed")
        poller = select.poll()
        poller.register(fileno, events)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = poller.poll(max(1, int(remaining * 1000 + 0.999)))
            if ready:
                return True

    # -- sending -------------------------------------------------------------------------------

    def send(self, message: Dict[str, Any], deadline: float, fd: Optional[int] = None) -> None:
        """Sends one message (with `fd` attached to its first byte). On a timeout or error the
        stream can no longer be trusted: the connection is closed and the error raised."""
        data = memoryview(encode(message))
        with self._send_lock:
            if self._closed:
                raise ConnectionClosed(f"connection to {self.path} is closed")
            pending_fd = fd
            ok = False
            try:
                while data:
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
                ok = True
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"the supervisor at {self.path} closed the connection ({exc.strerror})") from None
            except OSError as exc:
                raise SupervisorUnavailable(f"sending to the supervisor at {self.path}: {exc}") from None
            finally:
                # Whatever stopped a send half-way (an error, a timeout, KeyboardInterrupt) left
                # the stream in an unknown state: never write to it again.
                if not ok:
                    self.close()

    # -- receiving -----------------------------------------------------------------------------

    def _recv_some(self, into: memoryview) -> int:
        n, ancdata, flags, _ = self.sock.recvmsg_into([into], _ANCILLARY, _MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self.close()
            raise ProtocolError("the supervisor sent more file descriptors than one message may carry")
        return n

    def recv(self, deadline: float) -> Optional[Tuple[Dict[str, Any], Optional[int]]]:
        """The next message and its fd (or None), or None when the deadline passes first (a
        partial message is kept for the next call). Raises ConnectionClosed at end of stream
        and ProtocolError on a malformed message (the connection is then closed)."""
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
        """Closes the socket and any fd received for a message not yet complete."""
        if self._closed:
            return
        self._closed = True
        _close_fds(self._fds)
        self._fds = []
        try:
            self.sock.close()
        except OSError:
            pass

    def abandon(self) -> None:
        """Forgets a connection inherited across fork: closes this process's copy of the fd
        without shutdown(), which would also cut the parent's connection."""
        self.close()
