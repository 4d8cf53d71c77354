#!/usr/bin/env python3
"""Hangs never hold the pool, and many clients share it fairly (issue 13).

Part 1, I/O hangs: good clips decoded by 4 client threads (small natural clips, bench/media.py
small_clips, 8 frames each at 224x224) while 0, 2 or 8 requests are always blocked on FIFOs with
no writer (each FIFO is used once, deadline 3 s; a hang answered `timeout` is replaced at once).
Per scenario: good-clip throughput, latency p50/p99, and the ratio of throughput to the 0-hang
run. Goal: >= 0.9x with 2 and 8 hangs. Every good clip must decode and every hang must be
answered `timeout`, else the run fails (exit 1) and no ratio is printed.

Part 2, kill latency: 20 hangs with a 300 ms deadline, one at a time: (answer - deadline) as the
client sees it, p50/p99/max. Bar: ~100 ms.

Part 3, fairness: 4 "light" clients sending single clips, alone and then next to one "heavy"
client that keeps 64-clip samples queued. The light clients' latency p50/p99 in both, and the
ratio of p99. Goal: <= 2x.

Part 4, many clients: 1, 16 and 64 client processes each decoding N small clips at once; total
throughput, and the p99 over all clips of the time not spent decoding (the client's latency minus
the worker's decode_seconds: queue wait, plus the hop).

  python3 bench/hang_load.py --quick     # ~1.5 min
  python3 bench/hang_load.py             # ~4 min
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from media import small_clips  # noqa: E402

import clipvisor  # noqa: E402

GOOD = dict(frames=8, width=224, height=224)


class Failure(SystemExit):
    pass


def check_video(video, path) -> None:
    if tuple(video.frames.shape[:2]) != (8, 3) or video.frames.shape[2:] != (224, 224):
        raise Failure(f"{path}: unexpected shape {video.frames.shape}")


class HangKeeper:
    """Keeps `count` requests blocked on fresh FIFOs with no writer until stopped."""

    def __init__(self, socket: str, directory: Path, count: int, deadline: float):
        self.socket, self.directory, self.count, self.deadline = socket, directory, count, deadline
        self.stop = threading.Event()
        self.answers: List[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        self.serial = 0
        self.lock = threading.Lock()

    def _fifo(self) -> str:
        with self.lock:
            self.serial += 1
            path = self.directory / f"hang-{os.getpid()}-{self.serial}.fifo"
        os.mkfifo(path)
        return str(path)

    def _run(self, index: int) -> None:
        with clipvisor.Client(socket=self.socket, spawn=False) as client:
            while not self.stop.is_set():
                path = self._fifo()
                try:
                    client.video(path, deadline=self.deadline, **GOOD)
                    outcome = "decoded?!"
                except clipvisor.ClipSkipped as skip:
                    outcome = skip.reason
                finally:
                    os.unlink(path)
                with self.lock:
                    self.answers.append(outcome)

    def __enter__(self) -> "HangKeeper":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.deadline + 30)
        bad = [a for a in self.answers if a != "timeout"]
        if bad:
            raise Failure(f"hangs answered {sorted(set(bad))}, not timeout")


def decode_all(socket: str, clips: List[Path], threads: int) -> List[float]:
    """Decodes every clip once across `threads` client threads; returns per-clip latencies."""
    latencies: List[float] = []
    errors: List[str] = []
    lock = threading.Lock()
    todo = list(clips)

    def run() -> None:
        with clipvisor.Client(socket=socket, spawn=False) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    path = todo.pop()
                start = time.perf_counter()
                try:
                    check_video(client.video(str(path), **GOOD), path)
                except Exception as error:  # noqa: BLE001 - every failure is reported
                    with lock:
                        errors.append(f"{path}: {error!r}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise Failure("good clips failed: " + "; ".join(errors[:5]))
    return latencies


def part_hangs(bins: Path, clips: List[Path], hang_counts: List[int]) -> None:
    print("\n== 1. good clips next to I/O hangs (4 client threads, --workers 2)")
    print(f"{'hangs':>6} {'clips/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs 0 hangs':>11} {'max workers seen':>17}")
    base: Optional[float] = None
    with tempfile.TemporaryDirectory(prefix="clipvisor-hangs-") as scratch:
        for hangs in hang_counts:
            with common.Supervisor(bins, workers=2) as sup, sup.client() as probe:
                sup.wait_warm(probe, 2)
                decode_all(sup.socket, clips[:8], 4)  # warm-up
                seen = [0]
                stop = threading.Event()

                def watch() -> None:
                    while not stop.is_set():
                        seen[0] = max(seen[0], int(probe.status()["workers"]["live"]))
                        time.sleep(0.1)

                watcher = threading.Thread(target=watch, daemon=True)
                with HangKeeper(sup.socket, Path(scratch), hangs, deadline=3.0):
                    time.sleep(0.8 if hangs else 0)  # the hangs are in place and seen blocked
                    watcher.start()
                    start = time.perf_counter()
                    latencies = decode_all(sup.socket, clips, 4)
                    wall = time.perf_counter() - start
                    stop.set()
                if len(latencies) != len(clips):
                    raise Failure(f"{len(latencies)} of {len(clips)} good clips answered")
                rate = len(clips) / wall
                base = base or rate
                print(f"{hangs:>6} {rate:>9.1f} {1000 * common.percentile(latencies, 50):>8.0f} "
                      f"{1000 * common.percentile(latencies, 99):>8.0f} {rate / base:>10.2f}x {seen[0]:>17}")


def part_kill_latency(bins: Path, count: int) -> None:
    print(f"\n== 2. kill latency ({count} hangs, deadline 300 ms, one at a time)")
    late: List[float] = []
    with tempfile.TemporaryDirectory(prefix="clipvisor-kill-") as scratch, common.Supervisor(bins, workers=2) as sup:
        with sup.client() as client:
            sup.wait_warm(client, 2)
            for i in range(count):
                path = Path(scratch) / f"k{i}.fifo"
                os.mkfifo(path)
                start = time.perf_counter()
                try:
                    client.video(str(path), deadline=0.3, **GOOD)
                    raise Failure(f"{path} decoded")
                except clipvisor.ClipTimeout:
                    late.append(time.perf_counter() - start - 0.3)
    ms = [1000 * x for x in late]
    print(f"answer - deadline: p50 {common.percentile(ms, 50):.0f} ms, p99 {common.percentile(ms, 99):.0f} ms, "
          f"max {max(ms):.0f} ms")


def part_fairness(bins: Path, clips: List[Path], per_client: int) -> None:
    print("\n== 3. fairness: 4 light clients (single clips) alone, then next to one heavy client (64-clip samples)")

    def light_run(socket: str) -> List[float]:
        out: List[float] = []
        lock = threading.Lock()

        def one(offset: int) -> None:
            with clipvisor.Client(socket=socket, spawn=False) as client:
                for i in range(per_client):
                    path = clips[(offset * per_client + i) % len(clips)]
                    start = time.perf_counter()
                    check_video(client.video(str(path), **GOOD), path)
                    with lock:
                        out.append(time.perf_counter() - start)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    results: Dict[str, List[float]] = {}
    context = multiprocessing.get_context("spawn")
    items = [str(clips[i % len(clips)]) for i in range(64)]
    for heavy in (False, True):
        with common.Supervisor(bins, workers=2) as sup, sup.client() as probe:
            sup.wait_warm(probe, 2)
            stop = context.Event()
            # Its own process: its block copies must not take the light clients' GIL.
            feeder = context.Process(target=_heavy_client, args=(sup.socket, items, stop), daemon=True)
            if heavy:
                feeder.start()
                deadline = time.monotonic() + 30
                while probe.status()["queue"]["length"] < 32 and time.monotonic() < deadline:
                    time.sleep(0.05)  # its first sample is queued
            results["with heavy" if heavy else "alone"] = light_run(sup.socket)
            stop.set()
            if heavy:
                feeder.join(120)
                if feeder.exitcode != 0:
                    raise Failure(f"the heavy client failed (exit {feeder.exitcode})")
    for name, values in results.items():
        print(f"light clients {name:>10}: p50 {1000 * common.percentile(values, 50):.0f} ms, "
              f"p99 {1000 * common.percentile(values, 99):.0f} ms ({len(values)} clips)")
    ratio = common.percentile(results["with heavy"], 99) / common.percentile(results["alone"], 99)
    print(f"p99 with a heavy client / alone: {ratio:.2f}x (goal <= 2x)")


def _heavy_client(socket: str, items: List[str], stop) -> None:
    """Keeps 64-clip samples queued until `stop`."""
    with clipvisor.Client(socket=socket, spawn=False) as client:
        while not stop.is_set():
            for result in client.sample([{"path": p, **GOOD} for p in items], all_or_nothing=False):
                if isinstance(result, clipvisor.ClipSkipped):
                    raise SystemExit(f"heavy client: {result}")


def _client_process(socket: str, paths: List[str], queue) -> None:
    waits, count = [], 0
    try:
        with clipvisor.Client(socket=socket, spawn=False) as client:
            for path in paths:
                start = time.perf_counter()
                reply = client.video(path, **GOOD)
                check_video(reply, path)
                # Time not spent decoding: the queue, the hop, the client's copy.
                waits.append(max(0.0, time.perf_counter() - start - reply.decode_seconds))
                count += 1
        queue.put(("ok", count, waits))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        queue.put(("error", count, repr(error)))


def part_many_clients(bins: Path, clips: List[Path], counts: List[int], per_client: int) -> None:
    print(f"\n== 4. many clients: each decodes {per_client} clips, all at once (--workers 2)")
    print(f"{'clients':>8} {'clips/s':>9} {'p99 wait ms':>12} {'overloaded':>11}")
    context = multiprocessing.get_context("spawn")
    for n in counts:
        with common.Supervisor(bins, workers=2) as sup, sup.client() as probe:
            sup.wait_warm(probe, 2)
            queue = context.Queue()
            procs = [context.Process(target=_client_process, args=(
                sup.socket, [str(clips[(k * per_client + i) % len(clips)]) for i in range(per_client)], queue))
                for k in range(n)]
            start = time.perf_counter()
            for p in procs:
                p.start()
            outcomes = [queue.get(timeout=600) for _ in procs]
            wall = time.perf_counter() - start
            for p in procs:
                p.join(30)
            errors = [o for o in outcomes if o[0] != "ok"]
            if errors:
                raise Failure(f"{len(errors)} of {n} clients failed: {errors[:3]}")
            waits = [w for o in outcomes for w in o[2]]
            overloaded = probe.status()["counters"]["skipped"].get("overloaded", 0)
            print(f"{n:>8} {n * per_client / wall:>9.1f} {1000 * common.percentile(waits, 99):>12.0f} {overloaded:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", help="directory of clipvisor and clipvisor-worker (default: .build/release)")
    parser.add_argument("--quick", action="store_true", help="smaller runs (~1.5 min)")
    args = parser.parse_args()
    bins = common.bin_dir(args.bin_dir)
    print(common.machine_line())
    clips = small_clips(40 if args.quick else 80)
    part_hangs(bins, clips, [0, 2, 8])
    part_kill_latency(bins, 10 if args.quick else 20)
    part_fairness(bins, clips, 5 if args.quick else 10)
    part_many_clients(bins, clips, [1, 16] if args.quick else [1, 16, 64], 2 if args.quick else 4)


if __name__ == "__main__":
    main()
