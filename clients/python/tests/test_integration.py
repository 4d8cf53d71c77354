"""Against the real supervisor (`clipvisor serve`) and real clips from ../shared/corpus/real.

The binary is `$CLIPVISOR_BIN`, else `<repo>/.build/debug/clipvisor` (run `swift build`).
These tests are skipped only when that binary does not exist; a binary that exists but does
not serve the protocol fails them.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import pytest

import clipvisor
from clipvisor import block as B
from clipvisor import results as results_module
from clipvisor import spawn
from conftest import BINARY, REPO

CORPUS = os.environ.get("CLIPVISOR_CORPUS") or os.path.abspath(os.path.join(REPO, "..", "shared", "corpus", "real"))
if not os.path.isdir(CORPUS):
    CORPUS = "/work/shared/corpus/real"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY} "
                       "(build it with `swift build`, or set $CLIPVISOR_BIN)"),
]


def manifest() -> Dict[str, Dict[str, str]]:
    path = os.path.join(CORPUS, "MANIFEST.tsv")
    rows: Dict[str, Dict[str, str]] = {}
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            cells = line.rstrip("\n").split("\t")
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def media(name: str) -> str:
    path = os.path.join(CORPUS, name)
    if not os.path.exists(path):
        pytest.skip(f"corpus file {name} missing at {CORPUS}")
    return path


class Supervisor:
    """`clipvisor serve --socket DIR/s.sock`, its state and runtime dirs inside DIR."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, "s.sock")
        self.log_path = os.path.join(workdir, "supervisor.log")
        self.proc: Optional[subprocess.Popen] = None

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        for name in ("state", "run", "cache", "home"):
            os.makedirs(os.path.join(self.workdir, name), exist_ok=True)
        env.update(XDG_STATE_HOME=os.path.join(self.workdir, "state"),
                   XDG_RUNTIME_DIR=os.path.join(self.workdir, "run"),
                   XDG_CACHE_HOME=os.path.join(self.workdir, "cache"), HOME=os.path.join(self.workdir, "home"))
        env.pop("CLIPVISOR_SOCKET", None)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self, timeout: float = 30.0, args: Sequence[str] = ()) -> None:
        extra = list(args) + os.environ.get("CLIPVISOR_SERVE_ARGS", "").split()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([BINARY, "serve", "--socket", self.path] + extra, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, env=self.env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock = spawn.try_connect(self.path, 0.5)
            if sock is not None:
                sock.close()
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        code = self.proc.poll()
        self.stop()
        pytest.fail(f"`{BINARY} serve --socket {self.path}` did not start listening "
                    f"(exit code {code}); its output:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)  # the supervisor and its workers' groups are separate
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def supervisor() -> Iterator[Supervisor]:
    import tempfile

    workdir = tempfile.mkdtemp(prefix="cvi-", dir="/tmp")
    s = Supervisor(workdir)
    s.start()
    yield s
    s.stop()
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def own_supervisor(short_dir: str) -> Iterator[Supervisor]:
    s = Supervisor(short_dir)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def cv(supervisor: Supervisor) -> Iterator[clipvisor.Client]:
    c = clipvisor.Client(supervisor.path, spawn=False, margin=15.0, tag="pytest")
    yield c
    c.close()


# -- helpers ---------------------------------------------------------------------------------


def floor_by(n: float, f: int) -> int:
    return int(math.floor(n / f)) * f


def ceil_by(n: float, f: int) -> int:
    return int(math.ceil(n / f)) * f


def qwen_nframes(total: int, video_fps: float, fps: float, min_frames: int = 4, max_frames: int = 768,
                 factor: int = 2) -> int:
    """qwen-vl-utils 0.0.11 smart_nframes (the fps branch)."""
    lo = ceil_by(min_frames, factor)
    hi = floor_by(min(max_frames, total), factor)
    n = total / video_fps * fps
    n = min(min(max(n, lo), hi), total)
    return floor_by(n, factor)


def check_video(v: clipvisor.Video, max_pixels: Optional[int] = None, factor: int = 28) -> None:
    t = v.frames.shape[0]
    assert v.frames.dtype == np.uint8
    if v.layout == "TCHW":
        assert v.frames.shape[1] == 3 and v.frames.shape[2:] == (v.height, v.width)
    else:
        assert v.frames.shape[3] == 3 and v.frames.shape[1:3] == (v.height, v.width)
    assert len(v.pts) == len(v.indices) == t > 0
    assert np.all(np.diff(v.indices) > 0), v.indices
    assert np.all(np.diff(v.pts) >= 0), v.pts
    assert v.pts[0] >= 0 and v.indices[0] >= 0
    if v.frames_in_range:
        assert v.indices[-1] < v.frames_in_range + max(0, v.indices[0])
    assert v.sample_fps > 0
    if max_pixels is not None:
        assert v.width % factor == 0 and v.height % factor == 0
        assert v.width * v.height <= max_pixels
    assert v.frames.std() > 1.0  # real pictures, not a constant


# -- decoding real clips ---------------------------------------------------------------------

VIDEOS = [
    "imageio-test_images__realshort.mp4",
    "jcodec__big_buck_bunny_160x90_ltr.mp4",
    "decord__flipping_a_pancake.mkv",
    "go-mediainfo__sample.avi",
    "jcodec__cat_avc_clip.mp4",
]


@pytest.mark.parametrize("name", VIDEOS)
def test_video_shapes_pts_indices(cv: clipvisor.Client, name: str) -> None:
    row = manifest()[name]
    v = cv.video(media(name), fps=2.0, max_pixels=448 * 448)
    check_video(v, max_pixels=448 * 448)
    assert v.frames.shape[0] % 2 == 0
    fps = float(v.source.get("fps") or 0)
    assert fps > 0
    total = v.frames_in_range or int(row["decoded_frames"])
    assert v.frames.shape[0] == qwen_nframes(total, fps, 2.0)
    assert v.sample_fps == pytest.approx(v.frames.shape[0] / total * fps, rel=1e-3)
    # indices spread evenly over the range (torch.linspace(0, total - 1, n).round())
    expected = np.round(np.linspace(0, total - 1, v.frames.shape[0]))
    assert np.max(np.abs(v.indices - expected)) <= 1, (v.indices, expected)
    # pts of a constant-rate stream: index / fps, within a frame
    if name in ("imageio-test_images__realshort.mp4", "jcodec__big_buck_bunny_160x90_ltr.mp4"):
        assert np.max(np.abs(v.pts - v.indices / fps)) <= 1.0 / fps + 1e-6
    duration = float(v.source.get("duration") or 0)
    assert v.pts[-1] <= duration + 2.0 / fps  # a container duration may end before the last frame


def test_known_clip_exactly(cv: clipvisor.Client) -> None:
    """realshort.mp4: 36 frames at 45000/1499 fps, 320x240."""
    v = cv.video(media("imageio-test_images__realshort.mp4"), fps=2.0)
    assert v.frames.shape == (4, 3, 240, 320)
    assert v.indices.tolist() == [0, 12, 23, 35]
    assert v.sample_fps == pytest.approx(4 / 36 * 45000 / 1499, rel=1e-3)
    assert v.source["width"] == 320 and v.source["height"] == 240


def test_layout_size_count_timestamps(cv: clipvisor.Client) -> None:
    path = media("decord__flipping_a_pancake.mkv")
    v = cv.video(path, frames=8, width=64, height=48, layout="THWC")
    assert v.frames.shape == (8, 48, 64, 3) and v.layout == "THWC"
    check_video(v)
    t = cv.video(path, timestamps=[0.0, 2.0, 5.0], width=64, height=48)
    assert t.frames.shape == (3, 3, 48, 64)
    assert np.allclose(t.pts, [0.0, 2.0, 5.0], atol=1 / 30 + 1e-6), t.pts
    r = cv.video(path, start=2.0, end=4.0, fps=2.0, width=64, height=48)
    assert np.all(r.pts >= 2.0 - 1e-6) and np.all(r.pts < 4.0)
    assert r.frames.shape[0] == qwen_nframes(r.frames_in_range or 60, 30.0, 2.0)


def test_rotation(cv: clipvisor.Client) -> None:
    upright = cv.video(media("decord__video_0.mov"), frames=2)
    rotated = cv.video(media("decord__video_90.mov"), frames=2)
    kept = cv.video(media("decord__video_90.mov"), frames=2, rotate=False)
    assert upright.frames.shape[2:] == (320, 568)
    assert rotated.frames.shape[2:] == (568, 320) and rotated.rotation_applied in (90, 270)
    assert kept.frames.shape[2:] == (320, 568) and kept.rotation_applied == 0


@pytest.mark.parametrize("name, seconds, rate", [
    ("hf-datasets__test_audio_44100.wav", 4.588, 44100),
    ("librosa__snare-accelerate.ogg", 30.0, 22050),
    ("audiowaveform__test_file_stereo.flac", 7.095, 16000),
])
def test_audio(cv: clipvisor.Client, name: str, seconds: float, rate: int) -> None:
    a = cv.audio(media(name), sample_rate=16000, channels=1)
    assert a.samples.dtype == np.float32 and a.samples.shape[0] == 1 and a.channels == 1
    assert a.sample_rate == 16000
    assert abs(a.samples.shape[1] - seconds * 16000) <= 0.01 * seconds * 16000 + 1600
    assert np.isfinite(a.samples).all() and np.abs(a.samples).max() <= 1.5 and a.samples.std() > 1e-4
    stereo = cv.audio(media(name), sample_rate=8000, channels=2)
    assert stereo.samples.shape[0] == 2 and abs(stereo.samples.shape[1] - a.samples.shape[1] / 2) <= 400


def test_clip_video_and_audio_aligned(cv: clipvisor.Client) -> None:
    c = cv.clip(media("decord__flipping_a_pancake.mkv"), video={"fps": 1.0, "max_pixels": 200704})
    assert c.video is not None and c.audio is not None
    check_video(c.video, max_pixels=200704)
    assert abs(c.audio.samples.shape[1] / 16000 - 10.381) < 0.2
    assert c.audio.offset_from_first_frame is None or abs(c.audio.offset_from_first_frame) < 0.1
    silent = cv.clip(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), audio_optional=True)
    assert silent.audio is None and silent.video is not None
    with pytest.raises(clipvisor.ClipUnsupported):
        cv.clip(media("jcodec__big_buck_bunny_160x90_ltr.mp4"))


def test_probe_status(cv: clipvisor.Client) -> None:
    p = cv.probe(media("imageio-test_images__realshort.mp4"))
    assert "mp4" in str(p.get("container")) and abs(float(p["duration"]) - 1.199) < 0.05
    s = cv.status()
    assert isinstance(s.get("pid"), int)


# -- skips --------------------------------------------------------------------------------------


def test_fifo_times_out_within_deadline(cv: clipvisor.Client, short_dir: str) -> None:
    fifo = os.path.join(short_dir, f"hang-{os.getpid()}.mp4")
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(clipvisor.ClipTimeout) as info:
        cv.video(fifo, deadline=1.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5 + 1.0, elapsed
    assert info.value.path == fifo and fifo in info.value.message
    # durable in the skip log before the answer, with our tag
    got = cv.skips(reason="timeout", path_glob=fifo)
    assert any(r.get("path") == fifo and r.get("tag") == "pytest" for r in got["skips"]), got
    # a healthy clip right after
    assert cv.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), frames=2).frames.shape[0] == 2


