#!/usr/bin/env python3
"""Blocks in 4 KiB pages vs 2 MiB pages: the host's `shmem_enabled` A/B, in one run.

Sets /sys/kernel/mm/transparent_hugepage/shmem_enabled to `never`, then to `within_size`
(docs/operations.md, "Huge pages for blocks"), and under each runs

  bench/memfd_read_cost.py --mb 20     the client's read path of one 20 MB block, CPU s per GB
  bench/e2e.py --quick --only W1,W2    end to end against the peers (they use no shared memory)

then restores the setting it found, whatever happens. Prints the figures side by side with the
ratio. Needs root (the setting is the host's) and a release build.

    sudo python3 bench/shmem_pages.py --bin-dir .build/release
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
SETTING = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
MODES = ("never", "within_size")


def current() -> str:
    match = re.search(r"\[(\w+)\]", SETTING.read_text())
    if not match:
        raise SystemExit(f"{SETTING}: no bracketed setting in {SETTING.read_text()!r}")
    return match.group(1)


def run(args: List[str], timeout: float) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def number(pattern: str, text: str, what: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    if not match:
        raise SystemExit(f"no {what} in the output (pattern {pattern!r}):\n{text[-1500:]}")
    return float(match.group(1))


def measure(bin_dir: str, repeat: int) -> Dict[str, float]:
    cost = run([str(HERE / "memfd_read_cost.py"), "--mb", "20", "--reps", "9"], 600)
    e2e = run([str(HERE / "e2e.py"), "--quick", "--only", "W1,W2", "--repeat", str(repeat), "--bin-dir", bin_dir], 1800)
    w1, w2 = e2e.split("\nW2:", 1) if "\nW2:" in e2e else (e2e, "")
    if not w2:
        raise SystemExit(f"e2e.py printed no W2 section:\n{e2e[-1500:]}")
    return {
        "client read path, s/GB (memfd_read_cost)": number(r"read_block_fd \(whole\)\s+([\d.]+) s/GB", cost, "read_block_fd"),
        "map + unmap, s/GB (memfd_read_cost)": number(r"mmap\+populate, munmap\s+([\d.]+) s/GB", cost, "mmap+populate"),
        "W1 wall s, 4 client threads": number(r"^clipvisor\s+([\d.]+)", w1, "W1 clipvisor wall"),
        "W1 client CPU s/GB, ReusedBuffers": number(r"into ReusedBuffers: ([\d.]+) s/GB", w1, "W1 client CPU"),
        "W2 wall s, 4 client threads": number(r"^clipvisor\s+([\d.]+)", w2, "W2 clipvisor wall"),
        "W2 wall s, one caller": number(r"clipvisor one caller\s+([\d.]+)", w2, "W2 one-caller wall"),
        "W2 client CPU s/GB": number(r"client CPU per GB delivered: ([\d.]+) s/GB", w2, "W2 client CPU"),
        "W2 torchcodec 2 threads wall s": number(r"^torchcodec 2 threads\s+([\d.]+)", w2, "W2 torchcodec wall"),
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default=".build/release", help="clipvisor and clipvisor-worker (release build)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats per e2e measurement (default 3)")
    a = ap.parse_args(argv)
    if not SETTING.exists():
        raise SystemExit(f"{SETTING} does not exist: this kernel has no transparent huge pages for shared memory")
    if os.geteuid() != 0:
        raise SystemExit(f"writing {SETTING} needs root")
    found = current()
    results: Dict[str, Dict[str, float]] = {}
    try:
        for mode in MODES:
            SETTING.write_text(mode)
            if current() != mode:
                raise SystemExit(f"{SETTING} did not take {mode!r} (it says {current()!r})")
            print(f"shmem_enabled = {mode}: measuring...", flush=True)
            results[mode] = measure(a.bin_dir, a.repeat)
    finally:
        SETTING.write_text(found)
        print(f"shmem_enabled restored to {current()}")
    print(f"\n{'':44} {'never':>10} {'within_size':>12} {'ratio':>8}")
    for key in results["never"]:
        before, after = results["never"][key], results["within_size"][key]
        ratio = before / after if after else float("inf")
        print(f"{key:44} {before:>10.3f} {after:>12.3f} {ratio:>7.2f}x")
    print("(ratio = never / within_size: above 1, huge pages are cheaper; the torchcodec row is the control)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
