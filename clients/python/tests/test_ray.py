"""clipvisor.ray.read_videos on a local Ray cluster (``ray.init(num_cpus=2)``), against the real supervisor.

One Ray session for the whole module (Ray's start-up costs seconds). The clips are made here
with ffmpeg: good ones, a corrupt one, a truncated one and a FIFO. Every read runs through the
node's private supervisor, whose skip log is in the module's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

import clipvisor
from conftest import BINARY

try:
    import ray
    import ray.data  # noqa: F401

    import clipvisor.ray as cray
    RAY_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    RAY_ERROR = f"ray[data] is not importable ({exc}); pip install 'ray[data]'"


pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(RAY_ERROR is not None, reason=RAY_ERROR or ""),
    pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY} (swift build)"),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg CLI makes the test clips"),
]

GOOD = ["a.mp4", "b.mp4", "c.mkv", "d.mp4"]
REQUEST = dict(frames=4, width=64, height=48)
DEADLINE = 2.0


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cvray-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def clips(workdir: str) -> Dict[str, str]:
    data = os.path.join(workdir, "data")
    os.makedirs(os.path.join(data, "sub"))
    out = {name: os.path.join(data, name) for name in GOOD}
    out["d.mp4"] = os.path.join(data, "sub", "d.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-t", "2", "-pix_fmt", "yuv420p", out["a.mp4"])
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=128x96:rate=30",
           "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
           "-t", "3", "-pix_fmt", "yuv420p", "-shortest", out["b.mp4"])
    ffmpeg("-f", "lavfi", "-i", "mandelbrot=size=96x96:rate=10", "-t", "2", "-c:v", "libvpx", out["c.mkv"])
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=200x100:rate=24", "-t", "1", "-pix_fmt", "yuv420p", out["d.mp4"])
    out["corrupt.mp4"] = os.path.join(data, "corrupt.mp4")
    with open(out["corrupt.mp4"], "wb") as f:
        f.write(np.random.default_rng(1).integers(0, 256, 150_000, dtype=np.uint8).tobytes())
    out["truncated.mp4"] = os.path.join(data, "truncated.mp4")
    with open(out["b.mp4"], "rb") as f:
        whole = f.read()
    with open(out["truncated.mp4"], "wb") as f:
        f.write(whole[: len(whole) // 2])  # moov is at the end: the container is unreadable
    out["fifo.mp4"] = os.path.join(data, "fifo.mp4")
    os.mkfifo(out["fifo.mp4"])
    with open(os.path.join(data, "notes.txt"), "w") as f:
        f.write("not a video: filtered out by extension")
    return out


@pytest.fixture(scope="module")
def ray_session(workdir: str) -> Iterator[str]:
    """A local Ray cluster whose workers see this checkout's clipvisor and binary; yields the skip log path."""
    skip_log = os.path.join(workdir, "skips.jsonl")
    saved = {k: os.environ.get(k) for k in ("CLIPVISOR_BIN", "CLIPVISOR_SOCKET", "CLIPVISOR_SERVE_ARGS", "PYTHONPATH")}
    os.environ["CLIPVISOR_BIN"] = BINARY
    os.environ.pop("CLIPVISOR_SOCKET", None)
    os.environ.pop("CLIPVISOR_SERVE_ARGS", None)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(clipvisor.__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, saved["PYTHONPATH"]) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # CI has no network to report to
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield skip_log
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_args(skip_log: str) -> dict:
    return dict(REQUEST, deadline=DEADLINE, supervisor="private", serve_args=["--skip-log", skip_log])


