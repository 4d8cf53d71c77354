"""The private supervisor's watchdog (see :mod:`clipvisor.spawn`).

Usage: ``python -m clipvisor._watchdog LIFELINE SLOT_DIR ARGV...``

Starts ``ARGV`` (the supervisor), writes its pid to ``SLOT_DIR/supervisor.pid``, and watches:

- the lifeline: ``LIFELINE`` is either the read end of a pipe (an fd number) whose write end
  every process of the client's process tree holds (:mod:`clipvisor.spawn`), or ``pid:PID``, a
  process the supervisor must not outlive (a Ray node's raylet, :mod:`clipvisor.ray`), watched
  through its pidfd. When the lifeline ends (EOF: the whole tree is gone, even killed with
  SIGKILL; or the process exits) or on SIGTERM, it stops the supervisor (SIGTERM, then SIGKILL
  after :data:`GRACE_S`), removes ``SLOT_DIR`` and exits 0;
- the supervisor: when it exits by itself, the watchdog says so on stderr (the supervisor's log
  file), removes the pid files that are still its own (under the slot's lock: a client may
  already have started a successor) and exits 0.

Exit status 70 when ``ARGV`` cannot be started; 64 for a wrong command line. SIGINT is ignored
(a Ctrl-C in the terminal goes to the tree, which stops it through the lifeline).

:mod:`clipvisor.spawn` runs this file by path under ``python -I -S``: isolated from the user's
environment and without site-packages, so it starts fast and imports nothing but the standard
library (nothing of the clipvisor package, which may not even be importable there).
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
from typing import List, Optional

#: Seconds the supervisor gets between SIGTERM and SIGKILL.
GRACE_S = 5.0
#: How often the supervisor's exit is checked while the lifeline is quiet (seconds).
POLL_S = 0.25

EX_USAGE = 64
EX_SOFTWARE = 70


def _forget_pid_files(slot: str, mine: "dict[str, int]") -> None:
    """Removes the slot's pid files that still hold our pids, under the slot's lock."""
    try:
        lock = os.open(os.path.join(slot, "lock"), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, pid in mine.items():
            path = os.path.join(slot, name)
            try:
                with open(path) as f:
                    ours = f.read().strip() == str(pid)
                if ours:
                    os.unlink(path)
            except OSError:
                pass
    finally:
        os.close(lock)


def _stop(child: "subprocess.Popen[bytes]") -> None:
    child.terminate()
    try:
        child.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _lifeline(text: str) -> Optional[int]:
    """An fd to poll for the lifeline's end: the pipe's read end, or a pidfd of ``pid:PID``
    (readable when that process exits); None when ``text`` is neither."""
    if text.isdigit():
        return int(text)
    if text.startswith("pid:") and text[4:].isdigit():
        try:
            return os.pidfd_open(int(text[4:]))
        except ProcessLookupError:
            return os.open(os.devnull, os.O_RDONLY)  # already gone: reads as ended at once
    return None


def main(argv: List[str]) -> int:
    lifeline = _lifeline(argv[0]) if argv else None
    if len(argv) < 3 or lifeline is None:
        sys.stderr.write("usage: python -m clipvisor._watchdog LIFELINE_FD|pid:PID SLOT_DIR ARGV...\n")
        return EX_USAGE
    slot, command = argv[1], argv[2:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop: List[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
    except OSError as exc:
        sys.stderr.write(f"clipvisor watchdog: cannot start {command[0]!r}: {exc}\n")
        return EX_SOFTWARE
    with open(os.path.join(slot, "supervisor.pid"), "w") as f:
        f.write(str(child.pid))
    poller = select.poll()
    poller.register(lifeline, select.POLLIN | select.POLLHUP)
    code: Optional[int] = None
    while not stop:
        code = child.poll()
        if code is not None:
            break
        try:
            if poller.poll(int(POLL_S * 1000)):
                break  # EOF (or, never in practice, data): the tree is gone
        except InterruptedError:
            pass
    if code is None:
        _stop(child)
        shutil.rmtree(slot, ignore_errors=True)
        return 0
    sys.stderr.write(f"clipvisor watchdog: supervisor exited with {code}\n")
    _forget_pid_files(slot, {"watchdog.pid": os.getpid(), "supervisor.pid": child.pid})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
