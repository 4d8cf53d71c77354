"""The Client against a fake supervisor (tests/fakeserver.py): no Swift needed."""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Dict, List

import numpy as np
import pytest

import clipvisor
from clipvisor import spawn
from conftest import HERE, open_fds, settled_fds
from fakeserver import FakeServer, make_audio, make_frames
from forking import status_in_child


def test_video_result(client: clipvisor.Client, fake_server: FakeServer) -> None:
    v = client.video("/fake/video-4-8-12", fps=1.0, max_pixels=1000)
    assert isinstance(v, clipvisor.Video)
    assert v.frames.dtype == np.uint8 and v.frames.shape == (4, 3, 8, 12)
    assert np.array_equal(v.frames, make_frames(4, 8, 12))
    assert v.pts.tolist() == [0.0, 0.5, 1.0, 1.5] and v.indices.tolist() == [0, 15, 30, 45]
    assert (v.sample_fps, v.width, v.height, v.layout, v.partial) == (2.0, 12, 8, "TCHW", False)
    assert v.frames.flags.writeable and v.frames.flags.c_contiguous
    req = fake_server.requests[-1]
    assert req["op"] == "decode" and req["fps"] == 1.0 and req["max_pixels"] == 1000
    assert req["path"] == "/fake/video-4-8-12" and req["deadline_ms"] == 30000
    assert "frames" not in req and "no_rotate" not in req


def test_request_fields(client: clipvisor.Client, fake_server: FakeServer) -> None:
    client.video("/fake/video-2-4-4", frames=8, rotate=False, layout="THWC", deadline=1.5, tag="t1",
                 start=1.0, end=2.5, options={"level": 3})
    req = fake_server.requests[-1]
    assert req["frames"] == 8 and "fps" not in req and req["no_rotate"] is True and req["layout"] == "THWC"
    assert req["deadline_ms"] == 1500 and req["tag"] == "t1" and req["start"] == 1.0 and req["end"] == 2.5
    assert req["level"] == 3
    client.video("/fake/video-2-4-4", timestamps=(0.5, 1.0))
    req = fake_server.requests[-1]
    assert req["timestamps"] == [0.5, 1.0] and "fps" not in req


def test_relative_paths_are_made_absolute(client: clipvisor.Client, fake_server: FakeServer) -> None:
    with pytest.raises(clipvisor.ClipSkipped):
        client.video("error-timeout")
    assert fake_server.requests[-1]["path"] == os.path.join(os.getcwd(), "error-timeout")


def test_thwc_audio_clip(client: clipvisor.Client, fake_server: FakeServer) -> None:
    v = client.video("/fake/video-3-5-7-thwc", layout="THWC")
    assert v.frames.shape == (3, 5, 7, 3) and (v.width, v.height) == (7, 5)
    a = client.audio("/fake/audio-2-20000", sample_rate=16000, channels=2)
    assert isinstance(a, clipvisor.Audio) and a.samples.dtype == np.float32 and a.samples.shape == (2, 20000)
    assert np.array_equal(a.samples, make_audio(2, 20000)) and a.sample_rate == 16000 and a.duration == 1.25
    req = fake_server.requests[-1]
    assert req["no_video"] is True and req["audio"] is True and req["channels"] == 2 and "fps" not in req
    c = client.clip("/fake/clip-2-4-4-1-16000", video={"fps": 1.0}, audio={"sample_rate": 16000}, audio_optional=True)
    assert isinstance(c, clipvisor.Clip) and c.video.frames.shape == (2, 3, 4, 4)
    assert c.audio.samples.shape == (1, 16000)
    req = fake_server.requests[-1]
    assert req["audio"] is True and req["fps"] == 1.0 and req["audio_optional"] is True and "no_video" not in req


@pytest.mark.parametrize("reason, cls", [
    ("timeout", clipvisor.ClipTimeout), ("crashed", clipvisor.ClipCrashed),
    ("out_of_memory", clipvisor.ClipOutOfMemory), ("decode_error", clipvisor.ClipCorrupt),
    ("unsupported", clipvisor.ClipUnsupported), ("too_large", clipvisor.ClipTooLarge),
    ("not_found", clipvisor.ClipNotFound), ("permission", clipvisor.ClipPermission),
    ("quarantined", clipvisor.ClipQuarantined),
])
def test_skips_raise_their_subclass(client: clipvisor.Client, reason: str, cls) -> None:
    path = f"/fake/error-{reason}"
    with pytest.raises(cls) as info:
        client.video(path)
    assert isinstance(info.value, clipvisor.ClipSkipped) and not isinstance(info.value, clipvisor.ClipvisorError)
    assert info.value.reason == reason and info.value.path == path and path in info.value.message
    assert info.value.detail == "fake detail" and info.value.elapsed_ms == 5
    # the connection is still fine
    assert client.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)


