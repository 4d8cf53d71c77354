"""Finding a supervisor, and starting a private one when none answers.

Discovery (docs/protocol.md): ``$CLIPVISOR_SOCKET``, then ``/run/clipvisor/clipvisor.sock``,
then ``$XDG_RUNTIME_DIR/clipvisor/clipvisor.sock`` (else ``/tmp/clipvisor-$UID/clipvisor.sock``):
the first that accepts a connection.

The private supervisor (``Client(spawn=True)`` when nothing answers) runs ``$CLIPVISOR_BIN``, else
the binary bundled in the platform wheel (``clipvisor/bin/clipvisor``), else ``clipvisor`` on PATH.
It is not started when the system service's socket exists but refuses this user (not in group
``clipvisor``): that is reported, and bypassing the service takes ``CLIPVISOR_PRIVATE=1``.
It is shared by the whole process tree of the process that first made a spawning Client:

- Its socket lives in a private directory whose name is fixed when that first Client is made,
  so processes forked afterwards (DataLoader workers) look in the same place. Starting it
  happens under an ``flock`` in that directory: two children that start at once get exactly
  one supervisor; the second finds the first's socket answering.
- The process that starts it exports ``CLIPVISOR_SOCKET`` (inherited by its own children).
- It runs under a small watchdog (:mod:`clipvisor._watchdog`, run with ``python -I -S``) that
  holds the read end of a "lifeline"
  pipe whose write end every process of the tree holds (inherited across fork, closed on
  exec). When the tree is gone — even killed with SIGKILL — the watchdog sees EOF, stops the
  supervisor (SIGTERM, then SIGKILL) and removes the directory. The tree's root also stops it
  from ``atexit`` (forked DataLoader workers leave through ``os._exit`` and never run atexit
  handlers, which is why the lifeline, not atexit, carries the guarantee).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import grp
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from typing import List, Optional

from .errors import SupervisorUnavailable

__all__ = [
    "SYSTEM_SOCKET",
    "ClipvisorWarning",
    "user_socket_path",
    "candidate_sockets",
    "try_connect",
    "find_binary",
    "bundled_binary",
    "refused_system_socket",
    "private_supervisor",
]

SYSTEM_SOCKET = "/run/clipvisor/clipvisor.sock"


class ClipvisorWarning(UserWarning):
    """Something worth knowing that is not an error (e.g. a private supervisor was started)."""


def user_socket_path() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "clipvisor", "clipvisor.sock")
    return f"/tmp/clipvisor-{os.getuid()}/clipvisor.sock"


def candidate_sockets() -> List[str]:
    """The discovery order of docs/protocol.md."""
    out = []
    env = os.environ.get("CLIPVISOR_SOCKET")
    if env:
        out.append(env)
    for path in (SYSTEM_SOCKET, user_socket_path()):
        if path not in out:
            out.append(path)
    return out


def try_connect(path: str, timeout: float) -> Optional[socket.socket]:
    """A connected socket, or None when nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(max(timeout, 0.001))
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError, socket.timeout,
            BlockingIOError, InterruptedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EACCES, errno.EAGAIN,
                         errno.ENAMETOOLONG, errno.EINVAL):
            return None
        raise
    return sock


def refused_system_socket() -> Optional[str]:
    """Why the system service's socket refuses this user, or None.

    A socket that exists but that this user may not connect to (``/run/clipvisor/clipvisor.sock``
    is 0660 root:clipvisor) means the service runs and this user is not in its group: starting
    a private supervisor instead would silently bypass the service's data roots, quarantine and
    skip log, so it takes an explicit ``CLIPVISOR_PRIVATE=1``."""
    if os.environ.get("CLIPVISOR_PRIVATE", "") not in ("", "0"):
        return None
    try:
        st = os.stat(SYSTEM_SOCKET)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or os.access(SYSTEM_SOCKET, os.W_OK):
        return None
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return (f"permission denied on {SYSTEM_SOCKET}: join group {group} (sudo usermod -aG {group} $USER, "
            f"then log in again), or set CLIPVISOR_PRIVATE=1 to start a private supervisor instead")


