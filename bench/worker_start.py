#!/usr/bin/env python3
"""What a worker start costs: exec vs the fork server (`serve --worker-start exec|fork-server`).

Per mode, a private supervisor with --workers 2:
  crash   100 clips that crash their worker at once (test fault crash-on): CPU per crash of the
          supervisor, the reaped workers and the fork server, from /proc;
  fresh   60 small clips with --clips-per-worker 1 (a new worker for every clip): CPU per clip
          and the reaped workers' minor page faults;
  warm    the same clips in one long-lived worker.
Numbers from one run; compare rows of the same run only (a shared 2-core VM).
The clip: a 2 s 320x240 noise clip asked at max_pixels 20000 (the default), or with
`--clip training` a natural 5 s 640x360 H.264 clip (bench/media.py) asked at Qwen2.5-VL's
448x448 budget: the good clips of bench/chaos.py's `--throughput-source training`, where a fresh
worker is what `after_refused_media = "replace"` pays per refused clip.

    python3 bench/worker_start.py --bin-dir .build/release
    python3 bench/worker_start.py --bin-dir .build/release --clip training --modes fork-server
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))
import clipvisor  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def stat(pid: int) -> list:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu(pid: int) -> tuple:
    """(own CPU s, reaped children's CPU s, reaped children's minor faults)."""
    x = stat(pid)
    return (int(x[11]) + int(x[12])) / TICK, (int(x[13]) + int(x[14])) / TICK, int(x[8])


def own_cpu(pid: int) -> float:
    x = stat(pid)
    return (int(x[11]) + int(x[12])) / TICK


def live_worker_cpu(client: clipvisor.Client) -> float:
    total = 0.0
    for w in client.status()["workers"]["list"]:
        try:
            total += own_cpu(int(w["pid"]))
        except OSError:
            pass
    return total


def run(binary: Path, mode: str, kind: str, clip: Path, work: Path, max_pixels: int) -> str:
    d = Path(tempfile.mkdtemp(dir=work))
    args = [str(binary), "serve", "--socket", str(d / "s.sock"), "--skip-log", str(d / "skips.jsonl"),
            "--workers", "2", "--worker-start", mode]
    if kind == "fresh":
        args += ["--clips-per-worker", "1"]
    env = dict(os.environ, CLIPVISOR_TEST_FAULTS="crash-on=CRASHME")
    sup = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # the socket appears once the supervisor listens
            if (d / "s.sock").exists() or sup.poll() is not None:
                break
            time.sleep(0.02)
        n = 100 if kind == "crash" else 60
        files = []
        for i in range(n):
            f = d / (f"c-CRASHME-{i}.mp4" if kind == "crash" else "good.mp4")
            if not f.exists():
                shutil.copyfile(clip, f)
            files.append(str(f))
        with clipvisor.Client(str(d / "s.sock"), spawn=False, connect_timeout=30) as c:
            c.video(str(clip), fps=2, max_pixels=max_pixels)  # warm: every worker started
            start = c.status()["workers"]["start"]
            zygote = start.get("fork_server_pid")
            z0 = own_cpu(zygote) if zygote else 0.0
            s0, ch0, f0 = cpu(sup.pid)
            w0 = live_worker_cpu(c) if kind == "warm" else 0.0
            t0 = time.monotonic()
            outcomes = {}
            for f in files:
                try:
                    c.video(f, fps=2, max_pixels=max_pixels)
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except clipvisor.ClipSkipped as skip:
                    outcomes[skip.reason] = outcomes.get(skip.reason, 0) + 1
            wall = time.monotonic() - t0
            time.sleep(0.5)
            s1, ch1, f1 = cpu(sup.pid)
            w1 = live_worker_cpu(c) if kind == "warm" else 0.0
            z1 = own_cpu(zygote) if zygote else 0.0
        want = "crashed" if kind == "crash" else "ok"
        if outcomes.get(want) != n:
            raise SystemExit(f"{mode} {kind}: expected {n} x {want}, got {outcomes}")
        per = lambda v: v / n * 1000  # noqa: E731
        total = per(s1 - s0) + per(ch1 - ch0) + per(z1 - z0) + per(w1 - w0)
        return (f"{mode:<12} {kind:<6} {per(wall):8.1f} {total:10.1f} {per(s1 - s0):8.2f} {per(ch1 - ch0):8.2f} "
                f"{per(z1 - z0):8.2f} {per(w1 - w0):8.2f} {(f1 - f0) / n:9.0f}")
    finally:
        sup.terminate()
        sup.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default=".build/release")
    ap.add_argument("--clip", choices=("synthetic", "training"), default="synthetic",
                    help="synthetic: 2 s 320x240 noise at max_pixels 20000 (default); training: natural 5 s 640x360 "
                         "H.264 at max_pixels 448*448")
    ap.add_argument("--modes", default="exec,fork-server", help="comma-separated worker start modes (default: both)")
    a = ap.parse_args()
    binary = Path(a.bin_dir) / "clipvisor"
    modes = [m for m in a.modes.split(",") if m]
    if not modes or set(modes) - {"exec", "fork-server"}:
        ap.error(f"--modes: exec and/or fork-server, not {a.modes!r}")
    work = Path(tempfile.mkdtemp(prefix="worker-start-"))
    if a.clip == "training":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import media  # noqa: PLC0415  (bench/media.py, only this mode needs it)
        clip, max_pixels = media.natural_clip(5, size="640x360", seed=11, audio=False), 448 * 448
    else:
        clip, max_pixels = work / "clip.mp4", 20000
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        "testsrc2=size=320x240:rate=25,noise=alls=20:allf=t", "-t", "2", "-pix_fmt", "yuv420p",
                        str(clip)], check=True)
    print(f"clip {clip.name} at max_pixels {max_pixels}")
    print(f"load average {os.getloadavg()[0]:.2f} at start; per clip: wall ms, CPU ms (all processes), then by process")
    print(f"{'mode':<12} {'case':<6} {'wall':>8} {'CPU':>10} {'superv.':>8} {'reaped':>8} {'forksrv':>8} "
          f"{'live':>8} {'faults':>9}")
    try:
        for kind in ("crash", "fresh", "warm"):
            for mode in modes:
                print(run(binary, mode, kind, clip, work, max_pixels), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
