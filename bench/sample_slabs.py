#!/usr/bin/env python3
"""One `sample` of many clips (a Qwen-style sample of many videos), with and without block slabs.

A sample's clips are decoded on every worker at once and answered one by one. With slabs
(docs/protocol.md, "Block slabs") the client releases each clip's slab as soon as it has read it
(a `release` request), so the sample's clips that start later write into slabs the client has
mapped already; without, every clip's block is a fresh memfd that is allocated, mapped and freed.
Both clients talk to the same supervisor, alternately, in one run; each prints the median of
`--repeat` samples after one untimed sample (a connection makes its slabs at its first clips).

Client CPU and minor faults are this process's, and include the first touch of the result
arrays: a sample keeps all its clips' arrays at once, so on a VM that hands freed memory back to
the host a run may pay for fresh pages (docs/benchmarks.md, "Block slabs"); the medians and the
faults column show it.

  python3 bench/sample_slabs.py --bin-dir .build/release [--clips 20] [--repeat 5]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from media import small_clips  # noqa: E402

import clipvisor  # noqa: E402


def usage() -> Tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", help="directory with clipvisor and clipvisor-worker (release build)")
    ap.add_argument("--clips", type=int, default=20, help="clips in the sample (320x240, 3 s, every frame)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    paths = small_clips(args.clips)
    specs = [{"path": str(p), "fps": 30.0} for p in paths]
    print(common.machine_line())
    with common.Supervisor(common.bin_dir(args.bin_dir)) as sup:
        clients = {"with slabs": sup.client(), "no slabs": sup.client(slabs=0)}
        sup.wait_warm(clients["with slabs"], common.worker_target(clients["with slabs"].status()))
        rows: Dict[str, List[Tuple[float, float, int]]] = {name: [] for name in clients}
        total = 0
        for client in clients.values():
            client.sample(specs)
        for _ in range(args.repeat):
            for name, client in clients.items():
                c0, f0 = usage()
                w0 = time.perf_counter()
                results = client.sample(specs)
                wall = time.perf_counter() - w0
                c1, f1 = usage()
                failed = [r for r in results if not isinstance(r, clipvisor.Video)]
                if failed:
                    raise SystemExit(f"{name}: {len(failed)} clips of the sample failed: {failed[0]}")
                total = sum(r.frames.nbytes for r in results)
                rows[name].append((wall, c1 - c0, f1 - f0))
        slabs = clients["with slabs"].status()["memory"]["slabs"]
    gb = total / 1e9
    print(f"one sample of {args.clips} clips, every frame ({total / 1e6:.0f} MB), median of {args.repeat}:")
    medians = {}
    for name, runs in rows.items():
        wall = common.median([r[0] for r in runs])
        cpu = common.median([r[1] for r in runs])
        faults = common.median([float(r[2]) for r in runs])
        medians[name] = wall
        print(f"  {name:<11} wall {wall:.3f} s | client CPU {cpu:.3f} s ({cpu / gb:.3f} s/GB) | {faults / 1e3:.0f}k minor faults")
    print(f"  with slabs vs without: {medians['no slabs'] / medians['with slabs']:.2f}x; the supervisor's slabs at the "
          f"end: {slabs['count']} holding {slabs['bytes'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
