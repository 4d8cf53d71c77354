"""Fuzzing the request protocol (docs/protocol.md) against a real supervisor with hypothesis:
random values for every documented key (well-typed, out of range, or of the wrong type), unknown
keys, random ids, random framing and lengths, and random fds attached to random messages.

The supervisor must answer every framed JSON object (with the request's id when the id is a
valid integer; `invalid_request` naming a field for a wrong type or an unknown key), close the
connection only for unframeable input (a length of 0 or above 1 MiB) or a request before hello,
and stay healthy: `status` answers and its fd count returns to where it was (no fd it was sent is
kept). CI runs ~250 examples in well under a minute; more with $CLIPVISOR_FUZZ_EXAMPLES=5000 and
fresh randomness with $CLIPVISOR_FUZZ_RANDOM=1 (CI is derandomized: the same examples each run).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import BINARY, REPO

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "bench"))

import chaos  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.fuzz,
    pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY} (run `swift build`)"),
]

EXAMPLES = int(os.environ.get("CLIPVISOR_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 100, deadline=None, derandomize=os.environ.get("CLIPVISOR_FUZZ_RANDOM") != "1",
                database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink])
REASONS = {"timeout", "crashed", "out_of_memory", "decode_error", "unsupported", "too_large", "not_found", "permission",
           "quarantined", "cancelled", "overloaded", "invalid_request"}
ANSWER_WAIT = 20.0  # deadlines below are at most 3 s; the rest is room for a loaded machine


# --------------------------------------------------------------------------------------------
# A supervisor for the module, and raw protocol access


class Env:
    def __init__(self, sup: chaos.Supervisor, clip: str, work: str):
        self.sup = sup
        self.clip = clip
        self.work = work
        self.extra_fds: List[int] = []
        self.live = 0        # workers of the idle pool
        self.fresh_fds = 0   # the supervisor's fds, idle, before any fuzzing

    def connect(self, hello: bool = True) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(ANSWER_WAIT)
        sock.connect(self.sup.socket)
        if hello:
            chaos.send_msg(sock, {"op": "hello", "protocol": 1, "client": "fuzz", "pid": os.getpid()})
            answer, fds = chaos.recv_msg(sock)
            close_all(fds)
            assert answer.get("ok") is True, answer
        return sock


def close_all(fds: List[int]) -> None:
    for fd in fds:
        os.close(fd)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    work = tempfile.mkdtemp(prefix="cvfz-", dir="/tmp")
    cfg = chaos.Config(workers=1, deadline=3.0, queue_wait=5.0)
    clip = os.path.join(work, "clip.mp4")
    chaos._ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10:duration=1", "-f", "lavfi", "-i",
                   "sine=frequency=440:duration=1", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast",
                   "-c:a", "aac", "-shortest", clip])
    sup = chaos.Supervisor(chaos.Path(BINARY), chaos.Path(work), cfg)
    sup.start()
    e = Env(sup, clip, work)
    e.live = chaos.settle(sup, sup.status()["workers"]["live"], 20)["workers"]["live"]
    e.fresh_fds = len(chaos.fd_links(sup.pid))
    yield e
    close_all(e.extra_fds)
    sup.terminate()
    import shutil
    shutil.rmtree(work, ignore_errors=True)


def send_raw(sock: socket.socket, data: bytes, fd: Optional[int] = None) -> None:
    if fd is None:
        sock.sendall(data)
        return
    sent = socket.send_fds(sock, [data], [fd])
    if sent < len(data):
        sock.sendall(data[sent:])


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("<I", len(body)) + body


def answers_for(sock: socket.socket, rid: Any, until_done: bool) -> List[Dict[str, Any]]:
    """Every answer to `rid` (a sample's per-clip answers up to its final `done`)."""
    got = []
    while True:
        msg, fds = chaos.recv_msg(sock)
        close_all(fds)
        got.append(msg)
        if not until_done or msg.get("done") or (msg.get("ok") is False and "clip" not in msg):
            return got


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the supervisor has closed: EOF, or a reset (it closed with our unread bytes left in
    its receive buffer, which the kernel reports as ECONNRESET)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def settled_fds(env: Env, expected: int, timeout: float = 10.0) -> int:
    end = time.monotonic() + timeout
    n = len(chaos.fd_links(env.sup.pid))
    while n > expected and time.monotonic() < end:
        time.sleep(0.05)
        n = len(chaos.fd_links(env.sup.pid))
    return n


# --------------------------------------------------------------------------------------------
# Strategies: documented keys with well-typed or wrong-typed values

WRONG = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                            st.integers(), max_size=2))
BOOL_KEYS = ["audio", "no_video", "audio_optional", "no_rotate"]
NUMBER_KEYS = ["start", "end", "fps"]
INT_KEYS = ["frames", "min_frames", "max_frames", "frame_factor", "width", "height", "max_pixels", "min_pixels",
            "total_pixels", "factor", "threads", "level", "sample_rate", "channels", "max_source_pixels",
            "max_output_bytes"]