def test_missing_and_corrupt(cv: clipvisor.Client, short_dir: str) -> None:
    with pytest.raises(clipvisor.ClipNotFound) as info:
        cv.video(os.path.join(short_dir, "missing.mp4"))
    assert "missing.mp4" in info.value.message
    junk = os.path.join(short_dir, "junk.mp4")
    with open(junk, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(clipvisor.ClipCorrupt):
        cv.video(junk)
    with pytest.raises((clipvisor.ClipCorrupt, clipvisor.ClipUnsupported)):
        cv.video(media("jcodec__fr.vp8"))
    with pytest.raises((clipvisor.ClipCorrupt, clipvisor.ClipUnsupported)):
        cv.video(media("moviepy__result.webm"))
    with pytest.raises(clipvisor.InvalidRequest):
        cv.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), width=64)  # width without height


def test_a_wrong_request_is_not_a_skip_a_clip_that_cannot_satisfy_it_is(cv: clipvisor.Client) -> None:
    """The supervisor answers both `invalid_request`; only the one a worker found on the clip
    names the clip, and only that one is a skip (ClipIncompatible)."""
    good, one_frame = media("jcodec__big_buck_bunny_160x90_ltr.mp4"), media("jcodec__37.mp4")
    for wrong in ({"options": {"fsp": 2}}, {"fps": -1.0}, {"options": {"level": "high"}}):
        with pytest.raises(clipvisor.InvalidRequest) as info:
            cv.video(good, **wrong)
        assert not isinstance(info.value, clipvisor.ClipSkipped) and isinstance(info.value, clipvisor.ClipvisorError)
        assert info.value.path == good and info.value.detail in ("fsp", "fps", "level")
    with pytest.raises(clipvisor.ClipIncompatible) as unfit:
        cv.video(one_frame, frames=4)
    assert isinstance(unfit.value, clipvisor.ClipSkipped) and unfit.value.path == one_frame
    assert unfit.value.reason == "invalid_request" and unfit.value.detail == "frames"
    with pytest.raises(clipvisor.ClipIncompatible):
        cv.video(good, timestamps=[100.0])  # past the end of this clip
    out = cv.sample([{"path": good, "frames": 2}, {"path": one_frame, "frames": 4}], all_or_nothing=False)
    assert isinstance(out[0], clipvisor.Video) and isinstance(out[1], clipvisor.ClipIncompatible) and out[1].clip == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission(cv: clipvisor.Client, short_dir: str) -> None:
    locked = os.path.join(short_dir, "locked.mp4")
    with open(locked, "wb") as f:
        f.write(b"x")
    os.chmod(locked, 0)
    with pytest.raises(clipvisor.ClipPermission):
        cv.video(locked)


