"""Shared helpers of the benchmarks: binaries, a private supervisor, timing, machine notes.

Binaries come from `--bin-dir`, else `$CLIPVISOR_BENCH_BIN`, else the first of
`<repo>/.build-bench/release` and `<repo>/.build/release` that holds both `clipvisor` and
`clipvisor-worker` (build with `swift build -c release --scratch-path .build-bench`).
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

# SIGTERM unwinds like Ctrl-C, so that a private supervisor and temporary files are cleaned up.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))


def bin_dir(explicit: Optional[str] = None) -> Path:
    candidates = [explicit, os.environ.get("CLIPVISOR_BENCH_BIN"),
                  str(ROOT / ".build-bench" / "release"), str(ROOT / ".build" / "release")]
    for c in candidates:
        if c and os.access(Path(c) / "clipvisor", os.X_OK) and os.access(Path(c) / "clipvisor-worker", os.X_OK):
            return Path(c).resolve()
    raise SystemExit("no release build with clipvisor and clipvisor-worker found: run\n"
                     "  swift build -c release --scratch-path .build-bench\n"
                     "or pass --bin-dir DIR (or set CLIPVISOR_BENCH_BIN)")


def machine_line() -> str:
    load = os.getloadavg()
    return (f"cpus {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}); load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start (a shared, noisy 2-core VM: compare only "
            f"numbers from the same run)")


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    """utime+stime of a live process (and its reaped children) from /proc, seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    # after ')': state(0) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(11) stime(12) cutime cstime
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def run_checked(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc


def timed_cmd(cmd: List[str]) -> Tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout) of one run."""
    before = cpu_children()
    t0 = time.perf_counter()
    proc = run_checked(cmd)
    wall = time.perf_counter() - t0
    return wall, cpu_children() - before, proc.stdout


def worker_list(status: dict) -> List[dict]:
    """The live workers of a `status` answer."""
    return list((status.get("workers") or {}).get("list") or [])


def worker_target(status: dict) -> int:
    return int((status.get("workers") or {}).get("target") or 0)


class Supervisor:
    """A private `clipvisor serve` on a socket in a temporary directory."""

    def __init__(self, bins: Path, workers: Optional[int] = None, extra: Sequence[str] = ()):
        self.dir = Path(tempfile.mkdtemp(prefix="clipvisor-bench-"))
        self.socket = str(self.dir / "s.sock")
        self.log = open(self.dir / "serve.log", "w")
        cmd = [str(bins / "clipvisor"), "serve", "--socket", self.socket, "--skip-log", str(self.dir / "skips.jsonl"),
               "--log-target", "stderr", "--log-level", "warning", "--quarantine-timeouts", "1000"]
        if workers:
            cmd += ["--workers", str(workers)]
        cmd += list(extra)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"clipvisor serve exited {self.proc.returncode}: {(self.dir / 'serve.log').read_text()}")
            with contextlib.suppress(OSError):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.socket)
                s.close()
                break
            time.sleep(0.05)
        else:
            raise SystemExit("clipvisor serve did not start listening within 20 s")

    def client(self, **options):
        import clipvisor
        return clipvisor.Client(socket=self.socket, spawn=False, **options)

    def wait_warm(self, client, workers: int, timeout: float = 20) -> None:
        """Until `workers` workers are idle (spawned and ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ws = worker_list(client.status())
            if sum(1 for w in ws if w.get("state") == "idle") >= workers:
                return
            time.sleep(0.05)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def best_of(fn: Callable[[], float], repeat: int) -> List[float]:
    return [fn() for _ in range(repeat)]


@contextlib.contextmanager
def cpu_and_wall() -> Iterator[List[float]]:
    """Yields a list that receives [wall s, own CPU s (all threads)] at exit."""
    out: List[float] = []
    c0, w0 = cpu_self(), time.perf_counter()
    try:
        yield out
    finally:
        out += [time.perf_counter() - w0, cpu_self() - c0]
