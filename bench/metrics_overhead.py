#!/usr/bin/env python3
"""What the metrics cost a clip (issue 16): per-clip latency with metrics off, with the HTTP
listener and the textfile on, and with those on while a scraper polls /metrics at 20 Hz (a
hundred times Prometheus' usual rate), interleaved round by round on one warm worker.

Each round, each configuration: a private `clipvisor serve --workers 1`, 20 warm-up clips, then
N small natural clips (320x240, 1 s, 4 frames each) one at a time; it prints the median ms per
clip over rounds, and the supervisor's CPU ms per clip (scrapes included).

  python3 bench/metrics_overhead.py --quick   # 2 rounds x 200 clips: ~1 min
  python3 bench/metrics_overhead.py           # 5 rounds x 500 clips
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from media import natural_clip  # noqa: E402


def one_run(bins: Path, clip: str, clips: int, metrics: bool, scrape: bool) -> tuple[float, float]:
    extra = ["--metrics-listen", "127.0.0.1:0", "--metrics-textfile", "/dev/shm/clipvisor-bench.prom",
             "--metrics-interval", "1"] if metrics else []
    with common.Supervisor(bins, workers=1, extra=extra) as s:
        c = s.client()
        s.wait_warm(c, 1)
        for _ in range(20):
            c.video(clip, frames=4)
        stop = threading.Event()
        scrapes = [0]

        def scraper() -> None:
            address = c.status()["metrics"]["listen"]
            while not stop.is_set():
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
                    r.read()
                scrapes[0] += 1
                time.sleep(0.05)

        thread = threading.Thread(target=scraper) if scrape else None
        if thread:
            thread.start()
        cpu0 = s.cpu()
        t0 = time.perf_counter()
        for _ in range(clips):
            c.video(clip, frames=4)
        wall = time.perf_counter() - t0
        cpu = s.cpu() - cpu0
        stop.set()
        if thread:
            thread.join()
            assert scrapes[0] > 0
        c.close()
    return wall / clips * 1000, cpu / clips * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bin-dir")
    args = parser.parse_args()
    bins = common.bin_dir(args.bin_dir)
    rounds, clips = (2, 200) if args.quick else (5, 500)
    clip = str(natural_clip(1, size="320x240", rate=30, seed=7, audio=False, keyint=30))
    print(common.machine_line())
    configs = {"metrics off": (False, False), "listener + textfile": (True, False), "+ scraper at 20 Hz": (True, True)}
    wall: Dict[str, List[float]] = {k: [] for k in configs}
    cpu: Dict[str, List[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (metrics, scrape) in configs.items():
            w, c = one_run(bins, clip, clips, metrics, scrape)
            wall[name].append(w)
            cpu[name].append(c)
    print(f"{'configuration':<22} {'ms/clip':>8} {'supervisor CPU ms/clip':>24}")
    for name in configs:
        print(f"{name:<22} {statistics.median(wall[name]):8.3f} {statistics.median(cpu[name]):24.3f}")


if __name__ == "__main__":
    main()