def test_skips_are_about_the_clip_not_the_caller(client: clipvisor.Client) -> None:
    """invalid_request naming the clip (a worker found it cannot give what was asked) is a skip;
    a request wrong whatever the clip, and a cancellation, are not: they are ClipvisorErrors."""
    with pytest.raises(clipvisor.ClipIncompatible) as unfit:
        client.video("/fake/unfit", frames=4)
    assert isinstance(unfit.value, clipvisor.ClipSkipped) and isinstance(unfit.value, ValueError)
    assert unfit.value.reason == "invalid_request" and unfit.value.path == "/fake/unfit"
    assert unfit.value.detail == "frames" and unfit.value.elapsed_ms == 5
    with pytest.raises(clipvisor.InvalidRequest) as wrong:
        client.video("/fake/error-invalid_request")
    assert not isinstance(wrong.value, clipvisor.ClipSkipped)
    assert isinstance(wrong.value, clipvisor.ClipvisorError) and isinstance(wrong.value, ValueError)
    assert wrong.value.reason == "invalid_request" and wrong.value.detail == "fsp"
    assert wrong.value.path == "/fake/error-invalid_request" and "fsp" in str(wrong.value)
    with pytest.raises(clipvisor.ClipCancelled) as cancelled:
        client.video("/fake/error-cancelled")
    assert not isinstance(cancelled.value, clipvisor.ClipSkipped)
    assert isinstance(cancelled.value, clipvisor.ClipvisorError) and cancelled.value.reason == "cancelled"
    # in a sample without all-or-nothing: the clip that does not fit is listed, a wrong request raises
    out = client.sample(["/fake/video-1-2-2", "/fake/unfit"], all_or_nothing=False)
    assert isinstance(out[0], clipvisor.Video) and isinstance(out[1], clipvisor.ClipIncompatible) and out[1].clip == 1
    with pytest.raises(clipvisor.InvalidRequest) as wrong:
        client.sample(["/fake/video-1-2-2", "/fake/error-invalid_request"], all_or_nothing=False)
    assert wrong.value.clip == 1
    with pytest.raises(clipvisor.ClipCancelled):
        client.sample(["/fake/error-cancelled", "/fake/video-1-2-2"], all_or_nothing=False, pass_fd=False)
    # each keeps its type and attributes through pickling and through the one-argument form
    # torch's DataLoader uses to raise a worker's exception again in the main process
    for exc in (unfit.value, wrong.value, cancelled.value):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and (again.reason, again.path, again.detail, again.clip) == \
            (exc.reason, exc.path, exc.detail, exc.clip)
        rebuilt = type(exc)("Caught it in DataLoader worker process 0")
        assert rebuilt.reason == exc.reason and rebuilt.path is None and "worker process 0" in str(rebuilt)


def test_overloaded_is_retried_then_infrastructure(client: clipvisor.Client, fake_server: FakeServer) -> None:
    assert client.video("/fake/overloaded-3/video-1-2-2").frames.shape == (1, 3, 2, 2)
    assert sum(1 for r in fake_server.requests if r.get("path") == "/fake/overloaded-3/video-1-2-2") == 4
    t0 = time.monotonic()
    with pytest.raises(clipvisor.Overloaded) as info:
        client.video("/fake/overloaded-1000/video-1-2-2", deadline=0.4)
    assert 0.1 < time.monotonic() - t0 < 1.5  # gives up before a (jittered) pause would pass the deadline
    assert isinstance(info.value, clipvisor.ClipvisorError) and not isinstance(info.value, clipvisor.ClipSkipped)


def test_broken_blocks_are_rejected(client: clipvisor.Client) -> None:
    client.status()
    before = open_fds()
    for kind, match in (("unsealed", "sealed"), ("partialseal", "sealed"), ("tampered", "invalid block")):
        with pytest.raises(clipvisor.BlockFormatError, match=match):
            client.video(f"/fake/{kind}/video-2-4-4")
    with pytest.raises(clipvisor.ProtocolError):
        client.video("/fake/nofd/video-2-4-4")
    assert settled_fds(before) <= before
    assert client.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)


def test_slab_blocks_are_read_and_released_with_the_next_request(client: clipvisor.Client,
                                                                fake_server: FakeServer) -> None:
    """docs/protocol.md "Block slabs": the slab's fd comes with its first block only, later blocks
    in it are read through the same mapping, and each is released with the next request."""
    assert client.server["slabs"] == 1  # the fake grants one of the client's default four
    for i in range(3):
        v = client.video("/fake/slab-ok/video-3-8-12")
        assert np.array_equal(v.frames, make_frames(3, 8, 12)), f"block {i} read wrong from the slab"
        if i:
            assert fake_server.requests[-1]["release_slabs"] == [0]
    peer = fake_server.peers[-1]
    assert peer.slab_uses == 3, "a released slab takes the next block"
    status_request_count = len(fake_server.requests)
    client.status()
    assert fake_server.requests[status_request_count]["release_slabs"] == [0]
    # A larger block than the slab holds: the client maps the grown slab again.
    assert np.array_equal(client.video("/fake/slab-ok/video-8-32-48").frames, make_frames(8, 32, 48))
    assert peer.slab_uses == 4


def test_a_sample_releases_each_slab_as_soon_as_its_clip_is_read(client: clipvisor.Client,
                                                                  fake_server: FakeServer) -> None:
    """While a sample's clips come in one by one, each slab goes back in a ``release`` request
    at once, so the clips that finish later find it free (the fake answers them 0.25 s apart)."""
    specs = [{"path": f"/fake/delay-{0.05 + 0.25 * i:.2f}/slab-ok/video-2-4-{4 + i}"} for i in range(3)]
    results = client.sample(specs)
    for i, r in enumerate(results):
        assert isinstance(r, clipvisor.Video) and np.array_equal(r.frames, make_frames(2, 4, 4 + i))
    releases = [r for r in fake_server.requests if r["op"] == "release"]
    assert [r["release_slabs"] for r in releases] == [[0], [0]], "one release after each clip but the last"
    assert fake_server.peers[-1].slab_uses == 3, "every clip of the sample found the slab free"


