"""``clipvisor-scan`` / ``python -m clipvisor.scan``: the command line (docs/scan.md)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from ..client import Client
from ..errors import ClipvisorError
from . import outputs
from .buckets import BucketConfig, BucketError, load_bucket_config
from .facts import probe_clip, verify_clip
from .inputs import ClipRef, InputError, Sample, read_samples
from .qwenplan import QwenPlanner, sample_tokens
from .report import Summary, write_report

__all__ = ["main", "scan", "finalize", "merge"]

ROWS = "scan.jsonl"
META = "scan.meta.json"
# Options that change the rows: a resume or a merge must use the same ones.
_ROW_OPTIONS = ("inputs", "base", "verify", "qwen", "qwen_options", "buckets", "frame_interval", "seed", "epoch")


class ScanError(Exception):
    """A scan that cannot start or go on (bad input, an output that belongs to another scan)."""


def _parse_shard(text: Optional[str]) -> Tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N (e.g. 3/16), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipvisor-scan",
        description="Scan every clip of a dataset through the clipvisor supervisor before training: facts "
                    "(frame counts from packets and the header's, size after rotation, fps, duration, audio), "
                    "optionally a decode of every frame (--verify), Qwen frame/token plans (--qwen) and Open-Sora "
                    "bucket fit (--buckets). Clips that hang, crash or are damaged are recorded with their reason "
                    "(and in the supervisor's skip log, tag 'scan'), never fatal. Writes OUT/scan.jsonl, "
                    "OUT/scan.csv (Open-Sora columns first), OUT/scan.parquet (with pyarrow) and OUT/report.html.",
        epilog="Combine shards with: clipvisor-scan merge OUT SHARD_DIR... (docs/scan.md)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a directory (searched recursively for media files), a list file (one path per line), "
                        "an Open-Sora CSV/TSV (path column), or an ms-swift / LLaMA-Factory / Qwen JSON or JSONL")
    p.add_argument("-o", "--out", default="scan-out", help="output directory (default: %(default)s)")
    p.add_argument("--base", help="directory that relative paths in a manifest are taken against "
                                  "(default: the manifest's own directory)")
    p.add_argument("--verify", action="store_true",
                   help="decode every frame: each clip is clean, partial (with where it breaks) or failed")
    q = p.add_argument_group("Qwen plan (qwen-vl-utils' rules; defaults are its values and ms-swift's environment)")
    q.add_argument("--qwen", nargs="?", const="2.5", choices=["2.5", "3"],
                   help="plan frames, output size and visual tokens per clip and per sample "
                        "(2.5: Qwen2.5-VL, qwen-vl-utils 0.0.11; 3: Qwen3-VL, 0.0.14)")
    q.add_argument("--qwen-fps", type=float)
    q.add_argument("--qwen-min-frames", type=int)
    q.add_argument("--qwen-max-frames", type=int)
    q.add_argument("--qwen-min-pixels", type=int)
    q.add_argument("--qwen-max-pixels", type=int)
    q.add_argument("--qwen-total-pixels", type=int)
    q.add_argument("--max-tokens", type=int, help="list samples with more visual tokens than this in the report")
    b = p.add_argument_group("Open-Sora buckets")
    b.add_argument("--buckets", metavar="FILE",
                   help="bucket config: Open-Sora's bucket_config as JSON or a Python literal, or an Open-Sora "
                        "training config (.py) that defines bucket_config")
    b.add_argument("--frame-interval", type=int, help="Open-Sora's frame_interval (default: the file's, else 1)")
    b.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: %(default)s)")
    b.add_argument("--epoch", type=int, default=0, help="the epoch whose draws to reproduce (default: %(default)s)")
    b.add_argument("--global-batch", type=int, default=1, metavar="RANKS",
                   help="data-parallel size: a bucket with fewer than batch size × RANKS samples is a minority "
                        "bucket (default: %(default)s)")
    r = p.add_argument_group("running")
    r.add_argument("--jobs", type=int, help="clips in flight at once (default: twice the supervisor's workers)")
    r.add_argument("--deadline", type=float, help="seconds per clip (default: the supervisor's); a clip that takes "
                                                  "longer is recorded as a timeout")
    r.add_argument("--socket", help="the supervisor's socket (default: found as usual; a private one is started "
                                    "if none answers)")
    r.add_argument("--tag", default="scan", help="skip-log tag of the scan's requests (default: %(default)s)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted scan in --out: samples "
                                                         "already written are skipped")
    r.add_argument("--shard", type=_parse_shard, metavar="I/N",
                   help="scan only samples whose number is I modulo N (job arrays); combine with 'merge'")
    r.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _meta_options(args: argparse.Namespace) -> Dict[str, Any]:
    qwen_options = {k: getattr(args, f"qwen_{k}") for k in ("fps", "min_frames", "max_frames", "min_pixels",
                                                             "max_pixels", "total_pixels")}
    return {"inputs": [os.path.abspath(i) for i in args.inputs], "base": args.base, "verify": args.verify,
            "qwen": args.qwen, "qwen_options": qwen_options, "max_tokens": args.max_tokens,
            "buckets": os.path.abspath(args.buckets) if args.buckets else None, "frame_interval": args.frame_interval,
            "seed": args.seed, "epoch": args.epoch, "global_batch": args.global_batch}


def _load_buckets(options: Dict[str, Any]) -> Optional[BucketConfig]:
    if not options.get("buckets"):
        return None
    return load_bucket_config(options["buckets"], frame_interval=options.get("frame_interval"),
                              seed=int(options.get("seed") or 0), epoch=int(options.get("epoch") or 0))


def _planner(options: Dict[str, Any]) -> Optional[QwenPlanner]:
    if not options.get("qwen"):
        return None
    return QwenPlanner.create(options["qwen"], **(options.get("qwen_options") or {}))


class _Scanner:
    """Scans one sample: every clip probed (and verified), planned and bucketed."""

    def __init__(self, client: Client, options: Dict[str, Any], deadline: Optional[float], tag: str):
        self.client = client
        self.verify = bool(options.get("verify"))
        self.planner = _planner(options)
        self.buckets = _load_buckets(options)
        self.deadline = deadline
        self.tag = tag
        self.stop = threading.Event()

    def __call__(self, sample: Sample) -> List[Dict[str, Any]]:
        base = {"sample": sample.index, "sample_id": sample.id, "sample_clips": max(1, len(sample.clips))}
        if not sample.clips:
            return [dict(base, clip=0, path="", status="failed", reason="no_media",
                         detail=f"sample {sample.id}: the record names no video or audio file")]
        rows = []
        for k, ref in enumerate(sample.clips):
            if self.stop.is_set():
                raise _Stopped()
            row: Dict[str, Any] = dict(base, clip=k, kind=ref.kind)
            try:
                self._clip(sample, ref, row)
            except (ClipvisorError, _Stopped):
                raise  # the supervisor is gone, or the scan stops: this sample is not written
            except Exception as e:  # one odd clip (a bug of ours on it) must not end a million-clip scan
                row.update(path=ref.path, status="failed", reason="scan_error",
                           detail=f"{ref.path}: the scan could not judge this clip: {type(e).__name__}: {e}")
            rows.append(row)
        if self.planner is not None:
            total = sample_tokens(r for r in rows if r.get("has_video"))
            if total is not None:
                for r in rows:
                    r["qwen_sample_tokens"] = total
        return rows

    def _clip(self, sample: Sample, ref: ClipRef, row: Dict[str, Any]) -> None:
        """Probes one clip into `row`, then verifies, plans and buckets it as asked."""
        row.update(probe_clip(self.client, ref.path, tag=self.tag, deadline=self.deadline))
        if row.get("status") == "ok" and row.get("has_video"):
            h, w = row.get("height"), row.get("width")
            if h and w:
                row["aspect_ratio"] = h / w
                row["resolution"] = h * w
            if self.verify:
                if self.stop.is_set():
                    raise _Stopped()
                verify_clip(self.client, row, tag=self.tag, deadline=self.deadline)
            if self.planner is not None:
                row.update(self.planner.plan(row))
            if self.buckets is not None and row.get("verify") != "failed" and row.get("num_frames") and h and w:
                a = self.buckets.assign(int(row["num_frames"]), int(h), int(w), sample.index)
                if a.bucket is not None:
                    row.update(bucket_resolution=a.bucket[0], bucket_frames=a.bucket[1],
                               bucket_aspect_ratio=a.bucket[2])
                else:
                    row["bucket_reason"] = a.reason
        elif self.verify and row.get("status") == "ok":
            verify_clip(self.client, row, tag=self.tag, deadline=self.deadline)


class _Stopped(Exception):
    pass


def _progress(total: Optional[int], enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        tqdm = importlib.import_module("tqdm").tqdm  # an optional dependency (the scan extra)
    except ImportError:
        print("clipvisor scan: no progress bar (pip install tqdm)", file=sys.stderr)
        return None
    return tqdm(total=total, unit="sample", dynamic_ncols=True, smoothing=0.05, file=sys.stderr)


def _samples(options: Dict[str, Any]) -> Any:
    offset = 0
    for source in options["inputs"]:
        last = -1
        for s in read_samples(source, options.get("base")):
            last = s.index
            s.index += offset
            yield s
        offset += last + 1


def scan(args: argparse.Namespace) -> int:
    out = args.out
    os.makedirs(out, exist_ok=True)
    rows_path, meta_path = os.path.join(out, ROWS), os.path.join(out, META)
    options = _meta_options(args)
    shard = args.shard or (0, 1)
    if os.path.exists(rows_path) and os.path.getsize(rows_path) > 0:
        if not args.resume:
            raise ScanError(f"{out} already holds a scan ({ROWS}); pass --resume to continue it, "
                            f"or choose another --out")
        try:
            with open(meta_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise ScanError(f"{meta_path}: missing or unreadable; cannot tell which scan {out} holds") from None
        changed = [k for k in _ROW_OPTIONS if old.get("options", {}).get(k) != options.get(k)]
        if changed or tuple(old.get("shard") or (0, 1)) != shard:
            raise ScanError(f"{out}: --resume with different options ({', '.join(changed) or 'shard'}) than the scan "
                            f"it holds; use the same ones, or another --out")
    # Fail early on a bad config or input, before any clip is scanned.
    _load_buckets(options)
    for i in options["inputs"]:
        if not os.path.exists(i):
            raise ScanError(f"{i}: no such file or directory")
        next(iter(read_samples(i, options.get("base"))), None)  # a manifest without a path column fails here
    with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"options": options, "shard": list(shard), "started": time.time()}, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    done = outputs.recover(rows_path) if args.resume else outputs.DoneSet()

    client = Client(args.socket, spawn=args.socket is None, tag=args.tag)
    jobs = args.jobs
    if not jobs:
        try:
            jobs = max(2, 2 * int(client.status().get("workers", {}).get("target") or 1))
        except (ClipvisorError, OSError, ValueError) as e:
            raise ScanError(f"no supervisor: {e}") from None
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    total = None
    if show:
        total = sum(1 for s in _samples(options) if s.index % shard[1] == shard[0] and s.index not in done)
    bar = _progress(total, show)
    t_start = time.monotonic()
    scanner = _Scanner(client, options, args.deadline, args.tag)
    log = outputs.RowLog(rows_path)
    window = max(8, jobs * 8)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="clipvisor-scan")
    # Samples in flight; each is written as soon as it completes (a hanging clip holds up only its
    # own sample, never the ones behind it). finalize() puts the rows back in sample order.
    inflight: Set["Future[List[Dict[str, Any]]]"] = set()
    written = failed = 0
    interrupted = False
    error: Optional[BaseException] = None

    def take(fut: "Future[List[Dict[str, Any]]]") -> None:
        nonlocal written, failed
        rows = fut.result()
        log.write_sample(rows)
        written += 1
        failed += sum(1 for r in rows if r.get("status") != "ok" or r.get("verify") in ("failed", "partial"))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(bad=failed, refresh=False)

    def terminate(signum: int, frame: Any) -> None:  # a job scheduler's SIGTERM: stop as for Ctrl-C
        raise KeyboardInterrupt()

    in_main = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, terminate) if in_main else None
    try:
        for sample in _samples(options):
            if sample.index % shard[1] != shard[0] or sample.index in done:
                continue
            inflight.add(pool.submit(scanner, sample))
            if len(inflight) >= window:
                done_now, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done_now:
                    take(fut)
        while inflight:
            done_now, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in done_now:
                take(fut)
    except KeyboardInterrupt:
        interrupted = True
    except (ClipvisorError, InputError, OSError) as e:
        error = e
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        scanner.stop.set()
        for fut in inflight:
            fut.cancel()
        if interrupted or error is not None:
            client.close()  # requests in flight fail at once; their samples are not written
        pool.shutdown(wait=True, cancel_futures=True)
        log.close()
        if bar is not None:
            bar.close()
    scanned = time.monotonic() - t_start
    try:
        summary = finalize(out)
    except KeyboardInterrupt:
        print(f"clipvisor scan: interrupted while writing the CSV, Parquet and report; {out}/{ROWS} holds every "
              f"scanned sample — run again with --resume to finish them", file=sys.stderr)
        return 130
    t_outputs = time.monotonic() - t_start - scanned
    if interrupted:
        print(f"clipvisor scan: interrupted; {summary['samples']} samples are in {out} — run again with --resume "
              f"to continue", file=sys.stderr)
        return 130
    if error is not None:
        print(f"clipvisor scan: stopped: {error}; {out} holds what was scanned — fix the cause and run again with "
              f"--resume", file=sys.stderr)
        return 1
    print(f"clipvisor scan: {summary['samples']} samples, {summary['clips']} clips, {summary['failed']} failed"
          + (f", {summary['verify_bad']} damaged" if options.get("verify") else "")
          + f" -> {os.path.join(out, 'report.html')} (clips {scanned:.2f} s, outputs {t_outputs:.2f} s)",
          file=sys.stderr)
    client.close()
    return 0


def finalize(out: str) -> Dict[str, Any]:
    """Writes the derived files (CSV, Parquet, report) from ``scan.jsonl`` and returns counts."""
    rows_path, meta_path = os.path.join(out, ROWS), os.path.join(out, META)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    options = meta.get("options", {})
    if not os.path.exists(rows_path):
        open(rows_path, "ab").close()
    outputs.sort_rows(rows_path)
    usable = outputs.write_csv(outputs.read_rows(rows_path), os.path.join(out, "scan.csv"))
    outputs.write_samples_csv(outputs.read_rows(rows_path), os.path.join(out, "samples.csv"))
    outputs.write_parquet(outputs.read_rows(rows_path), os.path.join(out, "scan.parquet"))
    summary = Summary(_load_buckets(options), int(options.get("global_batch") or 1), options.get("max_tokens"))
    for row in outputs.read_rows(rows_path):
        summary.add(row)
    summary.options = {"inputs": ", ".join(options.get("inputs") or []), "verify": bool(options.get("verify"))}
    if options.get("qwen"):
        summary.options["qwen"] = json.dumps(_planner(options).describe())  # type: ignore[union-attr]
    if options.get("buckets"):
        summary.options["buckets"] = options["buckets"]
    title = f"clipvisor scan: {', '.join(options.get('inputs') or [])}"
    write_report(summary, os.path.join(out, "report.html"), title=title)
    result = {"samples": summary.samples, "clips": summary.clips, "failed": summary.clips - summary.ok,
              "usable": usable, "verify_bad": sum(v for k, v in summary.verify.items() if k != "clean")}
    meta["summary"] = result
    with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return result


def merge(out: str, shards: Sequence[str]) -> Dict[str, Any]:
    """Combines shard outputs (each from ``--shard I/N`` with the same options) into ``out``."""
    metas = []
    for d in shards:
        try:
            with open(os.path.join(d, META), encoding="utf-8") as f:
                metas.append(json.load(f))
        except (OSError, ValueError):
            raise ScanError(f"{d}: not a scan output ({META} missing or unreadable)") from None
    first = metas[0].get("options", {})
    for d, m in zip(shards[1:], metas[1:]):
        changed = [k for k in _ROW_OPTIONS if m.get("options", {}).get(k) != first.get(k)]
        if changed:
            raise ScanError(f"{d}: scanned with other options than {shards[0]} ({', '.join(changed)})")
    counts = {tuple(m.get("shard") or (0, 1)) for m in metas}
    n = {c[1] for c in counts}
    if len(n) == 1 and len(counts) != next(iter(n)):
        have = sorted(c[0] for c in counts)
        print(f"clipvisor scan merge: warning: shards {have} of {next(iter(n))} given; the result is incomplete",
              file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    outputs.merge_row_files([os.path.join(d, ROWS) for d in shards], os.path.join(out, ROWS))
    with open(os.path.join(out, META), "w", encoding="utf-8") as f:
        json.dump({"options": first, "shard": [0, 1], "merged_from": [os.path.abspath(d) for d in shards]}, f, indent=1)
    return finalize(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge"]:
            mp = argparse.ArgumentParser(prog="clipvisor-scan merge",
                                         description="Combine the outputs of --shard I/N scans into one "
                                                     "output and report.")
            mp.add_argument("out", help="the combined output directory")
            mp.add_argument("shards", nargs="+", help="the shards' output directories")
            a = mp.parse_args(argv[1:])
            s = merge(a.out, a.shards)
            print(f"clipvisor scan merge: {s['samples']} samples, {s['clips']} clips, {s['failed']} failed -> "
                  f"{os.path.join(a.out, 'report.html')}", file=sys.stderr)
            return 0
        args = _parser().parse_args(argv)
        return scan(args)
    except (ScanError, InputError, BucketError) as e:
        print(f"clipvisor scan: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the scan started (connecting, counting): nothing to resume yet
        print("clipvisor scan: interrupted", file=sys.stderr)
        return 130
