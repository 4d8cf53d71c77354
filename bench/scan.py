"""clipvisor-scan throughput: clips/s over a generated dataset of mixed sizes and containers, against
the tools a dataset pre-flight uses today, in one run (issue 15).

- facts: `clipvisor-scan DIR` (probe through the supervisor) vs `ffprobe -count_packets` as one
  subprocess per file, two at a time, and vs a decord header scan (`VideoReader`: length, fps) in two
  processes;
- `--verify` (every frame decoded) vs `ffmpeg -threads 1 -map 0:v:0 -f null -` per file, two at a time.

Every peer's exit status and output shape are checked (each file answered, frame counts equal
ffprobe's) before any ratio is printed. Clips are cut (stream copy) from natural-looking footage
(bench/media.py), so no two are the same and none is a flat test pattern.

    python3 bench/scan.py --clips 500            # the issue's size
    python3 bench/scan.py --clips 100 --quick    # a reduced run
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import common
import media

SIZES = ["320x240", "640x360", "854x480", "1280x720", "480x854"]


def make_dataset(count: int) -> Path:
    """`count` clips of 1–5 s cut from 12 s natural clips of five sizes, half MP4, half Matroska."""
    out = media.OUT / f"scan-{count}"
    done = out / ".complete"
    if done.exists():
        return out
    bases = [media.natural_clip(12, size=s, rate=30, seed=40 + i, audio=i % 2 == 0, keyint=30)
             for i, s in enumerate(SIZES)]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(15)
    print(f"[media] cutting {count} clips into {out} ...", file=sys.stderr, flush=True)

    plan = [(rng.randrange(0, 7), 1 + rng.random() * 4) for _ in range(count)]

    def cut(i: int) -> None:
        base = bases[i % len(bases)]
        start, length = plan[i]
        ext = "mp4" if i % 2 == 0 else "mkv"
        d = out / f"part{i // 100:02d}"
        d.mkdir(exist_ok=True)
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-ss", str(start), "-i", str(base),
                        "-t", f"{length:.2f}",
                        "-c", "copy", str(d / f"clip{i:05d}.{ext}")], check=True)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(cut, range(count)))
    done.touch()
    return out


def files_of(root: Path) -> List[str]:
    return sorted(str(p) for p in root.rglob("clip*.*"))


def run_scan(root: Path, sock: str, out: str, verify: bool) -> Tuple[float, List[dict]]:
    cmd = [sys.executable, "-m", "clipvisor.scan", str(root), "--out", out, "--socket", sock, "--no-progress"]
    if verify:
        cmd.append("--verify")
    env = dict(os.environ, PYTHONPATH=str(common.ROOT / "clients" / "python"))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"clipvisor-scan exited {r.returncode}: {r.stderr[-2000:]}")
    with open(os.path.join(out, "scan.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    m = re.search(r"\(clips ([0-9.]+) s, outputs ([0-9.]+) s\)", r.stderr)
    if m:
        which = "scan --verify" if verify else "scan"
        print(f"  {which}: clips {m.group(1)} s, then CSV/Parquet/report {m.group(2)} s, "
              f"of {wall:.2f} s (the rest: Python start-up, counting)")
    return wall, rows


def ffprobe_one(path: str) -> Tuple[str, int]:
    r = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0", "-show_entries",
                        "stream=nb_read_packets,width,height,avg_frame_rate", "-show_entries", "format=duration",
                        "-of", "json", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ffprobe {path} exited {r.returncode}: {r.stderr}")
    return path, int(json.loads(r.stdout)["streams"][0]["nb_read_packets"])


def ffmpeg_null(path: str) -> str:
    r = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", path, "-map", "0:v:0",
                        "-f", "null", "-"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ffmpeg -f null {path} exited {r.returncode}: {r.stderr}")
    return path


def decord_one(path: str) -> Tuple[str, int, float]:
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    return path, len(vr), float(vr.get_avg_fps())


def parallel(fn, items: List[str], n: int = 2) -> Tuple[float, list]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        out = list(pool.map(fn, items))
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=500)
    ap.add_argument("--bin-dir")
    ap.add_argument("--quick", action="store_true", help="skip the decord peer")
    a = ap.parse_args()
    print(common.machine_line())
    root = make_dataset(a.clips)
    files = files_of(root)
    if len(files) != a.clips:
        raise SystemExit(f"{root}: {len(files)} clips, expected {a.clips}")
    bins = common.bin_dir(a.bin_dir)
    tmp = tempfile.mkdtemp(prefix="clipvisor-bench-scan-")
    results: Dict[str, float] = {}
    try:
        with common.Supervisor(bins) as sup:
            c = sup.client()
            workers = common.worker_target(c.status())
            sup.wait_warm(c, workers)
            c.close()
            wall, rows = run_scan(root, sup.socket, os.path.join(tmp, "facts"), verify=False)
            assert len(rows) == len(files) and all(r["status"] == "ok" for r in rows), "scan: a clip failed"
            ours = {r["path"]: r["num_frames"] for r in rows}
            results["scan"] = wall
            vwall, vrows = run_scan(root, sup.socket, os.path.join(tmp, "verify"), verify=True)
            bad = [r["path"] for r in vrows if r.get("verify") != "clean"]
            assert len(vrows) == len(files) and not bad, f"--verify: not clean: {bad[:5]}"
            assert all(r["verify_frames"] == r["num_frames"] for r in vrows)
            results["scan --verify"] = vwall
        pwall, probed = parallel(ffprobe_one, files)
        assert len(probed) == len(files)
        differ = [p for p, n in probed if ours[p] != n]
        # Stream-copied MP4 cuts start at the keyframe before the cut and carry an edit list that
        # hides the preroll: those packets are not frames. There the count must equal what
        # decoding every frame gives (checked outside the timing).
        for p in differ:
            r = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                                "stream=nb_read_frames", "-of", "csv=p=0", p],
                               capture_output=True, text=True, check=True)
            assert int(r.stdout.strip()) == ours[p], f"{p}: {ours[p]} frames, ffprobe -count_frames {r.stdout.strip()}"
        print(f"frame counts: {len(files) - len(differ)} equal ffprobe -count_packets; {len(differ)} clips hold "
              f"edit-list preroll packets, and there equal ffprobe -count_frames")
        results["ffprobe -count_packets x2"] = pwall
        nwall, nulls = parallel(ffmpeg_null, files)
        assert len(nulls) == len(files)
        results["ffmpeg -f null x2"] = nwall
        if not a.quick:
            try:
                import decord  # noqa: F401
            except ImportError:
                print("decord not installed: skipping its peer")
            else:
                t0 = time.perf_counter()
                pool = multiprocessing.get_context("spawn").Pool(2)
                got = pool.map(decord_one, files, chunksize=8)
                pool.close()  # let the children exit on their own (terminate() would SIGTERM them)
                pool.join()
                results["decord header x2 processes"] = time.perf_counter() - t0
                assert len(got) == len(files) and all(n > 0 and fps > 0 for _, n, fps in got)
                off = sum(1 for p, n, _ in got if n != ours[p])
                print(f"decord's frame count differs from the frames shown on {off} of {len(files)} clips")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(files)
    print(f"\n{n} clips ({', '.join(SIZES)}; MP4 and Matroska; 1-5 s), binaries {bins}")
    for name, wall in results.items():
        print(f"  {name:32s} {wall:7.2f} s  {n / wall:8.1f} clips/s")
    print(f"\n  scan vs ffprobe -count_packets:  {results['ffprobe -count_packets x2'] / results['scan']:.2f}x")
    if "decord header x2 processes" in results:
        print(f"  scan vs decord header scan:      {results['decord header x2 processes'] / results['scan']:.2f}x")
    print(f"  scan --verify vs ffmpeg -f null: {results['ffmpeg -f null x2'] / results['scan --verify']:.2f}x")


if __name__ == "__main__":
    main()