def test_a_slab_answer_that_breaks_the_protocol_drops_the_connection(client: clipvisor.Client) -> None:
    client.status()
    before = open_fds()
    for kind, match in (("unknown", "never came"), ("unsealed", "shrinking"), ("malformed", "malformed slab")):
        with pytest.raises(clipvisor.SupervisorUnavailable, match=match):
            client.video(f"/fake/slab-{kind}/video-2-4-4")
        assert client.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2), "the next call reconnects"
    client.close()
    assert settled_fds(before) <= before


def test_no_slabs_when_asked_for_none(fake_server: FakeServer) -> None:
    with clipvisor.Client(fake_server.path, spawn=False, slabs=0) as c:
        assert c.server["slabs"] == 0 and "slabs" not in fake_server.peers[-1].hello
        assert np.array_equal(c.video("/fake/slab-ok/video-2-4-4").frames, make_frames(2, 4, 4))
        assert fake_server.peers[-1].slab_uses == 0
    with pytest.raises(ValueError, match="slabs"):
        clipvisor.Client(fake_server.path, spawn=False, slabs=17)


def test_decompress_threads_copy_a_large_block_out_alike(fake_server: FakeServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from clipvisor import block as B

    threads_used: List[int] = []
    real_runs = B._readinto_runs

    def spy(whole: Any, frames: Any, flat: Any, threads: int, name: str) -> None:
        threads_used.append(threads)
        real_runs(whole, frames, flat, threads, name)

    monkeypatch.setattr(B, "_readinto_runs", spy)
    # 8 frames of 480x640: 7.4 MB, over the size from which runs go to several threads.
    with clipvisor.Client(fake_server.path, spawn=False, decompress_threads=3) as c:
        for path in ("/fake/video-8-480-640", "/fake/slab-ok/video-8-480-640"):
            assert np.array_equal(c.video(path).frames, make_frames(8, 480, 640))
        assert pickle.loads(pickle.dumps(c)).decompress_threads == 3
        results = c.sample(["/fake/video-8-480-640", "/fake/video-2-4-4"])
        assert np.array_equal(results[0].frames, make_frames(8, 480, 640))
    assert threads_used == [3, 3, 3], "a block fd, a slab and a sample's clip, each on 3 threads"
    for bad in (0, 65, True, 2.0):
        with pytest.raises(ValueError, match="decompress_threads"):
            clipvisor.Client(fake_server.path, spawn=False, decompress_threads=bad)


def test_multiplexing_many_threads_one_connection(client: clipvisor.Client, fake_server: FakeServer) -> None:
    results = {}
    errors = []

    def work(i: int) -> None:
        try:
            delay = (7 - i % 8) * 0.03  # later requests answer first
            v = client.video(f"/fake/delay-{delay:.2f}/video-{1 + i % 3}-4-{4 + i}")
            results[i] = v
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors
    for i, v in results.items():
        assert np.array_equal(v.frames, make_frames(1 + i % 3, 4, 4 + i))
    assert fake_server.connections == 1
    ids = [r["id"] for r in fake_server.requests]
    assert len(ids) == len(set(ids)) == 16


def test_a_reader_whose_answer_came_hands_reading_over_at_once(client: clipvisor.Client,
                                                                fake_server: FakeServer) -> None:
    """The thread reading the connection stops at its own answer and wakes one waiting thread to
    read on; a lost hand-over would leave the others' answers unread until their 1 s re-check."""
    finished: Dict[str, float] = {}
    errors = []

    def work(name: str, delay: float) -> None:
        try:
            v = client.video(f"/fake/delay-{delay:.2f}/video-1-4-4")
            assert np.array_equal(v.frames, make_frames(1, 4, 4))
            finished[name] = time.monotonic()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    client.status()  # connected before the clock starts
    t0 = time.monotonic()
    reader = threading.Thread(target=work, args=("reader", 0.05))
    reader.start()
    time.sleep(0.03)  # it reads; the others wait
    waiters = [threading.Thread(target=work, args=(f"w{i}", 0.25 + 0.1 * i)) for i in range(3)]
    for t in waiters:
        t.start()
    for t in [reader, *waiters]:
        t.join(10)
    assert not errors, errors
    assert set(finished) == {"reader", "w0", "w1", "w2"}
    for i in range(3):
        # Answered at ~0.28-0.48 s; a missed wake-up shows as >= 1 s.
        assert finished[f"w{i}"] - t0 < 0.9, {k: round(v - t0, 3) for k, v in finished.items()}


def test_wedged_supervisor_times_out_and_next_call_reconnects(fake_server: FakeServer) -> None:
    c = clipvisor.Client(fake_server.path, spawn=False, margin=0.3, connect_timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(clipvisor.SupervisorTimeout):
        c.video("/fake/hang", deadline=0.2)
    assert 0.4 <= time.monotonic() - t0 < 1.5
    assert c.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)
    assert fake_server.connections == 2
    c.close()


def test_dead_supervisor_fails_everything_in_flight_promptly(client: clipvisor.Client, fake_server: FakeServer) -> None:
    client.video("/fake/video-1-2-2")
    outcome = {}

    def hang() -> None:
        try:
            client.video("/fake/hang", deadline=20)
        except Exception as exc:
            outcome["hang"] = (exc, time.monotonic())

    t = threading.Thread(target=hang)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    with pytest.raises(clipvisor.SupervisorUnavailable):
        client.video("/fake/die", deadline=20)
    t.join(5)
    assert time.monotonic() - t0 < 1.0
    exc, when = outcome["hang"]
    assert isinstance(exc, clipvisor.SupervisorUnavailable) and when - t0 < 1.0
    # the next call reconnects
    assert client.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)
    assert fake_server.connections == 2


