#!/usr/bin/env python3
"""Block -> CUDA tensor: clipvisor's GPU delivery against plain pinned copies (issue 14 §4).

Two steps, on two machines: the blocks are written here (Swift and FFmpeg), the copies are
timed on a machine with a GPU (no Swift, no FFmpeg there; only Python, numpy, torch and the
`zstandard` wheel, carried).

    # here: decode the W1/W2/W4 clips into block files
    python3 bench/gpu_delivery.py --prepare .gpu-blocks --bin-dir .build/release
    # here: the one wheel the GPU machine lacks (its Python is 3.12)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard
    # there (carry .gpu-blocks and .whl):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site python3 bench/gpu_delivery.py --blocks .gpu-blocks

For each block, `--repeat` times in a row (the blocks are in memory; no disk), GB/s of the
decoded bytes delivered as a CUDA tensor, the GPU synchronised once at the end of each run:

  pinned copy        the bytes already in page-locked memory, `.to(device, non_blocking=True)`:
                     the link's own speed, the ceiling
  pin_memory()       `torch.from_numpy(read_block(b).tensors[k]).pin_memory().to(device,
                     non_blocking=True)`: what a training loop writes without clipvisor's help
  to_torch(device)   `read_block(b)` into a new array, then `to_torch(array, device=...)`
                     (a reused staging slot, an asynchronous copy)
  uploader           `read_block(b, uploader.allocator)` decompresses into the staging slot,
                     `uploader.upload(...)` queues the copy: no host copy besides the block's own
  uploader, N thr.   the same with `read_block(..., threads=N)` (`Client(decompress_threads=N)`):
                     runs of frames decompressed by N threads at once (--threads, default 4)

Every delivered tensor is compared with the block's own decode (torch.equal on the host) before
any number is printed; a mismatch or an error exits non-zero. Issue 14's goal: block -> CUDA at
>= 0.8x of a plain pinned copy; the ratio is printed against both baselines.

`--dry-run` runs the same steps on a machine without a GPU (the copies go to host memory through
plain memory), to check the script and the blocks before spending GPU time; its numbers mean
nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MANIFEST = "manifest.json"


def prepare(out: Path, bin_dir: Path) -> int:
    """Writes one block per workload with `clipvisor-worker decode --out` (the worker's own
    bytes, as a supervisor would deliver them)."""
    from media import OUT as MEDIA_OUT
    from media import natural_clip, small_clips
    from w4_audio import cached_files

    out.mkdir(parents=True, exist_ok=True)
    worker = str(bin_dir / "clipvisor-worker")
    jobs = [
        ("w1", str(natural_clip(20)), ["--fps", "2", "--max-pixels", str(448 * 448), "--factor", "28"]),
        ("w2", str(small_clips(1)[0]), ["--fps", "30"]),
        ("w4", str(cached_files(MEDIA_OUT / "w4")[0]), ["--no-video", "--audio", "--sample-rate", "16000",
                                                         "--channels", "1"]),
    ]
    entries = []
    for name, path, args in jobs:
        target = out / f"{name}.block"
        proc = subprocess.run([worker, "decode", *args, "--layout", "THWC", "--out", str(target), path],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not target.exists():
            print(f"decode of {path} failed ({proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
            return 1
        entries.append({"name": name, "file": target.name, "source": Path(path).name, "bytes": target.stat().st_size})
        print(f"{name}: {target} ({target.stat().st_size / 1e6:.1f} MB) from {path}")
    (out / MANIFEST).write_text(json.dumps(entries, indent=1))
    return 0


class _HostBackend:
    """--dry-run only: page-locked memory as plain memory, no events, no streams."""

    class _Event:
        def record(self, stream: Any) -> None:
            pass

        def synchronize(self) -> None:
            pass

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def page_locked(self, nbytes: int) -> Any:
        return self.torch.empty(nbytes, dtype=self.torch.uint8)

    def event(self) -> Any:
        return self._Event()

    def current_stream(self) -> Any:
        return None

    def on(self, stream: Any) -> Any:
        return contextlib.nullcontext()

    def device_of(self, stream: Any) -> Any:
        return self.torch.device("cpu")

    def used_on(self, tensor: Any, stream: Any) -> None:
        pass


def measure(blocks_dir: Path, repeat: int, threads: int, dry_run: bool) -> int:
    import torch

    import clipvisor
    from clipvisor.block import read_block
    from clipvisor.results import to_torch

    if dry_run:
        device = torch.device("cpu")
        uploader = clipvisor.CudaUploader(device, _backend=_HostBackend(torch))
        pin = lambda t: t  # noqa: E731
        sync: Callable[[], None] = lambda: None  # noqa: E731
        deliver_array = uploader.upload
    else:
        if not torch.cuda.is_available():
            print("no CUDA device here (torch.cuda.is_available() is False): run on the GPU machine, or --dry-run",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        uploader = clipvisor.CudaUploader(device)
        pin = lambda t: t.pin_memory()  # noqa: E731
        sync = torch.cuda.synchronize
        deliver_array = lambda a: to_torch(a, device=device)  # noqa: E731

    threaded = f"uploader, {threads} thr."
    entries = json.loads((blocks_dir / MANIFEST).read_text())
    print(f"torch {torch.__version__}; device {torch.cuda.get_device_name(0) if not dry_run else 'cpu (dry run)'}; "
          f"{repeat} deliveries per block and path")
    failures = 0
    rows: List[Dict[str, Any]] = []
    for entry in entries:
        blob = (blocks_dir / entry["file"]).read_bytes()
        reference = read_block(blob)
        (key, want), = ((k, v) for k, v in reference.tensors.items())
        nbytes = want.nbytes
        pinned_host = pin(torch.from_numpy(want.copy()))

        def pinned_copy() -> Any:
            return pinned_host.to(device, non_blocking=True)

        def pin_memory() -> Any:
            return pin(torch.from_numpy(read_block(blob).tensors[key])).to(device, non_blocking=True)

        def via_to_torch() -> Any:
            return deliver_array(read_block(blob).tensors[key])

        def via_uploader() -> Any:
            return uploader.upload(read_block(blob, uploader.allocator).tensors[key])

        def via_uploader_threads() -> Any:
            return uploader.upload(read_block(blob, uploader.allocator, threads=threads).tensors[key])

        paths = {"pinned copy": pinned_copy, "pin_memory()": pin_memory, "to_torch(device)": via_to_torch,
                 "uploader": via_uploader, threaded: via_uploader_threads}
        expected = torch.from_numpy(want)
        row: Dict[str, Any] = {"name": entry["name"], "MB": nbytes / 1e6}
        for label, fn in paths.items():
            try:
                for out in (fn(), fn()):  # warm-up: the staging slots and the caching allocators
                    sync()
                    if not torch.equal(out.cpu(), expected):
                        raise AssertionError("delivered tensor differs from the block's decode")
                outs = []
                sync()
                t0 = time.perf_counter()
                for _ in range(repeat):
                    outs.append(fn())
                sync()
                wall = time.perf_counter() - t0
                bad = [i for i, o in enumerate(outs) if not torch.equal(o.cpu(), expected)]
                if bad:
                    raise AssertionError(f"deliveries {bad} differ from the block's decode")
                row[label] = nbytes * repeat / wall / 1e9
            except Exception as exc:  # noqa: BLE001 - reported, and the run fails
                failures += 1
                row[label] = None
                print(f"{entry['name']} {label}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        rows.append(row)

    labels = ["pinned copy", "pin_memory()", "to_torch(device)", "uploader", threaded]
    print(f"{'block':<6} {'MB':>6} " + " ".join(f"{label:>17}" for label in labels) + "   (GB/s)")
    for row in rows:
        cells = " ".join(f"{row[label]:>17.2f}" if row[label] else f"{'FAILED':>17}" for label in labels)
        print(f"{row['name']:<6} {row['MB']:>6.1f} {cells}")
    print("block -> CUDA through the uploader (goal: >= 0.8x the plain pinned copy):")
    for row in rows:
        for label in ("uploader", threaded):
            if not (row[label] and row["pinned copy"] and row["pin_memory()"]):
                continue
            vs_copy = row[label] / row["pinned copy"]
            vs_pin = row[label] / row["pin_memory()"]
            print(f"  {row['name']} {label:<17} {vs_copy:.2f}x the pinned copy ({'met' if vs_copy >= 0.8 else 'MISSED'}); "
                  f"{vs_pin:.2f}x pin_memory() per clip")
    if dry_run:
        print("dry run: the numbers above are host copies, not GPU transfers")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", metavar="DIR", help="write the block files here (needs the release build)")
    ap.add_argument("--bin-dir", help="with --prepare: directory with clipvisor-worker (release build)")
    ap.add_argument("--blocks", metavar="DIR", default=".gpu-blocks", help="block files to deliver (default .gpu-blocks)")
    ap.add_argument("--repeat", type=int, default=20, help="deliveries per block and path (default 20)")
    ap.add_argument("--threads", type=int, default=4, help="decompression threads of the last path (default 4)")
    ap.add_argument("--dry-run", action="store_true", help="without a GPU: check the script and blocks")
    a = ap.parse_args()
    if a.repeat < 1 or a.threads < 1:
        ap.error("--repeat and --threads: at least 1")
    if a.prepare:
        return prepare(Path(a.prepare), common.bin_dir(a.bin_dir))
    if not (Path(a.blocks) / MANIFEST).exists():
        ap.error(f"no {MANIFEST} in {a.blocks}: write the blocks first with --prepare {a.blocks}")
    return measure(Path(a.blocks), a.repeat, a.threads, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