def test_clip_outside_the_data_roots_is_a_permission_error(short_dir: str) -> None:
    # Works as root too: the supervisor's path policy refuses it before any worker opens it.
    allowed = os.path.join(short_dir, "data")
    os.makedirs(allowed)
    inside = os.path.join(allowed, "clip.mp4")
    shutil.copy(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), inside)
    s = Supervisor(short_dir)
    s.start(args=["--root", allowed, "--workers", "1"])
    try:
        with clipvisor.Client(s.path, spawn=False, margin=15.0) as c:
            assert c.video(inside, frames=2).frames.shape[0] == 2
            with pytest.raises(clipvisor.ClipPermission) as info:
                c.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), frames=2)
            assert "jcodec__big_buck_bunny_160x90_ltr.mp4" in str(info.value)
            assert info.value.reason == "permission"
    finally:
        s.stop()


def test_sample(cv: clipvisor.Client, short_dir: str) -> None:
    a, b = media("jcodec__big_buck_bunny_160x90_ltr.mp4"), media("imageio-test_images__realshort.mp4")
    out = cv.sample([a, {"path": b, "frames": 4}, {"path": media("jcodec__drip.wav"), "video": False, "audio": True}],
                    fps=1.0, max_pixels=100352)
    assert [type(r) for r in out] == [clipvisor.Video, clipvisor.Video, clipvisor.Audio]
    assert out[1].frames.shape[0] == 4
    missing = os.path.join(short_dir, "nope.mp4")
    with pytest.raises(clipvisor.ClipNotFound) as info:
        cv.sample([a, missing, b])
    assert info.value.clip == 1
    out = cv.sample([a, missing, b], all_or_nothing=False)
    assert isinstance(out[0], clipvisor.Video) and isinstance(out[1], clipvisor.ClipNotFound)
    assert isinstance(out[2], clipvisor.Video)


