"""The clipvisor client: ask the supervisor for clips, get numpy arrays back.

One :class:`Client` keeps at most one connection per process, opened at first use; requests
from several threads are multiplexed on it by id (whichever waiting thread is free reads the
socket and hands each response to its requester; blocks are decompressed by the requester,
with the GIL released). A connection inherited across ``fork`` is never used: the child closes
its copy and connects anew. Every wait is bounded: by the request's deadline plus
``margin`` seconds; a supervisor that goes away fails the requests in flight at once with
:class:`SupervisorUnavailable`, and the next call reconnects (or restarts the private one).
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import weakref
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from . import block as _block
from . import spawn as _spawn
from .block import read_block_fd
from .errors import (
    ClipFailure,
    ClipNotFound,
    ClipPermission,
    ClipSkipped,
    InvalidRequest,
    Overloaded,
    ProtocolError,
    SupervisorTimeout,
    SupervisorUnavailable,
    skip_from_error,
)
from .protocol import PROTOCOL_VERSION, Connection, ConnectionClosed
from .results import Audio, Clip, Video, build_result

__all__ = ["Client", "default_tag", "__version__"]

__version__ = "0.1.0"

PathLike = Union[str, "os.PathLike[str]"]
Result = Union[Video, Audio, Clip]

_OVERLOADED_FIRST_BACKOFF = 0.05
_SELECTION_KEYS = ("fps", "frames", "timestamps")
_OVERLOADED_MAX_BACKOFF = 2.0


def default_tag() -> Optional[str]:
    """The job id of the scheduler this runs under, for the skip log: ``slurm-$SLURM_JOB_ID``
    or ``torchelastic-$TORCHELASTIC_RUN_ID``."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"-{task}" if task else "")
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run:
        return f"torchelastic-{run}"
    return None


class _Session:
    """One live connection and the requests in flight on it."""

    def __init__(self, conn: Connection, hello: Dict[str, Any]):
        self.conn = conn
        self.hello = hello
        self.pid = os.getpid()
        self.next_id = 1
        self.pending: Dict[int, Deque[Tuple[Dict[str, Any], Optional[int]]]] = {}
        self.reading = False
        self.dead: Optional[BaseException] = None
        self.margin = 70.0

    def usable(self) -> bool:
        return self.dead is None and not self.conn.closed and self.pid == os.getpid()


_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_fd(fd: Optional[int]) -> None:
    if fd is not None:
        _block.close_fd(fd)


def _abs(path: PathLike) -> str:
    p = os.fspath(path)
    if isinstance(p, bytes):  # pragma: no cover - typing says str
        p = os.fsdecode(p)
    if p.startswith("file://"):
        p = p[len("file://"):]
    return os.path.abspath(p)


def _open_for_passing(path: str) -> int:
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