def typed_value(key: str) -> st.SearchStrategy[Any]:
    if key in BOOL_KEYS:
        return st.booleans()
    if key in NUMBER_KEYS:
        return st.one_of(st.floats(-10, 1e6, allow_nan=False), st.integers(-10, 100))
    if key == "timestamps":
        return st.lists(st.floats(-1, 100, allow_nan=False), max_size=12)
    if key == "layout":
        return st.sampled_from(["TCHW", "THWC", "tchw", "", "NCHW"])
    if key == "deadline_ms":
        return st.integers(-100, 3000)
    if key == "tag":
        return st.text(max_size=300)
    return st.one_of(st.integers(-3, 20000), st.integers(-(2**63), 2**63), st.sampled_from([1, 2, 28, 64, 16384]))


def wrong_value(key: str) -> st.SearchStrategy[Any]:
    if key in BOOL_KEYS:
        return st.one_of(st.integers(), st.text(max_size=4), st.lists(st.booleans(), max_size=2))
    if key in ("tag", "layout"):
        return st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=2))
    return st.one_of(WRONG, st.booleans())


DECODE_KEYS = BOOL_KEYS + NUMBER_KEYS + INT_KEYS + ["timestamps", "layout", "deadline_ms", "tag"]


@st.composite
def clip_fields(draw: Any, env_clip: str, allow_path: bool = True) -> Tuple[Dict[str, Any], List[str]]:
    """Decode keys with values; the second item lists the keys deliberately given a wrong type
    or unknown to the protocol (the answer must then be invalid_request)."""
    keys = draw(st.lists(st.sampled_from(DECODE_KEYS), max_size=6, unique=True))
    fields: Dict[str, Any] = {}
    bad: List[str] = []
    for key in keys:
        if draw(st.integers(0, 9)) == 0:
            fields[key] = draw(wrong_value(key))
            bad.append(key)
        else:
            fields[key] = draw(typed_value(key))
    if draw(st.integers(0, 14)) == 0:
        known = DECODE_KEYS + ["path", "fd", "op", "id"]
        name = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in known))
        fields[name] = draw(st.integers())
        bad.append(name)
    if "deadline_ms" not in fields:
        fields["deadline_ms"] = 3000
    if allow_path:
        fields["path"] = draw(st.sampled_from([env_clip, "/nonexistent/clip.mp4", "relative/clip.mp4", "", "/",
                                               env_clip + "\u0000x", "/proc/self/status"]))
    return fields, bad