def test_first_call_after_supervisor_restart_is_resent(short_dir: str) -> None:
    """An idle connection to a supervisor that went away looks usable; the next request finds it
    closed before anything was delivered (EPIPE) and goes again on a new connection."""
    path = os.path.join(short_dir, "r.sock")
    first = FakeServer(path)
    c = clipvisor.Client(path, spawn=False, margin=2.0, connect_timeout=5.0)
    try:
        c.status()
        first.stop()  # closes our connection (shutdown + close) before returning
        second = FakeServer(path)
        try:
            assert c.video("/fake/video-1-2-4").frames.shape == (1, 3, 2, 4)
            assert second.connections == 1
            assert [r["path"] for r in second.requests] == ["/fake/video-1-2-4"]
            assert c.status()["pid"] == os.getpid()
            assert second.connections == 1
        finally:
            second.stop()
        # also when nothing but a sample (its own send path) is asked after the restart
        third = FakeServer(path)
        try:
            out = c.sample(["/fake/video-1-2-2", "/fake/video-2-2-2"])
            assert [v.frames.shape[0] for v in out] == [1, 2] and third.connections == 1
        finally:
            third.stop()
    finally:
        c.close()


def _wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def test_close_wakes_the_reading_thread_and_disconnects(fake_server: FakeServer) -> None:
    c = clipvisor.Client(fake_server.path, spawn=False, margin=2.0)
    c.status()
    outcome: dict = {}

    def hang() -> None:
        try:
            c.video("/fake/hang", deadline=60)
        except BaseException as exc:
            outcome["exc"] = exc

    t = threading.Thread(target=hang, daemon=True)
    t.start()
    # that thread has sent its request and is the one reading the socket
    assert _wait_for(lambda: any(r.get("path") == "/fake/hang" for r in fake_server.requests)
                     and c._mux.current is not None and c._mux.current.reading)
    c.close()
    t.join(20)  # the request's own bound is 62 s
    assert not t.is_alive(), "close() did not wake the thread reading the connection"
    assert isinstance(outcome.get("exc"), clipvisor.SupervisorUnavailable), outcome
    assert "closed" in str(outcome["exc"])
    # the supervisor sees the disconnect (its hanging request ends with the connection)
    assert _wait_for(lambda: all(p.closed for p in fake_server.peers))
    assert c.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)  # reconnects
    c.close()


def test_timeout_in_another_thread_wakes_the_reader(fake_server: FakeServer) -> None:
    c = clipvisor.Client(fake_server.path, spawn=False, margin=0.5)
    c.status()
    outcome: dict = {}

    def reader() -> None:
        try:
            c.video("/fake/hang", deadline=60)
        except BaseException as exc:
            outcome["exc"] = exc

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert _wait_for(lambda: c._mux.current is not None and c._mux.current.reading
                     and any(r.get("path") == "/fake/hang" for r in fake_server.requests))
    with pytest.raises(clipvisor.SupervisorTimeout):
        c.video("/fake/hang", deadline=0.2)  # waits while the other thread reads, then gives up
    t.join(20)
    assert not t.is_alive(), "the reading thread kept waiting on a dropped connection"
    assert isinstance(outcome.get("exc"), clipvisor.SupervisorUnavailable), outcome
    assert _wait_for(lambda: all(p.closed for p in fake_server.peers))
    c.close()


def test_sample_waits_for_a_clip_deadline_longer_than_the_samples(fake_server: FakeServer, tmp_path) -> None:
    c = clipvisor.Client(fake_server.path, spawn=False, margin=0.3)
    try:
        # the sample's deadline (0.2 s) + margin is far shorter than the slow clip's own 30 s
        out = c.sample([{"path": "/fake/delay-1.5/video-1-2-2", "deadline": 30}, "/fake/video-2-2-2"], deadline=0.2)
        assert [v.frames.shape[0] for v in out] == [1, 2]
        req = fake_server.requests[-1]
        assert req["deadline_ms"] == 200 and req["clips"][0]["deadline_ms"] == 30000
        slow = tmp_path / "delay-1.5"
        slow.mkdir()
        (slow / "video-1-2-2").write_bytes(b"data")
        (tmp_path / "video-2-2-2").write_bytes(b"data")
        out = c.sample([{"path": str(slow / "video-1-2-2"), "deadline": 30}, str(tmp_path / "video-2-2-2")],
                       deadline=0.2, pass_fd=True)
        assert [v.frames.shape[0] for v in out] == [1, 2]
    finally:
        c.close()


