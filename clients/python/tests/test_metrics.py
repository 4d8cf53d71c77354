"""Metrics against a real supervisor: the HTTP endpoint (scraped with a real HTTP client and parsed
with prometheus_client's parser), `clipvisor metrics`, the textfile, and `clipvisor top` off a TTY.

Clips are made at test time with the ffmpeg CLI; the hang is a FIFO nobody writes to.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
import urllib.request
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest

import clipvisor
from test_integration import BINARY, Supervisor

prometheus_parser = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client is installed by scripts/setup.sh")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY}"),
]

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def make_clip(path: str, seconds: float = 1.0) -> str:
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=15",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path],
                   check=True)
    return path


def parse(text: str) -> Samples:
    """Every sample of the exposition text, keyed by name and sorted labels (the parser raises on
    anything malformed)."""
    samples: Samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape(address: str) -> Tuple[str, str]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.headers["Content-Type"], response.read().decode("utf-8")


class MetricsSupervisor(Supervisor):
    """A supervisor with the listener on a free loopback port and a fast textfile."""

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.textfile = os.path.join(workdir, "clipvisor.prom")
        self.address = ""

    def start_with_metrics(self, extra: Sequence[str] = ()) -> None:
        self.start(args=["--workers", "2", "--spare-workers", "1", "--metrics-listen", "127.0.0.1:0",
                         "--metrics-textfile", self.textfile, "--metrics-interval", "0.1", *extra])
        with clipvisor.Client(self.path, spawn=False) as c:
            self.address = c.status()["metrics"]["listen"]
        assert self.address.startswith("127.0.0.1:"), self.address


@pytest.fixture
def served(short_dir: str) -> Iterator[MetricsSupervisor]:
    s = MetricsSupervisor(short_dir)
    s.start_with_metrics()
    yield s
    s.stop()


@pytest.fixture
def clips(short_dir: str) -> Dict[str, str]:
    good = make_clip(os.path.join(short_dir, "good.mp4"))
    corrupt = os.path.join(short_dir, "corrupt.mp4")
    with open(corrupt, "wb") as f:
        f.write(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    fifo = os.path.join(short_dir, "hang.mp4")
    os.mkfifo(fifo)
    return {"good": good, "corrupt": corrupt, "fifo": fifo}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def test_counters_and_histograms_equal_the_outcomes_sent(served: MetricsSupervisor, clips: Dict[str, str]) -> None:
    # A scraper runs throughout: every scrape parses and no counter ever goes back.
    scrapes: List[Samples] = []
    stop = threading.Event()
    failures: List[str] = []

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrapes.append(parse(scrape(served.address)[1]))
            except Exception as error:  # noqa: BLE001  (reported below)
                failures.append(repr(error))
            time.sleep(0.02)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        run_outcomes(served, clips)
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:3]
    assert len(scrapes) >= 10, len(scrapes)
    for earlier, later in zip(scrapes, scrapes[1:]):
        for key, count in earlier.items():
            if key[0].endswith(("_total", "_count", "_sum", "_bucket")) and key in later:
                assert later[key] >= count, (key, count, later[key])
    check_outcomes(served, clips)


def run_outcomes(served: MetricsSupervisor, clips: Dict[str, str]) -> None:
    with clipvisor.Client(served.path, spawn=False, margin=15.0) as c:
        for _ in range(3):
            c.video(clips["good"], frames=4)
        with pytest.raises(clipvisor.ClipCorrupt):
            c.video(clips["corrupt"])
        with pytest.raises(clipvisor.ClipTimeout):
            c.video(clips["fifo"], deadline=1.0)
        results = c.sample([clips["good"], clips["good"]], frames=2)
        assert not any(isinstance(r, clipvisor.ClipSkipped) for r in results), results
        c.probe(clips["good"])


def check_outcomes(served: MetricsSupervisor, clips: Dict[str, str]) -> None:
    with clipvisor.Client(served.path, spawn=False) as c:
        status = c.status()
    live = status["workers"]["live"]
    content_type, text = scrape(served.address)
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    s = parse(text)
    # 3 + 2 (sample) decoded, 1 probed: all ok; one corrupt, one hang; nothing else.
    expected = {"ok": 6, "decode_error": 1, "timeout": 1}
    for outcome in ["ok", "partial", "timeout", "crashed", "out_of_memory", "decode_error", "unsupported", "too_large",
                    "not_found", "permission", "quarantined", "cancelled", "overloaded", "invalid_request"]:
        assert value(s, "clipvisor_clips_total", outcome=outcome) == expected.get(outcome, 0), outcome
    assert value(s, "clipvisor_requests_total", kind="decode") == 5
    assert value(s, "clipvisor_requests_total", kind="sample") == 1
    assert value(s, "clipvisor_requests_total", kind="probe") == 1
    assert value(s, "clipvisor_samples_total", outcome="ok") == 1
    # One observation per clip in each latency histogram; blocks only for the 5 decoded clips.
    for name in ["clipvisor_decode_seconds", "clipvisor_queue_wait_seconds", "clipvisor_answer_seconds"]:
        assert value(s, f"{name}_count") == 8, name
        assert value(s, f"{name}_bucket", le="+Inf") == 8, name
    # The hang ran into its 1 s deadline: exactly one worker time above 1 s.
    assert value(s, "clipvisor_decode_seconds_bucket", le="1.0") == 7
    assert value(s, "clipvisor_block_bytes_count") == 5
    assert value(s, "clipvisor_block_bytes_sum") == value(s, "clipvisor_delivered_bytes_total") > 0
    assert value(s, "clipvisor_worker_spawns_total") >= 3
    assert value(s, "clipvisor_skip_log_write_errors_total") == 0
    assert value(s, "clipvisor_queue_depth") == 0
    assert value(s, "clipvisor_workers_configured") == 2
    assert value(s, "clipvisor_memory_budget_bytes") > 0
    assert value(s, "clipvisor_build_info", version=status["version"]) == 1
    assert value(s, "process_cpu_seconds_total") > 0
    assert value(s, "process_open_fds") > 3
    assert abs(value(s, "process_start_time_seconds") - time.time()) < 600
    assert value(s, "clipvisor_worker_cpu_seconds_total") > 0
    # Conventions: our prefix or the standard process_ set, and no label carries a path.
    for (name, labels), _ in s.items():
        assert name.startswith(("clipvisor_", "process_")), name
        for key, label in labels:
            assert "/" not in label, (name, key, label)

    # The killed worker is counted once it is reaped; workers by state add up to those alive.
    def settled() -> Optional[Samples]:
        now = parse(scrape(served.address)[1])
        states = sum(v for (n, _), v in now.items() if n == "clipvisor_workers")
        alive = sum(v for (n, labels), v in now.items()
                    if n == "clipvisor_workers" and ("state", "killed") not in labels
                    and ("state", "retiring") not in labels)
        killed_once = value(now, "clipvisor_worker_kills_total", reason="deadline") == 1
        return now if killed_once and states >= alive == live else None

    assert wait_for(settled), scrape(served.address)[1]

    # `clipvisor metrics` gives the same text through the socket.
    out = subprocess.run([BINARY, "metrics", "--socket", served.path], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    via_socket = parse(out.stdout)
    for outcome, count in expected.items():
        assert value(via_socket, "clipvisor_clips_total", outcome=outcome) == count
    assert value(via_socket, "clipvisor_requests_total", kind="metrics") == 1


def connect_refused(host: str, port: int, family: int = socket.AF_INET) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((host, port))
        except OSError as error:
            return error.errno in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH)
        return False


def other_addresses() -> List[str]:
    """This machine's non-loopback IPv4 addresses."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if ":" not in a and not a.startswith("127.")]