@st.composite
def requests(draw: Any, env_clip: str) -> Tuple[Dict[str, Any], List[str], bool]:
    """(request, keys that must make it invalid, answered as a sample)."""
    op = draw(st.sampled_from(["decode", "probe", "sample", "status", "skips", "forget", "cancel", "release", "bogus"]))
    rid: Any = draw(st.one_of(st.integers(0, 2**53 - 1), st.integers(0, 50)))
    req: Dict[str, Any] = {"op": op, "id": rid}
    bad: List[str] = []
    if op in ("decode", "probe"):
        fields, bad = draw(clip_fields(env_clip))
        if op == "probe":
            fields = {k: v for k, v in fields.items() if k in ("path", "deadline_ms")}
            bad = [b for b in bad if b in fields]
        req.update(fields)
    elif op == "sample":
        top, bad = draw(clip_fields(env_clip, allow_path=False))
        req.update(top)
        req["all_or_nothing"] = draw(st.one_of(st.booleans(), st.integers(0, 1)))
        if not isinstance(req["all_or_nothing"], bool):
            bad.append("all_or_nothing")
        clips = []
        for i in range(draw(st.integers(0, 4))):
            fields, clip_bad = draw(clip_fields(env_clip))
            fields.pop("tag", None)
            fields.pop("deadline_ms", None)
            clip_bad = [b for b in clip_bad if b in fields]
            clips.append(fields)
            bad += [f"clips[{i}].{b}" for b in clip_bad]
        req["clips"] = clips
    elif op == "skips":
        for key, strat in (("reason", st.one_of(st.sampled_from(sorted(REASONS)), st.text(max_size=5))),
                           ("since_s", st.one_of(st.integers(-5, 10**6), st.floats(0, 1e6))),
                           ("path_glob", st.text(max_size=10)), ("tag", st.text(max_size=10)),
                           ("limit", st.integers(-3, 20000))):
            if draw(st.booleans()):
                req[key] = draw(strat)
    elif op == "forget":
        if draw(st.booleans()):
            req["path"] = draw(st.sampled_from(["/nonexistent/clip.mp4", env_clip]))
        else:
            req["all"] = draw(st.booleans())
    elif op == "cancel":
        req["target"] = draw(st.one_of(st.integers(-1, 100), st.text(max_size=3)))
        if not isinstance(req["target"], int):
            bad.append("target")
    elif op == "bogus":
        bad.append("op")
    if op == "release" or draw(st.integers(0, 5)) == 0:
        # Any request may release block slabs; this connection asked for none, so only an empty
        # list is valid (docs/protocol.md, "Block slabs").
        release = draw(st.one_of(st.lists(st.integers(-2, 20), max_size=3), st.text(max_size=3), st.integers(-2, 5),
                                 st.none()))
        if release is not None:
            req["release_slabs"] = release
            if release != []:
                bad.append("release_slabs")
    if draw(st.integers(0, 19)) == 0:  # an id of the wrong kind
        req["id"] = draw(st.one_of(st.text(max_size=4), st.floats(allow_nan=False), st.integers(-(2**60), -1),
                                   st.just(2**60)))
    return req, bad, op == "sample"