def supervisor_processes(slot_socket: str) -> List[int]:
    """Pids of `clipvisor serve` processes listening on `slot_socket`."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and slot_socket.encode() in argv and os.path.basename(argv[0]) == b"clipvisor":
            pids.append(int(pid))
    return pids


def skip_lines(skip_log: str) -> List[dict]:
    import json

    with open(skip_log) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_concurrent_tasks_start_one_supervisor_per_node(ray_session: str, clips: Dict[str, str]) -> None:
    @ray.remote(num_cpus=0.5)
    def ask(serve_args: List[str]) -> tuple:
        import clipvisor.ray

        return os.getpid(), clipvisor.ray.node_socket("private", serve_args=serve_args), clipvisor.__file__

    answers = ray.get([ask.remote(["--skip-log", ray_session]) for _ in range(4)], timeout=90)
    sockets = {socket for _, socket, _ in answers}
    assert len(sockets) == 1, answers
    assert len({pid for pid, _, _ in answers}) >= 2, "the tasks should have run in several worker processes"
    assert {f for _, _, f in answers} == {clipvisor.__file__}, "Ray workers import another clipvisor"
    socket = sockets.pop()
    pids = supervisor_processes(socket)
    assert len(pids) == 1, pids
    with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[argv.index(b"--workers") + 1] == b"2", argv  # the node's Ray CPU resource


def test_rows_match_client_video_and_bad_clips_become_rows(ray_session: str, clips: Dict[str, str]) -> None:
    t0 = time.monotonic()
    ds = cray.read_videos(os.path.dirname(clips["a.mp4"]), on_skip="row", override_num_blocks=3,
                          **read_args(ray_session))
    rows = {row["path"]: row for row in ds.take_all()}
    elapsed = time.monotonic() - t0
    assert sorted(rows) == sorted(clips.values()), "one row per clip (notes.txt filtered out)"
    socket = cray.node_socket("private")  # the driver runs on the same (only) node
    with clipvisor.Client(socket=socket, spawn=False) as client:
        for name in GOOD:
            row = rows[clips[name]]
            want = client.video(clips[name], **REQUEST)
            assert row["skip_reason"] is None and row["skip_detail"] is None
            assert row["frames"].dtype == np.uint8 and row["frames"].shape == (4, 3, 48, 64)
            np.testing.assert_array_equal(row["frames"], want.frames)
            np.testing.assert_array_equal(row["pts"], want.pts)
            np.testing.assert_array_equal(row["indices"], want.indices)
            assert row["sample_fps"] == pytest.approx(want.sample_fps)
            assert bool(row["partial"]) == bool(want.partial)
    expected = {"corrupt.mp4": "decode_error", "truncated.mp4": "decode_error", "fifo.mp4": "timeout"}
    for name, reason in expected.items():
        row = rows[clips[name]]
        assert row["skip_reason"] == reason, (name, row["skip_reason"], row["skip_detail"])
        assert clips[name] in row["skip_detail"]
        assert row["frames"].shape[0] == 0 and len(row["pts"]) == 0
    assert elapsed < 60, elapsed  # the FIFO costs its deadline, not forever
    logged = {(r["path"], r["reason"]) for r in skip_lines(ray_session)}
    for name, reason in expected.items():
        assert (clips[name], reason) in logged, logged
    tags = {r.get("tag") for r in skip_lines(ray_session)}
    assert any(t and t.startswith("ray-") for t in tags), tags


def test_drop_leaves_bad_clips_out_and_logs_them(ray_session: str, clips: Dict[str, str]) -> None:
    before = len(skip_lines(ray_session))
    ds = cray.read_videos([clips[n] for n in ("a.mp4", "corrupt.mp4", "truncated.mp4", "b.mp4", "fifo.mp4")],
                          on_skip="drop", layout="THWC", override_num_blocks=2, **read_args(ray_session))
    rows = ds.take_all()
    assert sorted(r["path"] for r in rows) == sorted([clips["a.mp4"], clips["b.mp4"]])
    assert all(r["frames"].shape == (4, 48, 64, 3) for r in rows)
    assert "skip_reason" not in rows[0]
    new = skip_lines(ray_session)[before:]
    # corrupt and truncated again; the FIFO's second timeout quarantines it (logged once more)
    expected = [clips["corrupt.mp4"], clips["truncated.mp4"], clips["fifo.mp4"]]
    assert sorted(r["path"] for r in new) == sorted(expected), new


def test_quarantined_fifo_is_answered_at_once_and_audio_rows(ray_session: str, clips: Dict[str, str]) -> None:
    t0 = time.monotonic()
    ds = cray.read_videos([clips["fifo.mp4"], clips["b.mp4"], clips["a.mp4"]], audio=True, on_skip="row",
                          **read_args(ray_session))
    rows = {r["path"]: r for r in ds.take_all()}
    assert time.monotonic() - t0 < 30
    assert rows[clips["fifo.mp4"]]["skip_reason"] == "quarantined", rows[clips["fifo.mp4"]]["skip_detail"]
    with_audio = rows[clips["b.mp4"]]
    assert with_audio["sample_rate"] == 16000 and with_audio["audio"].dtype == np.float32
    assert with_audio["audio"].shape[0] == 1 and with_audio["audio"].shape[1] == pytest.approx(3 * 16000, rel=0.05)
    silent = rows[clips["a.mp4"]]
    assert silent["audio"].shape == (1, 0) and silent["frames"].shape == (4, 3, 48, 64)


def test_bad_arguments_are_refused_in_the_driver(ray_session: str, clips: Dict[str, str], workdir: str) -> None:
    with pytest.raises(ValueError, match="on_skip"):
        cray.read_videos(clips["a.mp4"], on_skip="ignore")
    with pytest.raises(ValueError, match="width and height"):
        cray.read_videos(clips["a.mp4"], width=64)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        cray.read_videos(os.path.join(workdir, "missing.mp4"))
    with pytest.raises(ValueError, match="local paths only"):
        cray.read_videos("s3://bucket/x.mp4")


def test_a_killed_node_supervisor_is_replaced_by_the_next_task(ray_session: str, clips: Dict[str, str]) -> None:
    import signal

    socket = cray.node_socket("private")
    [old] = supervisor_processes(socket)
    os.kill(old, signal.SIGKILL)  # the Ray workers' cached connections are now broken
    rows = cray.read_videos([clips["a.mp4"], clips["b.mp4"], clips["d.mp4"]], override_num_blocks=3,
                            **read_args(ray_session)).take_all()
    assert sorted(r["path"] for r in rows) == sorted([clips["a.mp4"], clips["b.mp4"], clips["d.mp4"]])
    pids = supervisor_processes(socket)
    assert len(pids) == 1 and pids != [old], pids


def test_ray_shutdown_stops_the_node_supervisor(ray_session: str, clips: Dict[str, str]) -> None:
    socket = cray.node_socket("private")
    assert len(supervisor_processes(socket)) == 1
    ray.shutdown()  # the raylet exits; the watchdog stops the supervisor and removes its directory
    deadline = time.monotonic() + 20
    while supervisor_processes(socket) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert supervisor_processes(socket) == []
    assert not os.path.exists(os.path.dirname(socket))


def test_a_scan_spread_over_ray_tasks_equals_one_shard(ray_session: str, clips: Dict[str, str], workdir: str) -> None:
    """clipvisor.ray.scan: shards in Ray tasks through the node's supervisor, merged by the driver;
    the same rows as a one-shard scan, bad clips as rows with their reasons (the FIFO a timeout)."""
    data = os.path.dirname(clips["a.mp4"])
    common = dict(args=["--deadline", str(DEADLINE)], supervisor="private", serve_args=["--skip-log", ray_session])
    two = cray.scan([data], os.path.join(workdir, "scan-two"), shards=2, **common)
    one = cray.scan([data], os.path.join(workdir, "scan-one"), shards=1, **common)

    def rows(out: str) -> Dict[str, Dict[str, Any]]:
        with open(os.path.join(workdir, out, "scan.jsonl")) as f:
            parsed = [json.loads(line) for line in f if line.strip()]
        return {os.path.basename(r["path"]): r for r in parsed}

    a, b = rows("scan-two"), rows("scan-one")
    assert set(a) == set(b) == set(GOOD) | {"corrupt.mp4", "truncated.mp4", "fifo.mp4"}, sorted(a)
    for name in GOOD:
        assert a[name]["status"] == "ok" and a[name]["num_frames"] == b[name]["num_frames"] > 0, a[name]
    # Earlier tests of this module timed the FIFO out twice on this node: it may be quarantined.
    assert a["fifo.mp4"]["status"] == "failed" and a["fifo.mp4"]["reason"] in ("timeout", "quarantined"), a["fifo.mp4"]
    assert a["corrupt.mp4"]["reason"] == b["corrupt.mp4"]["reason"] == "decode_error"
    assert two["clips"] == one["clips"] == 7 and two["failed"] == 3
    assert os.path.exists(os.path.join(workdir, "scan-two", "report.html"))
