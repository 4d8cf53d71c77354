#!/usr/bin/env python3
"""Where the client's CPU per GB goes when it takes a block out of a memfd (issue 6's goal:
<= 0.25 s of client CPU per GB delivered).

A worker's block arrives as a sealed memfd; the client (clipvisor.block.read_block_fd) maps it
with MAP_POPULATE, closes the fd, validates, decompresses into a new numpy array and unmaps.
When the client holds the last reference (the supervisor has closed its copy), the *unmap* also
frees the memfd's pages. This script splits that cost, per GB of block, on a fresh memfd of
natural frames stored raw (level -1000) each iteration, like a real block (fresh shmem pages,
filled by "someone else" = this process before the timed part):

  mmap+populate       mmap(MAP_SHARED|MAP_POPULATE) of the memfd, then munmap with the fd open
  mmap (faults)       the same without MAP_POPULATE, touching one byte per page
  munmap, last ref    munmap after the fd was closed: unmapping + freeing the shmem pages
  close, last ref     close(fd) with no mapping: freeing the pages alone
  pread -> array      os.preadv of the whole memfd into a preallocated numpy array (one copy,
                      no page tables) - the alternative to mapping
  readinto (dec)      the reader's decompression (memcpy + XXH64 of stored blocks) into an array
  read_block_fd       the whole client path as shipped, for a block in a fresh memfd
  read from a slab    the same for a block in a block slab (docs/protocol.md, "Block slabs"):
                      the slab mapped once, rewritten before each read as a worker would
  np.empty+first touch  a new destination array of the tensor's size, filled; then the same after
                      3 s idle: on the Firecracker dev VM, memory freed for a while is given back
                      to the host (virtio-balloon) and costs 2-4 s/GB to touch again

  python3 bench/memfd_read_cost.py [--mb 20] [--reps 15]
"""
from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from clipvisor.slabs import SlabTable  # noqa: E402

sys.path.insert(0, str(common.ROOT / "clients" / "python" / "tests"))
from blockwriter import natural_frames, write_block  # noqa: E402

from clipvisor import block as B  # noqa: E402

PAGE = mmap.PAGESIZE


def fresh_memfd(data: bytes) -> int:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], done)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0xF)
    return fd


def timed(setup, body, reps: int) -> float:
    """Median CPU seconds of body(state) over reps, each on a fresh setup()."""
    out = []
    for _ in range(reps + 1):
        state = setup()
        c0 = common.cpu_self()
        body(state)
        out.append(common.cpu_self() - c0)
    return common.median(out[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="block size, MB (a 3 s 320x240 clip is ~21 MB)")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    t = max(1, int(args.mb * 1e6 / (448 * 252 * 3)))
    frames = natural_frames(t)
    data = write_block([("video", np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), "TCHW")], {"path": "/bench"},
                       level=-1000)
    size = len(data)
    gb = size / 1e9
    print(common.machine_line())
    print(f"block {size / 1e6:.1f} MB ({t} frames 448x252, level -1000); CPU seconds per GB of block, median of "
          f"{args.reps}, fresh memfd each time")
    dest = np.empty(frames.nbytes, np.uint8)
    rows = []

    def populate_unmap(fd):
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | B.MAP_POPULATE, prot=mmap.PROT_READ)
        m.close()

    def faults_unmap(fd):
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        a = np.frombuffer(m, np.uint8)
        int(a[::PAGE].sum())
        del a
        m.close()

    def mapped(fd):
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | B.MAP_POPULATE, prot=mmap.PROT_READ)
        os.close(fd)
        return m

    rows.append(("mmap+populate, munmap", timed(lambda: fresh_memfd(data), lambda fd: (populate_unmap(fd), os.close(fd)),
                                                args.reps)))
    rows.append(("mmap (page faults)", timed(lambda: fresh_memfd(data), lambda fd: (faults_unmap(fd), os.close(fd)),
                                             args.reps)))
    rows.append(("munmap, last ref (frees)", timed(lambda: mapped(fresh_memfd(data)), lambda m: m.close(), args.reps)))
    rows.append(("close, last ref (frees)", timed(lambda: fresh_memfd(data), os.close, args.reps)))

    def pread(fd):
        with memoryview(dest) as d:
            got = os.preadv(fd, [d[:size]] if size <= dest.nbytes else [d], 0)
        return got

    rows.append(("pread -> array", timed(lambda: fresh_memfd(data), lambda fd: (pread(fd), os.close(fd)), args.reps)))
    fd = fresh_memfd(data)
    m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | B.MAP_POPULATE, prot=mmap.PROT_READ)
    layout = B.validate_block(m)
    out = np.empty(layout.tensors[0].shape, np.uint8)
    rows.append(("validate_block", timed(lambda: None, lambda _: B.validate_block(m), args.reps)))
    rows.append(("readinto (dec)", timed(lambda: None, lambda _: B.decompress_tensor(m, layout, 0, out), args.reps)))
    layout = None  # drop the views into the mapping before closing it
    m.close()
    os.close(fd)
    rows.append(("read_block_fd (whole)", timed(lambda: fresh_memfd(data), B.read_block_fd, args.reps)))
    table = SlabTable()
    slab_fd = os.memfd_create("bench-slab", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.pwrite(slab_fd, data, 0)
    fcntl.fcntl(slab_fd, fcntl.F_ADD_SEALS, 0x2)  # F_SEAL_SHRINK, as the supervisor seals a slab
    table.lease({"slab": {"index": 0, "attached": True}, "block_bytes": size}, slab_fd).read()

    def next_block_in_slab():
        os.pwrite(slab_fd, data, 0)  # the worker's write (not the client's cost)
        return table.lease({"slab": {"index": 0, "attached": False}, "block_bytes": size}, None)

    rows.append(("read from a slab (whole)", timed(next_block_in_slab, lambda lease: lease.read(), args.reps)))
    table.close()
    rows.append(("np.empty+first touch", timed(lambda: None, lambda _: np.empty(frames.nbytes, np.uint8).fill(1),
                                               args.reps)))
    def idle_then_touch(_):
        time.sleep(3.0)
        c0 = common.cpu_self()
        np.empty(frames.nbytes, np.uint8).fill(1)
        return common.cpu_self() - c0

    rows.append(("same, after 3 s idle", common.median([idle_then_touch(None) for _ in range(3)])))
    for name, cpu in rows:
        print(f"  {name:<26} {cpu / gb:>7.3f} s/GB  ({cpu * 1e3:6.2f} ms per block)")


if __name__ == "__main__":
    main()
