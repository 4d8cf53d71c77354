#!/usr/bin/env python3
"""zstd level of the shared-memory hop (issue 2): what each level costs end to end.

The frames are real worker output: `clipvisor-worker decode CLIP --frames N --level L --out FILE`
on a natural-looking 10 s 720p clip (bench/media.py), once resized to 448x252 and once at
native 1280x720 (TCHW, one zstd frame per video frame, as the supervisor ships them).

Per level it prints
  worker wall/CPU   the worker run that wrote the block (median of --repeat); "compress CPU" is
                    its CPU minus the -1000 run's (the decode is the same): compression measured
                    *in the worker*, with libzstd 1.5.4 (noisy: a difference of two ~1 s runs)
  proxy MB/s        python-zstandard (libzstd 1.5.7) compressing the same frames at the same
                    level, one frame at a time with checksum + content size, like the worker:
                    a precise stand-in for the worker's compression speed
  ratio             tensor bytes / block bytes (the worker's block)
  read GB/s         the client's own reader, `clipvisor.block.read_block_fd` on a sealed memfd
                    holding the worker's block (seals + mmap + validate + decompress into a new
                    numpy array + unmap), GB of tensor per CPU second; "dec only" is
                    `decompress_tensor` into a preallocated array
  e2e s/GB          CPU seconds per GB delivered: proxy compression + the whole read path.
                    The memfd hop itself does no I/O: it only holds block-size bytes of shmem.
  stored            (when the `xxhash` package is installed) the same frames written as standard
                    zstd frames of raw blocks, which any zstd reader accepts: no worker option
                    produces them yet; "proxy MB/s" is then copy + XXH64 in Python.

  python3 bench/zstd_levels.py --quick      # ~1 min
  python3 bench/zstd_levels.py              # ~3 min
"""
from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import zstandard

try:
    import xxhash  # optional: only for the "stored" row (raw zstd blocks written directly)
except ImportError:  # pragma: no cover
    xxhash = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from media import natural_clip  # noqa: E402

from clipvisor import block as B  # noqa: E402

LEVELS = [-1000, -50, -5, 1, 3]
F_SEAL_ALL = 0x1 | 0x2 | 0x4 | 0x8


def sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("bench-block", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    done = os.pwrite(fd, view, 0)
    while done < len(data):
        done += os.pwrite(fd, view[done:], done)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_ALL)
    return fd


def stored_frame(buf: memoryview) -> List[memoryview]:
    """One standard zstd frame holding `buf` in raw (stored) blocks of <= 128 KiB, with content size
    and XXH64 content checksum: what a writer that skips compression would emit."""
    n = len(buf)
    assert 65536 + 256 <= n < 1 << 32
    parts = [memoryview(b"\x28\xb5\x2f\xfd\xa4" + n.to_bytes(4, "little"))]
    for off in range(0, n, 131072):
        size = min(131072, n - off)
        last = off + size == n
        parts.append(memoryview((int(last) | (size << 3)).to_bytes(3, "little")))
        parts.append(buf[off:off + size])
    parts.append(memoryview((xxhash.xxh64_intdigest(buf) & 0xFFFFFFFF).to_bytes(4, "little")))
    return parts


def stored_block(reference: bytes, frames: np.ndarray) -> Tuple[bytes, float]:
    """The reference block with every data frame rewritten as a stored frame; and the CPU seconds
    the frames took to write (copy + XXH64: the proxy for a worker writing stored frames)."""
    header = dict(B.validate_block(reference).header)
    views = [memoryview(np.ascontiguousarray(f)).cast("B") for f in frames]
    c0 = common.cpu_self()
    data_frames = [b"".join(stored_frame(v)) for v in views]
    cpu = common.cpu_self() - c0
    crc = 0
    for f in data_frames:
        crc = zlib.crc32(f[:9], crc)
    header["frame_headers_crc32"] = crc
    js = json.dumps(header, separators=(",", ":")).encode()
    head = struct.pack("<II", 0x184D2A50, 8 + len(js)) + b"CVB1" + struct.pack("<I", zlib.crc32(js)) + js
    n = len(data_frames) + 1
    table = struct.pack("<II", 0x184D2A5E, 12 * n + 9) + struct.pack("<III", len(head), 0, 0)
    for f in data_frames:
        table += struct.pack("<III", len(f), frame_content_size(f), struct.unpack_from("<I", f, len(f) - 4)[0])
    table += struct.pack("<IBI", n, 0x80, 0x8F92EAB1)
    return head + b"".join(data_frames) + table, cpu


def frame_content_size(f: bytes) -> int:
    return int.from_bytes(f[5:9], "little")


def measure(fn, reps: int) -> Tuple[float, float]:
    """Median (CPU s, wall s) of `reps` calls after one warm-up."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = common.cpu_self(), time.perf_counter()
        fn()
        cpu.append(common.cpu_self() - c0)
        wall.append(time.perf_counter() - w0)
    return common.median(cpu), common.median(wall)


def proxy_compress(frames: np.ndarray, level: int, reps: int) -> float:
    """CPU seconds to compress every frame (one zstd frame each), median."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    views = [memoryview(np.ascontiguousarray(f)).cast("B") for f in frames]

    def run() -> None:
        for v in views:
            cctx.compress(v)

    cpu, _ = measure(run, reps)
    return cpu