def test_sample_items_take_video_and_audio_dicts(client: clipvisor.Client, fake_server: FakeServer) -> None:
    out = client.sample([
        {"path": "/fake/clip-2-4-4-1-16000", "video": {"frames": 2, "max_pixels": 1000},
         "audio": {"sample_rate": 8000, "channels": 1}},
        {"path": "/fake/audio-1-8000", "video": False, "audio": {"sample_rate": 8000}},
        "/fake/video-1-2-2",
    ], video={"fps": 1.0, "max_pixels": 5000})
    assert [type(r) for r in out] == [clipvisor.Clip, clipvisor.Audio, clipvisor.Video]
    clips = fake_server.requests[-1]["clips"]
    assert clips[0]["frames"] == 2 and "fps" not in clips[0] and clips[0]["max_pixels"] == 1000
    assert clips[0]["audio"] is True and clips[0]["sample_rate"] == 8000 and clips[0]["channels"] == 1
    assert clips[1]["no_video"] is True and clips[1]["sample_rate"] == 8000 and "fps" not in clips[1]
    assert clips[2]["fps"] == 1.0 and clips[2]["max_pixels"] == 5000 and "audio" not in clips[2]
    # the same as clip() sends
    client.clip("/fake/clip-2-4-4-1-16000", video={"frames": 2, "max_pixels": 1000},
                audio={"sample_rate": 8000, "channels": 1})
    single = {k: v for k, v in fake_server.requests[-1].items() if k not in ("op", "id", "path", "deadline_ms", "_pid")}
    assert {k: v for k, v in clips[0].items() if k not in ("path",)} == single


def test_numpy_values_in_options(client: clipvisor.Client, fake_server: FakeServer) -> None:
    v = client.video("/fake/video-1-2-2", fps=np.float64(1.5), max_pixels=np.int64(1000), min_frames=np.int32(2),
                     options={"level": np.int16(3), "threads": np.uint8(2)})
    assert v.frames.shape == (1, 3, 2, 2)
    req = fake_server.requests[-1]
    assert req["fps"] == 1.5 and req["max_pixels"] == 1000 and req["min_frames"] == 2
    assert req["level"] == 3 and req["threads"] == 2
    client.video("/fake/video-1-2-2", timestamps=np.array([0.5, 1.0]))
    assert fake_server.requests[-1]["timestamps"] == [0.5, 1.0]
    out = client.sample([{"path": "/fake/video-1-2-2", "frames": np.int64(1)}], max_pixels=np.int64(500))
    assert out[0].frames.shape[0] == 1
    assert fake_server.requests[-1]["clips"][0] == {"frames": 1, "max_pixels": 500, "path": "/fake/video-1-2-2"}
    with pytest.raises(clipvisor.InvalidRequest, match="level") as info:
        client.video("/fake/video-1-2-2", options={"level": object()})
    assert info.value.reason == "invalid_request"
    with pytest.raises(clipvisor.InvalidRequest, match=r"clips\[1\]\.width"):
        client.sample(["/fake/video-1-2-2", {"path": "/fake/video-1-2-2", "width": {1, 2}}])
    # nothing was sent; the connection is fine
    assert client.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)
    assert fake_server.connections == 1


def test_supervisor_gone_for_good(short_dir: str) -> None:
    server = FakeServer(os.path.join(short_dir, "g.sock"))
    c = clipvisor.Client(server.path, spawn=False, connect_timeout=1.0)
    c.video("/fake/video-1-2-2")
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(clipvisor.SupervisorUnavailable):
        c.video("/fake/video-1-2-2")
    with pytest.raises(clipvisor.SupervisorUnavailable, match="no clipvisor supervisor answers"):
        c.video("/fake/video-1-2-2")
    assert time.monotonic() - t0 < 1.0
    # and comes back
    server = FakeServer(server.path)
    assert c.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)
    server.stop()


def test_protocol_mismatch(short_dir: str) -> None:
    server = FakeServer(os.path.join(short_dir, "p.sock"), protocol=2)
    with pytest.raises(clipvisor.ProtocolError, match="protocol 2"):
        clipvisor.Client(server.path, spawn=False).status()
    server.stop()


def test_no_fd_leaks(client: clipvisor.Client) -> None:
    client.video("/fake/video-1-2-2")
    before = open_fds()
    for i in range(20):
        client.video(f"/fake/video-2-4-{4 + i}")
        with pytest.raises(clipvisor.ClipSkipped):
            client.video("/fake/error-crashed")
        with pytest.raises(clipvisor.BlockFormatError):
            client.video("/fake/tampered/video-1-4-4")
    assert settled_fds(before) <= before


def test_cancel_on_interrupt_and_late_answers_dropped(fake_server: FakeServer) -> None:
    c = clipvisor.Client(fake_server.path, spawn=False, margin=0.2)
    c.status()
    before = open_fds()
    with pytest.raises(clipvisor.SupervisorTimeout):
        c.video("/fake/delay-0.6/video-1-2-2", deadline=0.1)
    time.sleep(0.6)  # the late answer (with its memfd) arrives on a closed connection
    assert c.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)
    assert settled_fds(before) <= before  # the old connection's fds are gone, the new one's replace them
    c.close()