def test_listener_binds_only_what_is_configured(served: MetricsSupervisor, short_dir: str) -> None:
    port = int(served.address.rsplit(":", 1)[1])
    assert scrape(served.address)[1]
    assert connect_refused("127.0.0.2", port), "bound wider than 127.0.0.1"
    if socket.has_ipv6:
        assert connect_refused("::1", port, socket.AF_INET6), "bound to IPv6 too"
    for address in other_addresses():
        assert connect_refused(address, port), f"reachable on {address}"

    # Asked for a port that is taken, a second supervisor refuses to start (no other port, no
    # other address), and says why.
    second = Supervisor(os.path.join(short_dir, "b"))
    os.makedirs(second.workdir)
    proc = subprocess.run([BINARY, "serve", "--socket", second.path, "--metrics-listen", served.address],
                          capture_output=True, text=True, timeout=60, env=second.env())
    assert proc.returncode == 78, proc
    assert f"cannot serve metrics on {served.address}" in proc.stderr, proc.stderr
    # Names are not resolved; the flag is named in the error.
    proc = subprocess.run([BINARY, "serve", "--socket", second.path, "--metrics-listen", "example.com:9464"],
                          capture_output=True, text=True, timeout=60, env=second.env())
    assert proc.returncode != 0, proc.stderr
    assert "--metrics-listen" in proc.stderr and "not an IP address" in proc.stderr, proc.stderr
    # The same key in the config file, with its line.
    config = os.path.join(short_dir, "c.toml")
    with open(config, "w") as f:
        f.write('workers = 1\nmetrics_listen = "localhost:http"\n')
    proc = subprocess.run([BINARY, "serve", "--socket", second.path, "--config", config],
                          capture_output=True, text=True, timeout=60, env=second.env())
    assert proc.returncode == 78 and f"{config}:2" in proc.stderr and "metrics_listen" in proc.stderr, proc.stderr