def read_costs(row: dict, data: bytes, raw: np.ndarray, reps: int) -> None:
    """Decompression-only and whole-path CPU seconds of the client's reader on `data`."""
    got = B.read_block(data).tensors["video"]
    if not np.array_equal(got, raw):
        raise SystemExit(f"{row['name']}: block does not decode to the same frames")
    fd = sealed_memfd(data)
    mm = mmap.mmap(fd, len(data), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    layout = B.validate_block(mm)
    dest = np.empty(raw.shape, raw.dtype)
    row["dec_cpu"], _ = measure(lambda: B.decompress_tensor(mm, layout, 0, dest), reps)
    layout = None  # drop the views into the mapping before closing it
    mm.close()
    os.close(fd)
    # The whole path on a fresh memfd each time (new shmem pages, freed by the reader's unmap),
    # as with real blocks.
    cpu = []
    for _ in range(reps + 1):
        fd = sealed_memfd(data)
        c0 = common.cpu_self()
        B.read_block_fd(fd)
        cpu.append(common.cpu_self() - c0)
    row["read_cpu"] = common.median(cpu[1:])


def one_size(label: str, worker: Path, clip: Path, resize: List[str], nframes: int, repeat: int, reps: int,
             tmp: Path) -> Dict[str, dict]:
    rows: Dict[str, dict] = {}
    for level in LEVELS:
        out = tmp / f"{label}-{level}.blk"
        cmd = [str(worker), "decode", str(clip), "--frames", str(nframes), *resize, f"--level={level}",
               "--out", str(out)]
        runs = [common.timed_cmd(cmd) for _ in range(repeat)]
        result = json.loads(runs[-1][2])
        rows[str(level)] = {"name": str(level), "level": level, "wall": common.median([r[0] for r in runs]),
                            "cpu": common.median([r[1] for r in runs]), "shape": result["video"]["shape"]}
    reference = (tmp / f"{label}--1000.blk").read_bytes()
    raw = B.read_block(reference).tensors["video"]
    nbytes = raw.nbytes
    for level in LEVELS:
        row = rows[str(level)]
        data = (tmp / f"{label}-{level}.blk").read_bytes()
        row["ratio"] = nbytes / len(data)
        row["proxy_cpu"] = proxy_compress(raw, level, reps)
        read_costs(row, data, raw, reps)
        row["compress_delta"] = row["cpu"] - rows["-1000"]["cpu"]
    if xxhash is not None:
        cpus = []
        for _ in range(reps):
            data, cpu = stored_block(reference, raw)
            cpus.append(cpu)
        row = rows["stored"] = {"name": "stored", "ratio": nbytes / len(data), "proxy_cpu": common.median(cpus)}
        read_costs(row, data, raw, reps)
    gb = nbytes / 1e9
    shape = rows["-1000"]["shape"]
    print(f"\n{label}: {shape[0]} frames {shape[3]}x{shape[2]} RGB (TCHW) = {nbytes / 1e6:.1f} MB of tensor; worker "
          f"runs: median of {repeat}; Python: median of {reps}")
    print(f"{'level':>7} {'ratio':>6} | {'worker wall':>11} {'CPU':>6} {'compress CPU':>12} | {'proxy MB/s':>10} | "
          f"{'dec only GB/s':>13} {'read GB/s':>9} | {'e2e s/GB':>8} {'vs -1000':>8}")
    for row in rows.values():
        row["e2e"] = (row["proxy_cpu"] + row["read_cpu"]) / gb
    base = rows["-1000"]["e2e"]
    for name, r in rows.items():
        worker_cols = (f"{r['wall']:>10.2f}s {r['cpu']:>5.2f}s {r['compress_delta']:>+11.2f}s" if "wall" in r
                       else f"{'(no worker option)':>31}")
        print(f"{name:>7} {r['ratio']:>6.3f} | {worker_cols} | "
              f"{nbytes / 1e6 / r['proxy_cpu']:>10.0f} | {gb / r['dec_cpu']:>13.2f} {gb / r['read_cpu']:>9.2f} | "
              f"{r['e2e']:>8.3f} {r['e2e'] / base:>7.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", help="directory with clipvisor-worker (release build)")
    ap.add_argument("--repeat", type=int, default=3, help="worker runs per level")
    ap.add_argument("--quick", action="store_true", help="fewer frames and repetitions")
    args = ap.parse_args()
    bins = common.bin_dir(args.bin_dir)
    worker = bins / "clipvisor-worker"
    repeat = 1 if args.quick else args.repeat
    reps = 3 if args.quick else 7
    print(f"worker {worker}; zstandard {zstandard.__version__} (libzstd "
          f"{'.'.join(map(str, zstandard.ZSTD_VERSION))}); reader strategy {B.decompression_strategy()}")
    print(common.machine_line())
    clip = natural_clip(10)
    with tempfile.TemporaryDirectory(prefix="zstd-levels-") as d:
        tmp = Path(d)
        small = one_size("448x252", worker, clip, ["--width", "448", "--height", "252"], 48 if args.quick else 100,
                         repeat, reps, tmp)
        big = one_size("1280x720", worker, clip, [], 12 if args.quick else 30, repeat, reps, tmp)
    print("\nVerdict: the hop's default should minimise e2e s/GB (compression is paid once per clip in a"
          " worker, decompression in the training process, and the memfd hop does no I/O).")
    for name, rows in (("448x252", small), ("1280x720", big)):
        order = sorted(rows, key=lambda k: rows[k]["e2e"])
        print(f"  {name}: " + " < ".join(f"{k} ({rows[k]['e2e']:.3f})" for k in order))
    levels_only = [min((k for k in rows if k != "stored"), key=lambda k: rows[k]["e2e"]) for rows in (small, big)]
    print(f"  cheapest worker level: {levels_only[0]} (448x252), {levels_only[1]} (720p); "
          f"-1000 {'confirmed' if levels_only == ['-1000', '-1000'] else 'NOT confirmed'} as the hop's default"
          + ("; 'stored' = raw zstd blocks written directly (no worker option yet): the floor" if "stored" in small
             else ""))


if __name__ == "__main__":
    main()