def test_pass_fd(client: clipvisor.Client, fake_server: FakeServer, tmp_path) -> None:
    media = tmp_path / "video-2-4-4"
    media.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 100)
    v = client.video(media, pass_fd=True)
    assert v.frames.shape == (2, 3, 4, 4)
    req = fake_server.requests[-1]
    assert req["fd"] is True and req["path"] == str(media)
    got = fake_server.received_fds[-1]
    assert got["size"] == 112 and got["head"].startswith(b"\x00\x00\x00\x18ftyp")
    with pytest.raises(clipvisor.ClipNotFound):
        client.video(tmp_path / "missing.mp4", pass_fd=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # opening a FIFO must not block the client (the supervisor's deadline handles it)
    with pytest.raises(clipvisor.ClipSkipped):
        client.video(str(fifo) + "/../error-timeout", pass_fd=False)


def test_sample_all_or_nothing(client: clipvisor.Client, fake_server: FakeServer) -> None:
    out = client.sample(["/fake/video-2-4-4", {"path": "/fake/video-3-4-6", "frames": 3},
                         {"path": "/fake/audio-1-8000", "video": False, "audio": True}], fps=1.0, tag="conv-1")
    assert [type(r) for r in out] == [clipvisor.Video, clipvisor.Video, clipvisor.Audio]
    assert out[1].frames.shape == (3, 3, 4, 6) and out[2].samples.shape == (1, 8000)
    req = fake_server.requests[-1]
    assert req["op"] == "sample" and req["all_or_nothing"] is True and req["tag"] == "conv-1"
    assert req["clips"][0]["fps"] == 1.0 and req["clips"][1]["frames"] == 3 and "fps" not in req["clips"][1]
    with pytest.raises(clipvisor.ClipCorrupt) as info:
        client.sample(["/fake/delay-0.3/video-1-2-2", "/fake/error-decode_error", "/fake/hang"])
    assert info.value.clip == 1 and info.value.path == "/fake/error-decode_error"
    assert client.sample([]) == []


@pytest.mark.parametrize("all_or_nothing", [True, False])
def test_sample_refused_as_a_whole(client: clipvisor.Client, fake_server: FakeServer, all_or_nothing: bool) -> None:
    """A refusal of the whole sample is its final answer alone, `done` without `clip`
    (docs/protocol.md), with or without all-or-nothing."""
    aon = {"all_or_nothing": all_or_nothing}
    with pytest.raises(clipvisor.InvalidRequest) as info:
        client.sample(["/fake/video-1-2-2", "/fake/sample-invalid"], **aon)
    assert info.value.clip == 1 and info.value.detail == "clips[1].width" and info.value.path == "/fake/sample-invalid"
    assert info.value.reason == "invalid_request" and "clips[1]" in info.value.message
    with pytest.raises(clipvisor.InvalidRequest) as info:
        client.sample(["/fake/video-1-2-2"] * 257, **aon)
    assert info.value.detail == "clips" and info.value.clip is None and "257" in info.value.message
    # overloaded: the whole sample again, with back-off, until it goes through or the deadline passes
    before = len(fake_server.requests)
    out = client.sample(["/fake/video-1-2-2", f"/fake/sample-overloaded-2/x{all_or_nothing}/video-1-2-4"], **aon)
    assert [v.frames.shape for v in out] == [(1, 3, 2, 2), (1, 3, 2, 4)]
    assert len(fake_server.requests) - before == 3
    t0 = time.monotonic()
    with pytest.raises(clipvisor.Overloaded) as overloaded:
        client.sample(["/fake/sample-overloaded-1000/video-1-2-4"], deadline=0.3, **aon)
    assert time.monotonic() - t0 < 2.0 and "overloaded" in str(overloaded.value)
    with pytest.raises(clipvisor.ClipCancelled) as cancelled:
        client.sample(["/fake/video-1-2-2", "/fake/sample-shutdown"], **aon)
    assert "shutting down" in str(cancelled.value)
    # the connection is fine after every refusal
    assert client.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2) and fake_server.connections == 1


def test_sample_refused_on_retry_names_the_clip_of_the_whole_list(client: clipvisor.Client) -> None:
    """After an overloaded clip, only the clips left are sent again: a refusal's `clips[i]`
    counts within that shorter list, and the exception names the clip of the caller's list."""
    clips = ["/fake/video-1-2-2", "/fake/video-1-2-4", "/fake/overloaded-1/sample-invalidafter-1/video-1-2-2"]
    with pytest.raises(clipvisor.InvalidRequest) as info:
        client.sample(clips, all_or_nothing=False)
    assert info.value.clip == 2 and info.value.path == clips[2] and info.value.detail == "clips[0].width"


def test_default_margin_follows_the_queue_bound(fake_server: FakeServer) -> None:
    with clipvisor.Client(fake_server.path, spawn=False) as c:
        c.status()
        assert c._mux.current.margin == pytest.approx(11.5)
    with clipvisor.Client(fake_server.path, spawn=False, margin=3) as c:
        c.status()
        assert c._mux.current.margin == 3


