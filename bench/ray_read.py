"""Ray Data: `ray.data.read_videos` (decord in the Ray task) against `clipvisor.ray.read_videos`.

  python3 bench/ray_read.py --quick     # 8 small clips, frames=8, FIFO capped at 20 s; ~1 min
  python3 bench/ray_read.py             # 24 clips

Both read the same clips on one local Ray cluster (``ray.init(num_cpus=2)``) in one run:

- **ray.data.read_videos** decodes every frame with decord inside the Ray task (one row per
  frame); the rows are then sampled (``Dataset.filter``) to the frame indices clipvisor chose,
  so both end with the same frames of every clip.
- **clipvisor.ray.read_videos** sends each clip to the node's private supervisor (one row per
  clip, ``frames=N`` evenly spaced).

Reported per reader: clips per second (wall, from creating the dataset to having every row in
the driver) and CPU seconds of everything involved (the driver, Ray's processes, the
supervisor and its workers: /proc of each process tree, before and after). Then the FIFO case:
the bad inputs, each among good clips:

- a FIFO: clipvisor finishes after the FIFO's deadline with a ``timeout`` row. ``ray.data.read_videos``
  (2.60) refuses the whole read at listing (``FileNotFoundError``: pyarrow does not call a FIFO a
  file), and in a directory it leaves the FIFO out without a word.
- a stalled mount: a FUSE file system whose ``read()`` never returns (a network mount whose server
  stopped answering; needs /dev/fuse, ``apt-get install fuse3`` and ``pip install mfusepy``, else it is
  skipped). clipvisor finishes after the deadline; ``ray.data.read_videos`` blocks in the read task,
  so it runs in a child driver on the same cluster, killed at ``--fifo-cap`` seconds and reported
  as CAPPED.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import media  # noqa: E402

CHILD_DRIVER = r"""
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
ds = ray.data.read_videos(sys.argv[2:], include_paths=True)
print("rows", ds.count(), flush=True)
"""

# A FUSE file system with one file whose read() never returns: a network mount whose server
# stopped answering. Needs /dev/fuse, fusermount3 (apt fuse3) and mfusepy (pip).
STALLED_FS = r"""
import errno, stat, sys, threading
import mfusepy as fuse

class Stalled(fuse.Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_mtime=1.7e9, st_ctime=1.7e9, st_atime=1.7e9)
        if path == "/stalled.mp4":
            return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=1 << 20, st_mtime=1.7e9, st_ctime=1.7e9,
                        st_atime=1.7e9)
        raise fuse.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "stalled.mp4"]

    def open(self, path, flags):
        return 0

    def read(self, path, size, offset, fh):
        threading.Event().wait()

fuse.FUSE(Stalled(), sys.argv[1], foreground=True, allow_other=True)
"""


def capped_ray_read(ray, paths: List[str], cap: float) -> str:
    """ray.data.read_videos(paths).count() in a child driver on the same cluster, killed after `cap` s."""
    gcs = ray.get_runtime_context().gcs_address
    child = subprocess.Popen([sys.executable, "-c", CHILD_DRIVER, gcs] + paths, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.monotonic()
    try:
        out, err = child.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return f"CAPPED: no result after {cap:.0f} s (Ray has no per-task timeout); killed"
    last = (err.decode().strip().splitlines() or [""])[-1]
    return f"exited {child.returncode} after {time.monotonic() - t0:.1f} s: {out.decode().strip() or last}"


def clipvisor_case(cray, label: str, mixed: List[str], bad: str, args, serve_args) -> bool:
    t0 = time.monotonic()
    got = cray.read_videos(mixed, frames=args.frames, deadline=3.0, on_skip="row", supervisor="private",
                           serve_args=serve_args).take_all()
    wall = time.monotonic() - t0
    reasons = {r["path"]: r["skip_reason"] for r in got}
    ok = len(got) == len(mixed) and reasons.get(bad) in ("timeout", "quarantined") and \
        all(reasons[p] is None for p in mixed if p != bad)
    print(f"{label}, clipvisor (deadline 3 s): {'finished' if ok else 'WRONG RESULT'} in {wall:.1f} s, "
          f"{len(got)} rows; the bad one: skip_reason={reasons.get(bad)}")
    return ok


def fifo_case(cray, ray, clips: List[str], args, serve_args) -> bool:
    fifo_dir = tempfile.mkdtemp(prefix="cv-bench-fifo-")
    fifo = os.path.join(fifo_dir, "fifo.mp4")
    os.mkfifo(fifo)
    mixed = clips[:3] + [fifo] + clips[3:6]
    print()
    try:
        ok = clipvisor_case(cray, f"FIFO among {len(mixed) - 1} good clips", mixed, fifo, args, serve_args)
        print(f"FIFO among {len(mixed) - 1} good clips, ray.data.read_videos: {capped_ray_read(ray, mixed, args.fifo_cap)}")
        for clip in clips[:3]:
            os.symlink(clip, os.path.join(fifo_dir, os.path.basename(clip)))
        listed = ray.data.read_videos(fifo_dir, include_paths=True).select_columns(["path"]).take_all()
        print(f"directory of 3 clips and the FIFO, ray.data.read_videos: rows from "
              f"{len({r['path'] for r in listed})} files; the FIFO is left out without a word")
        return ok
    finally:
        shutil.rmtree(fifo_dir, ignore_errors=True)


def stalled_mount_case(cray, ray, clips: List[str], args, serve_args) -> bool:
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        mfusepy = None
    if not (os.path.exists("/dev/fuse") and fusermount and mfusepy):
        print("stalled mount: skipped (needs /dev/fuse, fusermount3 from apt fuse3, and pip mfusepy)")
        return True
    mount = tempfile.mkdtemp(prefix="cv-bench-stalled-")
    daemon = subprocess.Popen([sys.executable, "-c", STALLED_FS, mount], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        stalled = os.path.join(mount, "stalled.mp4")
        for _ in range(100):
            if os.path.exists(stalled):
                break
            time.sleep(0.05)
        else:
            print("stalled mount: skipped (the FUSE file system did not mount)")
            return True
        mixed = clips[:3] + [stalled] + clips[3:6]
        ok = clipvisor_case(cray, "stalled mount (FUSE read never returns)", mixed, stalled, args, serve_args)
        print(f"stalled mount, ray.data.read_videos: {capped_ray_read(ray, mixed, args.fifo_cap)}")
        return ok
    finally:
        subprocess.run([fusermount, "-u", "-z", mount], stderr=subprocess.DEVNULL)
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        os.rmdir(mount)




def process_tree_cpu(roots: Set[int]) -> float:
    """CPU seconds (with reaped children) of `roots` and every live descendant."""
    parents: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(common.proc_cpu(pid) for pid in tree)


def supervisor_pids() -> Set[int]:
    """Node-private supervisors started by clipvisor.ray (their workers are their children)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in argv and any(b"/clipvisor-ray-" in a for a in argv) and argv[0].endswith(b"clipvisor"):
                out.add(int(entry))
    return out


