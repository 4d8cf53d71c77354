"""Framing, fd passing and error mapping, over real socketpairs (no supervisor needed)."""

from __future__ import annotations

import array
import json
import os
import pickle
import socket
import struct
import time

import pytest

from clipvisor import errors as E
from clipvisor.errors import ProtocolError, SupervisorUnavailable
from clipvisor.protocol import MAX_MESSAGE_BYTES, Connection, ConnectionClosed, encode
from conftest import open_fds


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a, "test"), b


def soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


def frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("<I", len(body)) + body


def test_encode_is_length_prefixed_compact_utf8() -> None:
    data = encode({"op": "hello", "name": "é"})
    n = struct.unpack_from("<I", data)[0]
    assert n == len(data) - 4
    assert json.loads(data[4:].decode("utf-8")) == {"op": "hello", "name": "é"}
    with pytest.raises(ValueError):
        encode({"x": "a" * MAX_MESSAGE_BYTES})
    with pytest.raises(ValueError):
        encode({"x": float("nan")})


def test_round_trip_and_fd_passing() -> None:
    conn, peer = pair()
    r, w = os.pipe()
    conn.send({"op": "decode", "id": 1}, soon(), fd=r)
    os.close(r)
    data, anc, _, _ = peer.recvmsg(4096, socket.CMSG_SPACE(4))
    assert json.loads(data[4:]) == {"op": "decode", "id": 1}
    fds = array.array("i")
    fds.frombytes(anc[0][2])
    os.write(w, b"hi")
    assert os.read(fds[0], 2) == b"hi"
    os.close(fds[0])
    os.close(w)
    # server -> client with an fd on the first byte
    r, w = os.pipe()
    msg = frame({"id": 1, "ok": True})
    peer.sendmsg([msg[:3]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    peer.sendall(msg[3:])
    os.close(r)
    got = conn.recv(soon())
    assert got is not None
    message, fd = got
    assert message == {"id": 1, "ok": True} and fd is not None
    assert os.get_inheritable(fd) is False  # MSG_CMSG_CLOEXEC
    os.close(fd)
    os.close(w)
    conn.close()
    peer.close()


def test_fds_stay_with_their_message() -> None:
    """Two back-to-back messages, the second with an fd: the fd is not given to the first."""
    conn, peer = pair()
    r, w = os.pipe()
    peer.sendall(frame({"id": 1}))
    peer.sendmsg([frame({"id": 2})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    os.close(r)
    m1, fd1 = conn.recv(soon())
    m2, fd2 = conn.recv(soon())
    assert (m1["id"], fd1) == (1, None)
    assert m2["id"] == 2 and fd2 is not None
    os.close(fd2)
    os.close(w)


def test_partial_message_survives_a_timeout() -> None:
    conn, peer = pair()
    msg = frame({"id": 9, "ok": True, "pad": "x" * 1000})
    peer.sendall(msg[:2])
    assert conn.recv(time.monotonic() + 0.05) is None
    peer.sendall(msg[2:500])
    assert conn.recv(time.monotonic() + 0.05) is None
    peer.sendall(msg[500:])
    message, fd = conn.recv(soon())
    assert message["id"] == 9 and fd is None


def test_timeout_is_bounded() -> None:
    conn, peer = pair()
    t0 = time.monotonic()
    assert conn.recv(t0 + 0.2) is None
    assert 0.15 <= time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("raw, kind", [
    (struct.pack("<I", 0), ProtocolError),
    (struct.pack("<I", MAX_MESSAGE_BYTES + 1), ProtocolError),
    (struct.pack("<I", 3) + b"{x}", ProtocolError),
    (struct.pack("<I", 2) + b"[]", ProtocolError),
    (struct.pack("<I", 2) + b"\xff\xfe", ProtocolError),
])
def test_malformed_messages(raw: bytes, kind) -> None:
    conn, peer = pair()
    peer.sendall(raw)
    with pytest.raises(kind):
        conn.recv(soon())
    assert conn.closed


def test_end_of_stream() -> None:
    conn, peer = pair()
    peer.close()
    with pytest.raises(ConnectionClosed):
        conn.recv(soon())
    conn, peer = pair()
    peer.sendall(frame({"id": 1})[:6])
    peer.close()
    with pytest.raises(ConnectionClosed, match="mid-message"):
        conn.recv(soon())
    assert isinstance(ConnectionClosed("x"), SupervisorUnavailable)


def test_two_fds_on_one_message_is_a_protocol_error() -> None:
    before = open_fds()
    conn, peer = pair()
    r, w = os.pipe()
    peer.sendmsg([frame({"id": 1})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
    with pytest.raises(ProtocolError):
        conn.recv(soon())
    os.close(r)
    os.close(w)
    peer.close()
    assert open_fds() == before  # the received copies were closed


def test_send_to_closed_peer() -> None:
    conn, peer = pair()
    peer.close()
    with pytest.raises(SupervisorUnavailable):
        for _ in range(100):
            conn.send({"op": "x", "pad": "y" * 10000}, soon())
    assert conn.closed


def test_send_timeout_when_peer_does_not_read() -> None:
    conn, peer = pair()
    t0 = time.monotonic()
    with pytest.raises(SupervisorUnavailable, match="timed out"):
        for _ in range(10000):
            conn.send({"pad": "y" * 100000}, t0 + 0.3)
    assert time.monotonic() - t0 < 2.0
    assert conn.closed  # a half-sent message leaves the stream unusable
    peer.close()


REASONS = {
    "timeout": E.ClipTimeout, "crashed": E.ClipCrashed, "out_of_memory": E.ClipOutOfMemory,
    "decode_error": E.ClipCorrupt, "unsupported": E.ClipUnsupported, "too_large": E.ClipTooLarge,
    "not_found": E.ClipNotFound, "permission": E.ClipPermission, "quarantined": E.ClipQuarantined,
    "invalid_request": E.ClipIncompatible,  # naming the clip: the clip cannot give what was asked
}
NOT_SKIPS = {"cancelled": E.ClipCancelled, "invalid_request": E.InvalidRequest}


@pytest.mark.parametrize("reason, cls", sorted(REASONS.items()))
def test_error_mapping(reason: str, cls) -> None:
    skip = E.skip_from_error({"reason": reason, "message": "/d/x.mp4: bad", "path": "/d/x.mp4", "detail": "d"},
                             clip=3, elapsed_ms=12)
    assert type(skip) is cls
    assert isinstance(skip, E.ClipSkipped) and not isinstance(skip, E.ClipvisorError)
    assert (skip.reason, skip.path, skip.message, skip.detail, skip.clip, skip.elapsed_ms) == (
        reason, "/d/x.mp4", "/d/x.mp4: bad", "d", 3, 12)
    assert reason in str(skip) and "/d/x.mp4" in str(skip)
    again = pickle.loads(pickle.dumps(skip))
    assert type(again) is cls and again.path == "/d/x.mp4" and again.clip == 3


@pytest.mark.parametrize("reason, cls", sorted(NOT_SKIPS.items()))
def test_error_mapping_not_about_the_clip(reason: str, cls) -> None:
    """A request refused before any worker (no `path` in the error) and a cancellation are the
    caller's or the service's: ClipvisorErrors with the same attributes, never skips."""
    error = E.skip_from_error({"reason": reason, "message": "invalid field 'fsp': unknown field", "detail": "fsp"},
                              path="/d/x.mp4", clip=3)
    assert type(error) is cls
    assert isinstance(error, E.ClipvisorError) and not isinstance(error, E.ClipSkipped)
    assert (error.reason, error.path, error.detail, error.clip) == (reason, "/d/x.mp4", "fsp", 3)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls and again.path == "/d/x.mp4" and again.clip == 3 and again.detail == "fsp"


def test_error_mapping_edges() -> None:
    unknown = E.skip_from_error({"reason": "future_reason"}, path="/a")
    assert type(unknown) is E.ClipSkipped and unknown.path == "/a" and "/a" in unknown.message
    assert isinstance(E.skip_from_error({"reason": "invalid_request", "message": "m"}), ValueError)
    for cls in (E.SupervisorUnavailable, E.ProtocolError, E.Overloaded, E.SupervisorTimeout, E.BlockFormatError,
                E.InvalidRequest, E.ClipCancelled):
        assert issubclass(cls, E.ClipvisorError) and not issubclass(cls, E.ClipSkipped)
    # 0.1.0 pickles name _rebuild_skip
    assert E._rebuild_skip(E.ClipTimeout, "timeout", "/a", "m", None, None, None).path == "/a"


# -- undelivered sends, close() from another thread, abandon() after fork ------------------------------


def test_send_on_a_dead_idle_connection_is_marked_undelivered() -> None:
    conn, peer = pair()
    peer.close()  # the supervisor went away while the connection was idle
    with pytest.raises(ConnectionClosed) as info:
        conn.send({"op": "status", "id": 1}, soon())
    assert info.value.delivered is False  # nothing left: safe to send again elsewhere
    assert conn.closed
    with pytest.raises(ConnectionClosed) as info:
        conn.send({"op": "status", "id": 2}, soon())
    assert info.value.delivered is False


def _recv_in_thread(conn: Connection, seconds: float):
    import threading

    outcome: dict = {}
    started = threading.Event()

    def run() -> None:
        started.set()
        try:
            outcome["got"] = conn.recv(time.monotonic() + seconds)
        except BaseException as exc:
            outcome["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    return t, outcome


def test_close_from_another_thread_wakes_recv_and_disconnects() -> None:
    conn, peer = pair()
    t, outcome = _recv_in_thread(conn, 60)
    time.sleep(0.2)  # let it block in poll (the outcome does not depend on it)
    conn.close()
    t.join(20)  # its own deadline is 60 s
    assert not t.is_alive(), "close() did not wake the thread blocked in recv()"
    assert isinstance(outcome.get("exc"), ConnectionClosed), outcome
    peer.settimeout(20)
    assert peer.recv(10) == b""  # the peer sees the disconnect at once
    peer.close()


def test_close_releases_the_fd_only_after_the_reader_left() -> None:
    before = open_fds()
    conn, peer = pair()
    t, outcome = _recv_in_thread(conn, 60)
    time.sleep(0.2)
    conn.close()
    t.join(20)
    assert not t.is_alive() and isinstance(outcome.get("exc"), ConnectionClosed)
    peer.close()
    assert open_fds() == before


def test_abandon_does_not_cut_the_parents_connection() -> None:
    a, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parents = socket.socket(fileno=os.dup(a.fileno()))  # the parent's copy of an inherited fd
    conn = Connection(a, "test")
    conn.abandon()
    assert conn.closed
    parents.sendall(b"ping")
    peer.settimeout(5)
    assert peer.recv(4) == b"ping"  # no shutdown(): the connection still works for the parent
    peer.sendall(b"pong")
    parents.settimeout(5)
    assert parents.recv(4) == b"pong"
    parents.close()
    peer.close()


def test_received_fds_are_cloexec_and_tracked_until_closed() -> None:
    from clipvisor import block as B

    conn, peer = pair()
    r, w = os.pipe()
    peer.sendmsg([frame({"id": 1})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    os.close(r)
    message, fd = conn.recv(soon())
    assert fd is not None and os.get_inheritable(fd) is False
    assert fd in B._open_fds
    B.close_fd(fd)
    assert fd not in B._open_fds
    os.close(w)
    conn.close()
    peer.close()


def test_encode_numpy_values_and_unencodable_keys() -> None:
    np = pytest.importorskip("numpy")
    data = encode({"op": "decode", "fps": np.float32(1.5), "frames": np.int64(3), "flag": np.bool_(True),
                   "timestamps": [np.float64(0.25), 0.5], "arr": np.array([1, 2], dtype=np.uint16),
                   "clips": [{"max_pixels": np.int32(100)}]})
    assert json.loads(data[4:]) == {"op": "decode", "fps": 1.5, "frames": 3, "flag": True, "timestamps": [0.25, 0.5],
                                    "arr": [1, 2], "clips": [{"max_pixels": 100}]}
    with pytest.raises(ValueError, match="'level'"):
        encode({"op": "decode", "level": object()})
    with pytest.raises(ValueError, match=r"'clips\[1\]\.width'"):
        encode({"op": "sample", "clips": [{"width": 1}, {"width": {1, 2}}]})
    with pytest.raises(ValueError, match="'fps'"):
        encode({"op": "decode", "fps": np.float64("nan")})
