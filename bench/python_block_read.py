#!/usr/bin/env python3
"""How fast can Python turn a clipvisor block (sealed memfd) into a numpy array?

Prints GB/s of tensor bytes delivered, per CPU second (time.process_time, all threads) and
per wall second, for several strategies, on natural-looking 448x252 RGB frames (smooth
moving gradients + noise; zstd ratio ~1.0 at -1000, ~1.4 at -5, ~1.5 at 3), with a fresh
np.empty destination each time (its page faults are part of the cost, as in real use).

  python3 bench/python_block_read.py            # ~20 s on 2 cores
  python3 bench/python_block_read.py --quick    # ~5 s

Strategies (decompression only; the block is already mapped and validated):
  decompress+copy     per frame ZstdDecompressor.decompress() -> bytes, then copy into the array
  readinto/frame      per frame stream_reader(frame).readinto(array slice)
  readinto/tensor     one stream_reader(all frames, read_across_frames=True).readinto(array)
  multi_to_buffer     multi_decompress_to_buffer(frames, threads=1), then copy
  rawcopy+xxh64       parse raw zstd blocks in Python, numpy copy, verify XXH64 with `xxhash`
                      (only if the optional xxhash package is installed; stored blocks only)
  rawcopy UNSAFE      the same without verifying the checksum: an upper bound, not correct
  memcpy bound        one numpy copy of as many bytes: the ceiling
Then the whole client path (clipvisor.block.read_block_fd: seals, mmap, validate, decompress,
unmap, close) with and without MAP_POPULATE, on 2 (and up to 4) threads (`decompress_threads`),
and other zstd levels.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from typing import Callable, List, Tuple

import numpy as np
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python", "tests"))

from blockwriter import memfd_with, natural_frames, write_block  # noqa: E402
from clipvisor import block as B  # noqa: E402

try:
    import xxhash  # optional, only for the comparison
except ImportError:  # pragma: no cover
    xxhash = None


def make_block(frames: np.ndarray, level: int) -> bytes:
    tchw = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    return write_block([("video", tchw, "TCHW")], {"path": "/bench"}, level=level)


def measure(fn: Callable[[], int], reps: int) -> Tuple[float, float]:
    """Median over `reps` of (bytes/CPU-s, bytes/wall-s) in GB/s."""
    fn()  # warm up
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        n = fn()
        c1, w1 = time.process_time(), time.perf_counter()
        cpu.append(n / max(c1 - c0, 1e-9) / 1e9)
        wall.append(n / max(w1 - w0, 1e-9) / 1e9)
    return float(np.median(cpu)), float(np.median(wall))


def strategies(mm: mmap.mmap, layout: B.BlockLayout):
    info = layout.tensors[0]
    frames = layout.frames[0]
    nbytes = info.nbytes
    dctx = zstandard.ZstdDecompressor()

    def decompress_copy() -> int:
        out = np.empty(nbytes, np.uint8)
        pos = 0
        with memoryview(mm) as mv:
            for f in frames:
                with mv[f.offset:f.offset + f.compressed_size] as src:
                    data = dctx.decompress(src)
                out[pos:pos + len(data)] = np.frombuffer(data, np.uint8)
                pos += len(data)
        return nbytes

    def readinto_frame() -> int:
        out = np.empty(nbytes, np.uint8)
        pos = 0
        with memoryview(mm) as mv, memoryview(out) as dest:
            for f in frames:
                with mv[f.offset:f.offset + f.compressed_size] as src, dest[pos:pos + f.decompressed_size] as d:
                    with dctx.stream_reader(src) as r:
                        assert r.readinto(d) == f.decompressed_size
                pos += f.decompressed_size
        return nbytes

    def readinto_tensor() -> int:
        out = np.empty(nbytes, np.uint8)
        first, last = frames[0], frames[-1]
        with memoryview(mm) as mv, memoryview(out) as dest:
            with mv[first.offset:last.offset + last.compressed_size] as src:
                with dctx.stream_reader(src, read_across_frames=True) as r:
                    assert r.readinto(dest) == nbytes
        return nbytes

    def multi_to_buffer() -> int:
        out = np.empty(nbytes, np.uint8)
        with memoryview(mm) as mv:
            srcs = [mv[f.offset:f.offset + f.compressed_size] for f in frames]
            coll = dctx.multi_decompress_to_buffer(srcs, threads=1)
            pos = 0
            for i in range(len(coll)):
                seg = coll[i]
                n = len(seg)
                out[pos:pos + n] = np.frombuffer(seg, np.uint8)
                pos += n
            del coll
            for s in srcs:
                s.release()
        return nbytes

    def rawcopy(check: bool) -> Callable[[], int]:
        def run() -> int:
            out = np.empty(nbytes, np.uint8)
            pos = 0
            with memoryview(mm) as mv:
                src = np.frombuffer(mv, np.uint8)
                for f in frames:
                    d = mv[f.offset + 4]
                    single = bool(d & 0x20)
                    p = f.offset + 5 + (0 if single else 1) + (0, 1, 2, 4)[d & 3] + ((1 if single else 0), 2, 4, 8)[d >> 6]
                    start = pos
                    spans = []
                    while True:
                        bh = mv[p] | (mv[p + 1] << 8) | (mv[p + 2] << 16)
                        size = bh >> 3
                        spans.append((p + 3, size, (bh >> 1) & 3))
                        p += 3 + (1 if (bh >> 1) & 3 == 1 else size)
                        if bh & 1:
                            break
                    if all(kind == 0 for _, _, kind in spans):
                        for q, size, _ in spans:
                            out[pos:pos + size] = src[q:q + size]
                            pos += size
                        if check and (xxhash.xxh64_intdigest(out[start:pos]) & 0xFFFFFFFF) != f.checksum:
                            raise RuntimeError("checksum mismatch")
                    else:  # a compressed block in this frame: let zstd do the frame
                        with mv[f.offset:f.offset + f.compressed_size] as s, memoryview(out)[pos:pos + f.decompressed_size] as d:
                            with dctx.stream_reader(s) as r:
                                r.readinto(d)
                        pos += f.decompressed_size
                del src
            return nbytes
        return run

    def memcpy_bound() -> int:
        out = np.empty(nbytes, np.uint8)
        with memoryview(mm) as mv:
            src = np.frombuffer(mv, np.uint8, count=min(nbytes, len(mm)))
            out[:len(src)] = src
            del src
        return nbytes

    out = [
        ("decompress+copy", decompress_copy),
        ("readinto/frame", readinto_frame),
        ("readinto/tensor", readinto_tensor),
        ("multi_to_buffer", multi_to_buffer),
    ]
    if xxhash is not None:
        out.append(("rawcopy+xxh64", rawcopy(True)))
    out.append(("rawcopy UNSAFE", rawcopy(False)))
    out.append(("memcpy bound", memcpy_bound))
    return out


def pipeline(fd: int, populate: bool, threads: int = 1) -> Callable[[], int]:
    saved = B.MAP_POPULATE

    def run() -> int:
        B.MAP_POPULATE = B.MAP_POPULATE if populate else 0
        try:
            block = B.read_block_fd(os.dup(fd), threads=threads)
        finally:
            B.MAP_POPULATE = saved
        return block.tensors["video"].nbytes

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer frames and repetitions")
    ap.add_argument("--frames", type=int, default=None, help="frames per block (448x252 RGB)")
    args = ap.parse_args()
    t = args.frames or (24 if args.quick else 64)
    reps = 5 if args.quick else 9
    print(f"zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}), numpy {np.__version__}, "
          f"python {sys.version.split()[0]}, xxhash {'yes' if xxhash else 'not installed'}; "
          f"reader strategy in use: {B.decompression_strategy()}")
    frames = natural_frames(t)
    mb = frames.nbytes / 1e6
    rows: List[Tuple[str, str, float, float]] = []

    blob = make_block(frames, -1000)
    fd = memfd_with(blob)
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    layout = B.validate_block(mm)
    print(f"\n{t} frames 448x252 RGB = {mb:.1f} MB per block; level -1000 (ratio {frames.nbytes / len(blob):.3f}); "
          f"median of {reps}; GB/s of tensor bytes")
    print(f"{'strategy':<22}{'GB/s per CPU-s':>16}{'GB/s wall':>12}{'CPU s/GB':>10}")
    for name, fn in strategies(mm, layout):
        cpu, wall = measure(fn, reps)
        rows.append(("-1000", name, cpu, wall))
        print(f"{name:<22}{cpu:>16.2f}{wall:>12.2f}{1 / cpu:>10.3f}")
    c, w = measure(lambda: (B.validate_block(mm), layout.tensors[0].nbytes)[1], reps)
    print(f"{'validate only':<22}{c:>16.2f}{w:>12.2f}{1 / c:>10.3f}")
    mm.close()

    print("\nwhole client path, clipvisor.block.read_block_fd (seals + mmap + validate + decompress + unmap):")
    for populate in (True, False):
        cpu, wall = measure(pipeline(fd, populate), reps)
        name = "mmap MAP_POPULATE" if populate else "mmap (page faults)"
        print(f"{name:<22}{cpu:>16.2f}{wall:>12.2f}{1 / cpu:>10.3f}")
    # Client(decompress_threads=N): runs of frames decompressed by N threads at once.
    for threads in sorted({2, min(4, os.cpu_count() or 1)} - {1}):
        cpu, wall = measure(pipeline(fd, True, threads), reps)
        name = f"  on {threads} threads"
        print(f"{name:<22}{cpu:>16.2f}{wall:>12.2f}{1 / cpu:>10.3f}")
    nb = layout.tensors[0].nbytes

    def map_only() -> int:
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | B.MAP_POPULATE, prot=mmap.PROT_READ)
        m.close()
        return nb

    cpu, wall = measure(map_only, reps)
    print(f"{'  of which map+unmap':<22}{cpu:>16.2f}{wall:>12.2f}{1 / cpu:>10.3f}")
    os.close(fd)
    noise = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    fd = memfd_with(make_block(noise, -1000))
    cpu, wall = measure(pipeline(fd, True), reps)
    print(f"{'pure noise (all raw)':<22}{cpu:>16.2f}{wall:>12.2f}{1 / cpu:>10.3f}")
    os.close(fd)
    # Destinations above glibc's mmap threshold (32 MiB) get fresh pages on every call: the
    # kernel zeroes them on first touch (with transparent huge pages, 2 MiB at a time).
    big = np.concatenate([frames] * max(1, (40 << 20) // frames.nbytes + 1))
    fd = memfd_with(make_block(big, -1000))
    cpu, wall = measure(pipeline(fd, True), max(3, reps // 2))
    print(f"{f'{big.nbytes >> 20} MiB (fresh pages)':<22}{cpu:>16.2f}{wall:>12.2f}{1 / cpu:>10.3f}")
    os.close(fd)
    del big
    if xxhash is not None:
        flat = noise.reshape(-1)
        cpu, wall = measure(lambda: (xxhash.xxh64_intdigest(flat), flat.nbytes)[1], reps)
        print(f"{'  bound: XXH64 alone':<22}{cpu:>16.2f}{wall:>12.2f}{1 / cpu:>10.3f}")

    print("\nother levels (GB/s per CPU-s; the first two decompress only, the last is the whole path):")
    print(f"{'level':<8}{'ratio':>7}{'readinto/tensor':>17}{'decompress+copy':>17}{'read_block_fd':>15}")
    for level in (-50, -5, 1, 3):
        blob = make_block(frames, level)
        fd = memfd_with(blob)
        mm = mmap.mmap(fd, len(blob), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        layout = B.validate_block(mm)
        table = dict(strategies(mm, layout))
        n = max(3, reps // 2)
        ci, _ = measure(table["readinto/tensor"], n)
        cb, _ = measure(table["decompress+copy"], n)
        del table
        mm.close()
        cp, _ = measure(pipeline(fd, True), n)
        os.close(fd)
        print(f"{level:<8}{frames.nbytes / len(blob):>7.3f}{ci:>17.2f}{cb:>17.2f}{cp:>15.2f}")

if __name__ == "__main__":
    main()
