#!/usr/bin/env python3
"""W4: audio decode to 16 kHz mono, clipvisor-worker vs PyAV in-process, on the same files.

Ten 30 s files are made at bench time with the ffmpeg CLI from "natural-ish" sources (pink or
brown noise with a slow amplitude envelope, a chirp and a few tones, mixed), at 44.1/48/22.05 kHz,
mono and stereo, as WAV (PCM s16), MP3 (LAME 128k) and M4A (AAC 128k).

For each file, the median of --repeat runs of:
  worker  `clipvisor-worker decode F --audio --no-video --out /dev/null` (a fresh process, so its
          ~30-40 ms start-up with 135 shared libraries is included; `decode_s` is the worker's own
          in-process decode time from its result, which is what a warm pooled worker pays);
  pyav    in this process: `av.open`, decode the first audio stream, `av.AudioResampler(format=
          'fltp', layout='mono', rate=16000)`, concatenate to one float32 array.
Wall and CPU seconds are printed per file and in total, with the ratios PyAV/worker (> 1: the
worker is faster). The two outputs are compared too (length and relative RMS difference).

Usage: swift build -c release --scratch-path .build-audio && python3 bench/w4_audio.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))

# (name, sample rate, channels, noise colour, codec args)
FILES = [
    ("w4_00.wav", 44100, 2, "pink", ["-c:a", "pcm_s16le"]),
    ("w4_01.wav", 48000, 1, "brown", ["-c:a", "pcm_s16le"]),
    ("w4_02.wav", 22050, 1, "pink", ["-c:a", "pcm_s16le"]),
    ("w4_03.wav", 48000, 2, "white", ["-c:a", "pcm_s16le"]),
    ("w4_04.mp3", 44100, 2, "pink", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    ("w4_05.mp3", 48000, 1, "brown", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    ("w4_06.mp3", 22050, 2, "pink", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    ("w4_07.m4a", 44100, 2, "brown", ["-c:a", "aac", "-b:a", "128k"]),
    ("w4_08.m4a", 48000, 1, "pink", ["-c:a", "aac", "-b:a", "128k"]),
    ("w4_09.m4a", 44100, 1, "white", ["-c:a", "aac", "-b:a", "128k"]),
]
SECONDS = 30
RATE = 16000


def cached_files(directory: Path) -> list[Path]:
    """The ten files, made once in `directory` (bench/e2e.py's and bench/client_cpu.py's W4)."""
    directory.mkdir(parents=True, exist_ok=True)
    return [make_file(directory, i, *spec) for i, spec in enumerate(FILES)]


def make_file(directory: Path, index: int, name: str, rate: int, channels: int, colour: str, codec: list[str]) -> Path:
    out = directory / name
    if out.exists():
        return out
    base = 150 + 40 * index
    graph = (
        f"anoisesrc=color={colour}:amplitude=0.25:seed={index + 1}:r={rate}:d={SECONDS},"
        f"volume='0.35+0.3*sin(2*PI*0.37*t)':eval=frame[n];"
        f"aevalsrc='0.15*sin(2*PI*({base}+{60 + index}*t)*t)':s={rate}:d={SECONDS}[c];"
        f"aevalsrc='0.1*sin(2*PI*{base * 2}*t)*(0.5+0.5*sin(2*PI*3*t))+0.05*sin(2*PI*{base * 3 + 7}*t)':"
        f"s={rate}:d={SECONDS}[t];"
        f"[n][c][t]amix=inputs=3:normalize=0,aformat=channel_layouts={'stereo' if channels == 2 else 'mono'}[a]"
    )
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-filter_complex", graph, "-map", "[a]", "-t", str(SECONDS),
         *codec, str(out)], check=True)
    return out


def run_worker(worker: Path, path: Path) -> tuple[float, float, float, dict]:
    """Wall s, CPU s (the child's rusage) and the result JSON of one worker decode."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(worker), "decode", str(path), "--audio", "--no-video", "--sample-rate", str(RATE), "--channels", "1",
         "--out", "/dev/null"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed on {path}: {out.decode()}")
    return wall, usage.ru_utime + usage.ru_stime, 0.0, json.loads(out)


def run_pyav(path: Path) -> tuple[float, float, np.ndarray]:
    import av

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=RATE)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu, samples