def test_sample_not_all_or_nothing(client: clipvisor.Client) -> None:
    out = client.sample(["/fake/video-1-2-2", "/fake/error-not_found", "/fake/overloaded-2/video-1-2-4"],
                        all_or_nothing=False)
    assert isinstance(out[0], clipvisor.Video) and isinstance(out[2], clipvisor.Video)
    assert isinstance(out[1], clipvisor.ClipNotFound) and out[1].clip == 1


def test_sample_with_fds(client: clipvisor.Client, fake_server: FakeServer, tmp_path) -> None:
    paths = []
    for name in ("video-1-2-2", "video-2-2-4", "error-timeout"):
        p = tmp_path / name
        p.write_bytes(b"data")
        paths.append(str(p))
    out = client.sample(paths[:2], pass_fd=True)
    assert [v.frames.shape for v in out] == [(1, 3, 2, 2), (2, 3, 2, 4)]
    with pytest.raises(clipvisor.ClipTimeout) as info:
        client.sample(paths, pass_fd=True)
    assert info.value.clip == 2
    out = client.sample(paths, pass_fd=True, all_or_nothing=False)
    assert isinstance(out[2], clipvisor.ClipTimeout)
    # not about the clip: raised without all-or-nothing too; a clip that cannot satisfy it is listed
    for name in ("error-invalid_request", "unfit"):
        (tmp_path / name).write_bytes(b"data")
    out = client.sample([paths[0], str(tmp_path / "unfit")], pass_fd=True, all_or_nothing=False)
    assert isinstance(out[0], clipvisor.Video) and isinstance(out[1], clipvisor.ClipIncompatible) and out[1].clip == 1
    with pytest.raises(clipvisor.InvalidRequest):
        client.sample([paths[0], str(tmp_path / "error-invalid_request")], pass_fd=True, all_or_nothing=False)
    assert client.video(paths[0]).frames.shape == (1, 3, 2, 2) and fake_server.connections == 1


def test_probe_status_skips(client: clipvisor.Client, fake_server: FakeServer) -> None:
    assert client.probe("/fake/x.mp4")["container"] == "fake"
    with pytest.raises(clipvisor.ClipNotFound):
        client.probe("/fake/error-not_found")
    assert client.status()["pid"] == os.getpid()
    got = client.skips(reason="timeout", since=60, limit=5)
    assert got["counts"] == {"timeout": 1} and got["skips"][0]["reason"] == "timeout"
    req = fake_server.requests[-1]
    assert req == dict(req, op="skips", reason="timeout", since_s=60, limit=5)
    assert client.server["server"] == "fake 0.1"


def test_default_tag_from_job_ids(monkeypatch: pytest.MonkeyPatch, fake_server: FakeServer) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with clipvisor.Client(fake_server.path, spawn=False) as c:
        c.video("/fake/video-1-2-2")
    assert fake_server.requests[-1]["tag"] == "slurm-4242"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert clipvisor.default_tag() == "torchelastic-abc"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert clipvisor.default_tag() is None


def test_context_manager_closes(fake_server: FakeServer) -> None:
    with clipvisor.Client(fake_server.path, spawn=False) as c:
        c.status()
        assert c._mux.current is not None
    assert c._mux.current is None


def test_fork_never_reuses_the_connection(client: clipvisor.Client, fake_server: FakeServer) -> None:
    client.video("/fake/video-1-2-2")
    parent_session = client._mux.current

    def child() -> bool:
        v = client.video("/fake/video-2-2-2")
        return v.frames.shape == (2, 3, 2, 2) and client._mux.current is not parent_session

    assert status_in_child(child) == 0
    assert fake_server.connections == 2
    pids = {p.hello["pid"] for p in fake_server.peers}
    assert os.getpid() in pids and len(pids) == 2
    # the parent's connection is untouched by the child's exit
    assert client._mux.current is parent_session
    assert client.video("/fake/video-1-2-4").frames.shape == (1, 3, 2, 4)
    assert fake_server.connections == 2


def test_fork_while_another_thread_is_waiting(client: clipvisor.Client, fake_server: FakeServer) -> None:
    t = threading.Thread(target=lambda: client.video("/fake/delay-0.5/video-1-2-2"))
    t.start()
    time.sleep(0.1)  # that thread is now the reader, holding the session's state
    assert status_in_child(lambda: client.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)) == 0
    t.join(5)


# -- spawn=True, with the fake server as a stand-in binary ---------------------------------------


@pytest.fixture
def fake_binary(short_dir: str, monkeypatch: pytest.MonkeyPatch) -> str:
    path = os.path.join(short_dir, "clipvisor")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} {os.path.join(HERE, 'fakeserver.py')} \"$@\"\n")
    os.chmod(path, 0o755)
    monkeypatch.setenv("CLIPVISOR_BIN", path)
    return path