def measure(label: str, run) -> dict:
    roots = {os.getpid()} | supervisor_pids()
    cpu0 = process_tree_cpu(roots)
    t0 = time.monotonic()
    result = run()
    wall = time.monotonic() - t0
    cpu = process_tree_cpu(roots | supervisor_pids()) - cpu0
    return dict(label=label, wall=wall, cpu=cpu, result=result)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clips", type=int)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--fifo-cap", type=float, default=20.0)
    ap.add_argument("--bin-dir")
    args = ap.parse_args()
    count = args.clips or (8 if args.quick else 24)
    bins = common.bin_dir(args.bin_dir)
    os.environ["CLIPVISOR_BIN"] = str(bins / "clipvisor")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.ROOT / "clients" / "python"),
                                                          os.environ.get("PYTHONPATH")) if p)
    print(common.machine_line())
    clips = [str(p) for p in media.small_clips(count=count, seconds=3, size="320x240")]
    print(f"{count} clips, 3 s 320x240 30 fps H.264; {args.frames} frames per clip at native size; binaries {bins}")

    import ray
    import ray.data

    import clipvisor.ray as cray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    skip_log = tempfile.mkdtemp(prefix="cv-bench-ray-") + "/skips.jsonl"
    serve_args = ["--skip-log", skip_log]
    try:
        # Warm both paths once (Ray worker start, the node's supervisor start, decord import).
        cray.read_videos(clips[:2], frames=args.frames, supervisor="private", serve_args=serve_args).take_all()
        ray.data.read_videos(clips[:1]).count()

        cv = measure("clipvisor.ray.read_videos", lambda: cray.read_videos(
            clips, frames=args.frames, layout="THWC", supervisor="private", serve_args=serve_args).take_all())
        rows = {r["path"]: r for r in cv["result"]}
        if sorted(rows) != sorted(clips) or any(r["frames"].shape[0] != args.frames for r in rows.values()):
            print(f"FAILED: clipvisor returned {len(rows)} rows for {len(clips)} clips "
                  f"(frames {sorted({r['frames'].shape[0] for r in rows.values()})})")
            return 1
        wanted = {p: set(int(i) for i in r["indices"]) for p, r in rows.items()}

        def ray_native() -> List[dict]:
            ds = ray.data.read_videos(clips, include_paths=True)
            return ds.filter(lambda r: int(r["frame_index"]) in wanted[r["path"]]).take_all()

        rd = measure("ray.data.read_videos (decord)", ray_native)
        frames_by_path: Dict[str, list] = defaultdict(list)
        for r in rd["result"]:
            frames_by_path[r["path"]].append((int(r["frame_index"]), r["frame"]))
        if sorted(frames_by_path) != sorted(clips) or any(len(v) != args.frames for v in frames_by_path.values()):
            print(f"FAILED: ray.data.read_videos gave {sum(len(v) for v in frames_by_path.values())} sampled frames "
                  f"for {len(clips)} clips")
            return 1
        diffs = []
        for path, items in frames_by_path.items():
            stacked = np.stack([f for _, f in sorted(items, key=lambda x: x[0])])
            if stacked.shape != rows[path]["frames"].shape:
                print(f"FAILED: {path}: decord {stacked.shape} vs clipvisor {rows[path]['frames'].shape}")
                return 1
            diffs.append(float(np.abs(stacked.astype(np.int16) - rows[path]["frames"].astype(np.int16)).mean()))

        print()
        print(f"{'reader':34} {'clips/s':>8} {'wall s':>7} {'CPU s':>7} {'CPU s/clip':>11}")
        for m in (rd, cv):
            print(f"{m['label']:34} {count / m['wall']:8.1f} {m['wall']:7.2f} {m['cpu']:7.2f} {m['cpu'] / count:11.3f}")
        print(f"clipvisor / ray.data: {rd['wall'] / cv['wall']:.2f}x clips/s, {rd['cpu'] / max(cv['cpu'], 1e-9):.2f}x less CPU; "
              f"same frames: shapes equal, mean |pixel difference| {np.mean(diffs):.3f} of 255")

        # -- a FIFO, and a stalled mount -------------------------------------------------------
        ok = fifo_case(cray, ray, clips, args, serve_args)
        ok = stalled_mount_case(cray, ray, clips, args, serve_args) and ok
        return 0 if ok else 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
