#!/usr/bin/env python3
"""Issue 14's second calling mode as users run it: a torch DataLoader with 2 worker processes.

bench/e2e.py stands in for a DataLoader with client threads in one process; this runs the real
thing. For each workload, a map-style Dataset whose `__getitem__` decodes one clip, under
`DataLoader(num_workers=2, batch_size=None, persistent_workers=True)` (the arrays travel to the
main process as torch tensors in shared memory, the same for every decoder):
  clipvisor   the Client made in the main process, pickled into the workers (its documented
              DataLoader use); one private `clipvisor serve` with its default worker count
  torchcodec  VideoDecoder(num_ffmpeg_threads=1, seek_mode="exact"), AudioDecoder (as e2e.py)
  decord      VideoReader(num_threads=1) / AudioReader (as e2e.py)
  PyAV        as e2e.py, one decoder thread
The workloads are e2e.py's: W1 (720p 10 + 20 s at fps 2, 448x448 budget; --full adds 40 and 60 s),
W2 (20 small clips, every frame; --full: 60), W4 (ten 30 s audio files to 16 kHz mono). W3 is one
clip, which a DataLoader cannot spread over workers.

Each loader first runs one untimed epoch (worker start, imports, the connection's slabs); then
--repeat epochs are timed. Reported (medians): wall per epoch; CPU of every process of the
machine over the epoch (from /proc/stat: the supervisor, its workers, the DataLoader's workers
and the main process; on this VM nothing else runs); the DataLoader workers' CPU (their decode
calls and the DataLoader's own hand-over of each tensor through shared memory, the same for
every decoder); and the CPU of the decode calls alone, on the calling thread (for clipvisor:
the client, issue 14's client-CPU goal with one client thread per process; decord decodes on
threads of its own, which that column does not see). Every epoch's shapes are checked against
the untimed epoch's and against every other decoder's (audio lengths within 0.1 %: resamplers
end a few samples apart) before any ratio is printed; a mismatch or error exits non-zero.

    python3 bench/dataloader.py --bin-dir .build/release
    python3 bench/dataloader.py --bin-dir .build/release --only W2 --repeat 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import e2e  # noqa: E402  (the peers' calls, the jobs, the media)

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

WORKERS = 2


class Clips(Dataset):
    """One decoded clip per item, by one decoder."""

    def __init__(self, jobs: Sequence[e2e.Job], decode: Callable[[e2e.Job], np.ndarray]):
        self.jobs = list(jobs)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, float]:
        """The clip and the CPU its decode call took in this worker (for clipvisor: the
        client's own work; for a peer: its whole decode)."""
        start = time.thread_time()
        out = self.decode(self.jobs[i])
        return out, time.thread_time() - start


class ClipvisorDecode:
    """Picklable: the Client travels into each DataLoader worker, as users pass it."""

    def __init__(self, client) -> None:
        self.client = client

    def __call__(self, job: e2e.Job) -> np.ndarray:
        if job.kind == "audio":
            return self.client.audio(job.path, **job.request).samples
        return self.client.video(job.path, layout="THWC", **job.request).frames


class PeerDecode:
    """Picklable by name: the peer's function from e2e.py, one decoder thread."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name

    def __call__(self, job: e2e.Job) -> np.ndarray:
        return e2e.PEERS[self.kind][self.name](job)


def busy_seconds() -> float:
    """CPU seconds all CPUs spent busy so far (user, nice, system, irq, softirq, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Row:
    def __init__(self) -> None:
        self.walls: List[float] = []
        self.cpus: List[float] = []
        self.loader_cpu: List[float] = []  # the DataLoader workers' processes, all they did
        self.call_cpu: List[float] = []  # inside __getitem__'s decode call only
        self.bytes = 0
        self.shapes: List[Tuple[int, ...]] = []


def run_loader(name: str, dataset: Clips, repeat: int) -> Row:
    loader = DataLoader(dataset, batch_size=None, num_workers=WORKERS, persistent_workers=True, prefetch_factor=2)
    row = Row()
    first = [tuple(t.shape) for t, _ in loader]  # untimed: workers start, imports, slabs
    if len(first) != len(dataset):
        raise SystemExit(f"{name}: the untimed epoch gave {len(first)} items, not {len(dataset)}")
    row.shapes = first
    pids = [w.pid for w in getattr(loader._iterator, "_workers", [])]  # persistent workers
    if len(pids) != WORKERS:
        raise SystemExit(f"{name}: cannot find the DataLoader's {WORKERS} worker processes")
    for _ in range(repeat):
        l0 = sum(common.proc_cpu(p) for p in pids)
        b0, w0 = busy_seconds(), time.perf_counter()
        shapes, total, call = [], 0, 0.0
        for t, cpu in loader:
            shapes.append(tuple(t.shape))
            total += t.numel() * t.element_size()
            call += float(cpu)
        row.walls.append(time.perf_counter() - w0)
        row.cpus.append(busy_seconds() - b0)
        row.loader_cpu.append(sum(common.proc_cpu(p) for p in pids) - l0)
        row.call_cpu.append(call)
        if shapes != first:
            raise SystemExit(f"{name}: a timed epoch's shapes differ from the untimed epoch's")
        row.bytes = total
    del loader
    return row


def same_output(kind: str, ours: Sequence[Tuple[int, ...]], theirs: Sequence[Tuple[int, ...]]) -> bool:
    """Video: the same shapes. Audio: the same channels and, within 0.1 %, the same length
    (resamplers flush a few samples more or less at the end, as e2e.py reports)."""
    if kind != "audio":
        return list(ours) == list(theirs)
    return len(ours) == len(theirs) and all(
        a[:-1] == b[:-1] and abs(a[-1] - b[-1]) <= max(1, a[-1] // 1000) for a, b in zip(ours, theirs))


def workload(label: str, title: str, jobs: List[e2e.Job], client, repeat: int) -> Optional[float]:
    kind = jobs[0].kind
    decoders: Dict[str, Callable[[e2e.Job], np.ndarray]] = {"clipvisor": ClipvisorDecode(client)}
    for peer in e2e.PEERS[kind]:
        decoders[peer] = PeerDecode(kind, peer)
    print(f"\n{label}: {title}; {len(jobs)} clips, DataLoader num_workers={WORKERS}, one decoder thread each")
    rows = {name: run_loader(f"{label} {name}", Clips(jobs, fn), repeat) for name, fn in decoders.items()}
    base = rows["clipvisor"]
    for name, row in rows.items():
        if not same_output(kind, base.shapes, row.shapes):
            raise SystemExit(f"{label}: {name} delivered other shapes than clipvisor: {row.shapes[:3]}... "
                             f"vs {base.shapes[:3]}...")
    cv_wall = common.median(base.walls)
    gb = base.bytes / 1e9
    print(f"  {'decoder':<12} {'wall s':>7} {'speed-up':>9} {'CPU s, all':>11} {'loader workers':>15} "
          f"{'decode calls':>13}")
    for name, row in rows.items():
        wall = common.median(row.walls)
        ratio = "" if name == "clipvisor" else f"{wall / cv_wall:.2f}x"
        print(f"  {name:<12} {wall:>7.3f} {ratio:>9} {common.median(row.cpus):>11.3f} "
              f"{common.median(row.loader_cpu):>15.3f} {common.median(row.call_cpu):>15.3f}")
    fastest = min((n for n in rows if n != "clipvisor"), key=lambda n: common.median(rows[n].walls))
    r = common.median(rows[fastest].walls) / cv_wall
    print(f"  vs the fastest peer ({fastest}): {r:.2f}x {'met' if round(r, 2) >= 1.0 else 'MISSED'} (goal >= 1.0)")
    print(f"  clipvisor's client in the DataLoader workers (its decode calls, one thread each): "
          f"{common.median(base.call_cpu) / gb:.3f} CPU s per GB delivered (goal <= 0.25; {gb:.3f} GB per epoch); "
          f"the workers' whole CPU, the DataLoader's hand-over to the main process included: "
          f"{common.median(base.loader_cpu) / gb:.3f} s/GB")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", help="directory with clipvisor and clipvisor-worker (release build)")
    ap.add_argument("--repeat", type=int, default=3, help="timed epochs per decoder (default 3)")
    ap.add_argument("--only", default="W1,W2,W4", help="comma-separated workloads (W1, W2, W4)")
    ap.add_argument("--full", action="store_true", help="e2e.py's full sets instead of its quick ones")
    a = ap.parse_args()
    only = {w.strip().upper() for w in a.only.split(",") if w.strip()}
    if not only or only - {"W1", "W2", "W4"} or a.repeat < 1:
        ap.error("--only: some of W1, W2, W4; --repeat: at least 1")
    if not e2e.HAVE_TORCHCODEC:
        print(f"torchcodec NOT MEASURED ({e2e.TORCHCODEC_MISSING})")
    print(common.machine_line())
    print(f"torch {torch.__version__}; PyAV {e2e.av.__version__}; decord {e2e.decord.__version__}"
          + (f"; torchcodec {e2e.torchcodec.__version__}" if e2e.HAVE_TORCHCODEC else ""))
    missed = []
    with common.Supervisor(common.bin_dir(a.bin_dir)) as sup:
        client = sup.client()
        sup.wait_warm(client, common.worker_target(client.status()))
        if "W1" in only:
            seconds = (10, 20, 40, 60) if a.full else (10, 20)
            jobs = e2e.plan(client, [e2e.natural_clip(s) for s in seconds], "video",
                            dict(fps=2.0, max_pixels=448 * 448, factor=28))
            if workload("W1", "720p H.264 at fps 2, 448x448 budget", jobs, client, a.repeat) < 1.0:
                missed.append("W1")
        if "W2" in only:
            jobs = e2e.plan(client, e2e.small_clips(60 if a.full else 20), "video", dict(fps=30.0))
            if workload("W2", "320x240 3 s clips, every frame", jobs, client, a.repeat) < 1.0:
                missed.append("W2")
        if "W4" in only:
            jobs = e2e.plan(client, e2e.w4_files(e2e.MEDIA_OUT / "w4"), "audio", dict(sample_rate=16000, channels=1))
            if workload("W4", "30 s audio to 16 kHz mono float32", jobs, client, a.repeat) < 1.0:
                missed.append("W4")
        client.close()
    print(f"\nmissed: {', '.join(missed)}" if missed else "\nevery workload >= 1.0x its fastest peer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