def _servers(slot_socket: str) -> list:
    """pids of running processes serving `slot_socket`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        watchdog = any(a.endswith(b"_watchdog.py") or a == b"clipvisor._watchdog" for a in argv)
        if b"serve" in argv and slot_socket.encode() in argv and not watchdog:
            out.append(int(pid))
    return out


def _exited(pid: int) -> bool:
    """The process has exited (reaped, or a zombie: its files are closed either way)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_spawn_private_supervisor(isolated_env: str, fake_binary: str) -> None:
    c = clipvisor.Client(margin=2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert c.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)
    assert any(issubclass(w.category, clipvisor.ClipvisorWarning) for w in caught)
    private = spawn._private
    assert os.environ["CLIPVISOR_SOCKET"] == private.socket_path
    assert len(_servers(private.socket_path)) == 1
    # kill the supervisor while the connection is idle: the next call finds the connection
    # closed before it delivered anything, respawns the supervisor and sends the request there
    first = _servers(private.socket_path)[0]
    os.kill(first, signal.SIGKILL)
    # Wait until our idle connection sees the other end closed (all of the killed process's
    # threads are gone: its pid turns zombie before that).
    poller = select.poll()
    poller.register(c._mux.current.conn.fileno(), select.POLLIN | select.POLLHUP)
    assert poller.poll(20_000), "the killed supervisor's end of the connection did not close"
    deadline = time.monotonic() + 20
    while (not _exited(first) or _servers(private.socket_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _exited(first) and _servers(private.socket_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert c.video("/fake/video-1-2-2").frames.shape == (1, 3, 2, 2)
    assert len(_servers(private.socket_path)) == 1 and _servers(private.socket_path)[0] != first
    assert c.status()["pid"] == _servers(private.socket_path)[0]
    c.close()
    private.stop()
    # The watchdog stops its supervisor with SIGTERM: allow a loaded machine a moment for the exit.
    deadline = time.monotonic() + 10
    while _servers(private.socket_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _servers(private.socket_path) == []
    assert not os.path.exists(private.dir)


def test_spawn_two_forked_children_start_exactly_one(isolated_env: str, fake_binary: str) -> None:
    c = clipvisor.Client(margin=2.0)  # the parent never connects
    r, w = os.pipe()
    barrier_r, barrier_w = os.pipe()

    def child() -> bool:
        os.read(barrier_r, 1)  # start together
        status = c.status()
        os.write(w, f"{status['pid']}\n".encode())
        return True

    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                code = 0 if child() else 3
            finally:
                os._exit(code)
        pids.append(pid)
    os.write(barrier_w, b"xx")
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    os.close(w)
    served_by = os.read(r, 100).decode().split()
    assert codes == [0, 0]
    assert len(served_by) == 2 and served_by[0] == served_by[1]
    private = spawn._private
    assert len(_servers(private.socket_path)) == 1
    # the children are gone (os._exit, no atexit); the supervisor lives on for the parent
    assert c.status()["pid"] == int(served_by[0])
    private.stop()
    assert _servers(private.socket_path) == []


ROOT_SCRIPT = r"""
import sys, time
sys.path[:0] = [{pkg!r}]
import clipvisor
c = clipvisor.Client()
print(c.status()["pid"], clipvisor.client._spawn._private.socket_path, flush=True)
time.sleep(60)
"""


def test_private_supervisor_stops_when_its_program_is_killed(isolated_env: str, fake_binary: str) -> None:
    script = ROOT_SCRIPT.format(pkg=os.path.dirname(HERE))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ))
    try:
        line = proc.stdout.readline().decode().split()
        assert len(line) == 2, line
        server_pid, sock = int(line[0]), line[1]
        assert _servers(sock) == [server_pid]
        proc.kill()  # SIGKILL: no atexit; the lifeline must do it
        proc.wait()
        deadline = time.monotonic() + 8
        while (_servers(sock) or os.path.exists(os.path.dirname(sock))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _servers(sock) == []
        assert not os.path.exists(os.path.dirname(sock))  # the watchdog cleaned up
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_private_supervisor_stops_at_normal_exit(isolated_env: str, fake_binary: str) -> None:
    script = ROOT_SCRIPT.format(pkg=os.path.dirname(HERE)).replace("time.sleep(60)", "")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, env=dict(os.environ), timeout=30)
    server_pid, sock = out.stdout.decode().split()
    assert _servers(sock) == []
    assert not os.path.exists(os.path.dirname(sock))


def test_no_binary_no_supervisor(isolated_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPVISOR_BIN", "")
    monkeypatch.setenv("PATH", isolated_env)
    with pytest.raises(clipvisor.SupervisorUnavailable, match="no clipvisor binary"):
        clipvisor.Client().status()
    with pytest.raises(clipvisor.SupervisorUnavailable, match="no clipvisor supervisor answers"):
        clipvisor.Client(spawn=False).status()


def test_discovery_order(isolated_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = os.environ["XDG_RUNTIME_DIR"]
    os.makedirs(os.path.join(runtime, "clipvisor"))
    user = FakeServer(os.path.join(runtime, "clipvisor", "clipvisor.sock"))
    system = FakeServer(os.path.join(isolated_env, "sys.sock"))
    env = FakeServer(os.path.join(isolated_env, "env.sock"))
    try:
        assert clipvisor.Client(spawn=False).server and user.connections == 1
        monkeypatch.setattr(spawn, "SYSTEM_SOCKET", system.path)
        clipvisor.Client(spawn=False).status()
        assert system.connections == 1 and user.connections == 1
        monkeypatch.setenv("CLIPVISOR_SOCKET", env.path)
        clipvisor.Client(spawn=False).status()
        assert env.connections == 1 and system.connections == 1
    finally:
        for s in (user, system, env):
            s.stop()
