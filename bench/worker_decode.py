#!/usr/bin/env python3
"""W1 and W3 for the decode worker alone (issue 2), against `ffmpeg -f null` on the same clips.

W1: natural-looking 720p H.264 clips of 10-60 s, 2 fps, max_pixels 448x448, factor 28.
W3: a 5-minute clip at 0.25 fps: the worker seeks to each keyframe; ffmpeg decodes everything.

Each command runs `--repeat` times; the median wall time and the CPU time (user+sys of the
child) are reported, with ratios computed in the same run. Use a release build:
    swift build -c release --product clipvisor-worker
    python3 bench/worker_decode.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from media import natural_clip  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], repeat: int) -> tuple[float, float, str]:
    """Median wall seconds, median CPU seconds, and the last stdout."""
    walls, cpus, out = [], [], ""
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
        walls.append(wall)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        out = proc.stdout
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=str(ROOT / ".build" / "release" / "clipvisor-worker"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--w1-seconds", default="10,20,40,60", help="W1 clip lengths")
    parser.add_argument("--w3-seconds", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="short clips, one repeat (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.w1_seconds, args.w3_seconds = 1, "10", 60
    if not os.access(args.worker, os.X_OK):
        raise SystemExit(f"{args.worker} missing: swift build -c release --product clipvisor-worker")

    print(f"worker: {args.worker}; repeat {args.repeat}; cpus {os.cpu_count()}")
    print("\nW1: 720p H.264, 2 fps, max_pixels 448*448, factor 28 (video only)")
    print(f"{'clip':>6} {'frames':>6} {'out':>9} | {'worker wall':>11} {'cpu':>6} | {'ffmpeg -an':>10} {'cpu':>6} | {'ffmpeg':>7} | {'speed vs -an':>12}")
    totals = [0.0, 0.0, 0.0, 0.0]
    for seconds in [float(s) for s in args.w1_seconds.split(",")]:
        clip = natural_clip(seconds)
        wall, cpu, out = timed([args.worker, "decode", str(clip), "--fps", "2", "--max-pixels", str(448 * 448),
                                "--factor", "28", "--out", "/dev/null"], args.repeat)
        result = json.loads(out)
        shape = result["video"]["shape"]
        f_wall, f_cpu, _ = timed(["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", str(clip), "-an",
                                  "-f", "null", "-"], args.repeat)
        a_wall, _, _ = timed(["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", str(clip), "-f", "null", "-"],
                             args.repeat)
        totals = [totals[0] + wall, totals[1] + cpu, totals[2] + f_wall, totals[3] + f_cpu]
        print(f"{seconds:>5g}s {shape[0]:>6} {shape[2]}x{shape[3]:<4} | {wall:>10.2f}s {cpu:>5.2f}s | {f_wall:>9.2f}s "
              f"{f_cpu:>5.2f}s | {a_wall:>6.2f}s | {f_wall / wall:>11.2f}x")
    print(f"{'all':>6} {'':>6} {'':>9} | {totals[0]:>10.2f}s {totals[1]:>5.2f}s | {totals[2]:>9.2f}s {totals[3]:>5.2f}s | "
          f"{'':>7} | {totals[2] / totals[0]:>11.2f}x   (W1 ratio: ffmpeg -f null wall / worker wall; target >= 0.8)")

    print(f"\nW3: {args.w3_seconds:g} s clip at 0.25 fps")
    clip = natural_clip(args.w3_seconds, size="1280x720", audio=False)
    wall, cpu, out = timed([args.worker, "decode", str(clip), "--fps", "0.25", "--max-pixels", str(448 * 448),
                            "--out", "/dev/null"], args.repeat)
    result = json.loads(out)
    f_wall, f_cpu, _ = timed(["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", str(clip), "-f", "null", "-"],
                             args.repeat)
    print(f"worker ({result['video']['access']}, {result['video']['shape'][0]} frames): {wall:.2f} s wall, {cpu:.2f} s CPU")
    print(f"ffmpeg -f null (decodes all {result['video']['frames_in_range']} frames): {f_wall:.2f} s wall, {f_cpu:.2f} s CPU")
    print(f"W3 speed-up of seeking over decoding everything: {f_wall / wall:.1f}x")


if __name__ == "__main__":
    main()
