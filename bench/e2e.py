#!/usr/bin/env python3
"""End to end into numpy arrays: clipvisor vs PyAV and decord in-process (issue 6).

Same frames, same output size, same layout (THWC uint8 RGB), ratios within one run:
  W1  natural 720p H.264 clips of 10-60 s, fps=2, max_pixels=448*448, factor 28
  W2  60 natural clips 320x240 3 s, all frames (fps=30 on 30 fps sources), native size
  W3  a natural 5-minute 720p clip at fps=0.25, max_pixels=448*448
  W4  10 files of 30 s audio (WAV, MP3, M4A at 22.05-48 kHz, mono and stereo; bench/w4_audio.py's
      set) to 16 kHz mono float32, and one caller as for W1-W3
The frame indices and the output size of each clip come from clipvisor's own result (the
Qwen2.5-VL rule: `video.indices`, `video.frames.shape`); the peers are asked for exactly those:
  PyAV    av.open, decode in order, `frame.to_ndarray(width=, height=, format="rgb24",
          interpolation="BICUBIC")` for the wanted indices; when the next wanted frame is more
          than 60 frames (2 s) ahead it seeks to the keyframe before it and decodes forward (W3).
          Audio: AudioResampler(format="flt", layout="mono", rate=16000).
  decord  VideoReader(path, width=, height=, num_threads=1).get_batch(indices).asnumpy();
          AudioReader(path, sample_rate=16000, mono=True)
  torchcodec  VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1|2, seek_mode="exact",
          transforms=[Resize((h, w))]).get_frames_at(indices); AudioDecoder(path, sample_rate=16000,
          num_channels=1).get_all_samples() (timed after `import torch`)
clipvisor is also run with its default layout TCHW (same bytes, planar), for information:
the worker converts THWC and TCHW differently (see docs/benchmark-method.md).
Both peers run in this process, single-threaded, one clip at a time (a DataLoader worker), and again
with 2 clips at a time on 2 threads (both release the GIL while decoding; one decoder thread each),
or, for the one-clip workloads W3 and W4, with 2 decoder threads.
clipvisor: a private `clipvisor serve` with the default worker count (one per CPU: 2 here), the
Python client with 4 threads (kept for the whole run, as a loader keeps its threads) submitting clips
concurrently, layout="THWC".
ffmpeg: `ffmpeg -threads 1 -i CLIP -an -f null -` on the W1 clips (all frames, no scaling), the
issue's raw-decode reference.

Reported per workload: wall (median of --repeat), speed ratio of clipvisor over each peer
(peer wall / clipvisor wall, > 1 = clipvisor faster), CPU seconds of every process involved, and
the client's CPU per GB delivered (this process only: receive, map, validate, decompress into
the final arrays; goal <= 0.25 s/GB), with its minor page faults per GB.

  python3 bench/e2e.py --quick     # W1 on 10+20 s clips, 20 small clips, W3 on 60 s; ~2 min
  python3 bench/e2e.py             # the full set, 3 repeats; ~10 min on 2 cores
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from media import OUT as MEDIA_OUT, natural_clip, small_clips  # noqa: E402
from w4_audio import cached_files as w4_files  # noqa: E402

import av  # noqa: E402
import decord  # noqa: E402

# torchcodec (imported here, before any timing: `import torch` costs seconds, which every training
# process has paid already). `pip install --no-deps torchcodec==0.17.0` works against Debian's FFmpeg 5.1.
try:
    import torchcodec  # noqa: E402
    from torchcodec.decoders import AudioDecoder as TorchcodecAudioDecoder  # noqa: E402
    from torchcodec.decoders import VideoDecoder as TorchcodecVideoDecoder  # noqa: E402
    from torchcodec.transforms import Resize as TorchcodecResize  # noqa: E402
    HAVE_TORCHCODEC = True
except ImportError as _missing:  # reported in the header line, never silently
    HAVE_TORCHCODEC = False
    TORCHCODEC_MISSING = str(_missing)

import clipvisor  # noqa: E402

CLIENT_THREADS = 4


# ---- one clip ------------------------------------------------------------------------------

class Job:
    """What to decode from one clip: the indices and output size clipvisor chose."""

    def __init__(self, path: str, kind: str, request: dict, indices: Optional[List[int]] = None,
                 size: Optional[Tuple[int, int]] = None, native: Optional[Tuple[int, int]] = None):
        self.path, self.kind, self.request = path, kind, request
        self.indices, self.size, self.native = indices, size, native


def pyav_video(job: Job, threads: int = 1) -> np.ndarray:
    """Decode in order; when the next wanted frame is more than SEEK_GAP frames ahead, seek to the
    keyframe before it instead (container.seek(..., backward=True)), as a careful PyAV user would."""
    idx = job.indices
    w, h = job.size
    out = np.empty((len(idx), h, w, 3), np.uint8)
    kw = dict(width=w, height=h, interpolation="BICUBIC") if (w, h) != job.native else {}
    with av.open(job.path) as c:
        s = c.streams.video[0]
        s.thread_count = threads
        if threads > 1:
            s.thread_type = "AUTO"
        rate, tb, start = s.average_rate, s.time_base, s.start_time or 0
        pts_of = lambda i: start + int(round(i / rate / tb))  # noqa: E731  (CFR sources)
        frames = None
        pos = -1  # index of the last decoded frame
        for k, i in enumerate(idx):
            if frames is None or i - pos > SEEK_GAP:
                c.seek(pts_of(i), stream=s, backward=True, any_frame=False)
                frames = c.decode(s)
                pos = None  # unknown until the first frame's pts
            target = pts_of(i)
            for f in frames:
                fi = int(round((f.pts - start) * tb * rate))
                pos = fi
                if fi >= i or f.pts >= target:
                    out[k] = f.to_ndarray(format="rgb24", **kw)
                    break
    return out


SEEK_GAP = 60


def decord_video(job: Job, threads: int = 1) -> np.ndarray:
    w, h = job.size
    kw = dict(width=w, height=h) if (w, h) != job.native else {}
    vr = decord.VideoReader(job.path, ctx=decord.cpu(0), num_threads=threads, **kw)
    return vr.get_batch(job.indices).asnumpy()


def pyav_audio(job: Job, threads: int = 1) -> np.ndarray:
    parts = []
    with av.open(job.path) as c:
        s = c.streams.audio[0]
        res = av.AudioResampler(format="flt", layout="mono", rate=16000)
        for f in c.decode(s):
            for g in res.resample(f):
                parts.append(g.to_ndarray().reshape(1, -1))
        for g in res.resample(None):
            parts.append(g.to_ndarray().reshape(1, -1))
    return np.concatenate(parts, axis=1)


def decord_audio(job: Job, threads: int = 1) -> np.ndarray:
    ar = decord.AudioReader(job.path, ctx=decord.cpu(0), sample_rate=16000, mono=True)
    return ar[:].asnumpy()


def torchcodec_video(job: Job, threads: int = 1) -> np.ndarray:
    """As torchcodec's users call it: exact seeking, the resize done in the decoder
    (`transforms=[Resize((h, w))]`), the wanted indices in one `get_frames_at`."""
    w, h = job.size
    kw = dict(transforms=[TorchcodecResize((h, w))]) if (w, h) != job.native else {}
    decoder = TorchcodecVideoDecoder(job.path, dimension_order="NHWC", num_ffmpeg_threads=threads, seek_mode="exact", **kw)
    return decoder.get_frames_at(job.indices).data.numpy()


def torchcodec_audio(job: Job, threads: int = 1) -> np.ndarray:
    return TorchcodecAudioDecoder(job.path, sample_rate=16000, num_channels=1).get_all_samples().data.numpy()


PEERS: Dict[str, Dict[str, Callable[[Job], np.ndarray]]] = {
    "video": {"PyAV": pyav_video, "decord": decord_video},
    "audio": {"PyAV": pyav_audio, "decord": decord_audio},
}
if HAVE_TORCHCODEC:
    PEERS["video"]["torchcodec"] = torchcodec_video
    PEERS["audio"]["torchcodec"] = torchcodec_audio


# ---- runners -------------------------------------------------------------------------------

class Measured:
    def __init__(self) -> None:
        self.wall: List[float] = []
        self.cpu: List[float] = []        # every process involved
        self.here: List[float] = []       # this process
        self.faults: List[float] = []     # minor faults of this process
        self.bytes = 0


_client_pools: Dict[int, ThreadPoolExecutor] = {}


def client_pool(threads: int) -> ThreadPoolExecutor:
    """The client's threads, made once per count and kept for the whole run, as a training
    loader keeps its threads (a `ReusedBuffers` allocator holds one buffer per thread)."""
    if threads not in _client_pools:
        _client_pools[threads] = ThreadPoolExecutor(threads)
    return _client_pools[threads]


def run_clipvisor(client, sup: common.Supervisor, jobs: List[Job], m: Measured, layout: str = "THWC",
                  allocator=None, threads: int = 0) -> None:
    def one(job: Job) -> int:
        if job.kind == "audio":
            return client.audio(job.path, allocator=allocator, **job.request).samples.nbytes
        v = client.video(job.path, layout=layout, allocator=allocator, **job.request)
        return v.frames.nbytes

    pids = [int(w["pid"]) for w in common.worker_list(client.status())]
    s0 = sup.cpu() + sum(common.proc_cpu(p) for p in pids)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, w0 = common.cpu_self(), time.perf_counter()
    total = sum(client_pool(threads or CLIENT_THREADS).map(one, jobs))
    wall, here = time.perf_counter() - w0, common.cpu_self() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    pids = set(pids) | {int(w["pid"]) for w in common.worker_list(client.status())}
    s1 = sup.cpu() + sum(common.proc_cpu(p) for p in pids)
    m.wall.append(wall), m.here.append(here), m.cpu.append(here + s1 - s0)
    m.faults.append(r1.ru_minflt - r0.ru_minflt)
    m.bytes = total


def run_peer(fn: Callable[[Job], np.ndarray], jobs: List[Job], threads: int, m: Measured) -> None:
    def one(job: Job) -> int:
        return fn(job).nbytes

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, w0 = common.cpu_self(), time.perf_counter()
    if threads == 1:
        total = sum(one(j) for j in jobs)
    elif len(jobs) == 1:  # one clip: 2 decoder threads instead
        total = fn(jobs[0], threads).nbytes
    else:
        with ThreadPoolExecutor(threads) as ex:
            total = sum(ex.map(one, jobs))
    wall, here = time.perf_counter() - w0, common.cpu_self() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    m.wall.append(wall), m.here.append(here), m.cpu.append(here), m.faults.append(r1.ru_minflt - r0.ru_minflt)
    m.bytes = total


def run_peer_one_caller(fn: Callable[[Job], np.ndarray], jobs: List[Job], threads: int, m: Measured) -> None:
    """One clip at a time with `threads` decoder threads: a script or an inference server."""
    c0, w0 = common.cpu_self(), time.perf_counter()
    total = sum(fn(job, threads).nbytes for job in jobs)
    wall, here = time.perf_counter() - w0, common.cpu_self() - c0
    m.wall.append(wall), m.here.append(here), m.cpu.append(here)
    m.bytes = total


def one_caller(name: str, client, sup, jobs: List[Job], repeat: int) -> Dict[str, Measured]:
    """Issue 14's first table: one caller, one clip at a time (num_workers=0); the peers at 1 and
    2 decoder threads. clipvisor gives the lone clip the idle decode slots (a conversion thread
    beside the decoder on a dense selection, parallel readers on a sparse one); its client copies
    with one thread (the default) or two (`decompress_threads=2`, a one-caller setting as the
    peers' thread counts are)."""
    rows: Dict[str, Measured] = {"clipvisor one caller": Measured(), "clipvisor one caller, 2 copy threads": Measured(),
                                 "clipvisor one caller no slabs (info)": Measured()}
    plain = sup.client(slabs=0)
    two_copiers = sup.client(decompress_threads=2)
    peers = PEERS[jobs[0].kind]
    # Audio decoders have no frame threads: their one caller is the 1-thread row.
    threads = (1,) if jobs[0].kind == "audio" else (1, 2)
    row_name = {1: "1 thread", 2: "2 decoder threads"}
    for peer in peers:
        for t in threads:
            rows[f"{peer} {row_name[t]}"] = Measured()
    for _ in range(repeat):
        run_clipvisor(client, sup, jobs, rows["clipvisor one caller"], threads=1)
        run_clipvisor(two_copiers, sup, jobs, rows["clipvisor one caller, 2 copy threads"], threads=1)
        run_clipvisor(plain, sup, jobs, rows["clipvisor one caller no slabs (info)"], threads=1)
        for peer, fn in peers.items():
            for t in threads:
                run_peer_one_caller(fn, jobs, t, rows[f"{peer} {row_name[t]}"])
    cvw = common.median(rows["clipvisor one caller"].wall)
    print(f"{name}, one caller (one clip at a time):")
    for label, m in rows.items():
        w = common.median(m.wall)
        ratio = "" if label.startswith("clipvisor") else f"{w / cvw:.2f}x"
        print(f"  {label:<40} {w:>7.2f} {ratio:>8} | CPU {common.median(m.cpu):.2f}")
    fastest = min((k for k in rows if not k.startswith("clipvisor")), key=lambda k: common.median(rows[k].wall))
    for label in ("clipvisor one caller", "clipvisor one caller, 2 copy threads"):
        r = common.median(rows[fastest].wall) / common.median(rows[label].wall)
        print(f"  {label[10:]} vs the fastest peer ({fastest}): {r:.2f}x {'met' if round(r, 2) >= 1.0 else 'MISSED'}")
    plain.close()
    two_copiers.close()
    return rows


def run_ffmpeg(jobs: List[Job], m: Measured) -> None:
    k0, w0 = common.cpu_children(), time.perf_counter()
    for job in jobs:
        common.run_checked(["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", job.path, "-an", "-f", "null", "-"])
    m.wall.append(time.perf_counter() - w0), m.cpu.append(common.cpu_children() - k0)


def plan(client, paths: Sequence[Path], kind: str, request: dict) -> List[Job]:
    """Asks clipvisor once per clip for the indices and size the peers must reproduce."""
    jobs = []
    for p in paths:
        if kind == "audio":
            jobs.append(Job(str(p), kind, request))
            continue
        v = client.video(str(p), layout="THWC", **request)
        t, h, w, _ = v.frames.shape
        src = v.source or {}
        jobs.append(Job(str(p), kind, request, [int(i) for i in v.indices], (w, h),
                        (int(src.get("width") or 0), int(src.get("height") or 0))))
    return jobs


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    d = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float("inf") if d == 0 else 10 * np.log10(255.0 ** 2 / d)


def check_same(client, job: Job) -> str:
    """PSNR of each peer against clipvisor on one clip: the same frames, decoded and scaled by
    different code, agree to ~30+ dB; a wrong index shows as < 20 dB."""
    if job.kind == "audio":
        a = client.audio(job.path, **job.request).samples
        out = []
        for name, fn in PEERS["audio"].items():
            b = fn(job)
            out.append(f"{name} {b.shape[1]} samples vs {a.shape[1]}")
        return ", ".join(out)
    a = client.video(job.path, layout="THWC", **job.request).frames
    out = []
    for name, fn in PEERS["video"].items():
        b = fn(job)
        if b.shape != a.shape:
            raise SystemExit(f"{name} gave {b.shape}, clipvisor {a.shape} on {job.path}")
        out.append(f"{name} {psnr(a, b):.1f} dB")
    return "PSNR vs clipvisor: " + ", ".join(out)


def workload(name: str, title: str, client, sup, jobs: List[Job], repeat: int, ffmpeg: bool) -> Dict[str, Measured]:
    kind = jobs[0].kind
    print(f"\n{name}: {title}; {len(jobs)} clip(s); {check_same(client, jobs[0])}", flush=True)
    rows: Dict[str, Measured] = {"clipvisor": Measured()}
    # The same client without block slabs (a fresh memfd mapped and freed per clip): what the
    # slabs save, measured in the same run.
    rows["clipvisor no slabs (info)"] = Measured()
    plain = sup.client(slabs=0)
    if kind == "video":
        rows["clipvisor TCHW (info)"] = Measured()
    # Decoding into reused memory (clipvisor.ReusedBuffers): what a loader that copies frames
    # into its batch or to the GPU right away pays; the peers always return new arrays.
    rows["clipvisor reused (info)"] = Measured()
    for peer in PEERS[kind]:
        rows[f"{peer} 1 thread"] = Measured()
        rows[f"{peer} 2 threads"] = Measured()
    if ffmpeg:
        rows["ffmpeg -threads 1 -f null"] = Measured()
    # Once, untimed: a connection makes its slabs at its first clips (as it connects once), and a
    # training run decodes thousands of clips on it; so do the reused buffers.
    reused = clipvisor.ReusedBuffers()
    run_clipvisor(client, sup, jobs, Measured())
    run_clipvisor(client, sup, jobs, Measured(), allocator=reused)
    for r in range(repeat):
        run_clipvisor(client, sup, jobs, rows["clipvisor"])
        run_clipvisor(plain, sup, jobs, rows["clipvisor no slabs (info)"])
        if kind == "video":
            run_clipvisor(client, sup, jobs, rows["clipvisor TCHW (info)"], layout="TCHW")
        run_clipvisor(client, sup, jobs, rows["clipvisor reused (info)"], allocator=reused)
        for peer, fn in PEERS[kind].items():
            run_peer(fn, jobs, 1, rows[f"{peer} 1 thread"])
            run_peer(fn, jobs, 2, rows[f"{peer} 2 threads"])
        if ffmpeg:
            run_ffmpeg(jobs, rows["ffmpeg -threads 1 -f null"])
    cv = rows["clipvisor"]
    gb = cv.bytes / 1e9
    cvw = common.median(cv.wall)
    print(f"{'':<26} {'wall s':>7} {'clipvisor speed-up':>18} | {'CPU s (all procs)':>17} {'CPU here':>8} | "
          f"{'MB out':>7}")
    for label, m in rows.items():
        w = common.median(m.wall)
        ratio = "" if label.startswith("clipvisor") else f"{w / cvw:.2f}x"
        here = f"{common.median(m.here):>8.2f}" if m.here else f"{'-':>8}"
        mb = f"{m.bytes / 1e6:>7.1f}" if m.bytes else f"{'-':>7}"
        print(f"{label:<26} {w:>7.2f} {ratio:>18} | {common.median(m.cpu):>17.2f} {here} | {mb}")
    peers = [k for k in rows if k.endswith("1 thread")]
    fastest1 = min(peers, key=lambda k: common.median(rows[k].wall))
    peers2 = [k for k in rows if k.endswith("2 threads")]
    fastest2 = min(peers2, key=lambda k: common.median(rows[k].wall))
    r1 = common.median(rows[fastest1].wall) / cvw
    r2 = common.median(rows[fastest2].wall) / cvw
    def verdict(r: float) -> str:
        return "met" if round(r, 2) >= 1.0 else "MISSED"

    print(f"target >= 1.0x the faster peer: vs {fastest1}: {r1:.2f}x {verdict(r1)}; "
          f"vs {fastest2}: {r2:.2f}x {verdict(r2)}")
    if ffmpeg:
        f = rows["ffmpeg -threads 1 -f null"]
        rw = common.median(f.wall) / cvw
        rc = common.median(f.cpu) / common.median(cv.cpu)
        print(f"vs raw ffmpeg (target >= 0.8x): wall {rw:.2f}x ({'met' if rw >= 0.8 else 'MISSED'}; clipvisor on "
              f"{sup.workers} workers, ffmpeg one process); CPU efficiency {rc:.2f}x (ffmpeg CPU / clipvisor CPU, all "
              f"processes; ffmpeg decodes every frame but scales none)")
    if gb > 0:
        here = common.median(cv.here)
        faults = common.median(cv.faults)
        print(f"client CPU per GB delivered: {here / gb:.3f} s/GB (goal <= 0.25; {gb:.3f} GB; {faults / gb / 1e3:.0f}k "
              f"minor faults/GB; includes the first touch of each new array: see bench/memfd_read_cost.py)")
        reused = rows["clipvisor reused (info)"]
        rh, rf = common.median(reused.here), common.median(reused.faults)
        print(f"client CPU per GB delivered into ReusedBuffers: {rh / gb:.3f} s/GB ({rf / gb / 1e3:.0f}k minor "
              f"faults/GB)")
        nh = common.median(rows["clipvisor no slabs (info)"].here)
        print(f"client CPU per GB delivered without slabs: {nh / gb:.3f} s/GB; wall with slabs vs without: "
              f"{common.median(rows['clipvisor no slabs (info)'].wall) / cvw:.2f}x")
    plain.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", help="directory with clipvisor and clipvisor-worker (release build)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="W1,W2,W3,W4", help="comma-separated workloads")
    args = ap.parse_args()
    bins = common.bin_dir(args.bin_dir)
    repeat = 1 if args.quick else args.repeat
    only = set(args.only.split(","))
    tc = f"torchcodec {torchcodec.__version__}" if HAVE_TORCHCODEC else f"torchcodec NOT MEASURED ({TORCHCODEC_MISSING})"
    print(f"binaries {bins}; PyAV {av.__version__} (FFmpeg {'.'.join(map(str, av.library_versions['libavcodec']))} "
          f"libavcodec); decord {decord.__version__}; {tc}; numpy {np.__version__}")
    print(common.machine_line())
    w1_seconds = (10, 20) if args.quick else (10, 20, 40, 60)
    w1 = [natural_clip(s) for s in w1_seconds]
    w2 = small_clips(20 if args.quick else 60)
    w3 = natural_clip(60 if args.quick else 300, size="1280x720", audio=False)
    w4 = w4_files(MEDIA_OUT / "w4")
    with common.Supervisor(bins) as sup:
        client = sup.client()
        sup.workers = common.worker_target(client.status())
        sup.wait_warm(client, sup.workers)
        print(f"clipvisor: {sup.workers} workers, client threads {CLIENT_THREADS}")
        if "W1" in only:
            jobs = plan(client, w1, "video", dict(fps=2.0, max_pixels=448 * 448, factor=28))
            workload("W1", f"720p H.264 {'+'.join(f'{x}s' for x in w1_seconds)} with AAC, fps 2, max_pixels 448*448 -> "
                     f"{jobs[0].size[0]}x{jobs[0].size[1]}", client, sup, jobs, repeat, True)
            one_caller("W1", client, sup, jobs, repeat)
        if "W2" in only:
            jobs = plan(client, w2, "video", dict(fps=30.0))
            workload("W2", f"320x240 3 s clips, all frames ({len(jobs[0].indices)} per clip)", client, sup, jobs,
                     repeat, False)
            one_caller("W2", client, sup, jobs, repeat)
        if "W3" in only:
            jobs = plan(client, [w3], "video", dict(fps=0.25, max_pixels=448 * 448, factor=28))
            workload("W3", f"{Path(w3).name}: fps 0.25 -> {len(jobs[0].indices)} frames {jobs[0].size[0]}x"
                     f"{jobs[0].size[1]}", client, sup, jobs, repeat, False)
            one_caller("W3", client, sup, jobs, repeat)
        if "W4" in only:
            try:
                client.audio(str(w4[0]))
            except (clipvisor.ClipSkipped, clipvisor.ClipvisorError) as exc:
                print(f"\nW4: PENDING: client.audio raised {type(exc).__name__}: {str(exc)[:200]}")
            else:
                jobs = plan(client, w4, "audio", dict(sample_rate=16000, channels=1))
                workload("W4", f"{len(w4)} x 30 s audio (WAV, MP3, M4A) to 16 kHz mono float32", client, sup, jobs,
                         max(repeat, 3), False)
                one_caller("W4", client, sup, jobs, max(repeat, 3))


if __name__ == "__main__":
    main()