def _error_of(reply: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``error`` object of a failed answer ({} when missing or malformed)."""
    error = reply.get("error")
    return error if isinstance(error, dict) else {}


def _clip_from_detail(detail: Any) -> Optional[int]:
    """The clip index of an invalid_request detail such as ``clips[1].height``."""
    if isinstance(detail, str) and detail.startswith("clips["):
        try:
            return int(detail[6:detail.index("]")])
        except ValueError:
            return None
    return None


def _is_clip_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


# Python option names that differ from protocol keys, or need a conversion.
_DIRECT_KEYS = {
    "fps", "frames", "timestamps", "start", "end", "min_frames", "max_frames", "frame_factor", "width",
    "height", "max_pixels", "min_pixels", "total_pixels", "factor", "layout", "sample_rate", "channels",
    "threads", "level", "max_source_pixels", "max_output_bytes", "audio_optional", "tag",
}


def _protocol_fields(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Protocol keys for Python-side clip options (``rotate=False`` → ``no_rotate``, ``video=False``
    → ``no_video``, ``deadline`` seconds → ``deadline_ms``; ``None`` values left out)."""
    out: Dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in _DIRECT_KEYS:
            out[key] = list(value) if key == "timestamps" else value
        elif key == "rotate":
            if not value:
                out["no_rotate"] = True
        elif key == "video":
            if not value:
                out["no_video"] = True
        elif key == "audio":
            if value:
                out["audio"] = True
        elif key == "deadline":
            out["deadline_ms"] = _ms(float(value))
        elif key == "deadline_ms":
            out["deadline_ms"] = int(value)
        elif key == "options":
            out.update(value)
        elif key in ("path", "pass_fd"):
            pass
        else:
            raise TypeError(f"unknown clip option {key!r}")
    return out


def _expand_sides(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Options with ``video``/``audio`` dicts (as :meth:`Client.clip` takes them, e.g.
    ``video={"fps": 1, "max_pixels": 200704}``) flattened: the dict's options join the others and
    the side becomes ``True``. A frame selection inside ``video`` replaces one outside it."""
    out = dict(options)
    for side in ("video", "audio"):
        value = out.get(side)
        if isinstance(value, Mapping):
            inner = dict(value)
            if side == "video" and any(k in inner for k in _SELECTION_KEYS):
                for k in _SELECTION_KEYS:
                    out.pop(k, None)
            out[side] = True
            out.update(inner)
    return out


def _video_options(fps: Optional[float], frames: Optional[int], timestamps: Optional[Sequence[float]],
                   **rest: Any) -> Dict[str, Any]:
    # fps has a default; send it only when no other selection was asked for.
    opts: Dict[str, Any] = dict(rest)
    if frames is not None:
        opts["frames"] = frames
    elif timestamps is not None:
        opts["timestamps"] = timestamps
    else:
        opts["fps"] = fps
    return opts


class Client:
    """A connection to a clipvisor supervisor.

    Args:
        socket: the supervisor's socket; by default found as docs/protocol.md says
            (``$CLIPVISOR_SOCKET``, the system service, the per-user service).
        deadline: default per-clip deadline in seconds (default: the supervisor's).
        spawn: when no supervisor answers, start a private one (``clipvisor serve`` from
            ``$CLIPVISOR_BIN`` or PATH) shared by this process and its forked children,
            stopped when the program exits.
        margin: seconds added to a request's deadline before the client gives up on an
            answer. It covers time queued for a worker, which the supervisor bounds itself
            (answering ``overloaded``), so by default it is that bound (``queue.wait_limit_ms``
            of ``status``) plus 10 s, or 70 s if the supervisor does not say. Only a wedged
            supervisor ever makes it count.
        connect_timeout: bound on connecting, the hello exchange and starting a private
            supervisor.
        tag: default ``tag`` of requests, recorded in the skip log (default: the SLURM or
            torchelastic job id, when set).
    """

    def __init__(
        self,
        socket: Optional[PathLike] = None,
        deadline: Optional[float] = None,
        spawn: bool = True,
        *,
        margin: Optional[float] = None,
        connect_timeout: float = 10.0,
        tag: Optional[str] = None,
    ):
        self.socket_path = os.fspath(socket) if socket is not None else None
        self.deadline = deadline
        self.spawn = spawn
        self.margin = margin
        self.connect_timeout = connect_timeout
        self.tag = tag if tag is not None else default_tag()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._connect_lock = threading.Lock()
        self._session: Optional[_Session] = None
        self._closed = False
        if spawn and socket is None:
            _spawn.private_supervisor()  # fix the private slot now, before any fork
        _clients.add(self)

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection (requests in flight fail). The client reconnects if used again."""
        with self._lock:
            session, self._session = self._session, None
            if session is not None:
                self._kill(session, SupervisorUnavailable("the client was closed"))

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            session = self._session
            if session is not None and session.pid == os.getpid():
                session.conn.close()
        except Exception:
            pass

    def __getstate__(self) -> Dict[str, Any]:
        # Pickled into spawn/forkserver DataLoader workers: resolve the socket first, so that
        # children use this supervisor (a private one included) instead of starting their own.
        path = self.socket_path
        if path is None:
            path = self._session_for_call().conn.path
        return {"socket": path, "deadline": self.deadline, "spawn": False, "margin": self.margin,
                "connect_timeout": self.connect_timeout, "tag": self.tag}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _forget_after_fork(self) -> None:
        """In a forked child: fresh locks (a parent thread may have held them) and no connection."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._connect_lock = threading.Lock()
        session, self._session = self._session, None
        if session is not None:
            session.conn.abandon()
            for queue in session.pending.values():
                for _, fd in queue:
                    if fd is not None:  # block.py's own after-fork hook may have closed it: not twice
                        _block.close_tracked_fd(fd)

    @property
    def server(self) -> Dict[str, Any]:
        """The supervisor's hello (connects if needed): version, pid, deadline bounds."""
        return dict(self._session_for_call().hello)

    # -- connection --------------------------------------------------------------------------

    def _session_for_call(self) -> _Session:
        with self._connect_lock:
            with self._lock:
                s = self._session
                if s is not None and s.usable():
                    return s
                if s is not None and s.pid != os.getpid():
                    self._session = None
                    s.conn.abandon()
            s = self._connect()
            with self._lock:
                self._session = s
            return s

    def _connect(self) -> _Session:
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

    def _connect_once(self, deadline: float) -> _Session:
        sock = None
        path = None
        tried: List[str] = []
        if self.socket_path is not None:
            candidates = [self.socket_path]
        else:
            candidates = _spawn.candidate_sockets()
        for candidate in candidates:
            tried.append(candidate)
            sock = _spawn.try_connect(candidate, max(0.05, deadline - time.monotonic()))
            if sock is not None:
                path = candidate
                break
        if sock is None:
            if not self.spawn or self.socket_path is not None:
                raise SupervisorUnavailable("no clipvisor supervisor answers at " + ", ".join(tried))
            private = _spawn.private_supervisor()
            sock = private.ensure(max(1.0, deadline - time.monotonic()))
            path = private.socket_path
        assert path is not None
        conn = Connection(sock, path)
        try:
            conn.send({"op": "hello", "protocol": PROTOCOL_VERSION, "client": f"clipvisor-python/{__version__}",
                       "pid": os.getpid()}, deadline)
            got = conn.recv(deadline)
            if got is None:
                raise SupervisorUnavailable(f"no hello from the supervisor at {path} within {self.connect_timeout} s")
            hello, fd = got
            _close_fd(fd)
            if hello.get("op") != "hello" or hello.get("ok") is not True:
                err = hello.get("error") or {}
                msg = err.get("message") if isinstance(err, dict) else None
                raise ProtocolError(f"the supervisor at {path} refused the hello: {msg or hello}")
            if hello.get("protocol") != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"the supervisor at {path} speaks protocol {hello.get('protocol')}, this client {PROTOCOL_VERSION}")
            session = _Session(conn, hello)
            session.margin = self._server_margin(session, deadline)
        except BaseException:
            conn.close()
            raise
        return session

    def _server_margin(self, s: _Session, deadline: float) -> float:
        if self.margin is not None:
            return float(self.margin)
        limit = s.hello.get("queue_wait_ms")  # servers before 0.1.0 only report it in status
        if not isinstance(limit, (int, float)):
            s.conn.send({"op": "status", "id": 0}, deadline)
            got = s.conn.recv(deadline)
            if got is None:
                raise SupervisorUnavailable(f"no status from the supervisor at {s.conn.path}")
            reply, fd = got
            _close_fd(fd)
            status = reply.get("status")
            queue = status.get("queue") if isinstance(status, dict) else None
            limit = queue.get("wait_limit_ms") if isinstance(queue, dict) else None
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 0:
            return limit / 1000.0 + 10.0
        return 70.0

    def _kill(self, s: _Session, exc: BaseException) -> None:
        """Marks a session dead (lock held): closes it and wakes every waiter."""
        if s.dead is None:
            s.dead = exc
        s.conn.close()
        for queue in s.pending.values():
            while queue:
                _close_fd(queue.popleft()[1])
        if self._session is s:
            self._session = None
        self._cond.notify_all()

    # -- request machinery -------------------------------------------------------------------

    def _send(self, s: _Session, message: Dict[str, Any], fd: Optional[int] = None,
              resend: bool = True) -> Tuple[_Session, int]:
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
            try:
                s.conn.send(message, time.monotonic() + self.connect_timeout, fd)
            except ValueError as exc:  # too large, or a value JSON cannot carry; the connection is intact
                with self._lock:
                    s.pending.pop(rid, None)
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
                    s = self._session_for_call()
                    continue
                raise
            return s, rid

    def _next(self, s: _Session, rids: Iterable[int], deadline: float) -> Tuple[int, Dict[str, Any], Optional[int]]:
        """The next message for any of `rids`: (id, message, fd). Raises SupervisorUnavailable
        when the connection dies and SupervisorTimeout when `deadline` passes."""
        ids: Set[int] = set(rids)
        while True:
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
                    self._cond.wait(min(remaining, 1.0))
                    continue
                s.reading = True
            # This thread reads for everyone until one message arrives or its deadline passes.
            try:
                got = s.conn.recv(deadline)
            except BaseException as exc:
                with self._lock:
                    s.reading = False
                    if isinstance(exc, (SupervisorUnavailable, ProtocolError)) or s.conn.closed:
                        self._kill(s, exc)
                    self._cond.notify_all()
                if isinstance(exc, (SupervisorUnavailable, ProtocolError)):
                    # What killed the session first (close(), another thread's timeout) says why.
                    raise SupervisorUnavailable(f"lost the supervisor at {s.conn.path}: {s.dead or exc}") from exc
                raise
            with self._lock:
                s.reading = False
                if got is not None:
                    message, fd = got
                    answer_id = message.get("id")
                    queue = s.pending.get(answer_id) \
                        if isinstance(answer_id, int) and not isinstance(answer_id, bool) else None
                    if queue is not None:
                        queue.append((message, fd))
                    else:
                        _close_fd(fd)  # an answer nobody waits for (cancelled, timed out)
                self._cond.notify_all()

    def _finish(self, s: _Session, rid: int) -> None:
        with self._lock:
            queue = s.pending.pop(rid, None)
            if queue:
                for _, fd in queue:
                    _close_fd(fd)

    def _abandon(self, s: _Session, rids: Iterable[int], kill: bool = False) -> None:
        """Gives up on requests: cancels them on the supervisor (best effort) and forgets them.
        With `kill`, drops the connection (the supervisor then cancels everything of ours)."""
        rids = list(rids)
        for rid in rids:
            self._finish(s, rid)
        if kill:
            with self._lock:
                self._kill(s, SupervisorTimeout("gave up waiting for the supervisor"))
            return
        for rid in rids:
            if not s.usable():
                return
            try:
                _, cid = self._send(s, {"op": "cancel", "target": rid}, resend=False)
                self._finish(s, cid)  # its answer is dropped when it comes
            except Exception:
                return

    def _deadline_s(self, deadline: Optional[float], s: _Session) -> float:
        if deadline is None:
            deadline = self.deadline
        if deadline is None:
            default_ms = s.hello.get("deadline_ms_default")
            deadline = (default_ms / 1000.0) if isinstance(default_ms, (int, float)) and default_ms > 0 else 30.0
        max_ms = s.hello.get("deadline_ms_max")
        if isinstance(max_ms, (int, float)) and max_ms > 0:
            deadline = min(deadline, max_ms / 1000.0)
        return float(deadline)

    def _clip_deadline_s(self, fields: Mapping[str, Any], s: _Session) -> float:
        """The deadline in seconds a clip of a sample asks for itself (0 when it does not)."""
        ms = fields.get("deadline_ms")
        if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0:
            return self._deadline_s(ms / 1000.0, s)
        return 0.0

    def _retry_pause(self, error: Mapping[str, Any], attempt: int, start: float, dl: float,
                     name: Optional[str]) -> float:
        """How long to wait before retrying an ``overloaded`` answer; raises ``Overloaded`` when the
        deadline would pass first, or at once when no worker can start (``detail: no_workers``:
        waiting does not help, and the operator must look at the supervisor)."""
        retry_after = error.get("retry_after_ms")
        prefix = f"{name}: " if name else ""
        if error.get("detail") == "no_workers":
            raise Overloaded(f"{prefix}{error.get('message', 'no decode worker can start')}", name, retry_after)
        pause = self._backoff(attempt, retry_after)
        if time.monotonic() + pause - start >= dl:
            raise Overloaded(f"{prefix}the supervisor stayed overloaded for the whole {dl:g} s deadline"
                             f" ({error.get('message', 'overloaded')})", name, retry_after)
        return pause

    @staticmethod
    def _backoff(attempt: int, retry_after_ms: Any) -> float:
        base = min(_OVERLOADED_MAX_BACKOFF, _OVERLOADED_FIRST_BACKOFF * (2 ** attempt))
        if isinstance(retry_after_ms, (int, float)) and retry_after_ms > 0:
            base = max(base, retry_after_ms / 1000.0)
        return base * random.uniform(0.8, 1.2)

    def _exchange(self, s: _Session, message: Dict[str, Any], fd: Optional[int],
                  until: float) -> Tuple[Dict[str, Any], Optional[int]]:
        """Sends one request and waits until `until` for its answer (and the fd that came with it).
        `fd`, if any, is closed once sent: the kernel holds its own reference while in flight.
        A request whose answer does not come in time is abandoned (the connection is dropped, so
        the supervisor cancels it)."""
        try:
            s, rid = self._send(s, message, fd)
        finally:
            _close_fd(fd)
        try:
            _, reply, got = self._next(s, [rid], until)
        except SupervisorTimeout:
            self._abandon(s, [rid], kill=True)
            raise
        except BaseException:
            self._abandon(s, [rid])
            raise
        self._finish(s, rid)
        return reply, got

    def _simple(self, op: Dict[str, Any]) -> Dict[str, Any]:
        """A request answered at once by one message without a block (status, skips)."""
        s = self._session_for_call()
        message, fd = self._exchange(s, op, None, time.monotonic() + self.connect_timeout + s.margin)
        _close_fd(fd)
        return message

    # -- decode --------------------------------------------------------------------------------

    def _decode(self, kind: str, path: PathLike, options: Dict[str, Any], deadline: Optional[float],
                tag: Optional[str], pass_fd: bool) -> Result:
        fields = _protocol_fields(options)
        tag = tag if tag is not None else self.tag
        if tag is not None:
            fields["tag"] = tag
        reply, block_fd, name = self._clip_request("decode", path, fields, deadline, pass_fd)
        return self._result(kind, reply, block_fd, name)

    def _clip_request(self, op: str, path: PathLike, fields: Dict[str, Any], deadline: Optional[float],
                      pass_fd: bool) -> Tuple[Dict[str, Any], Optional[int], str]:
        """One clip request (``decode`` or ``probe``): retried with back-off while the supervisor
        answers ``overloaded`` and the deadline allows. Returns the ok answer with the fd that came
        with it and the clip's name; raises the clip's :class:`ClipSkipped` otherwise."""
        name = _abs(path)
        start = time.monotonic()
        attempt = 0
        while True:
            s = self._session_for_call()
            dl = self._deadline_s(deadline, s)
            message: Dict[str, Any] = {"op": op, "path": name, **fields, "deadline_ms": _ms(dl)}
            fd = None
            if pass_fd:
                fd = _open_for_passing(name)
                message["fd"] = True
            reply, got = self._exchange(s, message, fd, time.monotonic() + dl + s.margin)
            if reply.get("ok") is True:
                return reply, got, name
            _close_fd(got)
            error = _error_of(reply)
            if error.get("reason") == "overloaded":
                time.sleep(self._retry_pause(error, attempt, start, dl, name))
                attempt += 1
                continue
            raise skip_from_error(error, path=name, elapsed_ms=reply.get("elapsed_ms"))

    @staticmethod
    def _result(kind: str, reply: Mapping[str, Any], fd: Optional[int], path: str) -> Result:
        if fd is None:
            raise ProtocolError(f"{path}: the supervisor answered ok without a block")
        block = read_block_fd(fd)  # closes fd, unmaps before returning
        result = reply.get("result")
        if not isinstance(result, dict):
            result = block.result
        return build_result(kind, result, block.tensors)

    def video(
        self,
        path: PathLike,
        *,
        fps: float = 2.0,
        frames: Optional[int] = None,
        timestamps: Optional[Sequence[float]] = None,
        start: Optional[float] = None,
        end: Optional[float] = None,
        min_frames: int = 4,
        max_frames: int = 768,
        frame_factor: int = 2,
        width: Optional[int] = None,
        height: Optional[int] = None,
        max_pixels: Optional[int] = None,
        min_pixels: Optional[int] = None,
        total_pixels: Optional[int] = None,
        factor: int = 28,
        layout: str = "TCHW",
        rotate: bool = True,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        options: Optional[Mapping[str, Any]] = None,
    ) -> Video:
        """Decodes video frames to uint8 RGB.

        Frame selection: ``fps`` (the Qwen2.5-VL rule, bounded by ``min_frames``/``max_frames``
        and rounded to ``frame_factor``), or ``frames`` (a count), or ``timestamps`` (seconds).
        Size: ``width``+``height``, or a Qwen pixel budget (``max_pixels``, ``min_pixels``,
        ``total_pixels``, ``factor``). ``start``/``end`` bound the range in seconds. ``deadline``
        in seconds; ``pass_fd`` opens the file here and passes the fd (containers).
        ``options`` holds raw protocol keys (e.g. ``{"level": 3}``).

        Raises :class:`ClipSkipped` (a subclass per reason) or :class:`ClipvisorError`.
        """
        opts = _video_options(
            fps, frames, timestamps, start=start, end=end, min_frames=min_frames, max_frames=max_frames,
            frame_factor=frame_factor, width=width, height=height, max_pixels=max_pixels, min_pixels=min_pixels,
            total_pixels=total_pixels, factor=factor, layout=layout, rotate=rotate, options=options)
        return self._decode("video", path, opts, deadline, tag, pass_fd)  # type: ignore[return-value]

    def audio(
        self,
        path: PathLike,
        *,
        sample_rate: int = 16000,
        channels: int = 1,
        start: Optional[float] = None,
        end: Optional[float] = None,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        options: Optional[Mapping[str, Any]] = None,
    ) -> Audio:
        """Decodes the best audio stream to float32 ``(channels, n)`` at ``sample_rate``."""
        opts = dict(video=False, audio=True, sample_rate=sample_rate, channels=channels, start=start, end=end,
                    options=options)
        return self._decode("audio", path, opts, deadline, tag, pass_fd)  # type: ignore[return-value]

    def clip(
        self,
        path: PathLike,
        *,
        video: Union[bool, Mapping[str, Any]] = True,
        audio: Union[bool, Mapping[str, Any]] = True,
        audio_optional: bool = False,
        start: Optional[float] = None,
        end: Optional[float] = None,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        options: Optional[Mapping[str, Any]] = None,
    ) -> Clip:
        """Decodes video and audio of one clip together, on the same time origin (audio-in-video).

        ``video``/``audio``: True, False, or a dict of that side's options (as for
        :meth:`video` / :meth:`audio`, e.g. ``video={"fps": 1, "max_pixels": 200704}``).
        ``audio_optional``: a clip without audio decodes anyway, with ``audio=None``.
        """
        if not video and not audio:
            raise ValueError("clip() needs video, audio or both")
        opts: Dict[str, Any] = {"start": start, "end": end, "options": options}
        if video:
            vopts = dict(video) if isinstance(video, Mapping) else {}
            opts.update(_video_options(vopts.pop("fps", 2.0), vopts.pop("frames", None), vopts.pop("timestamps", None),
                                       **vopts))
        else:
            opts["video"] = False
        if audio:
            opts["audio"] = True
            if isinstance(audio, Mapping):
                opts.update(audio)
            if audio_optional:
                opts["audio_optional"] = True
        return self._decode("clip", path, opts, deadline, tag, pass_fd)  # type: ignore[return-value]

    # -- sample --------------------------------------------------------------------------------

    def sample(
        self,
        clips: Sequence[Union[PathLike, Mapping[str, Any]]],
        *,
        all_or_nothing: bool = True,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        **defaults: Any,
    ) -> List[Union[Result, ClipSkipped]]:
        """Decodes a list of clips (one training sample: a conversation with many videos) in
        parallel across the pool, each under its own deadline; results in order.

        Each item is a path or a dict: ``{"path": ..., <options of video()>}``; add
        ``"audio": True`` for video+audio (a :class:`Clip`), ``"video": False, "audio": True``
        for audio only; as for :meth:`clip`, ``video``/``audio`` may be dicts of that side's
        options (``"audio": {"sample_rate": 16000}``). A clip's ``deadline`` may exceed the
        sample's: the client waits for the longest. ``defaults`` (keyword options) apply to
        every clip.

        With ``all_or_nothing`` (default) the first failure cancels the other clips and is
        raised (its ``clip`` attribute is the index). Without it, failed clips appear in the
        list as :class:`ClipSkipped` instances (not raised).
        """
        if len(clips) == 0:
            return []
        specs: List[Tuple[str, str, Dict[str, Any]]] = []
        base = _expand_sides(defaults)
        for item in clips:
            opts: Dict[str, Any] = dict(base)
            if isinstance(item, Mapping):
                own = _expand_sides(item)
                if any(k in own for k in _SELECTION_KEYS):
                    for k in _SELECTION_KEYS:  # the clip's own frame selection replaces the default's
                        opts.pop(k, None)
                opts.update(own)
                path = opts.get("path")
                if path is None:
                    raise ValueError("every clip of a sample needs a 'path'")
            else:
                path = item
            want_video = opts.get("video", True) is not False
            want_audio = bool(opts.get("audio", False))
            kind = "clip" if (want_video and want_audio) else ("audio" if want_audio else "video")
            if kind == "audio":
                for k in _SELECTION_KEYS:
                    opts.pop(k, None)
            elif "frames" not in opts and "timestamps" not in opts:
                opts.setdefault("fps", 2.0)
            name = _abs(path)
            fields = _protocol_fields(opts)
            specs.append((kind, name, fields))
        if pass_fd:
            return self._sample_with_fds(specs, all_or_nothing, deadline, tag)
        return self._sample(specs, all_or_nothing, deadline, tag)

    def _sample(self, specs: List[Tuple[str, str, Dict[str, Any]]], all_or_nothing: bool,
                deadline: Optional[float], tag: Optional[str]) -> List[Union[Result, ClipSkipped]]:
        results: List[Optional[Union[Result, ClipFailure]]] = [None] * len(specs)
        todo = list(range(len(specs)))
        tag = tag if tag is not None else self.tag
        start = time.monotonic()
        attempt = 0
        while True:
            s = self._session_for_call()
            dl = self._deadline_s(deadline, s)
            message: Dict[str, Any] = {
                "op": "sample", "all_or_nothing": all_or_nothing, "deadline_ms": _ms(dl),
                "clips": [dict(specs[i][2], path=specs[i][1]) for i in todo],
            }
            if tag is not None:
                message["tag"] = tag
            # A clip's own deadline may exceed the sample's: wait for the longest one.
            wait = max([dl] + [self._clip_deadline_s(specs[i][2], s) for i in todo])
            s, rid = self._send(s, message)
            overloaded: List[int] = []
            last_error: Dict[str, Any] = {}
            final: Optional[Dict[str, Any]] = None
            try:
                while final is None:
                    # Each answer restarts the clock: clips finish one by one, each within its
                    # own deadline once a worker takes it.
                    _, reply, fd = self._next(s, [rid], time.monotonic() + wait + s.margin)
                    if reply.get("done") is True or ("clip" not in reply and reply.get("ok") is False):
                        # The end of the sample; or its refusal as a whole (overloaded,
                        # invalid_request, shutting down): `done` without `clip` (docs/protocol.md),
                        # or, from supervisors before 0.1.0, neither `done` nor `clip`.
                        _close_fd(fd)
                        final = reply
                        break
                    local = reply.get("clip")
                    if not isinstance(local, int) or isinstance(local, bool) or not 0 <= local < len(todo):
                        _close_fd(fd)
                        raise ProtocolError(f"sample answer for an unknown clip {local!r}")
                    index = todo[local]
                    kind, name, _ = specs[index]
                    if reply.get("ok") is True:
                        results[index] = self._result(kind, reply, fd, name)
                        continue
                    _close_fd(fd)
                    error = _error_of(reply)
                    if error.get("reason") == "overloaded":
                        overloaded.append(index)
                        last_error = error
                        continue
                    results[index] = skip_from_error(error, path=name, clip=index, elapsed_ms=reply.get("elapsed_ms"))
            except SupervisorTimeout:
                self._abandon(s, [rid], kill=True)
                raise
            except BaseException:
                self._abandon(s, [rid])
                raise
            self._finish(s, rid)
            if final.get("ok") is not True and not _is_clip_index(final.get("clip")):
                # Refused as a whole: no clip was started.
                error = _error_of(final)
                if error.get("reason") != "overloaded":
                    local = _clip_from_detail(error.get("detail"))
                    culprit = todo[local] if local is not None and 0 <= local < len(todo) else None
                    raise skip_from_error(error, path=specs[culprit][1] if culprit is not None else None,
                                          clip=culprit)
                overloaded = list(todo)
                last_error = error
            elif all_or_nothing and final.get("ok") is not True:
                error = _error_of(final)
                failing = final.get("clip")
                culprit = todo[failing] if isinstance(failing, int) and 0 <= failing < len(todo) else None
                if error.get("reason") == "overloaded" or (culprit is not None and culprit in overloaded):
                    overloaded = list(todo)  # the whole sample again
                    last_error = error or last_error
                else:
                    answered = results[culprit] if culprit is not None else None
                    if isinstance(answered, ClipFailure):
                        raise answered
                    culprit_path = specs[culprit][1] if culprit is not None else None
                    raise skip_from_error(error, path=culprit_path, clip=culprit)
            if not overloaded:
                if all_or_nothing:
                    missing = [i for i, r in enumerate(results) if not isinstance(r, (Video, Audio, Clip))]
                    if missing:
                        raise ProtocolError(f"the sample succeeded but clips {missing} have no result")
                missing = [i for i, r in enumerate(results) if r is None]
                if missing:
                    raise ProtocolError(f"the sample ended without answers for clips {missing}")
                for r in results:
                    if isinstance(r, ClipFailure) and not isinstance(r, ClipSkipped):
                        raise r  # not about the clip (cancelled at shutdown): not a skip to list
                return list(results)  # type: ignore[arg-type]
            time.sleep(self._retry_pause(last_error, attempt, start, dl, None))
            attempt += 1
            todo = sorted(overloaded)
            if all_or_nothing:
                results = [None] * len(specs)

    def _sample_with_fds(self, specs: List[Tuple[str, str, Dict[str, Any]]], all_or_nothing: bool,
                         deadline: Optional[float], tag: Optional[str]) -> List[Union[Result, ClipSkipped]]:
        """Clients passing fds send one decode per clip (docs/protocol.md), all at once on the
        connection; all-or-nothing is then done here: the first failure cancels the others."""
        s = self._session_for_call()
        dl = self._deadline_s(deadline, s)
        tag = tag if tag is not None else self.tag
        results: List[Optional[Union[Result, ClipSkipped]]] = [None] * len(specs)
        ids: Dict[int, int] = {}
        outstanding: Set[int] = set()
        retry: List[int] = []
        # A clip's own deadline may exceed the sample's: wait for the longest one.
        wait = max([dl] + [self._clip_deadline_s(fields, s) for _, _, fields in specs])
        try:
            for index, (kind, name, fields) in enumerate(specs):
                message = {"op": "decode", "path": name, "fd": True, **fields}
                message.setdefault("deadline_ms", _ms(dl))
                if tag is not None:
                    message.setdefault("tag", tag)
                try:
                    fd = _open_for_passing(name)
                except ClipSkipped as skip:
                    skip.clip = index
                    if all_or_nothing:
                        raise
                    results[index] = skip
                    continue
                try:
                    # Resent on a new connection only while nothing else is in flight on this one.
                    s, rid = self._send(s, message, fd, resend=not outstanding)
                finally:
                    _close_fd(fd)
                ids[rid] = index
                outstanding.add(rid)
            while outstanding:
                rid, reply, block_fd = self._next(s, outstanding, time.monotonic() + wait + s.margin)
                outstanding.discard(rid)
                self._finish(s, rid)
                index = ids[rid]
                kind, name, _ = specs[index]
                if reply.get("ok") is True:
                    results[index] = self._result(kind, reply, block_fd, name)
                    continue
                _close_fd(block_fd)
                error = _error_of(reply)
                if error.get("reason") == "overloaded":
                    retry.append(index)
                    continue
                failed = skip_from_error(error, path=name, clip=index, elapsed_ms=reply.get("elapsed_ms"))
                if all_or_nothing or not isinstance(failed, ClipSkipped):
                    raise failed
                results[index] = failed
        except SupervisorTimeout:
            self._abandon(s, outstanding, kill=True)
            raise
        except BaseException:
            self._abandon(s, outstanding)
            raise
        for index in retry:  # overloaded: one at a time, with _decode's backoff
            kind, name, fields = specs[index]
            try:
                results[index] = self._decode(kind, name, {"options": fields}, deadline, tag, True)
            except ClipSkipped as skip:
                skip.clip = index
                if all_or_nothing:
                    raise
                results[index] = skip
        return [r for r in results if r is not None]

    # -- other operations ----------------------------------------------------------------------

    def probe(self, path: PathLike, *, deadline: Optional[float] = None, pass_fd: bool = False) -> Dict[str, Any]:
        """What the file holds (container, duration, streams...), probed by a worker under the
        deadline. Raises :class:`ClipSkipped` like a decode."""
        reply, fd, _ = self._clip_request("probe", path, {}, deadline, pass_fd)
        _close_fd(fd)
        probe = reply.get("probe")
        return dict(probe) if isinstance(probe, dict) else {}

    def status(self) -> Dict[str, Any]:
        """The supervisor's status: pid, uptime, version, workers, queue, counters."""
        reply = self._simple({"op": "status"})
        if reply.get("ok") is not True:
            raise ProtocolError(f"status failed: {reply.get('error')}")
        status = reply.get("status")
        return dict(status) if isinstance(status, dict) else {}

    def skips(
        self,
        *,
        reason: Optional[str] = None,
        since: Optional[float] = None,
        path_glob: Optional[str] = None,
        tag: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Recent skips from the supervisor's skip log: ``{"skips": [records], "counts": {reason: n}}``.
        ``since`` is in seconds before now."""
        op: Dict[str, Any] = {"op": "skips"}
        if reason is not None:
            op["reason"] = reason
        if since is not None:
            op["since_s"] = since
        if path_glob is not None:
            op["path_glob"] = path_glob
        if tag is not None:
            op["tag"] = tag
        if limit is not None:
            op["limit"] = limit
        reply = self._simple(op)
        if reply.get("ok") is not True:
            error = _error_of(reply)
            if error.get("reason") == "invalid_request":
                raise skip_from_error(error)
            raise ProtocolError(f"skips failed: {error or reply}")
        return {"skips": list(reply.get("skips") or []), "counts": dict(reply.get("counts") or {})}