def test_sample_clip_deadline_longer_than_the_samples(supervisor: Supervisor, short_dir: str) -> None:
    """A clip's own deadline (8 s) far beyond the sample's (0.5 s) + margin (3 s): the client
    waits for the clip's answer (a timeout at 8 s) instead of giving up on the supervisor."""
    fifo = os.path.join(short_dir, f"slow-{os.getpid()}.mp4")
    os.mkfifo(fifo)
    good = media("jcodec__big_buck_bunny_160x90_ltr.mp4")
    with clipvisor.Client(supervisor.path, spawn=False, margin=3.0) as c:
        out = c.sample([{"path": fifo, "deadline": 8}, {"path": good, "frames": 2}], deadline=0.5,
                       all_or_nothing=False)
    assert isinstance(out[0], clipvisor.ClipTimeout), out
    assert isinstance(out[1], clipvisor.Video) and out[1].frames.shape[0] == 2


@pytest.mark.parametrize("all_or_nothing", [True, False])
def test_sample_refused_as_a_whole(cv: clipvisor.Client, all_or_nothing: bool) -> None:
    """The real supervisor refuses a whole sample with `done` and no `clip` (docs/protocol.md):
    an invalid field of one clip, or more than 256 clips, is InvalidRequest naming the clip."""
    good = media("jcodec__big_buck_bunny_160x90_ltr.mp4")
    other = media("imageio-test_images__realshort.mp4")
    with pytest.raises(clipvisor.InvalidRequest) as info:
        cv.sample([good, good, {"path": other, "fps": -1.0}], all_or_nothing=all_or_nothing)
    assert info.value.clip == 2 and info.value.path == other and info.value.detail == "clips[2].fps"
    assert info.value.reason == "invalid_request" and "fps" in info.value.message
    with pytest.raises(clipvisor.InvalidRequest) as info:
        cv.sample([{"path": good, "frames": 2}] * 257, all_or_nothing=all_or_nothing)
    assert info.value.detail == "clips" and "257" in info.value.message and info.value.clip is None
    # the connection is fine afterwards
    out = cv.sample([{"path": good, "frames": 2}, other], all_or_nothing=all_or_nothing)
    assert [type(r) for r in out] == [clipvisor.Video, clipvisor.Video]


