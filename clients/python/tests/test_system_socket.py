"""A system service whose socket refuses this user: told so, no silent private supervisor.

/run/clipvisor/clipvisor.sock is 0660 root:clipvisor. A user outside the group must hear
"permission denied ...: join group clipvisor", not get a private supervisor that bypasses the
service's data roots, quarantine and skip log; CLIPVISOR_PRIVATE=1 makes that choice explicit.
The check needs a user the socket refuses, so it runs in a forked child that drops to nobody.
"""
from __future__ import annotations

import os
import socket
import stat
import tempfile

import pytest

from clipvisor import spawn
from clipvisor.errors import SupervisorUnavailable
from forking import status_in_child

NOBODY = 65534


@pytest.fixture
def refusing_socket():
    if os.getuid() != 0:
        pytest.skip("needs root to make a socket that another user is refused")
    directory = tempfile.mkdtemp(prefix="clipvisor-system-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "clipvisor.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    os.chmod(path, 0o660)  # root:root, as the service's is root:clipvisor
    runtime = tempfile.mkdtemp(prefix="clipvisor-runtime-")
    os.chown(runtime, NOBODY, NOBODY)
    try:
        yield path, runtime
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(directory)
        import shutil
        shutil.rmtree(runtime, ignore_errors=True)


def _as_nobody(runtime: str) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    os.environ.pop("CLIPVISOR_SOCKET", None)
    os.environ.pop("CLIPVISOR_PRIVATE", None)
    os.environ["XDG_RUNTIME_DIR"] = runtime


def test_a_refused_user_is_told_to_join_the_group(refusing_socket, monkeypatch):
    path, runtime = refusing_socket
    assert stat.S_ISSOCK(os.stat(path).st_mode)

    def check() -> bool:
        _as_nobody(runtime)
        spawn.SYSTEM_SOCKET = path
        message = spawn.refused_system_socket()
        assert message is not None and message.startswith(f"permission denied on {path}: join group root"), message
        assert "CLIPVISOR_PRIVATE=1" in message
        import clipvisor
        with pytest.raises(SupervisorUnavailable, match="join group root"):
            with clipvisor.Client(connect_timeout=5) as client:
                client.status()
        # Also when the client may not start one itself: the refusal is the answer.
        with pytest.raises(SupervisorUnavailable, match="join group root"):
            with clipvisor.Client(spawn=False, connect_timeout=5) as client:
                client.status()
        # No private supervisor was started behind the user's back.
        assert "CLIPVISOR_SOCKET" not in os.environ
        assert not any(name.startswith("clipvisor-private-") and os.path.exists(os.path.join(runtime, name, "s.sock"))
                       for name in os.listdir(runtime))
        os.environ["CLIPVISOR_PRIVATE"] = "1"
        return spawn.refused_system_socket() is None

    assert status_in_child(check) == 0


def test_a_member_is_not_refused(refusing_socket):
    path, _ = refusing_socket
    saved = spawn.SYSTEM_SOCKET
    try:
        spawn.SYSTEM_SOCKET = path
        assert spawn.refused_system_socket() is None  # root may connect
    finally:
        spawn.SYSTEM_SOCKET = saved
