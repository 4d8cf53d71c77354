#!/usr/bin/env python3
"""Where each CPU millisecond of a dense small clip goes: clipvisor against torchcodec, by library.

Issue 14's W2 (20 natural 320x240 3 s clips, every frame: 20.7 MB of RGB each) is where
clipvisor trails torchcodec when every core is busy. This benchmark says why with one
system-wide profile per side, taken in the same run:

- **clipvisor**: a private supervisor (default workers) and 4 client threads in this machine's
  usual shape (the benchmark's own process is the client);
- **torchcodec**: `VideoDecoder(..., num_ffmpeg_threads=1, seek_mode="exact")` and
  `get_frames_at(all indices)` on 2 threads, its best setting on 2 cores.

Each side runs in a child process that decodes the set once untimed, then loops over it while
`perf record -a` samples every CPU for `--seconds`; the child counts the clips it finished in
that window and checks every array's shape. The samples are then grouped by process and library
into CPU milliseconds per clip (a sample's share of all CPUs' time in the window, divided by the
clips): decoding (libavcodec, libavformat, libavutil) and conversion (libswscale) are the work
both sides must do; the rest of clipvisor's time is what isolation costs (the worker's checksums
and write into shared memory, the supervisor, the client's copy and checksum check); `idle` is
time no process used.

Needs `perf` (linux-perf) and the right to profile every CPU (root, or
`kernel.perf_event_paranoid` <= 0), and torchcodec:

    python3 bench/cpu_attribution.py --bin-dir .build/release
    python3 bench/cpu_attribution.py --bin-dir .build/release --seconds 12 --keep perf-out
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from media import small_clips  # noqa: E402

FRAMES, HEIGHT, WIDTH = 90, 240, 320
CLIENT_THREADS, PEER_THREADS = 4, 2

#: Libraries whose time is the decode itself, the same on both sides.
DECODE_LIBS = ("libavcodec", "libavformat", "libavutil")
CONVERT_LIBS = ("libswscale",)


# ---- the children: one decodes in a loop until told to stop ------------------------------------

def _loop(one: Callable[[str], int], clips: List[str], threads: int) -> None:
    """Protocol with the parent: prints `ready` after the untimed pass; at `start` on stdin it
    begins counting, at `stop` it prints the clips finished in between and exits."""
    pool = ThreadPoolExecutor(threads)
    list(pool.map(one, clips))
    print("ready", flush=True)
    state = {"counting": False, "done": 0, "stop": False}
    lock = threading.Lock()

    def counted(path: str) -> int:
        n = one(path)
        with lock:
            if state["counting"]:
                state["done"] += 1
        return n

    def control() -> None:
        for line in sys.stdin:
            with lock:
                if line.strip() == "start":
                    state["counting"] = True
                elif line.strip() == "stop":
                    state["counting"] = False
                    state["stop"] = True
                    print(f"done {state['done']}", flush=True)
                    return

    threading.Thread(target=control, daemon=True).start()
    while not state["stop"]:
        list(pool.map(counted, clips))
    pool.shutdown()


def _check(frames, path: str) -> int:
    if tuple(frames.shape) != (FRAMES, HEIGHT, WIDTH, 3):
        raise SystemExit(f"{path}: got frames of shape {tuple(frames.shape)}, expected {(FRAMES, HEIGHT, WIDTH, 3)}")
    return int(frames.nbytes)


def child_clipvisor(bins: Path, clips: List[str]) -> None:
    with common.Supervisor(bins) as sup:
        client = sup.client()
        sup.wait_warm(client, common.worker_target(client.status()))
        _loop(lambda p: _check(client.video(p, fps=30.0, layout="THWC").frames, p), clips, CLIENT_THREADS)


def child_torchcodec(clips: List[str]) -> None:
    import torch  # noqa: F401  (every training process has paid this import)
    from torchcodec.decoders import VideoDecoder

    def one(path: str) -> int:
        decoder = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1, seek_mode="exact")
        return _check(decoder.get_frames_at(list(range(FRAMES))).data.numpy(), path)

    _loop(one, clips, PEER_THREADS)


# ---- the parent: profile each child, group the samples -----------------------------------------

def profile(side: str, args: argparse.Namespace, clips: List[str], out: Path) -> Tuple[int, Path]:
    """Runs one child under a system-wide profile of `args.seconds`; returns (clips, perf.data)."""
    cmd = [sys.executable, __file__, "--child", side, "--bin-dir", str(common.bin_dir(args.bin_dir)), "--clips",
           str(len(clips))]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin and child.stdout
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise SystemExit(f"{side}: the decoding child failed before it was ready (exit {child.wait()})")
    data = out / f"{side}.perf.data"
    child.stdin.write("start\n")
    child.stdin.flush()
    rec = subprocess.run(["perf", "record", "-a", "-q", "-o", str(data), "--", "sleep", str(args.seconds)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    child.stdin.write("stop\n")
    child.stdin.flush()
    line = child.stdout.readline().strip()
    rc = child.wait(timeout=120)
    if rec.returncode != 0:
        raise SystemExit(f"perf record failed (exit {rec.returncode}): {rec.stderr.strip()}")
    if rc != 0 or not line.startswith("done "):
        raise SystemExit(f"{side}: the decoding child exited {rc} (last line {line!r})")
    done = int(line.split()[1])
    if done < len(clips):
        raise SystemExit(f"{side}: only {done} clips finished in {args.seconds} s; raise --seconds")
    return done, data


def samples_by_process_and_library(data: Path) -> Dict[Tuple[str, str], float]:
    """perf's shares (percent of all samples, idle included) by (command, library)."""
    rep = subprocess.run(["perf", "report", "-i", str(data), "--sort", "comm,dso", "--stdio", "-q", "-t", "\t",
                          "--percentage", "relative"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if rep.returncode != 0:
        raise SystemExit(f"perf report failed on {data}: {rep.stderr.strip()}")
    shares: Dict[Tuple[str, str], float] = defaultdict(float)
    for row in rep.stdout.splitlines():
        parts = [p.strip() for p in row.split("\t")]
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        shares[(parts[1], parts[2])] += float(parts[0].rstrip("%"))
    if not shares:
        raise SystemExit(f"perf report on {data} gave no samples")
    return shares


def category(side: str, comm: str, dso: str) -> str:
    if comm == "swapper":
        return "idle"
    lib = Path(dso).name
    if lib.startswith(DECODE_LIBS):
        return "decode (libavcodec, libavformat, libavutil)"
    if lib.startswith(CONVERT_LIBS):
        return "convert (libswscale)"
    if side == "clipvisor":
        if comm.startswith("clipvisor-work"):
            return {"[kernel.kallsyms]": "worker: kernel (write into shared memory, syscalls)",
                    "clipvisor-worker": "worker: own code (mostly the frames' checksums)"}.get(
                        lib, "worker: libc, Swift runtime")
        if comm == "clipvisor":
            return "supervisor"
        if comm.startswith("python"):
            return ("client: copy and checksum check (zstd, memmove)"
                    if lib.startswith(("backend_c", "libc.so")) else "client: Python and the rest")
    elif comm.startswith("python"):
        return "torchcodec: libc, torch, Python, kernel"
    return "other processes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", help="directory with clipvisor and clipvisor-worker (release build)")
    ap.add_argument("--seconds", type=float, default=8.0, help="profile length per side (default 8)")
    ap.add_argument("--clips", type=int, default=20, help="W2 clips in the set (default 20)")
    ap.add_argument("--keep", help="keep the perf.data files in this directory")
    ap.add_argument("--child", choices=["clipvisor", "torchcodec"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    clips = [str(p) for p in small_clips(args.clips)]
    if args.child == "clipvisor":
        return child_clipvisor(common.bin_dir(args.bin_dir), clips)
    if args.child == "torchcodec":
        return child_torchcodec(clips)

    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (Debian: apt install linux-perf)")
    try:
        import torchcodec
    except Exception as e:  # noqa: BLE001 - any import failure means the peer is missing
        raise SystemExit(f"torchcodec cannot be imported ({e}); pip install torchcodec")
    print(f"binaries {common.bin_dir(args.bin_dir)}; torchcodec {torchcodec.__version__}")
    print(common.machine_line())
    cpus = len(os.sched_getaffinity(0))
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipvisor-attribution-"))
    out.mkdir(parents=True, exist_ok=True)
    per_clip: Dict[str, Dict[str, float]] = {}
    for side in ("clipvisor", "torchcodec"):
        done, data = profile(side, args, clips, out)
        ms_per_share = cpus * args.seconds * 1000 / 100 / done  # one percent of all CPU time, per clip
        rows: Dict[str, float] = defaultdict(float)
        for (comm, dso), share in samples_by_process_and_library(data).items():
            rows[category(side, comm, dso)] += share * ms_per_share
        per_clip[side] = rows
        print(f"{side}: {done} clips in {args.seconds:g} s on {cpus} CPUs: {cpus * args.seconds * 1000 / done:.2f} "
              f"ms of CPU time per clip (idle included)")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)

    names = sorted({k for rows in per_clip.values() for k in rows},
                   key=lambda k: (k == "idle", -max(r.get(k, 0.0) for r in per_clip.values())))
    print(f"\nCPU ms per clip (320x240, {FRAMES} frames, {FRAMES * HEIGHT * WIDTH * 3 / 1e6:.1f} MB of RGB)")
    print(f"{'':58s} {'clipvisor':>10s} {'torchcodec':>11s}")
    for name in names:
        print(f"{name:58s} {per_clip['clipvisor'].get(name, 0.0):10.2f} {per_clip['torchcodec'].get(name, 0.0):11.2f}")
    work = ("decode (libavcodec, libavformat, libavutil)", "convert (libswscale)")
    for side in per_clip:
        busy = sum(v for k, v in per_clip[side].items() if k != "idle")
        shared = sum(per_clip[side].get(k, 0.0) for k in work)
        print(f"{side}: busy {busy:.2f} ms per clip, of which decode + convert {shared:.2f}, the rest {busy - shared:.2f}")
    cv = sum(v for k, v in per_clip["clipvisor"].items() if k != "idle")
    tc = sum(v for k, v in per_clip["torchcodec"].items() if k != "idle")
    print(f"torchcodec's busy CPU / clipvisor's: {tc / cv:.2f}x (what clipvisor's throughput can reach with every core "
          f"busy)")


if __name__ == "__main__":
    main()
