#!/usr/bin/env python3
"""Chaos suite: a real supervisor under damaged media, hangs, crashes, hostile clients and a
SIGKILL, with every promise checked at the end and printed as a table (docs/chaos.md).

    python3 bench/chaos.py                      # medium: 8 clients, ~2 min of load
    python3 bench/chaos.py --long               # 64 clients, >= 10 000 clips, RSS bound enforced
    python3 bench/chaos.py --short --seed 7     # what CI runs (clients/python/tests/test_chaos.py)

Everything is generated at run time from --seed: synthetic clips (ffmpeg CLI), a seeded pick of
clean clips from the shared corpus (MANIFEST.tsv), damaged copies of both (bit flips, zeroed runs,
truncation, swapped halves, duplicated ranges), hangs (a FIFO with no writer, a FIFO whose writer
stalls after some data, the worker faults `spin-on` and `sleep-on`), crashes (`crash-on`,
`abort-on`) and `oom-on` under a small `--worker-memory`. N client processes send random mixes of
video/audio/clip/sample requests through the public Python client (`clipvisor.Client`); some
disconnect mid-request, some read their answers slowly. Half-way the supervisor is SIGKILLed and
restarted on the same socket and skip log.

The throughput phase measures good-clip throughput alone, with 25 % bad clips, and with the
same bad clips plus H concurrent I/O hangs (FIFOs and the sleep fault, fresh paths so quarantine
cannot help). The bad clips are crash faults and damaged copies that the worker alone fails to
decode (most random damage still decodes: such a copy is not a bad clip). Ratios are reported,
never asserted (the goal of issue 13 is >= 0.9 against alone); the run with bad clips and no
hangs separates what the bad clips cost by themselves from what the hangs cost. The good clips
are the catalog's small clips by default (a few frames each, ~3 ms of work: the per-clip fixed
costs weigh most, the worst case), or with `--throughput-source training` natural 5 s 640x360
H.264 clips (bench/media.py) asked at Qwen2.5-VL's 448x448 budget, like a training run's, or
with `--throughput-source training-720p` natural 10 s 720p clips (issue 14's W1 kind) at the
same budget.

Exit status: 0 when every correctness check passed, 1 otherwise (the throughput ratio does not
count; the RSS bound counts only with --long).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))

import numpy as np  # noqa: E402

import clipvisor  # noqa: E402

# Reasons the supervisor must write to the skip log before answering (docs/skip-log.md).
LOGGED_REASONS = {"timeout", "crashed", "out_of_memory", "decode_error", "unsupported", "too_large", "not_found",
                  "permission"}
# What each kind of clip may be answered with. Damaged media may decode (partially) or fail in any
# clip-level way; the check is that the answer is a clip-level one, logged, and on time. A damaged
# copy may also hold fewer frames than a preset asks for (`frames: 4`): that is `invalid_request`
# (detail `frames`), as for a clean clip that short.
EXPECTED = {
    "good": {"ok"},
    "damaged": {"ok", "decode_error", "unsupported", "too_large", "quarantined", "timeout", "crashed",
                "out_of_memory", "invalid_request"},
    "fifo": {"timeout", "quarantined"},
    "stall": {"timeout", "quarantined", "decode_error", "unsupported"},
    "spin": {"timeout", "quarantined"},
    "sleep": {"timeout", "quarantined"},
    "crash": {"crashed", "quarantined"},
    "abort": {"crashed", "quarantined"},
    "oom": {"out_of_memory", "quarantined"},
    "missing": {"not_found"},
}
HANG_KINDS = {"fifo", "stall", "spin", "sleep"}
# Outcomes that are about the service or the caller, not the clip: allowed for any kind.
NEUTRAL = {"cancelled", "unavailable", "overloaded"}
FAULTS = "crash-on=CRASHME,abort-on=ABORTME,oom-on=OOMME,spin-on=SPINME,sleep-on=SLEEPME"

# Request presets: the client call and the equivalent `clipvisor-worker decode` flags.
PRESETS: Dict[str, Dict[str, Any]] = {
    "v1": {"method": "video", "kwargs": {"fps": 2.0, "max_pixels": 20000}, "cli": ["--fps", "2", "--max-pixels", "20000"],
           "sample": {"fps": 2.0, "max_pixels": 20000}, "audio": False},
    "v2": {"method": "video", "kwargs": {"frames": 4, "width": 64, "height": 48},
           "cli": ["--frames", "4", "--width", "64", "--height", "48"], "sample": {"frames": 4, "width": 64, "height": 48},
           "audio": False},
    "a1": {"method": "audio", "kwargs": {"sample_rate": 16000}, "cli": ["--audio", "--no-video"],
           "sample": {"video": False, "audio": True}, "audio": True},
    "c1": {"method": "clip", "kwargs": {"video": {"fps": 1.0, "max_pixels": 20000}, "audio": True, "audio_optional": True},
           "cli": ["--fps", "1", "--max-pixels", "20000", "--audio", "--audio-optional"], "sample": None, "audio": False},
}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    seed: int = 1
    clients: int = 8
    duration: float = 90.0          # seconds of mixed client load (split around the SIGKILL)
    workers: int = 2
    deadline: float = 20.0          # deadline of requests for clips that are not hangs
    hang_deadline: float = 2.0      # deadline of requests for hanging clips
    queue_wait: float = 20.0        # --queue-wait of the supervisor
    margin: float = 10.0            # slack of the "answered within its bound" check
    worker_memory: int = 1024       # --worker-memory (MiB): oom-on hits it quickly
    synthetic: int = 3              # synthetic good clips
    corpus: int = 3                 # clean corpus clips
    damaged: int = 8                # damaged variants
    hangs_per_kind: int = 2
    sample_size: int = 30
    throughput_good: int = 40       # good clips per throughput run (0: skip the phase)
    throughput_hangs: Tuple[int, ...] = (2,)
    throughput_threads: int = 4
    # Rounds of the throughput runs (alone, bad-only, each hang count, in turn): ratios are
    # reported as the median of the rounds', each against its own round's run alone, so that one
    # noisy run on a shared machine does not decide them.
    throughput_rounds: int = 1
    # Output size of the throughput requests: tiny by default (a good clip is ~13 ms of work, so
    # a bad clip's fixed costs weigh most); 200704 (448x448) is Qwen2.5-VL's usual budget.
    throughput_max_pixels: int = 20000
    # What the 25 % bad clips of the throughput runs are: "both" (half damaged copies that fail
    # to decode, half crash faults), "damaged" or "crash".
    bad_mix: str = "both"
    # The good clips of the throughput runs: "catalog" (the small clips above), "training"
    # (natural 5 s 640x360 clips, asked at 448x448) or "training-720p" (natural 10 s 720p clips).
    throughput_source: str = "catalog"
    # The supervisor's `after_refused_media`: "replace" (the default) or "keep".
    after_refused_media: str = "replace"
    kill: bool = True
    long_form: bool = False
    bin_dir: Optional[str] = None
    workdir: Optional[str] = None
    keep: bool = False
    verbose: bool = False

    @staticmethod
    def short(seed: int = 1) -> "Config":
        return Config(seed=seed, clients=8, duration=24.0, synthetic=2, corpus=2, damaged=6, hangs_per_kind=1,
                      sample_size=30, throughput_good=24, throughput_hangs=(2,), throughput_threads=3)

    @staticmethod
    def long(seed: int = 1) -> "Config":
        return Config(seed=seed, clients=64, duration=900.0, workers=max(2, os.cpu_count() or 2), synthetic=6,
                      corpus=8, damaged=24, hangs_per_kind=3, throughput_good=200, throughput_hangs=(2, 8),
                      throughput_threads=8, long_form=True)


def find_binaries(explicit: Optional[str]) -> Tuple[Path, Path]:
    candidates = [explicit, os.path.dirname(os.environ.get("CLIPVISOR_BIN", "")) or None,
                  os.environ.get("CLIPVISOR_BENCH_BIN"), str(ROOT / ".build-bench" / "release"),
                  str(ROOT / ".build" / "release"), str(ROOT / ".build" / "debug")]
    for c in candidates:
        if c and os.access(Path(c) / "clipvisor", os.X_OK) and os.access(Path(c) / "clipvisor-worker", os.X_OK):
            return Path(c) / "clipvisor", Path(c) / "clipvisor-worker"
    raise SystemExit("no build with clipvisor and clipvisor-worker found: run `swift build` (or "
                     "`swift build -c release --scratch-path .build-bench`), or pass --bin-dir DIR")


def corpus_dir() -> Path:
    env = os.environ.get("CLIPVISOR_CORPUS")
    for c in (env, str(ROOT.parent / "shared" / "corpus" / "real"), "/work/shared/corpus/real"):
        if c and os.path.isdir(c):
            return Path(c)
    raise SystemExit("no corpus: set $CLIPVISOR_CORPUS to the shared corpus (../shared/corpus/real)")


# --------------------------------------------------------------------------------------------
# Media: generated from the seed


@dataclasses.dataclass
class Item:
    path: str
    kind: str
    presets: List[str]      # presets this clip is requested with
    note: str = ""


def _ffmpeg(args: List[str]) -> None:
    r = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"] + args, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {r.stderr.strip()[-500:]}")


def synthetic_clips(rng: random.Random, out: Path, count: int) -> List[Item]:
    specs = [
        ("mp4", ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-c:a", "aac"], True),
        ("mkv", ["-c:v", "mpeg4", "-c:a", "libmp3lame"], True),
        ("webm", ["-c:v", "libvpx", "-b:v", "200k", "-deadline", "realtime", "-an"], False),
        ("mov", ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-an"], False),
    ]
    items = []
    for i in range(count):
        ext, codec, audio = specs[i % len(specs)]
        w, h = rng.choice([(160, 120), (176, 144), (128, 96), (192, 108)])
        seconds = rng.choice([1.0, 1.5, 2.0])
        rate = rng.choice([15, 25])
        path = out / f"syn-{i}.{ext}"
        args = ["-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate={rate}:duration={seconds}"]
        if audio:
            args += ["-f", "lavfi", "-i", f"sine=frequency={200 + 100 * i}:sample_rate=44100:duration={seconds}"]
        _ffmpeg(args + codec + ["-shortest", str(path)])
        items.append(Item(str(path), "good", ["v1", "v2", "c1"] + (["a1"] if audio else []), f"testsrc2 {w}x{h} {ext}"))
    return items


def corpus_clips(rng: random.Random, count: int) -> List[Item]:
    base = corpus_dir()
    rows = list(csv.DictReader(open(base / "MANIFEST.tsv"), delimiter="\t"))
    pool = []
    for r in rows:
        m = re.match(r"(\d+)x(\d+)$", r.get("WxH", "-"))
        if r.get("decodes_cleanly") != "yes" or not m or not (base / r["file"]).exists():
            continue
        w, h = int(m.group(1)), int(m.group(2))
        if w < 16 or h < 16 or w * h > 1280 * 720 or int(r["size_bytes"]) > 600_000:
            continue
        pool.append(r)
    pool.sort(key=lambda r: r["file"])
    items = []
    for r in rng.sample(pool, min(count, len(pool))):
        audio = r.get("audio", "-") not in ("-", "")
        items.append(Item(str(base / r["file"]), "good", ["v1", "v2", "c1"] + (["a1"] if audio else []),
                          f"corpus {r['WxH']}"))
    return items


def damage(rng: random.Random, data: bytes) -> Tuple[bytes, str]:
    n = len(data)
    how = rng.choice(["bitflip", "zeros", "truncate", "swap", "duplicate"])
    b = bytearray(data)
    if how == "bitflip":
        flips = rng.randint(1, 64)
        for _ in range(flips):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"bitflip x{flips}"
    if how == "zeros":
        length = rng.randint(64, max(65, n // 8))
        at = rng.randrange(max(1, n - length))
        b[at:at + length] = bytes(length)
        return bytes(b), f"zeros {length}@{at}"
    if how == "truncate":
        at = rng.randint(n // 20, n - 1)
        return bytes(b[:at]), f"truncate at {at}/{n}"
    if how == "swap":
        return bytes(b[n // 2:] + b[:n // 2]), "swapped halves"
    length = rng.randint(64, max(65, n // 4))
    at = rng.randrange(max(1, n - length))
    to = rng.randrange(n)
    return bytes(b[:to] + b[at:at + length] + b[to:]), f"duplicated {length}@{at} to {to}"


def damaged_clips(rng: random.Random, out: Path, sources: List[Item], count: int, prefix: str = "dmg") -> List[Item]:
    items = []
    for i in range(count):
        src = rng.choice(sources)
        data, note = damage(rng, Path(src.path).read_bytes())
        ext = os.path.splitext(src.path)[1]
        path = out / f"{prefix}-{i}{ext}"
        path.write_bytes(data)
        items.append(Item(str(path), "damaged", list(src.presets), f"{note} of {os.path.basename(src.path)}"))
    return items


def fault_clips(out: Path, source: Item, per_kind: int, tag: str = "") -> List[Item]:
    """Real files whose names carry a fault marker: the worker looks at the file (so quarantine
    works on them) and then crashes, aborts, spins, sleeps or runs out of memory."""
    data = Path(source.path).read_bytes()
    ext = os.path.splitext(source.path)[1]
    items = []
    for kind, marker in (("crash", "CRASHME"), ("abort", "ABORTME"), ("oom", "OOMME"), ("spin", "SPINME"),
                         ("sleep", "SLEEPME")):
        for i in range(per_kind):
            path = out / f"{kind}-{marker}{tag}-{i}{ext}"
            path.write_bytes(data)
            items.append(Item(str(path), kind, ["v1"], f"fault {marker}"))
    return items


class StalledWriters:
    """Writers for the `stall` FIFOs: each sends the start of a real clip, then stalls with the FIFO
    open until the reader goes away (the worker is killed), and starts over for the next reader."""

    def __init__(self, fifos: Sequence[str], head: bytes):
        self.fifos = list(fifos)
        self.head = head
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(p,), daemon=True) for p in self.fifos]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _serve(self, path: str) -> None:
        while not self.stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader opens it
            except OSError:
                self.stop.wait(0.02)
                continue
            try:
                os.set_blocking(fd, True)
                try:
                    os.write(fd, self.head)
                except OSError:
                    continue
                poller = select.poll()
                poller.register(fd, select.POLLERR | select.POLLHUP)
                while not self.stop.is_set() and not poller.poll(50):
                    pass  # stalled: the reader waits for more
            finally:
                os.close(fd)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)


def make_fifo(path: Path) -> str:
    os.mkfifo(path, 0o644)
    return str(path)


@dataclasses.dataclass
class Catalog:
    items: List[Item]
    good: List[Item]
    writers: Optional[StalledWriters] = None


def build_catalog(cfg: Config, work: Path) -> Catalog:
    rng = random.Random(cfg.seed)
    media = work / "media"
    media.mkdir()
    good = synthetic_clips(rng, media, cfg.synthetic) + corpus_clips(rng, cfg.corpus)
    items = list(good)
    items += damaged_clips(rng, media, good, cfg.damaged)
    items += fault_clips(media, good[0], cfg.hangs_per_kind)
    stalls = []
    for i in range(cfg.hangs_per_kind):
        items.append(Item(make_fifo(media / f"fifo-nowriter-{i}.mp4"), "fifo", ["v1"], "FIFO, no writer"))
        p = make_fifo(media / f"fifo-stall-{i}.mp4")
        stalls.append(p)
        items.append(Item(p, "stall", ["v1"], "FIFO, writer stalls after 4 KiB"))
    items.append(Item(str(media / "missing.mp4"), "missing", ["v1"], "no such file"))
    writers = StalledWriters(stalls, Path(good[0].path).read_bytes()[:4096]) if stalls else None
    return Catalog(items, good, writers)


# --------------------------------------------------------------------------------------------
# Reference decodes: `clipvisor-worker decode ... --out`, the same request without the supervisor


def tensors_digest(arrays: Sequence[Optional[np.ndarray]]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def result_digest(result: Any) -> str:
    if isinstance(result, clipvisor.Video):
        return tensors_digest([result.frames])
    if isinstance(result, clipvisor.Audio):
        return tensors_digest([result.samples])
    return tensors_digest([result.video.frames if result.video is not None else None,
                           result.audio.samples if result.audio is not None else None])


def direct_digest(worker: Path, path: str, preset: str, out: Path) -> Tuple[Optional[str], str]:
    """(digest, detail) of the worker CLI's decode, or (None, why) when it fails."""
    spec = PRESETS[preset]
    r = subprocess.run([str(worker), "decode", path] + spec["cli"] + ["--out", str(out)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    if r.returncode != 0:
        return None, (r.stderr.strip() or r.stdout.strip())[-300:]
    block = clipvisor.read_block_file(out)
    os.unlink(out)
    t = block.tensors
    if preset == "a1":
        return tensors_digest([t.get("audio")]), ""
    if preset == "c1":
        return tensors_digest([t.get("video"), t.get("audio")]), ""
    return tensors_digest([t.get("video")]), ""


class References:
    """Direct decodes, computed once per (path, preset), in parallel."""

    def __init__(self, worker: Path, work: Path):
        self.worker = worker
        self.dir = work / "refs"
        self.dir.mkdir(exist_ok=True)
        self.cache: Dict[Tuple[str, str], Tuple[Optional[str], str]] = {}

    def compute(self, keys: Sequence[Tuple[str, str]], jobs: int = 2) -> None:
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        lock = threading.Lock()

        def run(i: int) -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    key = todo.pop()
                value = direct_digest(self.worker, key[0], key[1], self.dir / f"ref-{i}.block")
                with lock:
                    self.cache[key] = value

        threads = [threading.Thread(target=run, args=(i,)) for i in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def get(self, path: str, preset: str) -> Tuple[Optional[str], str]:
        if (path, preset) not in self.cache:
            self.compute([(path, preset)], 1)
        return self.cache[(path, preset)]


# --------------------------------------------------------------------------------------------
# The supervisor and what the kernel says about it


class Supervisor:
    def __init__(self, binary: Path, work: Path, cfg: Config):
        self.binary = binary
        self.work = work
        self.cfg = cfg
        self.socket = str(work / "s.sock")
        self.skip_log = str(work / "skips.jsonl")
        self.tmp = work / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = work / "supervisor.log"

    def args(self) -> List[str]:
        return [str(self.binary), "serve", "--socket", self.socket, "--skip-log", self.skip_log,
                "--workers", str(self.cfg.workers), "--queue-wait", f"{self.cfg.queue_wait:g}",
                "--worker-memory", str(self.cfg.worker_memory), "--deadline", f"{self.cfg.deadline:g}",
                "--after-refused-media", self.cfg.after_refused_media]

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        for name in ("state", "run", "home"):
            (self.work / name).mkdir(exist_ok=True)
        env.update(XDG_STATE_HOME=str(self.work / "state"), XDG_RUNTIME_DIR=str(self.work / "run"),
                   HOME=str(self.work / "home"), TMPDIR=str(self.tmp), CLIPVISOR_TEST_FAULTS=FAULTS)
        env.pop("CLIPVISOR_SOCKET", None)
        env.pop("NOTIFY_SOCKET", None)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                     start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                with clipvisor.Client(self.socket, spawn=False, connect_timeout=1.0) as c:
                    st = c.status()
                    if st.get("workers", {}).get("live", 0) >= 1:
                        return
            except clipvisor.ClipvisorError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"supervisor did not start (exit {self.proc.poll()}):\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_bytes()[-3000:].decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> Dict[str, Any]:
        with clipvisor.Client(self.socket, spawn=False, connect_timeout=5.0) as c:
            return c.status()

    def workers(self) -> List[int]:
        return children(self.pid)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # the supervisor alone: its workers must follow by themselves (PDEATHSIG)
        self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None


def proc_stat(pid: int) -> Optional[Tuple[str, int]]:
    """(state, ppid) of a process, None when gone."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def all_pids() -> List[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def children(pid: int) -> List[int]:
    out = []
    for p in all_pids():
        s = proc_stat(p)
        if s and s[1] == pid:
            out.append(p)
    return out


def zombies_of(parents: Sequence[int]) -> List[int]:
    parents = set(parents)
    return [p for p in all_pids() if (s := proc_stat(p)) and s[0] == "Z" and s[1] in parents]


def fd_links(pid: int) -> List[str]:
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# Raw protocol (for the clients the public API cannot be: disconnecting, slow readers)


def send_msg(sock: socket.socket, obj: Any) -> None:
    body = json.dumps(obj).encode()
    sock.sendall(struct.pack("<I", len(body)) + body)


def recv_exact(sock: socket.socket, n: int, fds: List[int]) -> bytes:
    buf = b""
    while len(buf) < n:
        data, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), 4)
        fds.extend(got)
        if not data:
            raise ConnectionError("closed")
        buf += data
    return buf


def recv_msg(sock: socket.socket) -> Tuple[Dict[str, Any], List[int]]:
    fds: List[int] = []
    (n,) = struct.unpack("<I", recv_exact(sock, 4, fds))
    return json.loads(recv_exact(sock, n, fds)), fds


def raw_connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    send_msg(sock, {"op": "hello", "protocol": 1, "client": "chaos", "pid": os.getpid()})
    hello, _ = recv_msg(sock)
    if not hello.get("ok"):
        raise ConnectionError(f"hello refused: {hello}")
    return sock


# --------------------------------------------------------------------------------------------
# Client processes


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, clipvisor.ClipSkipped):
        return exc.reason
    if isinstance(exc, clipvisor.Overloaded):
        return "overloaded"
    if isinstance(exc, clipvisor.SupervisorUnavailable):
        return "unavailable"
    if isinstance(exc, clipvisor.SupervisorTimeout):
        return "client_timeout"
    return f"error:{type(exc).__name__}:{exc}"[:200]


def client_main(index: int, cfg: Config, items: List[Item], sock_path: str, out_path: str, go: Any,
                stop_at: float) -> None:
    """One client process: random requests until `stop_at` (wall clock); one JSON line per request."""
    rng = random.Random(cfg.seed * 7919 + index)
    weights = {"good": 60, "damaged": 18, "crash": 2, "abort": 2, "oom": 2, "spin": 2, "sleep": 2, "fifo": 2,
               "stall": 2, "missing": 2}
    by_kind: Dict[str, List[Item]] = {}
    for it in items:
        by_kind.setdefault(it.kind, []).append(it)
    kinds = [k for k in weights if k in by_kind]

    def pick() -> Item:
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        return rng.choice(by_kind[kind])

    def deadline_of(item: Item) -> float:
        return cfg.hang_deadline if item.kind in HANG_KINDS else cfg.deadline

    out = open(out_path, "a")
    client = clipvisor.Client(sock_path, spawn=False, connect_timeout=2.0, margin=cfg.queue_wait + cfg.margin)
    go.wait()
    n = 0
    while time.time() < stop_at:
        n += 1
        tag = f"chaos-c{index}-r{n}"
        op = rng.choices(["single", "sample", "disconnect", "slow"], [55, 30, 8, 7])[0]
        rec: Dict[str, Any] = {"client": index, "n": n, "tag": tag, "op": op, "t0": time.time(), "clips": []}
        mono0 = time.monotonic()
        try:
            if op == "single":
                item = pick()
                preset = rng.choice(item.presets)
                spec = PRESETS[preset]
                rec["bound"] = deadline_of(item) + cfg.queue_wait + cfg.margin
                clip = {"path": item.path, "kind": item.kind, "preset": preset}
                rec["clips"].append(clip)
                try:
                    res = getattr(client, spec["method"])(item.path, deadline=deadline_of(item), tag=tag, **spec["kwargs"])
                    clip.update(outcome="ok", digest=result_digest(res), partial=bool(res.partial))
                except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
                    clip["outcome"] = outcome_of(exc)
                clip["t_answer"] = time.time()
                rec["outcome"] = clip["outcome"]
            elif op == "sample":
                aon = rng.random() < 0.5
                chosen = [pick() for _ in range(cfg.sample_size)]
                specs = []
                for item in chosen:
                    preset = rng.choice([p for p in item.presets if PRESETS[p]["sample"] is not None])
                    specs.append(dict(PRESETS[preset]["sample"], path=item.path, deadline=deadline_of(item)))
                    rec["clips"].append({"path": item.path, "kind": item.kind, "preset": preset})
                rec["all_or_nothing"] = aon
                rec["bound"] = max(deadline_of(i) for i in chosen) + cfg.queue_wait + cfg.margin
                try:
                    results = client.sample(specs, all_or_nothing=aon, tag=tag)
                    now = time.time()
                    for clip, res in zip(rec["clips"], results):
                        clip["t_answer"] = now
                        if isinstance(res, clipvisor.ClipSkipped):
                            clip["outcome"] = res.reason
                        else:
                            clip.update(outcome="ok", digest=result_digest(res), partial=bool(res.partial))
                    rec["outcome"] = "ok"
                except BaseException as exc:  # noqa: BLE001
                    rec["outcome"] = outcome_of(exc)
                    idx = getattr(exc, "clip", None)
                    if isinstance(exc, clipvisor.ClipSkipped) and isinstance(idx, int) and 0 <= idx < len(rec["clips"]):
                        rec["clips"][idx].update(outcome=exc.reason, t_answer=time.time())
            elif op == "disconnect":
                item = pick()
                rec["clips"].append({"path": item.path, "kind": item.kind, "preset": "v1", "outcome": "abandoned"})
                rec["bound"] = 5.0 + cfg.margin
                try:
                    sock = raw_connect(sock_path, 5.0)
                    send_msg(sock, {"op": "decode", "id": 1, "path": item.path, "fps": 2.0, "max_pixels": 20000,
                                    "deadline_ms": int(deadline_of(item) * 1000), "tag": tag})
                    time.sleep(rng.uniform(0.0, 0.4))
                    sock.close()
                    rec["outcome"] = "disconnected"
                except OSError as exc:
                    rec["outcome"] = f"unavailable:{exc}"[:100]
            else:  # slow reader: a whole sample, answers read one at a time with pauses
                goods = by_kind["good"]
                chosen = [rng.choice(goods) for _ in range(cfg.sample_size)]
                rec["bound"] = cfg.deadline + cfg.queue_wait + cfg.margin + 0.1 * cfg.sample_size
                try:
                    sock = raw_connect(sock_path, rec["bound"])
                    send_msg(sock, {"op": "sample", "id": 1, "all_or_nothing": False, "tag": tag, "fps": 2.0,
                                    "max_pixels": 20000, "deadline_ms": int(cfg.deadline * 1000),
                                    "clips": [{"path": i.path} for i in chosen]})
                    answers = 0
                    while True:
                        time.sleep(0.1)
                        msg, fds = recv_msg(sock)
                        for fd in fds:
                            os.close(fd)
                        if msg.get("done"):
                            rec["outcome"] = "ok" if msg.get("ok") else (msg.get("error") or {}).get("reason", "failed")
                            break
                        answers += 1
                    rec["answers"] = answers
                    sock.close()
                except (OSError, ConnectionError, ValueError) as exc:
                    rec["outcome"] = f"unavailable:{exc}"[:100]
        except BaseException as exc:  # noqa: BLE001
            rec["outcome"] = f"error:{type(exc).__name__}:{exc}"[:200]
        rec["elapsed"] = time.monotonic() - mono0
        rec["t1"] = time.time()
        out.write(json.dumps(rec) + "\n")
        out.flush()
        if rec.get("outcome") == "unavailable" or str(rec.get("outcome", "")).startswith("unavailable"):
            time.sleep(0.2)  # the supervisor is being restarted: back off a little
    client.close()
    out.close()


# --------------------------------------------------------------------------------------------
# Throughput: good clips alone vs with 25 % bad clips and H concurrent I/O hangs


_THROUGHPUT_CANDIDATES: Dict[str, List[Item]] = {}


def training_clips(source: str, count: int = 6) -> List[Item]:
    """Natural-looking H.264 clips (bench/media.py; made once, then cached): 5 s 640x360 for
    "training", 10 s 720p for "training-720p"."""
    sys.path.insert(0, str(HERE))
    import media  # noqa: PLC0415  (bench/media.py, only this mode needs it)
    seconds, size = (10, "1280x720") if source == "training-720p" else (5, "640x360")
    return [Item(str(media.natural_clip(seconds, size=size, seed=11 + i, audio=False)), "good", ["v1"],
                 f"natural {size} {seconds} s") for i in range(count)]


def throughput_candidates(cfg: Config, sup: Supervisor, cat: Catalog) -> List[Item]:
    """The good clips the throughput request suits (fps=2, at least 4 frames): a clean 1-frame
    clip of the corpus is `invalid_request` for it, which is right but is not throughput."""
    key = f"{sup.socket}:{cfg.throughput_source}"
    if key not in _THROUGHPUT_CANDIDATES:
        sources = (training_clips(cfg.throughput_source) if cfg.throughput_source.startswith("training")
                   else list({it.path: it for it in cat.good}.values()))
        usable = []
        with clipvisor.Client(sup.socket, spawn=False, connect_timeout=5.0) as c:
            for item in sources:
                try:
                    c.video(item.path, fps=2.0, max_pixels=cfg.throughput_max_pixels, deadline=cfg.deadline)
                    usable.append(item)
                except (clipvisor.ClipSkipped, clipvisor.ClipvisorError):
                    pass
        if cfg.throughput_source.startswith("training") and len(usable) < len(sources):
            raise RuntimeError(f"only {len(usable)} of {len(sources)} training clips decode; see the supervisor log")
        _THROUGHPUT_CANDIDATES[key] = usable or sources
    return _THROUGHPUT_CANDIDATES[key]


_THROUGHPUT_BAD: Dict[str, List[Path]] = {}


def failing_damaged(cfg: Config, sources: List[Item], work: Path, count: int, seed: int) -> List[Path]:
    """`count` damaged copies of the good clips `sources` that the worker alone cannot decode with the
    throughput request (`clipvisor-worker decode --fps 2 --max-pixels N` exits 1). About
    two thirds of random damage still decodes: such a copy is a good clip by another name, not
    one of the 25 % bad clips the throughput goal is about. Made once per run; each phase copies
    them to fresh paths."""
    key = f"{seed}:{count}:{cfg.throughput_source}"
    if key in _THROUGHPUT_BAD:
        return _THROUGHPUT_BAD[key]
    _, worker = find_binaries(cfg.bin_dir)
    rng = random.Random(seed)
    out = work / f"tp-bad-{cfg.throughput_source}"
    out.mkdir(exist_ok=True)
    found: List[Path] = []
    attempts = 0
    while len(found) < count and attempts < 20 * count:
        batch = damaged_clips(rng, out, sources, 8, prefix=f"cand{attempts}")
        attempts += len(batch)
        for item in batch:
            r = subprocess.run([str(worker), "decode", item.path, "--fps", "2", "--max-pixels", str(cfg.throughput_max_pixels)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
            if r.returncode == 1 and len(found) < count:
                found.append(Path(item.path))
            else:
                os.unlink(item.path)
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} of {attempts} damaged copies fail to decode; wanted {count}")
    _THROUGHPUT_BAD[key] = found
    return found


def throughput(cfg: Config, sup: Supervisor, cat: Catalog, work: Path, hangs: int, with_bad: bool,
               rng: random.Random, label: str) -> Dict[str, Any]:
    """Good clips from 4 client threads, optionally shuffled with 25 % bad clips (`bad_mix`:
    damaged copies that fail to decode, crash faults, or half of each) and with `hangs` I/O
    hangs kept in flight beside them."""
    candidates = throughput_candidates(cfg, sup, cat)
    goods = [rng.choice(candidates) for _ in range(cfg.throughput_good)]
    jobs: List[Tuple[str, Item]] = [("good", g) for g in goods]
    phase_dir = work / f"tp-{label}"
    phase_dir.mkdir()
    bad_outcomes: Dict[str, int] = {}
    if with_bad:
        wanted = max(1, cfg.throughput_good // 3)  # 25 % of all clips
        damaged_count = {"both": wanted // 2, "damaged": wanted, "crash": 0}[cfg.bad_mix]
        bad = []
        if damaged_count:
            for i, source in enumerate(failing_damaged(cfg, candidates, work, damaged_count, cfg.seed + 23)):
                copy = phase_dir / f"tpd-{i}{source.suffix}"  # a fresh path: quarantine cannot answer for it
                shutil.copyfile(source, copy)
                bad.append(Item(str(copy), "damaged", ["v1"]))
        for i in range(wanted - len(bad)):
            crash = Item(str(phase_dir / f"tp-CRASHME-{i}.mp4"), "crash", ["v1"])
            shutil.copyfile(candidates[0].path, crash.path)
            bad.append(crash)
        jobs += [("bad", b) for b in bad]
        rng.shuffle(jobs)
    lock = threading.Lock()
    done_good: List[float] = []
    latencies: List[float] = []
    errors: List[str] = []
    queue = list(jobs)
    finished = threading.Event()
    t0 = time.monotonic()

    def worker() -> None:
        with clipvisor.Client(sup.socket, spawn=False, connect_timeout=5.0) as c:
            while True:
                with lock:
                    if not queue:
                        return
                    kind, item = queue.pop(0)
                s = time.monotonic()
                outcome = "decoded"
                try:
                    c.video(item.path, fps=2.0, max_pixels=cfg.throughput_max_pixels, deadline=cfg.deadline)
                except (clipvisor.ClipSkipped, clipvisor.ClipvisorError) as exc:
                    outcome = getattr(exc, "reason", type(exc).__name__)
                    if kind == "good":
                        errors.append(f"{item.path}: {exc}")
                if kind == "bad":
                    with lock:
                        bad_outcomes[outcome] = bad_outcomes.get(outcome, 0) + 1
                if kind == "good":
                    with lock:
                        done_good.append(time.monotonic())
                        latencies.append(time.monotonic() - s)

    hang_count = [0]

    def hanger(i: int) -> None:
        """Keeps one I/O hang in flight: fresh FIFOs and sleep-fault files, so quarantine never helps."""
        with clipvisor.Client(sup.socket, spawn=False, connect_timeout=5.0) as c:
            n = 0
            while not finished.is_set():
                n += 1
                if (i + n) % 2:
                    path = make_fifo(phase_dir / f"hang-{i}-{n}.mp4")
                else:
                    path = str(phase_dir / f"hang-SLEEPME-{i}-{n}.mp4")
                    shutil.copyfile(cat.good[0].path, path)
                try:
                    c.video(path, fps=2.0, max_pixels=cfg.throughput_max_pixels, deadline=cfg.hang_deadline)
                except (clipvisor.ClipSkipped, clipvisor.ClipvisorError):
                    pass
                hang_count[0] += 1

    hangers = [threading.Thread(target=hanger, args=(i,), daemon=True) for i in range(hangs)]
    for t in hangers:
        t.start()
    if hangs:
        time.sleep(0.3)  # the hangs take their workers first
        t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(cfg.throughput_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finished.set()
    wall = (max(done_good) if done_good else time.monotonic()) - t0
    for t in hangers:
        t.join(cfg.hang_deadline + cfg.queue_wait + cfg.margin)
    latencies.sort()
    return {"label": label, "hangs": hangs, "good": len(goods), "bad": len(jobs) - len(goods), "wall_s": wall,
            "good_per_s": len(done_good) / wall if wall > 0 else 0.0,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0,
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0,
            "good_errors": errors[:5], "good_failed": len(errors), "hang_requests": hang_count[0],
            "bad_outcomes": bad_outcomes}


# --------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    measured: str
    required: bool = True


class Report:
    def __init__(self) -> None:
        self.checks: List[Check] = []
        self.info: Dict[str, Any] = {}
        self.problems: List[str] = []

    def add(self, name: str, ok: bool, measured: str, required: bool = True) -> None:
        self.checks.append(Check(name, ok, measured, required))

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 10
        lines = [f"{'check':<{width}}  result  measured", f"{'-' * width}  ------  --------"]
        for c in self.checks:
            verdict = ("PASS" if c.ok else "FAIL") if c.required else ("ok" if c.ok else "below")
            lines.append(f"{c.name:<{width}}  {verdict:<6}  {c.measured}")
        for k, v in self.info.items():
            lines.append(f"  {k}: {v}")
        if self.problems:
            lines.append("problems (first 20):")
            lines += [f"  - {p}" for p in self.problems[:20]]
        return "\n".join(lines)


def read_skip_log(path: str) -> List[Dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def parse_ts(ts: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def settle(sup: Supervisor, live: int, timeout: float = 15.0) -> Dict[str, Any]:
    """Status once nothing is busy or queued and the pool is back to `live` workers."""
    end = time.monotonic() + timeout
    st: Dict[str, Any] = {}
    while time.monotonic() < end:
        st = sup.status()
        w = st.get("workers", {})
        busy = [x for x in w.get("list", []) if x.get("state") not in ("idle",)]
        if not busy and st.get("queue", {}).get("length", 0) == 0 and w.get("live") == live \
                and st.get("memory", {}).get("blocks_unread", 0) == 0:
            time.sleep(0.3)
            return st
        time.sleep(0.1)
    return st


def snapshot(sup: Supervisor) -> Dict[str, Any]:
    pids = [sup.pid] + sup.workers()
    links = {p: fd_links(p) for p in pids}
    return {"sup_fds": len(links[sup.pid]), "memfds": sum(1 for p in pids for l in links[p] if "memfd:" in l),
            "workers": len(pids) - 1, "rss_kib": rss_kib(sup.pid)}


def run(cfg: Config, log: Any = print) -> Report:
    report = Report()
    supervisor_bin, worker_bin = find_binaries(cfg.bin_dir)
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    shm_before = set(os.listdir("/dev/shm"))
    t_start = time.monotonic()
    log(f"chaos: seed {cfg.seed}, {cfg.clients} clients, {cfg.duration:g} s, workers {cfg.workers}, "
        f"binaries {supervisor_bin.parent}, workdir {work}")
    cat = build_catalog(cfg, work)
    refs = References(worker_bin, work)
    # "Clean" means: the worker alone decodes it with that preset. A clean clip the worker itself
    # refuses is dropped from the catalog (and said), so the check below is about the supervisor.
    refs.compute([(it.path, p) for it in cat.good for p in it.presets])
    for it in cat.good:
        bad = [p for p in it.presets if refs.get(it.path, p)[0] is None]
        for p in bad:
            report.problems.append(f"note: {it.path} preset {p} fails without the supervisor too "
                                   f"({refs.get(it.path, p)[1][:120]}); not requested")
        it.presets = [p for p in it.presets if p not in bad]
    cat.items = [it for it in cat.items if it.presets]
    counts: Dict[str, int] = {}
    for it in cat.items:
        counts[it.kind] = counts.get(it.kind, 0) + 1
    report.info["catalog"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    log(f"chaos: catalog {report.info['catalog']} ({time.monotonic() - t_start:.1f} s)")

    sup = Supervisor(supervisor_bin, work, cfg)
    sup.start()
    base = settle(sup, sup.status()["workers"]["live"])
    live_idle = base["workers"]["live"]
    fresh = snapshot(sup)  # a fresh supervisor, idle with its pool warm: the fd reference

    # -- throughput phase ---------------------------------------------------------------------
    tp_results = []
    if cfg.throughput_good:
        # One dict per round: "alone", "bad-only", "hangs2"... -> that run's result.
        rounds: List[Dict[str, Dict[str, Any]]] = []
        for k in range(cfg.throughput_rounds):
            suffix = f"-r{k + 1}" if cfg.throughput_rounds > 1 else ""
            if k:
                settle(sup, live_idle, 30)
            rnd = {"alone": throughput(cfg, sup, cat, work, 0, False, random.Random(cfg.seed + 17), "alone" + suffix)}
            settle(sup, live_idle, 30)
            # The same bad clips without hangs: what the bad clips cost by themselves (a damaged
            # copy that still decodes is a whole decode), so the hang runs can be read against it.
            rnd["bad-only"] = throughput(cfg, sup, cat, work, 0, True, random.Random(cfg.seed + 17),
                                         "bad-only" + suffix)
            for h in cfg.throughput_hangs:
                settle(sup, live_idle, 30)
                rnd[f"hangs{h}"] = throughput(cfg, sup, cat, work, h, True, random.Random(cfg.seed + 17),
                                              f"hangs{h}{suffix}")
            rounds.append(rnd)
            tp_results.extend(rnd.values())
        report.info["after_refused_media"] = cfg.after_refused_media
        report.info["throughput good clips"] = (f"{cfg.throughput_source}, fps 2, max_pixels "
                                                f"{cfg.throughput_max_pixels}")
        report.info["throughput bad clips"] = {"both": "half damaged copies that fail, half crash faults",
                                               "damaged": "damaged copies that fail", "crash": "crash faults"}[cfg.bad_mix]
        report.info["throughput rounds"] = str(cfg.throughput_rounds)
        for r in tp_results:
            log(f"chaos: throughput {r['label']}: {r['good']} good + {r['bad']} bad clips {r['bad_outcomes']}, "
                f"{r['hangs']} hangs: {r['good_per_s']:.2f} good clips/s, p50 {r['p50_ms']:.0f} ms, "
                f"p99 {r['p99_ms']:.0f} ms")

        def ratio(r: Dict[str, Any], base: Dict[str, Any]) -> float:
            return r["good_per_s"] / base["good_per_s"] if base["good_per_s"] else 0.0

        def measured(label: str, base_label: str) -> Tuple[float, str]:
            """The ratio of `label`'s runs to `base_label`'s (the median over rounds) and its text."""
            pairs = [(rnd[label], rnd[base_label]) for rnd in rounds]
            ratios = [ratio(r, base) for r, base in pairs]
            mid = statistics.median(ratios)
            if len(pairs) == 1:
                r, base = pairs[0]
                return mid, (f"{mid:.3g}x ({r['good_per_s']:.2f} vs {base['good_per_s']:.2f} clips/s; "
                             f"p99 {r['p99_ms']:.0f} vs {base['p99_ms']:.0f} ms)")
            return mid, (f"{mid:.3g}x median of {len(pairs)} rounds ({min(ratios):.3g}-{max(ratios):.3g}x; "
                         f"{statistics.median(r['good_per_s'] for r, _ in pairs):.2f} vs "
                         f"{statistics.median(b['good_per_s'] for _, b in pairs):.2f} clips/s)")

        value, text = measured("bad-only", "alone")
        report.add("good-clip throughput, 25% bad clips, no hangs vs alone (their own decode cost)",
                   value >= 0.9, text, required=False)
        for h in cfg.throughput_hangs:
            value, text = measured(f"hangs{h}", "alone")
            report.add(f"good-clip throughput, 25% bad + {h} I/O hangs vs alone (goal >= 0.9)",
                       value >= 0.9, text, required=False)
            value, text = measured(f"hangs{h}", "bad-only")
            report.add(f"good-clip throughput, 25% bad + {h} I/O hangs vs 25% bad alone (the hangs' cost)",
                       value >= 0.9, text, required=False)
        for r in tp_results:
            report.info[f"throughput {r['label']}"] = json.dumps(r)
        failed_good = sum(r["good_failed"] for r in tp_results)
        example = next((r["good_errors"][:1] for r in tp_results if r["good_errors"]), [])
        report.add("throughput phase: every good clip decoded", failed_good == 0,
                   f"{failed_good} failed" + (f" e.g. {example}" if failed_good else ""))
        base = settle(sup, live_idle, 30)

    # -- chaos phase --------------------------------------------------------------------------
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    out_dir = work / "clients"
    out_dir.mkdir()
    t_chaos = time.time()
    stop_at = t_chaos + cfg.duration
    procs = [ctx.Process(target=client_main, args=(i, cfg, cat.items, sup.socket, str(out_dir / f"c{i}.jsonl"), go,
                                                   stop_at), daemon=True) for i in range(cfg.clients)]
    for p in procs:
        p.start()
    if cat.writers:
        cat.writers.start()  # threads only after the fork: the clients are forked from one thread
    go.set()
    rss_samples: List[Tuple[float, int, int]] = []   # (time, rss KiB, clips answered by this supervisor)
    killed = False
    kill_info: Dict[str, Any] = {}
    quarantine_probe: Optional[Item] = next((i for i in cat.items if i.kind == "crash"), None)
    crashed_before_kill = False
    max_bound = max(cfg.deadline, cfg.hang_deadline) + cfg.queue_wait + cfg.margin + 0.1 * cfg.sample_size
    hung_clients = 0
    while any(p.is_alive() for p in procs):
        now = time.time()
        if now > stop_at + max_bound + 30:  # a client stuck past every bound: a hang, reported below
            hung_clients = sum(1 for p in procs if p.is_alive())
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
        if cfg.kill and not killed and now >= t_chaos + cfg.duration * 0.45:
            if quarantine_probe is not None:
                try:
                    with clipvisor.Client(sup.socket, spawn=False, connect_timeout=5.0) as c:
                        c.video(quarantine_probe.path, fps=2.0, max_pixels=20000, deadline=cfg.deadline)
                except clipvisor.ClipSkipped as exc:
                    crashed_before_kill = exc.reason in ("crashed", "quarantined")
                except clipvisor.ClipvisorError:
                    pass
            workers = sup.workers()
            t_kill = time.monotonic()
            sup.kill()
            gone_after = None
            while time.monotonic() - t_kill < 5.0:
                alive = [w for w in workers if (s := proc_stat(w)) is not None and s[0] != "Z"]
                if not alive:
                    gone_after = time.monotonic() - t_kill
                    break
                time.sleep(0.005)
            leftover = [w for w in workers if proc_stat(w) is not None and proc_stat(w)[0] != "Z"]
            for w in leftover:
                os.kill(w, signal.SIGKILL)
            kill_info = {"workers": len(workers), "gone_s": gone_after, "leftover": len(leftover)}
            time.sleep(0.3)  # clients see the socket go away
            sup.start()
            kill_info["restart_s"] = time.monotonic() - t_kill
            killed = True
            if quarantine_probe is not None:
                try:
                    with clipvisor.Client(sup.socket, spawn=False, connect_timeout=5.0) as c:
                        c.video(quarantine_probe.path, fps=2.0, max_pixels=20000, deadline=cfg.deadline)
                    kill_info["quarantine_after_restart"] = "ok (decoded!)"
                except clipvisor.ClipSkipped as exc:
                    kill_info["quarantine_after_restart"] = exc.reason
                except clipvisor.ClipvisorError as exc:
                    kill_info["quarantine_after_restart"] = outcome_of(exc)
        if killed or not cfg.kill:
            try:
                st = sup.status()
                c = st.get("counters", {})
                answered = c.get("decoded", 0) + sum((c.get("skipped") or {}).values())
                rss_samples.append((now, rss_kib(sup.pid), answered))
            except clipvisor.ClipvisorError:
                pass
        time.sleep(0.5)
    for p in procs:
        p.join()
    if cat.writers:
        cat.writers.close()
    chaos_wall = time.time() - t_chaos

    # -- checks -------------------------------------------------------------------------------
    records: List[Dict[str, Any]] = []
    for i in range(cfg.clients):
        try:
            with open(out_dir / f"c{i}.jsonl") as f:
                records += [json.loads(line) for line in f]
        except OSError:
            report.problems.append(f"client {i} wrote no results")
    exit_codes = [p.exitcode for p in procs]
    report.add("client processes exited cleanly, none hung", all(c == 0 for c in exit_codes) and not hung_clients,
               f"exit codes {sorted(set(map(str, exit_codes)))}, {hung_clients} killed after every bound")
    clips = [c for r in records for c in r["clips"] if "outcome" in c and r["op"] in ("single", "sample")]
    n_clips = len(clips)
    by_outcome: Dict[str, int] = {}
    for c in clips:
        by_outcome[c["outcome"]] = by_outcome.get(c["outcome"], 0) + 1
    ops = ", ".join(f"{k} {sum(1 for r in records if r['op'] == k)}" for k in ("single", "sample", "disconnect", "slow"))
    report.info["requests"] = f"{len(records)} ({ops})"
    report.info["clip answers"] = f"{n_clips}: " + ", ".join(f"{k} {v}" for k, v in sorted(by_outcome.items()))
    by_kind: Dict[str, Dict[str, int]] = {}
    for c in clips:
        by_kind.setdefault(c["kind"], {}).setdefault(c["outcome"], 0)
        by_kind[c["kind"]][c["outcome"]] += 1
    report.info["answers by kind"] = "; ".join(
        f"{k}: " + ", ".join(f"{o} {n}" for o, n in sorted(v.items())) for k, v in sorted(by_kind.items()))

    late = [r for r in records if r["elapsed"] > r.get("bound", 0)]
    worst = max((r["elapsed"] - r.get("bound", 0) for r in records), default=0.0)
    report.add("every request answered within its bound", not late,
               f"{len(records) - len(late)}/{len(records)} (worst slack {-worst:.1f} s)")
    for r in late[:5]:
        report.problems.append(f"late: {r['tag']} {r['op']} took {r['elapsed']:.1f} s > bound {r.get('bound')}: {r.get('outcome')}")
    errors = [r for r in records if str(r.get("outcome", "")).startswith(("error:", "client_timeout"))]
    report.add("no client-side errors or hangs (only clip skips, Overloaded, SupervisorUnavailable)", not errors,
               f"{len(errors)} errors")
    for r in errors[:5]:
        report.problems.append(f"client error: {r['tag']} {r['op']}: {r['outcome']}")
    wrong = [c for c in clips if c["outcome"] not in EXPECTED[c["kind"]] | NEUTRAL]
    report.add("every clip answered with a reason its kind allows", not wrong, f"{len(wrong)} unexpected")
    for c in wrong[:8]:
        report.problems.append(f"unexpected: {c['kind']} {c['path']} ({c['preset']}) -> {c['outcome']}")
    slow = [r for r in records if r["op"] == "slow"]
    slow_bad = [r for r in slow if r.get("outcome") not in ("ok",) and not str(r.get("outcome")).startswith("unavailable")]
    report.add("slow readers get every answer", not slow_bad,
               f"{len(slow) - len(slow_bad)}/{len(slow)} samples complete")
    # Bytes: every decoded clip equals the worker's own decode of the same request.
    decoded = [c for c in clips if c["outcome"] == "ok"]
    refs.compute([(c["path"], c["preset"]) for c in decoded])
    mismatched = [c for c in decoded if refs.get(c["path"], c["preset"])[0] != c["digest"]]
    good_ok = sum(1 for c in decoded if c["kind"] == "good")
    good_all = sum(1 for c in clips if c["kind"] == "good")
    report.add("every decoded clip's bytes equal a direct worker decode", not mismatched,
               f"{len(decoded) - len(mismatched)}/{len(decoded)} equal ({good_ok}/{good_all} clean answers decoded, "
               f"the rest cancelled/unavailable/overloaded)")
    for c in mismatched[:5]:
        report.problems.append(f"bytes differ: {c['kind']} {c['path']} {c['preset']}: {c['digest']} vs "
                               f"{refs.get(c['path'], c['preset'])}")
    # Skip log: a record with the right reason, path and tag, written before the answer.
    skips = read_skip_log(sup.skip_log)
    index: Dict[Tuple[str, str, str], List[float]] = {}
    for s in skips:
        if "reason" in s and s.get("tag"):
            index.setdefault((s["path"], s["reason"], s["tag"]), []).append(parse_ts(s["ts"]))
    logged = [(r, c) for r in records for c in r["clips"] if c.get("outcome") in LOGGED_REASONS]
    missing = [(r, c) for r, c in logged if not index.get((c["path"], c["outcome"], r["tag"]))]
    after = [(r, c) for r, c in logged if index.get((c["path"], c["outcome"], r["tag"]))
             and min(index[(c["path"], c["outcome"], r["tag"])]) > c["t_answer"] + 0.002]
    report.add("every clip-level skip in the skip log, right reason, before its answer", not missing and not after,
               f"{len(logged) - len(missing) - len(after)}/{len(logged)} ({len(missing)} missing, {len(after)} late)")
    for r, c in (missing + after)[:5]:
        report.problems.append(f"skip log: no timely record for {c['path']} {c['outcome']} tag {r['tag']}")
    # The SIGKILL.
    if cfg.kill:
        gone = kill_info.get("gone_s")
        report.add("SIGKILL: the old supervisor's workers gone within 1 s", gone is not None and gone <= 1.0,
                   f"{kill_info.get('workers')} workers gone in {gone * 1000:.0f} ms" if gone is not None
                   else f"{kill_info.get('leftover')} still alive after 5 s")
        unavailable = sum(1 for r in records if str(r.get("outcome", "")).startswith("unavailable"))
        report.info["requests failed SupervisorUnavailable (restart)"] = unavailable
        q = kill_info.get("quarantine_after_restart")
        report.add("restarted supervisor rebuilt quarantine from the log", crashed_before_kill and q == "quarantined",
                   f"crash clip before kill: {'crashed' if crashed_before_kill else 'not crashed'}; after restart: {q}")
    # Resources of the (restarted) supervisor.
    end = settle(sup, live_idle, 30)
    snap_end = snapshot(sup)
    pids_now = [sup.pid] + sup.workers()
    zombies = zombies_of(pids_now)
    report.add("zero zombies (children of the supervisor and its workers)", not zombies, f"{len(zombies)}")
    report.add("zero leftover memfds (supervisor and workers, idle)", snap_end["memfds"] == 0,
               f"{snap_end['memfds']} memfds; blocks_unread {end.get('memory', {}).get('blocks_unread')}, "
               f"bytes held {end.get('memory', {}).get('block_bytes_held')}")
    tmp_left = os.listdir(sup.tmp)
    shm_new = sorted(set(os.listdir("/dev/shm")) - shm_before)
    report.add("zero leftover temp files (supervisor TMPDIR, /dev/shm)", not tmp_left and not shm_new,
               f"tmp {tmp_left[:3]}, /dev/shm {shm_new[:3]}")
    # RSS after warm-up.
    if rss_samples:
        answered_total = rss_samples[-1][2] - rss_samples[0][2]
        warm_idx = max(0, len(rss_samples) // 4)
        warm_rss = rss_samples[warm_idx][1]
        peak = max(s[1] for s in rss_samples[warm_idx:])
        growth = (peak - warm_rss) / 1024
        last = (rss_samples[-1][1] - warm_rss) / 1024
        enough = answered_total >= 10_000
        report.add("supervisor RSS flat after warm-up (<= +10 MiB" + (" over >= 10 000 clips)" if cfg.long_form else ")"),
                   growth <= 10.0 and (enough or not cfg.long_form),
                   f"+{growth:.1f} MiB peak, {last:+.1f} MiB at end, over {answered_total} clips "
                   f"(RSS {warm_rss / 1024:.1f} MiB after warm-up)", required=cfg.long_form)
    fd_end = snap_end["sup_fds"]
    report.add("zero fd growth (supervisor idle after the run vs a fresh one, same pool)",
               fd_end <= fresh["sup_fds"] and snap_end["workers"] == fresh["workers"],
               f"{fresh['sup_fds']} fds with {fresh['workers']} workers fresh -> {fd_end} with {snap_end['workers']}")
    report.info["chaos wall"] = f"{chaos_wall:.1f} s; SIGKILL {kill_info}"
    # And the same supervisor before and after one more burst of good and bad clips.
    fd_before = fd_end
    burst_rng = random.Random(cfg.seed + 99)
    with clipvisor.Client(sup.socket, spawn=False, connect_timeout=5.0) as c:
        for _ in range(10):
            it = burst_rng.choice(cat.items)
            try:
                c.video(it.path, fps=2.0, max_pixels=20000,
                        deadline=cfg.hang_deadline if it.kind in HANG_KINDS else cfg.deadline)
            except (clipvisor.ClipSkipped, clipvisor.ClipvisorError):
                pass
    settle(sup, live_idle, 30)
    fd_after = snapshot(sup)["sup_fds"]
    report.add("zero fd growth (same supervisor, idle, before/after a burst of clips)", fd_after <= fd_before,
               f"{fd_before} -> {fd_after}")
    workers_at_end = sup.workers()
    code = sup.terminate()
    time.sleep(0.2)
    leftover_workers = [w for w in workers_at_end if proc_stat(w) is not None and proc_stat(w)[0] != "Z"]
    report.add("SIGTERM at the end: exit 0, no worker left", code == 0 and not leftover_workers,
               f"exit {code}, {len(leftover_workers)} workers left")
    report.info["total wall"] = f"{time.monotonic() - t_start:.1f} s"
    if not cfg.keep and report.passed:
        shutil.rmtree(work, ignore_errors=True)
    else:
        report.info["workdir kept"] = str(work)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    form = ap.add_mutually_exclusive_group()
    form.add_argument("--short", action="store_true", help="the CI form (~1 min on 2 cores)")
    form.add_argument("--long", action="store_true", help="64 clients, 15 min, >= 10 000 clips, RSS bound enforced")
    ap.add_argument("--seed", type=int, default=1, help="everything random derives from it (default 1)")
    ap.add_argument("--clients", type=int, help="client processes (default 8; 64 with --long)")
    ap.add_argument("--duration", type=float, help="seconds of mixed load (default 90; 24 short, 900 long)")
    ap.add_argument("--workers", type=int, help="supervisor --workers (default 2; CPUs with --long)")
    ap.add_argument("--hangs", help="concurrent I/O hangs of the throughput runs, e.g. 2,8 (0: skip the phase)")
    ap.add_argument("--throughput-clips", type=int, help="good clips per throughput run")
    ap.add_argument("--throughput-rounds", type=int, default=1,
                    help="rounds of the throughput runs; ratios are the median of the rounds' (default 1)")
    ap.add_argument("--throughput-max-pixels", type=int,
                    help="max_pixels of the throughput requests (default 20000; 200704 = 448x448)")
    ap.add_argument("--bad-mix", choices=("both", "damaged", "crash"), default="both",
                    help="the throughput runs' 25%% bad clips: half damaged copies that fail to decode and half "
                         "crash faults (default), or all of one kind")
    ap.add_argument("--throughput-source", choices=("catalog", "training", "training-720p"), default="catalog",
                    help="the throughput runs' good clips: the catalog's small clips (default; ~3 ms of work each, "
                         "fixed costs weigh most), natural 5 s 640x360 clips at 448x448 (what a training run asks; "
                         "implies --throughput-max-pixels 200704 unless given), or natural 10 s 720p clips at "
                         "448x448 (issue 14's W1 kind; the same default budget)")
    ap.add_argument("--after-refused-media", choices=("replace", "keep"), default="replace",
                    help="the supervisor's after_refused_media: replace a worker after media it refused (default) "
                         "or keep it (a later crash in it is retried on a fresh worker)")
    ap.add_argument("--no-kill", action="store_true", help="do not SIGKILL the supervisor mid-run")
    ap.add_argument("--bin-dir", help="directory with clipvisor and clipvisor-worker (default: a release "
                    "build, else .build/debug)")
    ap.add_argument("--workdir", help="where to generate media and logs (default: a new /tmp/chaos-*)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (always kept on failure)")
    ap.add_argument("--json", help="also write the report as JSON to this file")
    a = ap.parse_args(argv)
    cfg = Config.short(a.seed) if a.short else Config.long(a.seed) if a.long else Config(seed=a.seed)
    if a.clients is not None:
        cfg.clients = a.clients
    if a.duration is not None:
        cfg.duration = a.duration
    if a.workers is not None:
        cfg.workers = a.workers
    if a.hangs is not None:
        hs = tuple(int(x) for x in a.hangs.split(",") if x.strip())
        cfg.throughput_hangs = tuple(h for h in hs if h > 0)
        if not cfg.throughput_hangs:
            cfg.throughput_good = 0
    if a.throughput_clips is not None:
        cfg.throughput_good = a.throughput_clips
    if a.throughput_rounds < 1:
        ap.error("--throughput-rounds must be at least 1")
    cfg.throughput_rounds = a.throughput_rounds
    cfg.throughput_source = a.throughput_source
    if a.throughput_max_pixels is not None:
        cfg.throughput_max_pixels = a.throughput_max_pixels
    elif a.throughput_source.startswith("training"):
        cfg.throughput_max_pixels = 200704
    cfg.bad_mix = a.bad_mix
    cfg.after_refused_media = a.after_refused_media
    cfg.kill = not a.no_kill
    cfg.bin_dir, cfg.workdir, cfg.keep = a.bin_dir, a.workdir, a.keep
    report = run(cfg)
    print(report.table())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"passed": report.passed, "checks": [dataclasses.asdict(c) for c in report.checks],
                       "info": report.info, "problems": report.problems}, f, indent=1)
    print("chaos: PASS" if report.passed else "chaos: FAIL")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
