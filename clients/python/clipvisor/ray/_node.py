"""The node-local supervisor that a Ray read task decodes through.

A read task never decodes in its own process. It asks the node's supervisor:

1. the one named by ``supervisor=`` (a socket path), or else, with ``supervisor=None``,
   the first that answers of ``$CLIPVISOR_SOCKET``, the system service
   (``/run/clipvisor/clipvisor.sock``) and the per-user socket (docs/protocol.md);
2. otherwise (or with ``supervisor="private"``) the node's **private supervisor**: one per Ray
   node, shared by every task and every worker process on it. Its socket lives in a directory
   named after the Ray node id (``$TMPDIR/clipvisor-ray-$UID/<node id>/s.sock``); the first
   task to find nothing there starts it under an ``flock`` in that directory, later tasks (and
   tasks racing it) connect to it. It runs ``--workers`` = the node's Ray ``CPU`` resource.

The private supervisor must outlive the task (and the Ray worker process) that started it, and
must not outlive the Ray node: it runs under a small watchdog that is detached from the Ray
worker (a double start, so the watchdog is not a child of the worker, which Ray kills with its
children when the worker exits) and watches the node's ``raylet`` through a pidfd. When the
raylet exits (``ray stop``, ``ray.shutdown()`` of a local cluster), the watchdog stops the
supervisor (SIGTERM, then SIGKILL) and removes the directory.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from clipvisor import SupervisorUnavailable
from clipvisor.spawn import _WATCHDOG, _tail, _zombie, try_connect
from clipvisor.spawn import candidate_sockets as shared_candidates

# The watchdog is clipvisor/_watchdog.py, as for clipvisor.spawn, run by path under ``python -I -S``
# with the lifeline ``pid:RAYLET``: the supervisor stops when the raylet exits. Its stderr is the
# slot's supervisor.log.

# Starts the watchdog in a new session and exits at once, so that the watchdog is not a child
# of the Ray worker process.
_LAUNCHER = r"""
import os, subprocess, sys
log = open(sys.argv[1], "ab")
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                     start_new_session=True, close_fds=True)
sys.stdout.write(str(p.pid))
"""


def answers(path: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    sock = try_connect(path, timeout)
    if sock is None:
        return False
    sock.close()
    return True


def slot_directory(node_id: str) -> str:
    """The private supervisor's directory for one Ray node (short: Unix socket paths are limited)."""
    return os.path.join(tempfile.gettempdir(), f"clipvisor-ray-{os.getuid()}", node_id[:20])


def raylet_pid() -> int:
    """The node's raylet: the nearest ancestor named ``raylet`` (a Ray worker's parent), else the parent."""
    pid = os.getpid()
    for _ in range(8):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except (OSError, IndexError):
            break
        if comm == "raylet":
            return pid
        pid = int(fields[1])
        if pid <= 1:
            break
    return os.getppid()


def node_cpus(node_id: str) -> Optional[int]:
    """The Ray ``CPU`` resource of node `node_id` (``ray.nodes()``), or None when unknown."""
    try:
        import ray

        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                cpus = node.get("Resources", {}).get("CPU")
                return max(1, int(cpus)) if cpus else None
    except Exception:  # noqa: BLE001 - only a sizing hint; the supervisor has its own default
        return None
    return None


def find_binary(binary: Optional[str]) -> str:
    found = binary or os.environ.get("CLIPVISOR_BIN") or shutil.which("clipvisor")
    if not found:
        raise SupervisorUnavailable(
            "no clipvisor supervisor answers on this Ray node (tried " + ", ".join(shared_candidates())
            + ") and no clipvisor binary to start the node's private one ($CLIPVISOR_BIN or PATH)")
    return found


class NodeSupervisor:
    """The private supervisor slot of one Ray node (see the module docstring)."""

    def __init__(self, node_id: str, *, cpus: Optional[int], binary: Optional[str] = None,
                 serve_args: Sequence[str] = ()) -> None:
        self.node_id = node_id
        self.dir = slot_directory(node_id)
        self.socket_path = os.path.join(self.dir, "s.sock")
        self.log_path = os.path.join(self.dir, "supervisor.log")
        self.cpus = cpus
        self.binary = binary
        self.serve_args = list(serve_args)

    def ensure(self, timeout: float = 60.0) -> str:
        """The socket of the node's private supervisor, started if nothing answers there."""
        if answers(self.socket_path):
            return self.socket_path
        deadline = time.monotonic() + timeout
        self._make_dirs()
        lock = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise SupervisorUnavailable(
                            "timed out waiting for another task to start the node's supervisor "
                            f"in {self.dir}") from None
                    time.sleep(0.02)
            if answers(self.socket_path):
                return self.socket_path
            self._start(deadline)
            return self.socket_path
        finally:
            os.close(lock)

    def _make_dirs(self) -> None:
        parent = os.path.dirname(self.dir)
        for path in (parent, self.dir):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                    raise SupervisorUnavailable(f"{path} exists and is not a private directory of this user") from None

    def argv(self) -> List[str]:
        argv = [find_binary(self.binary), "serve", "--socket", self.socket_path]
        if self.cpus:
            argv += ["--workers", str(self.cpus)]
        return argv + shlex.split(os.environ.get("CLIPVISOR_SERVE_ARGS", "")) + self.serve_args

    def _start(self, deadline: float) -> None:
        argv = self.argv()
        try:
            os.unlink(self.socket_path)  # a dead supervisor's socket; we hold the lock
        except FileNotFoundError:
            pass
        watchdog = [sys.executable, "-I", "-S", _WATCHDOG, f"pid:{raylet_pid()}", self.dir] + argv
        try:
            launched = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, self.log_path] + watchdog,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SupervisorUnavailable(f"cannot start the node's clipvisor watchdog: {exc}") from None
        with open(os.path.join(self.dir, "watchdog.pid"), "w") as f:
            f.write(launched.stdout.decode().strip())
        while not answers(self.socket_path, 0.5):
            if time.monotonic() >= deadline:
                raise SupervisorUnavailable(
                    f"the node's private supervisor ({' '.join(argv)}) did not start listening on {self.socket_path}; "
                    f"its log says: {_tail(self.log_path)}")
            if not os.path.exists(os.path.join(self.dir, "watchdog.pid")) or _exited(self.dir):
                raise SupervisorUnavailable(
                    f"the node's private supervisor ({' '.join(argv)}) exited at start; its log says: "
                    f"{_tail(self.log_path)}")
            time.sleep(0.05)


def _exited(slot: str) -> bool:
    """Whether the slot's watchdog is gone (it wrote its pid file through the launcher)."""
    try:
        with open(os.path.join(slot, "watchdog.pid")) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return False
    return pid > 0 and _zombie(pid)