def bundled_binary() -> Optional[str]:
    """The ``clipvisor`` executable inside this package (``clipvisor/bin/``), which the
    platform wheel built by scripts/package.sh carries; None in the pure-Python package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "clipvisor")
    return path if os.access(path, os.X_OK) else None


def find_binary() -> Optional[str]:
    """``$CLIPVISOR_BIN``, else the binary bundled in the wheel, else ``clipvisor`` on PATH.

    The bundled one comes before PATH because a platform wheel's binaries are the ones its
    client was released with (and PATH may hold the wheel's own ``clipvisor`` entry point)."""
    env = os.environ.get("CLIPVISOR_BIN")
    if env:
        return env
    return bundled_binary() or shutil.which("clipvisor")


# The watchdog (clipvisor/_watchdog.py), run by path under ``python -I -S``: it imports only the
# standard library, so it needs neither site-packages nor this package on sys.path.
_WATCHDOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_watchdog.py")


class PrivateSupervisor:
    """The private supervisor slot of one process tree (see the module docstring)."""

    def __init__(self) -> None:
        self.root_pid = os.getpid()
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        if not os.path.isdir(base) or not os.access(base, os.W_OK):
            base = tempfile.gettempdir()
        token = os.urandom(5).hex()
        self.dir = os.path.join(base, f"clipvisor-private-{os.getuid()}-{self.root_pid}-{token}")
        self.socket_path = os.path.join(self.dir, "s.sock")
        self.log_path = os.path.join(self.dir, "supervisor.log")
        self._lifeline_r, self._lifeline_w = os.pipe()  # close-on-exec; inherited by fork
        self._lock = threading.Lock()
        atexit.register(self._at_exit)

    # -- the slot directory ------------------------------------------------------------------

    def _make_dir(self) -> None:
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            st = os.lstat(self.dir)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise SupervisorUnavailable(f"{self.dir} exists and is not a private directory of this user") from None

    def _flock(self, deadline: float) -> int:
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SupervisorUnavailable(
                        "timed out waiting for another process to start the private supervisor in "
                        + self.dir) from None
                time.sleep(0.01)

    # -- starting ------------------------------------------------------------------------------

    def ensure(self, timeout: float) -> socket.socket:
        """A connection to the tree's private supervisor, started if none answers."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._make_dir()
            lock_fd = self._flock(deadline)
            try:
                sock = try_connect(self.socket_path, 1.0)
                if sock is not None:
                    os.environ["CLIPVISOR_SOCKET"] = self.socket_path
                    return sock
                return self._start(deadline)
            finally:
                os.close(lock_fd)  # releases the flock

    def _start(self, deadline: float) -> socket.socket:
        refused = refused_system_socket()
        if refused:
            raise SupervisorUnavailable(refused)
        binary = find_binary()
        if not binary:
            raise SupervisorUnavailable(
                "no clipvisor supervisor answers (tried " + ", ".join(candidate_sockets())
                + ") and no clipvisor binary to start one ($CLIPVISOR_BIN or PATH)")
        try:
            os.unlink(self.socket_path)  # a stale socket of a dead supervisor; we hold the lock
        except FileNotFoundError:
            pass
        argv = [binary, "serve", "--socket", self.socket_path]
        argv += shlex.split(os.environ.get("CLIPVISOR_SERVE_ARGS", ""))
        with open(self.log_path, "ab") as log:
            try:
                watchdog = subprocess.Popen(
                    [sys.executable, "-I", "-S", _WATCHDOG, str(self._lifeline_r), self.dir] + argv,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    pass_fds=(self._lifeline_r,), start_new_session=True,
                )
            except OSError as exc:
                raise SupervisorUnavailable(f"cannot start the clipvisor watchdog: {exc}") from None
        with open(os.path.join(self.dir, "watchdog.pid"), "w") as f:
            f.write(str(watchdog.pid))
        while True:
            sock = try_connect(self.socket_path, 0.5)
            if sock is not None:
                break
            if watchdog.poll() is not None or time.monotonic() >= deadline:
                if watchdog.poll() is None:
                    _stop(watchdog.pid)
                raise SupervisorUnavailable(
                    f"the private supervisor ({' '.join(argv)}) did not start listening; its log says: "
                    + _tail(self.log_path))
            time.sleep(0.02)
        # The watchdog is reaped by nobody if we never wait(); keep the Popen alive so that
        # Python's subprocess module reaps it when it exits.
        _children.append(watchdog)
        os.environ["CLIPVISOR_SOCKET"] = self.socket_path
        warnings.warn(
            f"clipvisor: no supervisor found; started a private one ({binary} serve, pid file "
            f"{self.dir}/supervisor.pid) at {self.socket_path}; it stops when this program exits. "
            f"Log: {self.log_path}", ClipvisorWarning, stacklevel=_user_stacklevel())
        return sock

    # -- stopping ------------------------------------------------------------------------------

    def _at_exit(self) -> None:
        if os.getpid() != self.root_pid:
            return  # atexit handlers are inherited across fork; only the root stops it
        self.stop()

    def stop(self, wait: float = 5.0) -> None:
        """Stops the private supervisor (if this tree started one) and removes its directory."""
        try:
            os.close(self._lifeline_w)
        except OSError:
            pass
        self._lifeline_w = -1
        pid = _read_pid(os.path.join(self.dir, "watchdog.pid"))
        if pid and _runs_with(pid, self.dir):
            _stop(pid, wait)
        # Belt and braces: a supervisor whose watchdog is gone.
        pid = _read_pid(os.path.join(self.dir, "supervisor.pid"))
        if pid and _runs_with(pid, self.socket_path):
            _stop(pid, wait)
        shutil.rmtree(self.dir, ignore_errors=True)


_children: List[subprocess.Popen] = []


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: Optional[types.FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package:
        frame = frame.f_back
        level += 1
    return level


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _runs_with(pid: int, argument: str) -> bool:
    """Whether process `pid` has `argument` in its command line (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return argument.encode() in f.read()
    except OSError:
        return False


def _stop(pid: int, wait: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for child in _children:
            if child.pid == pid:
                child.poll()
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _zombie(pid):
            return
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode("utf-8", "replace").strip()
            return text or "(empty)"
    except OSError:
        return "(no log)"


_private: Optional[PrivateSupervisor] = None
_private_lock = threading.Lock()


def private_supervisor() -> PrivateSupervisor:
    """This process tree's private supervisor slot (made on first use; inherited by fork)."""
    global _private
    with _private_lock:
        if _private is None:
            _private = PrivateSupervisor()
        return _private


def _after_fork_in_child() -> None:
    global _private_lock
    _private_lock = threading.Lock()
    if _private is not None:
        _private._lock = threading.Lock()
    _children.clear()  # the parent's children are not ours to reap


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