def test_config_file_key_serves_on_loopback(short_dir: str) -> None:
    config = os.path.join(short_dir, "c.toml")
    with open(config, "w") as f:
        f.write('workers = 1\nmetrics_listen = "0"\n')  # a bare port: loopback
    s = Supervisor(short_dir)
    s.start(args=["--config", config])
    try:
        with clipvisor.Client(s.path, spawn=False) as c:
            address = c.status()["metrics"]["listen"]
        assert address.startswith("127.0.0.1:"), address
        assert "clipvisor_clips_total" in scrape(address)[1]
    finally:
        s.stop()


def blocked_server_sockets(port: int) -> List[int]:
    """Send-queue bytes of the server's connections on `port` that hold more than 100 kB unread
    by their peer (/proc/net/tcp: tx_queue in hex)."""
    queued = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            tx = int(fields[4].split(":")[0], 16)
            if local_port == port and tx > 100_000:
                queued.append(tx)
    return queued


def test_stuck_scrapers_do_not_delay_answers(served: MetricsSupervisor, clips: Dict[str, str]) -> None:
    host, port = served.address.rsplit(":", 1)

    fifos = iter(range(100))

    def kill_latency(c: clipvisor.Client) -> float:
        """Seconds past the 1 s deadline at which a hanging clip is answered (a new FIFO each
        time: the same one would be quarantined after two timeouts)."""
        fifo = f"{clips['fifo']}.{next(fifos)}"
        os.mkfifo(fifo)
        t0 = time.monotonic()
        with pytest.raises(clipvisor.ClipTimeout):
            c.video(fifo, deadline=1.0)
        return time.monotonic() - t0 - 1.0

    with clipvisor.Client(served.path, spawn=False, margin=15.0) as c:
        c.video(clips["good"], frames=2)
        before = min(kill_latency(c) for _ in range(2))

        # Scrapers that never read: small receive buffers and many pipelined requests, so the
        # server's writes block; others that send half a request and stall.
        stuck: List[socket.socket] = []
        request = f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        for i in range(40):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect((host, int(port)))
            if i % 2 == 0:
                s.setblocking(False)
                try:
                    for _ in range(1000):  # ~10 MB of answers: the server's send buffer fills
                        s.send(request)
                except BlockingIOError:
                    pass
            else:
                s.send(b"GET /metr")
            stuck.append(s)
        try:
            # The premise: the server really is stuck writing to them (its send queues are full).
            assert wait_for(lambda: len(blocked_server_sockets(int(port))) >= 10), blocked_server_sockets(int(port))
            t0 = time.monotonic()
            c.video(clips["good"], frames=2)
            good = time.monotonic() - t0
            after = max(kill_latency(c) for _ in range(2))
            t0 = time.monotonic()
            c.status()
            status = time.monotonic() - t0
            # A fresh scraper is still served while the stuck ones hang on.
            assert "clipvisor_clips_total" in scrape(served.address)[1]
        finally:
            for s in stuck:
                s.close()
    # Wide margins (a loaded 2-core machine): the kill latency stays where it was, and
    # the event loop answers at once.
    print(f"kill latency past the deadline: {before:.3f} s before, {after:.3f} s with 40 stuck scrapers; "
          f"good clip {good:.3f} s, status {status:.3f} s")
    assert after < 1.0 and after < before + 0.5, (before, after)
    assert good < 5 and status < 1, (good, status)


def test_textfile_is_replaced_atomically_and_valid(served: MetricsSupervisor, clips: Dict[str, str]) -> None:
    path = served.textfile
    assert os.path.exists(path), "written at start-up"
    inodes = set()
    reads = 0
    stop = threading.Event()

    def work() -> None:
        with clipvisor.Client(served.path, spawn=False, margin=15.0) as c:
            while not stop.is_set():
                c.video(clips["good"], frames=2)

    worker = threading.Thread(target=work)
    worker.start()
    try:
        # At least 2.5 s of reads, and until five writes were seen (a loaded machine delays the
        # writer's fsync; the bound only keeps a broken writer from hanging the test).
        start = time.monotonic()
        while time.monotonic() - start < 2.5 or (len(inodes) < 5 and time.monotonic() - start < 30):
            with open(path, "rb") as f:
                inodes.add(os.fstat(f.fileno()).st_ino)
                data = f.read()
            # Never a torn file: every read is complete and parses.
            assert data.endswith(b"\n"), data[-200:]
            samples = parse(data.decode())
            assert ("clipvisor_clips_total", (("outcome", "ok"),)) in samples
            reads += 1
            time.sleep(0.01)
    finally:
        stop.set()
        worker.join(30)
    # Replaced by rename (a new inode each write), not rewritten in place.
    assert len(inodes) >= 5, (len(inodes), reads)
    # The counts move: the last file has the clips decoded during the loop.
    assert wait_for(lambda: value(parse(open(path).read()), "clipvisor_clips_total", outcome="ok") > 0)
    served.stop()
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    assert leftovers == [], leftovers


