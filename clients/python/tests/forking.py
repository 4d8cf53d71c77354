"""Running a check in a forked child, for the fork-safety tests."""
from __future__ import annotations

import os
import signal
import traceback
from typing import Callable


def status_in_child(fn: Callable[[], object]) -> int:
    """Runs fn() in a forked child, killed by SIGALRM after 30 s (a deadlocked child must not hang
    the suite). Returns its exit code: 0 when fn() returned a true value, 3 when false, 2 when it
    raised (the traceback is printed); -signal when it was killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            signal.alarm(30)
            code = 0 if fn() else 3
        except BaseException:
            traceback.print_exc()
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