def test_sample_overloaded_as_a_whole(short_dir: str) -> None:
    """One decode slot and a queue limit of 1: a sample of 3 clips would leave at least 2 waiting,
    so the supervisor refuses it `overloaded` as a whole, every time; the client retries it
    until the deadline and raises Overloaded, in either mode. A sample of 2 clips while the slot is
    held by a FIFO (until its 4 s deadline) is refused too, and goes through once it is free."""
    s = Supervisor(short_dir)
    s.start(args=["--workers", "1", "--spare-workers", "0", "--queue-limit", "1"])
    fifo = os.path.join(short_dir, "busy.mp4")
    os.mkfifo(fifo)
    good = media("jcodec__big_buck_bunny_160x90_ltr.mp4")
    outcome: List[BaseException] = []
    try:
        with clipvisor.Client(s.path, spawn=False, margin=15.0) as c:
            assert c.video(good, frames=2).frames.shape[0] == 2  # the worker is up
            for all_or_nothing in (True, False):
                t0 = time.monotonic()
                with pytest.raises(clipvisor.Overloaded) as info:
                    c.sample([{"path": good, "frames": 2}] * 3, deadline=1.0, all_or_nothing=all_or_nothing)
                # Retried at least once: the supervisor's retry_after_ms (500) less the client's
                # jitter (0.8-1.2x) is at least 0.4 s.
                assert 0.35 < time.monotonic() - t0 < 3.0 and "queued (limit 1)" in str(info.value)
                assert not isinstance(info.value, clipvisor.ClipSkipped)

            def hang() -> None:
                try:
                    c.video(fifo, deadline=4.0)
                except BaseException as exc:
                    outcome.append(exc)

            t = threading.Thread(target=hang)
            t.start()
            until = time.monotonic() + 10
            while not any(w.get("state") == "busy" for w in c.status()["workers"]["list"]):
                assert time.monotonic() < until, c.status()["workers"]
                time.sleep(0.05)
            out = c.sample([{"path": good, "frames": 2}] * 2, deadline=30.0, all_or_nothing=False)
            assert [v.frames.shape[0] for v in out] == [2, 2]
            t.join(30)
            assert len(outcome) == 1 and isinstance(outcome[0], clipvisor.ClipTimeout), outcome
    finally:
        s.stop()


def test_pass_fd(cv: clipvisor.Client) -> None:
    v = cv.video(media("imageio-test_images__realshort.mp4"), fps=2.0, pass_fd=True)
    assert v.frames.shape == (4, 3, 240, 320)


