"""clipvisor._watchdog: the private supervisor's watchdog, as a real process on real pipes.

The "supervisor" it watches is a small Python program that records the SIGTERM it gets, so each
test can tell how it was stopped. The private-supervisor tests of test_client_fake.py cover the
watchdog as clipvisor.spawn starts it (by path, under ``python -I -S``) with the fake server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator, List, Optional, Tuple

import pytest

from clipvisor import _watchdog
from conftest import HERE

PACKAGE_ROOT = os.path.dirname(HERE)
WATCHDOG_FILE = os.path.join(PACKAGE_ROOT, "clipvisor", "_watchdog.py")

# A stand-in supervisor: writes "term" to argv[1] when SIGTERMed (then exits 0), or exits with
# argv[2] at once when given.
CHILD = r"""
import signal, sys, time
def term(*_):
    with open(sys.argv[1], "w") as f:
        f.write("term")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
if len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


class Running:
    """A watchdog started the way clipvisor.spawn starts it, with its lifeline and slot."""

    def __init__(self, slot: str, child_args: List[str], by_path: bool = False):
        self.slot = slot
        self.marker = os.path.join(os.path.dirname(slot), "term")  # outside the slot, which goes
        self.lifeline_r, self.lifeline_w = os.pipe()
        with open(os.path.join(slot, "lock"), "w"):
            pass
        entry = ["-I", "-S", WATCHDOG_FILE] if by_path else ["-m", "clipvisor._watchdog"]
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
        self.proc = subprocess.Popen(
            [sys.executable] + entry + [str(self.lifeline_r), slot, sys.executable, "-c", CHILD, self.marker]
            + child_args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(self.lifeline_r,), env=env, start_new_session=True)
        os.close(self.lifeline_r)
        with open(os.path.join(slot, "watchdog.pid"), "w") as f:
            f.write(str(self.proc.pid))

    def supervisor_pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.slot, "supervisor.pid")) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def finish(self, timeout: float = 15.0) -> Tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, err.decode()

    def close(self) -> None:
        if self.lifeline_w >= 0:
            os.close(self.lifeline_w)
            self.lifeline_w = -1


@pytest.fixture
def slot(short_dir: str) -> Iterator[str]:
    path = os.path.join(short_dir, "slot")
    os.mkdir(path, 0o700)
    yield path


@pytest.mark.parametrize("by_path", [False, True], ids=["python -m", "python -I -S file"])
def test_lifeline_eof_stops_the_supervisor_and_removes_the_slot(slot: str, by_path: bool) -> None:
    w = Running(slot, [], by_path=by_path)
    try:
        assert wait_for(lambda: w.supervisor_pid() is not None), w.finish(1)
        pid = w.supervisor_pid()
        assert pid is not None and alive(pid)
        time.sleep(0.3)  # the stand-in has installed its SIGTERM handler
        w.close()  # the whole process tree is gone
        code, err = w.finish()
        assert code == 0, err
        assert not alive(pid)
        with open(w.marker) as f:
            assert f.read() == "term"  # stopped with SIGTERM first
        assert not os.path.exists(slot)
    finally:
        w.close()


def test_sigterm_stops_the_supervisor(slot: str) -> None:
    w = Running(slot, [])
    try:
        assert wait_for(lambda: w.supervisor_pid() is not None)
        pid = w.supervisor_pid()
        assert pid is not None
        time.sleep(0.3)
        w.proc.send_signal(signal.SIGINT)  # ignored: a terminal's Ctrl-C reaches the tree instead
        time.sleep(0.3)
        assert w.proc.poll() is None and alive(pid)
        w.proc.terminate()
        code, err = w.finish()
        assert code == 0, err
        assert not alive(pid) and not os.path.exists(slot)
    finally:
        w.close()


def test_supervisor_exiting_by_itself_forgets_only_its_own_pid_files(slot: str) -> None:
    w = Running(slot, ["3"])  # the stand-in exits 3 at once
    try:
        code, err = w.finish()
        assert code == 0 and "supervisor exited with 3" in err, err
        # its own pid files are gone, the slot (and its lock) stay for a successor
        assert os.path.isdir(slot) and os.path.exists(os.path.join(slot, "lock"))
        assert not os.path.exists(os.path.join(slot, "watchdog.pid"))
        assert not os.path.exists(os.path.join(slot, "supervisor.pid"))
    finally:
        w.close()
    # a successor's pid files (other pids) are left alone
    w = Running(slot, ["3"])
    with open(os.path.join(slot, "watchdog.pid"), "w") as f:
        f.write("999999999")  # a successor's watchdog, written before this one noticed its exit
    try:
        code, err = w.finish()
        assert code == 0, err
        with open(os.path.join(slot, "watchdog.pid")) as f:
            assert f.read() == "999999999"
    finally:
        w.close()


def test_a_supervisor_that_cannot_start(slot: str) -> None:
    r, wfd = os.pipe()
    try:
        missing = os.path.join(slot, "no-such-clipvisor")
        proc = subprocess.run([sys.executable, "-m", "clipvisor._watchdog", str(r), slot, missing, "serve"],
                              pass_fds=(r,), capture_output=True, env=dict(os.environ, PYTHONPATH=PACKAGE_ROOT),
                              timeout=30)
        assert proc.returncode == _watchdog.EX_SOFTWARE
        assert "cannot start" in proc.stderr.decode() and missing in proc.stderr.decode()
        usage = subprocess.run([sys.executable, "-m", "clipvisor._watchdog", "not-a-fd"], capture_output=True,
                               env=dict(os.environ, PYTHONPATH=PACKAGE_ROOT), timeout=30)
        assert usage.returncode == _watchdog.EX_USAGE and b"usage" in usage.stderr
    finally:
        os.close(r)
        os.close(wfd)


def test_a_supervisor_ignoring_sigterm_is_killed_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_watchdog, "GRACE_S", 0.5)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        t0 = time.monotonic()
        _watchdog._stop(child)
        assert child.returncode == -signal.SIGKILL and 0.4 < time.monotonic() - t0 < 5.0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_a_watched_process_that_exits_stops_the_supervisor(slot: str) -> None:
    """``pid:PID`` as the lifeline (a Ray node's raylet): when that process exits, the
    supervisor is stopped with SIGTERM and the slot removed."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    marker = os.path.join(os.path.dirname(slot), "term")
    with open(os.path.join(slot, "lock"), "w"):
        pass
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", WATCHDOG_FILE, f"pid:{parent.pid}", slot, sys.executable, "-c", CHILD, marker],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        supervisor = os.path.join(slot, "supervisor.pid")
        assert wait_for(lambda: os.path.exists(supervisor) and os.path.getsize(supervisor) > 0)
        with open(supervisor) as f:
            pid = int(f.read())
        time.sleep(0.3)  # the stand-in has installed its SIGTERM handler
        assert proc.poll() is None and alive(pid)
        parent.kill()
        parent.wait()
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert not alive(pid) and not os.path.exists(slot)
        with open(marker) as f:
            assert f.read() == "term"
    finally:
        for p in (parent, proc):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_bad_lifeline_is_a_usage_error(slot: str) -> None:
    proc = subprocess.run([sys.executable, WATCHDOG_FILE, "pid:x", slot, "true"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == _watchdog.EX_USAGE and "LIFELINE_FD|pid:PID" in proc.stderr