def valid_id(v: Any) -> bool:
    """JSON has one number type: 7.0 is the integer 7, and the supervisor rightly takes it as one."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53


# --------------------------------------------------------------------------------------------
# The properties


@FUZZ
@given(data=st.data())
def test_every_request_is_answered_with_its_id_and_invalid_fields_are_named(env: Env, data: Any) -> None:
    req, bad, is_sample = data.draw(requests(env.clip))
    sock = env.connect()
    try:
        chaos.send_msg(sock, req)
        got = answers_for(sock, req.get("id"), until_done=is_sample and valid_id(req.get("id")))
    finally:
        sock.close()
    final = got[-1]
    if valid_id(req["id"]):
        assert all(m.get("id") == req["id"] for m in got), (req, got)
    else:
        assert final.get("ok") is False and final["error"]["reason"] == "invalid_request", (req, final)
        return
    if final.get("ok") is False:
        error = final.get("error") or {}
        assert error.get("reason") in REASONS, (req, final)
        assert isinstance(error.get("message"), str) and error["message"], final
    if bad:
        assert final.get("ok") is False, f"accepted a request with invalid {bad}: {req} -> {final}"
        error = final["error"]
        assert error["reason"] == "invalid_request", (req, final)
        detail = str(error.get("detail") or "")
        # The field named is one of the request's own (an out-of-range value may come first) or a
        # documented key it conflicts with (max_frames = 1 against the default min_frames = 4).
        named = detail.split(".", 1)[-1] if detail.startswith("clips[") else detail
        known = set(req) | {k for c in req.get("clips", []) for k in c} | set(DECODE_KEYS) | {"op", "id", "path", "fd"}
        assert named in known, (req, final)


JUNK = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.text(min_size=1, max_size=40).map(lambda t: t.encode()),
    st.sampled_from([b"null", b"[]", b"42", b'"op"', b"{}", b'{"op":1}', b'{"id":1}', b'{"op":"decode"', b"\xff\xfe",
                     b'{"op":"status","id":1,"id":2}', b'{"op":"status","id":1e400}', b'[' * 200 + b']' * 200,
                     b'{"a":' * 300 + b'1' + b'}' * 300]),
)


@FUZZ
@given(body=JUNK)
def test_junk_bodies_are_answered_invalid_request_and_the_connection_stays(env: Env, body: bytes) -> None:
    sock = env.connect()
    try:
        send_raw(sock, struct.pack("<I", len(body)) + body)
        answer, fds = chaos.recv_msg(sock)
        close_all(fds)
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        if not (isinstance(parsed, dict) and parsed.get("op") == "status" and parsed.get("id") == 1):
            assert answer.get("ok") is False and answer["error"]["reason"] == "invalid_request", (body, answer)
        # Still open and in sync: a status on the same connection is answered.
        chaos.send_msg(sock, {"op": "status", "id": 77})
        while True:
            follow, fds = chaos.recv_msg(sock)
            close_all(fds)
            if follow.get("id") == 77:
                break
        assert follow.get("ok") is True, follow
    finally:
        sock.close()


@FUZZ
@given(length=st.one_of(st.just(0), st.integers((1 << 20) + 1, 2**32 - 1)), tail=st.binary(max_size=16))
def test_unframeable_lengths_are_refused_and_the_connection_closed(env: Env, length: int, tail: bytes) -> None:
    sock = env.connect()
    try:
        send_raw(sock, struct.pack("<I", length) + tail)
        answer, fds = chaos.recv_msg(sock)
        close_all(fds)
        assert answer.get("ok") is False and answer["error"]["reason"] == "invalid_request" and answer.get("id") is None
        assert closed_by_peer(sock), "the connection must be closed after an unframeable length"
    finally:
        sock.close()


@FUZZ
@given(chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5), hello=st.booleans())
def test_random_streams_then_hangups_never_hurt_the_supervisor(env: Env, chunks: List[bytes], hello: bool) -> None:
    """Random bytes (often a partial frame), then the client hangs up without reading."""
    sock = env.connect(hello=hello)
    try:
        for c in chunks:
            send_raw(sock, c)
    except OSError:
        pass  # the supervisor closed on an unframeable length or a request before hello
    finally:
        sock.close()
    probe = env.connect()
    try:
        chaos.send_msg(probe, {"op": "status", "id": 1})
        answer, fds = chaos.recv_msg(probe)
        close_all(fds)
        assert answer.get("ok") is True
    finally:
        probe.close()


@FUZZ
@given(first=st.one_of(st.fixed_dictionaries({"op": st.sampled_from(["status", "decode", "skips"]),
                                               "id": st.integers(0, 9)}),
                       st.fixed_dictionaries({"op": st.just("hello"), "protocol": st.one_of(st.integers(-5, 5).filter(
                           lambda v: v != 1), st.text(max_size=3), st.none())})))
def test_anything_before_a_valid_hello_is_refused_and_closed(env: Env, first: Dict[str, Any]) -> None:
    sock = env.connect(hello=False)
    try:
        chaos.send_msg(sock, first)
        answer, fds = chaos.recv_msg(sock)
        close_all(fds)
        assert answer.get("ok") is False and answer["error"]["reason"] == "invalid_request", (first, answer)
        assert closed_by_peer(sock)
    finally:
        sock.close()


FD_KINDS = ["devnull", "pipe_read", "pipe_write", "socket", "memfd", "dir", "clip", "clip_write"]


def make_fd(env: Env, kind: str) -> Tuple[int, List[int]]:
    """An fd of the given kind, and every fd opened to make it (the caller closes them)."""
    if kind == "devnull":
        fd = os.open("/dev/null", os.O_RDONLY)
        return fd, [fd]
    if kind in ("pipe_read", "pipe_write"):
        r, w = os.pipe()
        return (r if kind == "pipe_read" else w), [r, w]
    if kind == "socket":
        a, b = socket.socketpair()
        fa, fb = a.detach(), b.detach()
        return fa, [fa, fb]
    if kind == "memfd":
        fd = os.memfd_create("fuzz")
        os.write(fd, b"\x00" * 1000)
        return fd, [fd]
    if kind == "dir":
        fd = os.open(env.work, os.O_RDONLY | os.O_DIRECTORY)
        return fd, [fd]
    fd = os.open(env.clip, os.O_RDONLY if kind == "clip" else os.O_RDWR)
    return fd, [fd]


@FUZZ
@given(kind=st.sampled_from(FD_KINDS),
       op=st.sampled_from(["decode_fd", "decode", "status", "probe_fd", "sample", "junk"]),
       deadline=st.integers(1, 2000))
def test_random_fds_on_random_messages_are_answered_and_never_kept(env: Env, kind: str, op: str, deadline: int) -> None:
    fd, opened = make_fd(env, kind)
    sock = env.connect()
    try:
        if op in ("decode_fd", "probe_fd"):
            msg = {"op": op[:-3], "id": 5, "fd": True, "deadline_ms": deadline}
        elif op == "decode":
            msg = {"op": "decode", "id": 5, "path": env.clip, "frames": 2, "deadline_ms": deadline}
        elif op == "sample":
            msg = {"op": "sample", "id": 5, "clips": [{"path": env.clip, "frames": 2}], "deadline_ms": deadline}
        elif op == "status":
            msg = {"op": "status", "id": 5}
        else:
            msg = {"op": "decode", "id": 5, "fd": "yes"}
        send_raw(sock, frame(msg), fd)
        got = answers_for(sock, 5, until_done=op == "sample")
        final = got[-1]
        assert final.get("id") == 5, (kind, op, final)
        if final.get("ok") is False:
            assert final["error"]["reason"] in REASONS, final
        if op == "junk":
            assert final["error"]["reason"] == "invalid_request"
        if op == "status":
            assert final.get("ok") is True
        if op == "decode_fd" and kind == "clip":
            # A readable fd of a real clip decodes, or times out under a tiny deadline (twice: then
            # it is quarantined, by its file identity).
            assert final.get("ok") is True or final["error"]["reason"] in ("timeout", "quarantined"), final
    finally:
        sock.close()
        close_all(opened)


def test_after_the_fuzzing_the_supervisor_is_healthy_and_kept_no_fd(env: Env) -> None:
    """Runs last in this module (pytest keeps file order): every fd the fuzzers sent is closed."""
    fresh_fds = env.fresh_fds
    sock = env.connect()
    opened_all: List[int] = []
    try:
        for kind in FD_KINDS:
            fd, opened = make_fd(env, kind)
            opened_all += opened
            send_raw(sock, frame({"op": "status", "id": 9}), fd)
            answer, fds = chaos.recv_msg(sock)
            close_all(fds)
            assert answer.get("ok") is True
    finally:
        sock.close()
        close_all(opened_all)
    chaos.settle(env.sup, env.live, 20)
    assert settled_fds(env, fresh_fds) <= fresh_fds, chaos.fd_links(env.sup.pid)
    st_ = env.sup.status()
    assert st_["phase"] == "running" and st_["counters"]["protocol_errors"] > 0, st_["counters"]
    assert env.sup.proc is not None and env.sup.proc.poll() is None, "the supervisor died during fuzzing"