def test_no_fd_leak_and_threads(cv: clipvisor.Client, short_dir: str) -> None:
    path = media("jcodec__big_buck_bunny_160x90_ltr.mp4")
    cv.video(path, frames=2)
    before = len(os.listdir("/proc/self/fd"))
    session = cv._mux.current
    assert session is not None
    slabs_before = session.slabs.count
    errors: List[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                assert cv.video(path, frames=2 + 2 * (i % 3)).frames.shape[0] == 2 + 2 * (i % 3)
                with pytest.raises(clipvisor.ClipNotFound):
                    cv.video(os.path.join(short_dir, f"missing-{i}.mp4"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # The slabs the threads' clips in flight at once needed stay, each an fd and its mapping's
    # (Python's mmap keeps a duplicate), bounded by the slabs the client asks for.
    assert cv._mux.current is session and session.slabs.count <= clipvisor.slabs.DEFAULT_SLABS
    assert len(os.listdir("/proc/self/fd")) <= before + 2 * (session.slabs.count - slabs_before)


# -- the block itself ---------------------------------------------------------------------------


def test_real_block_sealed_and_tamper_rejected(cv: clipvisor.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: List[bytes] = []
    seals: List[int] = []
    original = results_module.read_block_fd

    def spy(fd: int, **kwargs):
        seals.append(fcntl.fcntl(fd, B.F_GET_SEALS))
        size = os.fstat(fd).st_size
        captured.append(os.pread(fd, size, 0))
        return original(fd, **kwargs)

    monkeypatch.setattr(results_module, "read_block_fd", spy)
    with clipvisor.Client(cv.socket_path, spawn=False, slabs=0) as plain:
        v = plain.video(media("imageio-test_images__realshort.mp4"), fps=2.0)
    blob = captured[0]
    assert seals[0] & B.REQUIRED_SEALS == B.REQUIRED_SEALS
    block = B.read_block(blob)
    assert np.array_equal(block.tensors["video"], v.frames)
    layout = B.validate_block(blob)
    header_end = layout.frames[0][0].offset
    positions = set(range(0, header_end, max(1, header_end // 400)))
    positions |= set(range(len(blob) - (12 * (len(layout.frames[0]) + 1) + 17), len(blob)))
    for f in layout.frames[0]:
        positions |= {f.offset + k for k in range(0, 16)}
        positions |= {f.offset + f.compressed_size - k for k in range(1, 9)}
        positions.add(f.offset + f.compressed_size // 2)
    for i in sorted(positions):
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= mask
            with pytest.raises(clipvisor.BlockFormatError):
                B.read_block(bytes(bad))
    for n in range(0, len(blob), max(1, len(blob) // 300)):
        with pytest.raises(clipvisor.BlockFormatError):
            B.read_block(blob[:n])


# -- block slabs ------------------------------------------------------------------------------------


def test_blocks_in_slabs_equal_blocks_in_fresh_memfds(supervisor: Supervisor) -> None:
    """docs/protocol.md "Block slabs", against the real supervisor: a default client gets its
    blocks in at most four slabs, reused clip after clip and released with the next request, and
    every tensor equals what a client without slabs gets in fresh sealed memfds."""
    small = media("imageio-test_images__realshort.mp4")
    other = media("jcodec__big_buck_bunny_160x90_ltr.mp4")
    calls = [(small, {"fps": 2.0}), (other, {"frames": 8}), (small, {"fps": 30.0}), (other, {"fps": 1.0})] * 3
    with clipvisor.Client(supervisor.path, spawn=False, slabs=0) as plain, \
            clipvisor.Client(supervisor.path, spawn=False) as slabbed:
        for path, options in calls:
            a, b = plain.video(path, **options), slabbed.video(path, **options)
            assert np.array_equal(a.frames, b.frames) and np.array_equal(a.pts, b.pts), (path, options)
        pancake = media("decord__flipping_a_pancake.mkv")
        a_clip, b_clip = plain.clip(pancake, video={"fps": 1.0}), slabbed.clip(pancake, video={"fps": 1.0})
        assert a_clip.audio is not None and b_clip.audio is not None
        assert a_clip.video is not None and b_clip.video is not None
        assert np.array_equal(a_clip.audio.samples, b_clip.audio.samples)
        assert np.array_equal(a_clip.video.frames, b_clip.video.frames)
        specs = [{"path": small, "fps": 2.0}, {"path": other, "frames": 4}] * 4
        for x, y in zip(plain.sample(specs), slabbed.sample(specs)):
            assert isinstance(x, clipvisor.Video) and isinstance(y, clipvisor.Video)
            assert np.array_equal(x.frames, y.frames)
        session = slabbed._mux.current
        assert session is not None and 1 <= session.slabs.count <= clipvisor.slabs.DEFAULT_SLABS
        assert plain._mux.current is not None and plain._mux.current.slabs.count == 0
        status = slabbed.status()  # carries the releases of the last blocks read
        mine = [c for c in status["clients"] if c["pid"] == os.getpid() and c["slabs"] > 0]
        assert len(mine) == 1 and mine[0]["slabs"] == session.slabs.count
        assert mine[0]["slabs_delivered"] == 0, "every block read was released"
        assert status["memory"]["slabs"]["count"] >= session.slabs.count


# -- failure of the supervisor itself --------------------------------------------------------------


def test_supervisor_killed_mid_run(own_supervisor: Supervisor, short_dir: str) -> None:
    c = clipvisor.Client(own_supervisor.path, spawn=False, margin=15.0)
    assert c.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), frames=2).frames.shape[0] == 2
    fifo = os.path.join(short_dir, "stuck.mp4")
    os.mkfifo(fifo)
    outcome: Dict[str, object] = {}

    def stuck() -> None:
        try:
            c.video(fifo, deadline=60)
        except BaseException as exc:
            outcome["exc"] = exc
            outcome["at"] = time.monotonic()

    t = threading.Thread(target=stuck)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    own_supervisor.kill()
    t.join(10)
    assert isinstance(outcome.get("exc"), clipvisor.SupervisorUnavailable), outcome
    assert outcome["at"] - t0 < 2.0
    with pytest.raises(clipvisor.SupervisorUnavailable):
        c.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), frames=2)
    own_supervisor.start()
    assert c.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), frames=2).frames.shape[0] == 2
    c.close()


def test_first_call_after_a_supervisor_restart(own_supervisor: Supervisor) -> None:
    c = clipvisor.Client(own_supervisor.path, spawn=False, margin=15.0, connect_timeout=30.0)
    first = c.status()["pid"]
    own_supervisor.stop()  # the client's idle connection is now closed at the other end
    own_supervisor.start()
    assert c.status()["pid"] != first  # the first call goes through, on a new connection
    assert c.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), frames=2).frames.shape[0] == 2
    own_supervisor.stop()
    own_supervisor.start()
    assert c.video(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), frames=2).frames.shape[0] == 2
    c.close()


def test_close_fails_requests_in_flight_and_disconnects(own_supervisor: Supervisor, short_dir: str) -> None:
    fifo = os.path.join(short_dir, "pending.mp4")
    os.mkfifo(fifo)
    c = clipvisor.Client(own_supervisor.path, spawn=False, margin=15.0)
    observer = clipvisor.Client(own_supervisor.path, spawn=False, margin=15.0)
    outcome: Dict[str, object] = {}

    def pending() -> None:
        try:
            c.video(fifo, deadline=120)
        except BaseException as exc:
            outcome["exc"] = exc

    def busy_on_fifo() -> bool:
        status = observer.status()
        return any(w.get("state") == "busy" and w.get("clip") == fifo for w in status["workers"]["list"])

    def wait_for(condition, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    t = threading.Thread(target=pending, daemon=True)
    t.start()
    assert wait_for(busy_on_fifo), observer.status()
    assert observer.status()["connections"] == 2
    c.close()
    t.join(30)  # its own bound is 135 s
    assert not t.is_alive(), "close() did not wake the thread waiting for the answer"
    assert isinstance(outcome.get("exc"), clipvisor.SupervisorUnavailable), outcome
    # the supervisor saw the disconnect: the connection is gone and the decode cancelled
    assert wait_for(lambda: observer.status()["connections"] == 1 and not busy_on_fifo()), observer.status()
    observer.close()


def _serving(sock: str) -> List[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        watchdog = any(a.endswith(b"_watchdog.py") or a == b"clipvisor._watchdog" for a in argv)
        if b"serve" in argv and sock.encode() in argv and not watchdog:
            out.append(int(pid))
    return out


def test_spawn_two_forked_children_one_supervisor(isolated_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPVISOR_BIN", BINARY)
    c = clipvisor.Client(margin=15.0, connect_timeout=30.0)
    r, w = os.pipe()
    gate_r, gate_w = os.pipe()
    path = media("jcodec__big_buck_bunny_160x90_ltr.mp4")
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.read(gate_r, 1)
                status = c.status()
                os.write(w, f"{c.server['pid']} {status.get('pid')}\n".encode())
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    os.write(gate_w, b"go")
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in children]
    os.close(w)
    lines = os.read(r, 200).decode().split("\n")
    assert codes == [0, 0], lines
    pids = {line.split()[0] for line in lines if line}
    assert len(pids) == 1, lines
    private = spawn._private
    assert len(_serving(private.socket_path)) == 1
    assert str(c.server["pid"]) in pids  # the parent uses the same one
    assert c.video(path, frames=2).frames.shape[0] == 2
    c.close()
    private.stop()
    assert _serving(private.socket_path) == []
