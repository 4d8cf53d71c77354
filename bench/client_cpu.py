#!/usr/bin/env python3
"""The Python client's own CPU per call, with one thread and with several sharing a Client.

A private supervisor (default workers) serves issue 14's W4 set (ten 30 s audio files, WAV, MP3
and M4A, to 16 kHz mono float32: 1.92 MB blocks, where per-call costs weigh most) or the W2 set
(20 natural 320x240 3 s clips, every frame: 20.7 MB blocks) or the quick W1 set (natural 720p
clips of 10 and 20 s at fps 2 and Qwen2.5-VL's 448x448 budget: 6.8 and 13.5 MB), into new arrays. For each
`--threads` value and each allocator, a thread pool made once runs one untimed round of the
whole set (each thread's malloc arena grows once, as in a long training run) and then
`--rounds` rounds. Per call: wall, the client's CPU (user + system, this process only), its
voluntary context switches (a thread woken for nothing shows here), minor faults, and CPU
seconds per GB delivered (issue 14's goal: <= 0.25).

The allocators (`--allocators`): `default`, the client's own (large tensors from the
`RecycledArrays` pool), and `numpy`, a new `np.empty` array per tensor (the default before
that pool), so the table shows what the pool saves in the same run.

    python3 bench/client_cpu.py --bin-dir .build/release
    python3 bench/client_cpu.py --bin-dir .build/release --workload w2 --threads 1,4
    python3 bench/client_cpu.py --bin-dir .build/release --workload w1 --rounds 5
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from media import OUT as MEDIA_OUT  # noqa: E402
from media import natural_clip, small_clips  # noqa: E402
from w4_audio import cached_files as w4_files  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", help="directory with clipvisor and clipvisor-worker (release build)")
    ap.add_argument("--workload", choices=("w4", "w2", "w1"), default="w4")
    ap.add_argument("--threads", default="1,4", help="comma-separated thread counts (default 1,4)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the whole set per thread count")
    ap.add_argument("--allocators", default="default,numpy",
                    help="comma-separated: default (the client's RecycledArrays pool), numpy (np.empty per tensor)")
    a = ap.parse_args()
    counts = [int(t) for t in a.threads.split(",") if t]
    if not counts or min(counts) < 1 or a.rounds < 1:
        ap.error("--threads: positive counts; --rounds: at least 1")
    allocators = {"default": None, "numpy": lambda name, shape, dtype: np.empty(shape, dtype)}
    chosen = [x for x in a.allocators.split(",") if x]
    if not chosen or any(x not in allocators for x in chosen):
        ap.error(f"--allocators: some of {', '.join(allocators)}")
    if a.workload == "w4":
        paths = [str(p) for p in w4_files(MEDIA_OUT / "w4")]
    elif a.workload == "w2":
        paths = [str(p) for p in small_clips(20)]
    else:
        paths = [str(natural_clip(seconds)) for seconds in (10, 20)] * 2

    with common.Supervisor(common.bin_dir(a.bin_dir)) as sup:
        client = sup.client()
        sup.wait_warm(client, common.worker_target(client.status()))

        allocator = None

        def one(path: str) -> int:
            if a.workload == "w4":
                return client.audio(path, sample_rate=16000, channels=1, allocator=allocator).samples.nbytes
            if a.workload == "w2":
                return client.video(path, fps=30.0, layout="THWC", allocator=allocator).frames.nbytes
            return client.video(path, fps=2.0, max_pixels=448 * 448, factor=28, layout="THWC",
                                allocator=allocator).frames.nbytes

        expected = [one(p) for p in paths]  # untimed: the connection's slabs, the heap's growth
        if min(expected) <= 0:
            raise SystemExit(f"an empty result in the untimed round: {expected}")
        print(common.machine_line())
        print(f"{a.workload}: {len(paths)} files, {sum(expected) / len(paths) / 1e6:.2f} MB per call, "
              f"{a.rounds} rounds per row")
        print(f"{'allocator':>9} {'threads':>7} {'wall ms':>8} {'CPU ms':>7} {'user':>6} {'sys':>6} {'vol. cs':>8} "
              f"{'faults':>7} {'CPU s/GB':>9}")
        for name, threads in [(name, t) for t in counts for name in chosen]:
            allocator = allocators[name]
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, paths))  # untimed: each pool thread's malloc arena grows once
                r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                got = [n for _ in range(a.rounds) for n in pool.map(one, paths)]
                wall, r1 = time.perf_counter() - w0, resource.getrusage(resource.RUSAGE_SELF)
            if got != expected * a.rounds:
                raise SystemExit(f"{threads} threads: results differ in size from the untimed round")
            calls, gb = len(got), sum(got) / 1e9
            user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
            print(f"{name:>9} {threads:>7} {wall / calls * 1e3:>8.2f} {(user + system) / calls * 1e3:>7.3f} "
                  f"{user / calls * 1e3:>6.3f} {system / calls * 1e3:>6.3f} "
                  f"{(r1.ru_nvcsw - r0.ru_nvcsw) / calls:>8.1f} {(r1.ru_minflt - r0.ru_minflt) / calls:>7.0f} "
                  f"{(user + system) / gb:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