def worker_samples(worker: Path, path: Path, scratch: Path) -> np.ndarray:
    from clipvisor.block import read_block_file

    block = scratch / "w4.blk"
    subprocess.run([str(worker), "decode", str(path), "--audio", "--no-video", "--out", str(block)],
                   check=True, stdout=subprocess.DEVNULL)
    return read_block_file(block).tensors["audio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help="clipvisor-worker binary (default: .build-audio/release, then .build/release)")
    parser.add_argument("--dir", help="where to make the files (default: a temporary directory, removed after)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per file and tool; the median is reported")
    args = parser.parse_args()

    candidates = [args.worker, ROOT / ".build-audio/release/clipvisor-worker", ROOT / ".build/release/clipvisor-worker"]
    worker = next((Path(c) for c in candidates if c and os.access(c, os.X_OK)), None)
    if worker is None:
        raise SystemExit("no release clipvisor-worker: swift build -c release --scratch-path .build-audio")
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="clipvisor-w4-"))
    directory.mkdir(parents=True, exist_ok=True)
    import av

    load = os.getloadavg()
    print(f"W4 audio: {len(FILES)} files × {SECONDS} s → {RATE} Hz mono float32; median of {args.repeat} runs")
    print(f"worker {worker}; PyAV {av.__version__} (its own FFmpeg {'.'.join(map(str, av.library_versions['libavcodec']))} "
          f"libavcodec); cpus {os.cpu_count()}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    try:
        paths = [make_file(directory, i, *spec) for i, spec in enumerate(FILES)]
        header = (f"{'file':12s} {'in':>13s} {'worker wall':>11s} {'cpu':>6s} {'decode_s':>8s} "
                  f"{'pyav wall':>9s} {'cpu':>6s} {'wall ratio':>10s} {'cpu ratio':>9s} {'samples':>8s} {'Δn':>4s} {'rel rms':>8s}")
        print(header)
        totals = {"ww": 0.0, "wc": 0.0, "wd": 0.0, "pw": 0.0, "pc": 0.0}
        for path, (name, rate, channels, _, _) in zip(paths, FILES):
            wr, pr = [], []
            for _ in range(args.repeat):
                wall, cpu, _, result = run_worker(worker, path)
                wr.append((wall, cpu, result["decode_seconds"]))
                pwall, pcpu, pyav_out = run_pyav(path)
                pr.append((pwall, pcpu))
            ww, wc, wd = (statistics.median(x[i] for x in wr) for i in range(3))
            pw, pc = (statistics.median(x[i] for x in pr) for i in range(2))
            ours = worker_samples(worker, path, directory)
            n = min(ours.shape[1], pyav_out.shape[1])
            ref = pyav_out[:, :n].astype(np.float64)
            rel = float(np.sqrt(((ours[:, :n] - ref) ** 2).mean() / max((ref ** 2).mean(), 1e-30)))
            for k, v in zip(("ww", "wc", "wd", "pw", "pc"), (ww, wc, wd, pw, pc)):
                totals[k] += v
            print(f"{name:12s} {rate:>6d} Hz {channels}ch {ww:10.3f}s {wc:5.3f}s {wd:7.3f}s "
                  f"{pw:8.3f}s {pc:5.3f}s {pw / ww:9.2f}x {pc / wc:8.2f}x {ours.shape[1]:8d} "
                  f"{ours.shape[1] - pyav_out.shape[1]:4d} {rel:8.1e}")
        print(f"{'total':12s} {'':13s} {totals['ww']:10.3f}s {totals['wc']:5.3f}s {totals['wd']:7.3f}s "
              f"{totals['pw']:8.3f}s {totals['pc']:5.3f}s {totals['pw'] / totals['ww']:9.2f}x "
              f"{totals['pc'] / totals['wc']:8.2f}x")
        print(f"warm-worker view (decode_s, no process start): PyAV wall / worker decode_s = "
              f"{totals['pw'] / totals['wd']:.2f}x")
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
