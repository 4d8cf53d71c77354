"""Shared fixtures: short socket paths, a fake in-process supervisor, an isolated environment."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
#: The supervisor the integration tests start: $CLIPVISOR_BIN, else this checkout's debug build.
BINARY = os.environ.get("CLIPVISOR_BIN") or os.path.join(REPO, ".build", "debug", "clipvisor")
sys.path.insert(0, HERE)
try:
    import clipvisor  # noqa: F401  (the installed package, when pip-installed)
except ImportError:  # running from the source tree
    sys.path.insert(0, os.path.dirname(HERE))

import clipvisor  # noqa: E402
from clipvisor import spawn  # noqa: E402
from fakeserver import FakeServer  # noqa: E402


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for Unix socket paths (108-byte limit; pytest's tmp_path is long)."""
    d = tempfile.mkdtemp(prefix="cvt-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake_server(short_dir: str) -> Iterator[FakeServer]:
    server = FakeServer(os.path.join(short_dir, "s.sock"))
    yield server
    server.stop()


@pytest.fixture
def client(fake_server: FakeServer) -> Iterator[clipvisor.Client]:
    c = clipvisor.Client(fake_server.path, spawn=False, margin=2.0, connect_timeout=2.0)
    yield c
    c.close()


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, short_dir: str) -> Iterator[str]:
    """No discoverable supervisor: no $CLIPVISOR_SOCKET, a private XDG_RUNTIME_DIR, no system
    socket, no job ids, and a fresh private-supervisor slot (stopped afterwards)."""
    for var in ("CLIPVISOR_SOCKET", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID",
                "CLIPVISOR_SERVE_ARGS"):
        monkeypatch.delenv(var, raising=False)
    runtime = os.path.join(short_dir, "run")
    os.mkdir(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    monkeypatch.setattr(spawn, "SYSTEM_SOCKET", os.path.join(short_dir, "no-system.sock"))
    monkeypatch.setattr(spawn, "_private", None)
    yield short_dir
    private = spawn._private
    if private is not None and private.root_pid == os.getpid():
        private.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_fds(expected: int, timeout: float = 2.0) -> int:
    """The open fd count once it drops to `expected` or below (the in-process fake server closes its
    copies from its own threads, a moment after the client has its answer), or after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    n = open_fds()
    while n > expected and time.monotonic() < deadline:
        time.sleep(0.01)
        n = open_fds()
    return n