def test_textfile_that_cannot_be_written_refuses_start(short_dir: str) -> None:
    missing = os.path.join(short_dir, "no-such-dir", "clipvisor.prom")
    s = Supervisor(short_dir)
    proc = subprocess.run([BINARY, "serve", "--socket", s.path, "--metrics-textfile", missing],
                          capture_output=True, text=True, timeout=60, env=s.env())
    assert proc.returncode == 78 and missing in proc.stderr, proc.stderr


def test_top_without_a_terminal_prints_plain_snapshots(served: MetricsSupervisor, clips: Dict[str, str]) -> None:
    with clipvisor.Client(served.path, spawn=False, margin=15.0) as c:
        c.video(clips["good"], frames=2)
        with pytest.raises(clipvisor.ClipTimeout):
            c.video(clips["fifo"], deadline=0.5)
        pids = sorted(w["pid"] for w in c.status()["workers"]["list"])
    proc = subprocess.run([BINARY, "top", "--socket", served.path, "--iterations", "2", "--interval", "0.3"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b" not in out, "escape codes off a terminal"
    snapshots = out.split("\n\nclipvisor ")
    assert len(snapshots) == 2, out
    assert "workers:" in out and "recent skips:" in out and "clients:" in out
    assert f"timeout       {clips['fifo']}" in out, out
    # The second snapshot has rates (the first has none to compare with).
    assert "throughput: -" in snapshots[0] and "clips/s" in snapshots[1], out
    shown = {int(line.split()[0]) for line in out.splitlines() if line[:1].isdigit()}
    assert set(pids) & shown, (pids, out)
    # Without a supervisor it says so, and the exit status tells scripts.
    proc = subprocess.run([BINARY, "top", "--socket", served.path + ".none"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "no supervisor answers" in proc.stdout, proc


def test_text_passes_promtool_lint(served: MetricsSupervisor) -> None:
    """Prometheus' own linter (naming, units, help text), when promtool is installed."""
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    text = scrape(served.address)[1]
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_metrics_op_refuses_unknown_fields(served: MetricsSupervisor) -> None:
    import json
    import struct

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(served.path)

        def call(message: dict) -> dict:
            body = json.dumps(message).encode()
            s.sendall(struct.pack("<I", len(body)) + body)
            header = b""
            while len(header) < 4:
                header += s.recv(4 - len(header))
            (size,) = struct.unpack("<I", header)
            data = b""
            while len(data) < size:
                data += s.recv(size - len(data))
            return json.loads(data)

        assert call({"op": "hello", "protocol": 1})["ok"] is True
        answer = call({"op": "metrics", "id": 1})
        assert answer["ok"] is True and answer["content_type"].startswith("text/plain; version=0.0.4")
        assert value(parse(answer["text"]), "clipvisor_requests_total", kind="metrics") == 1
        refused = call({"op": "metrics", "id": 2, "format": "json"})
        assert refused["ok"] is False and refused["error"]["reason"] == "invalid_request", refused
        assert "format" in refused["error"]["message"], refused


def test_top_on_a_terminal_quits_on_q_and_restores_it(served: MetricsSupervisor) -> None:
    """`clipvisor top` on a pseudo-terminal: draws on the alternate screen, quits on q, and leaves
    the terminal's modes as it found them; Ctrl-C (SIGINT from the line discipline) likewise."""
    import pty  # noqa: F401  (os.openpty needs it on some platforms)
    import select
    import termios

    for key in (b"q", b"\x03"):
        master, slave = os.openpty()
        try:
            before = termios.tcgetattr(slave)
            proc = subprocess.Popen([BINARY, "top", "--socket", served.path, "--interval", "0.2"],
                                    stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                    preexec_fn=lambda: __import__("fcntl").ioctl(0, termios.TIOCSCTTY, 0))
            out = b""
            deadline = time.monotonic() + 20
            while b"recent skips:" not in out and time.monotonic() < deadline:
                if select.select([master], [], [], 0.2)[0]:
                    out += os.read(master, 65536)
            assert b"\x1b[?1049h" in out and b"workers:" in out, out[-2000:]
            during = termios.tcgetattr(slave)
            assert not during[3] & termios.ECHO and not during[3] & termios.ICANON, "raw mode while running"
            os.write(master, key)
            assert proc.wait(10) == 0, key
            while select.select([master], [], [], 0.2)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
            assert out.rstrip(b"\r\n").endswith(b"\x1b[?25h\x1b[?1049l"), out[-200:]
            assert termios.tcgetattr(slave) == before, f"terminal modes not restored after {key!r}"
        finally:
            os.close(master)
            os.close(slave)
