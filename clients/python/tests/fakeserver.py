"""A fake supervisor speaking docs/protocol.md over a real Unix socket, with real sealed memfds.

Behaviour is chosen by the request's path, one directive per path component, e.g.
``/fake/delay-0.2/video-4-8-12`` (wait 0.2 s, then 4 TCHW frames of 8x12):

  video-T-H-W[-thwc]   ok with T frames of HxW (TCHW, or THWC with the suffix)
  audio-C-S            ok with C channels x S samples
  clip-T-H-W-C-S       ok with both
  delay-X              sleep X seconds first
  error-REASON         answer error REASON (timeout, decode_error, ...) about the clip;
                       error-invalid_request: the request refused as wrong (no path)
  unfit                invalid_request naming the clip (it cannot give what was asked)
  overloaded-N         answer overloaded N times (per path), then go on
  sample-invalid, sample-invalidafter-N, sample-overloaded-N, sample-shutdown
                       in a sample: refuse the whole sample (an invalid field of this clip,
                       always or after N times; overloaded the first N times; shutting down)
  hang                 never answer (until cancelled or the client disconnects)
  die                  close the connection at once
  unsealed / tampered / nofd / partialseal   a broken block
  slab-ok              the block in the connection's one slab (granted when the hello asks for
                       slabs; docs/protocol.md "Block slabs"), the slab's fd only the first time;
                       a fresh memfd while the client holds the slab
  slab-unknown / slab-unsealed / slab-malformed   a slab answer that breaks the protocol (a slab
                       whose fd never came, one not sealed against shrinking, a bad slab object)
  level-L              zstd level of the block

The same module runs as a process (``python fakeserver.py serve --socket PATH``) so that tests
can use it as a stand-in ``clipvisor`` binary.
"""

from __future__ import annotations

import array
import json
import os
import queue
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blockwriter import ALL_SEALS, F_SEAL_GROW, F_SEAL_SHRINK, memfd_with, video_result, write_block  # noqa: E402


def make_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + t * 1000 + h * 10 + w)
    return rng.integers(0, 256, (t, 3, h, w), dtype=np.uint8)


def make_audio(c: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + c * 100000 + n)
    return rng.standard_normal((c, n)).astype(np.float32)


class Peer:
    """One client connection, server side."""

    def __init__(self, sock: socket.socket, server: "FakeServer"):
        self.sock = sock
        self.server = server
        self.send_lock = threading.Lock()
        self.closed = False
        self.hello: Optional[Dict[str, Any]] = None
        self.cancelled: set = set()
        self.answered: set = set()
        self.slab_fd: Optional[int] = None  # slab 0, once made
        self.slab_held = False  # delivered and not released yet
        self.slab_uses = 0

    def recv_exact(self, n: int, fds: List[int]) -> Optional[bytes]:
        data = b""
        while len(data) < n:
            try:
                chunk, anc, _, _ = self.sock.recvmsg(n - len(data), socket.CMSG_SPACE(16))
            except OSError:
                return None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(a)
            if not chunk:
                return None
            data += chunk
        return data

    def read(self) -> Optional[Tuple[Dict[str, Any], Optional[int]]]:
        fds: List[int] = []
        head = self.recv_exact(4, fds)
        if head is None:
            return None
        (n,) = struct.unpack("<I", head)
        body = self.recv_exact(n, fds)
        if body is None:
            return None
        return json.loads(body), (fds[0] if fds else None)

    def send(self, obj: Dict[str, Any], fd: Optional[int] = None) -> None:
        body = json.dumps(obj).encode()
        data = struct.pack("<I", len(body)) + body
        with self.send_lock:
            if self.closed:
                return
            try:
                if fd is not None:
                    n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                    data = data[n:]
                if data:
                    self.sock.sendall(data)
            except OSError:
                self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.slab_fd is not None:
                os.close(self.slab_fd)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class FakeServer:
    def __init__(self, path: str, protocol: int = 1):
        self.path = path
        self.protocol = protocol
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.peers: List[Peer] = []
        self.requests: List[Dict[str, Any]] = []
        self.received_fds: List[Dict[str, Any]] = []
        self.counters: Dict[str, int] = {}
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    # -- lifecycle -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            peer = Peer(sock, self)
            with self.lock:
                self.peers.append(peer)
            threading.Thread(target=self._serve, args=(peer,), daemon=True).start()

    def stop(self) -> None:
        self.stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for peer in list(self.peers):
            peer.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    @property
    def connections(self) -> int:
        return len(self.peers)

    # -- protocol ------------------------------------------------------------------------------

    def _serve(self, peer: Peer) -> None:
        first = True
        while True:
            got = peer.read()
            if got is None:
                peer.close()
                return
            msg, fd = got
            if first:
                first = False
                if msg.get("op") != "hello":
                    peer.send({"id": None, "ok": False,
                               "error": {"reason": "invalid_request", "message": "hello first"}})
                    peer.close()
                    return
                peer.hello = msg
                peer.send({"op": "hello", "ok": True, "protocol": self.protocol, "server": "fake 0.1",
                           "pid": os.getpid(), "max_message_bytes": 1 << 20, "deadline_ms_default": 30000,
                           "deadline_ms_max": 600000, "slabs": min(1, int(msg.get("slabs") or 0))})
                continue
            with self.lock:
                self.requests.append(dict(msg, _pid=(peer.hello or {}).get("pid")))
                if 0 in (msg.get("release_slabs") or []):
                    peer.slab_held = False
            op = msg.get("op")
            if op == "cancel":
                peer.cancelled.add(msg.get("target"))
                peer.send({"id": msg["id"], "ok": True, "cancelled": msg.get("target") not in peer.answered})
                continue
            if op == "release":
                peer.send({"id": msg["id"], "ok": True})
                continue
            if op == "status":
                peer.send({"id": msg["id"], "ok": True, "status": {"pid": os.getpid(), "version": "fake",
                                                                     "requests": len(self.requests),
                                                                     "queue": {"wait_limit_ms": 1500}}})
                continue
            if op == "skips":
                peer.send({"id": msg["id"], "ok": True, "skips": [{"path": "/x", "reason": "timeout"}],
                           "counts": {"timeout": 1}})
                continue
            threading.Thread(target=self._request, args=(peer, msg, fd), daemon=True).start()

    def _count(self, key: str) -> int:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + 1
            return self.counters[key]

    def _request(self, peer: Peer, msg: Dict[str, Any], fd: Optional[int]) -> None:
        rid = msg.get("id")
        if fd is not None:
            st = os.fstat(fd)
            head = os.pread(fd, 16, 0)
            with self.lock:
                self.received_fds.append({"path": msg.get("path"), "size": st.st_size, "head": head})
            os.close(fd)
        if msg.get("op") == "sample":
            self._sample(peer, msg)
            return
        reply, block_fd = self.outcome(peer, msg, rid)
        if reply is None:
            return
        peer.answered.add(rid)
        peer.send(reply, block_fd)
        if block_fd is not None:
            os.close(block_fd)

    def _sample(self, peer: Peer, msg: Dict[str, Any]) -> None:
        rid = msg["id"]
        clips = msg.get("clips") or []
        # Refusals of the request as a whole come as the final answer alone, `done` without `clip`
        # (docs/protocol.md, as the real supervisor sends them): more than 256 clips,
        # sample-invalid[after-N] (an invalid field of that clip), sample-overloaded-N (the first N
        # times), sample-shutdown (the supervisor is shutting down).
        if not clips or len(clips) > 256:
            peer.send({"id": rid, "done": True, "ok": False, "error": {
                "reason": "invalid_request", "detail": "clips",
                "message": f"invalid field 'clips': must hold 1 to 256 clips, got {len(clips)}"}})
            return
        for i, clip in enumerate(clips):
            for part in str(clip.get("path")).strip("/").split("/"):
                bits = part.split("-")
                if part == "sample-invalid" or (bits[:2] == ["sample", "invalidafter"]
                                                and self._count("sample:" + part) > int(bits[2])):
                    peer.send({"id": rid, "done": True, "ok": False, "error": {
                        "reason": "invalid_request", "detail": f"clips[{i}].width",
                        "message": f"clips[{i}]: invalid field 'width': must be in [1, 65536], got 0"}})
                    return
                if bits[:2] == ["sample", "overloaded"] and self._count("sample:" + part) <= int(bits[2]):
                    peer.send({"id": rid, "done": True, "ok": False, "error": {
                        "reason": "overloaded", "retry_after_ms": 10,
                        "message": "3 clips are queued (limit 2); retry later"}})
                    return
                if part == "sample-shutdown":
                    peer.send({"id": rid, "done": True, "ok": False, "error": {
                        "reason": "cancelled", "message": "the supervisor is shutting down"}})
                    return
        results: "queue.Queue[Tuple[int, Optional[Dict[str, Any]], Optional[int]]]" = queue.Queue()
        for i, clip in enumerate(clips):
            merged = {k: v for k, v in msg.items() if k not in ("clips", "op", "id", "all_or_nothing")}
            merged.update(clip)
            merged["op"] = "decode"

            def run(i: int = i, merged: Dict[str, Any] = merged) -> None:
                reply, fd = self.outcome(peer, merged, rid)
                results.put((i, reply, fd))

            threading.Thread(target=run, daemon=True).start()
        answered: Dict[int, bool] = {}
        failure: Optional[Tuple[int, Dict[str, Any]]] = None
        aon = msg.get("all_or_nothing", True)
        while len(answered) < len(clips):
            try:
                i, reply, fd = results.get(timeout=0.05)
            except queue.Empty:
                if peer.closed:
                    return
                continue
            if i in answered:
                if fd is not None:
                    os.close(fd)
                continue
            if reply is None:  # hang: only cancellation answers it
                continue
            reply = dict(reply)
            reply.pop("id", None)
            reply.update({"id": rid, "clip": i})
            answered[i] = bool(reply.get("ok"))
            peer.send(reply, fd)
            if fd is not None:
                os.close(fd)
            if not reply.get("ok") and failure is None:
                failure = (i, reply["error"])
                if aon:
                    for j in range(len(clips)):
                        if j not in answered:
                            answered[j] = False
                            peer.send({"id": rid, "clip": j, "ok": False, "error": {
                                "reason": "cancelled", "message": f"clip {j}: cancelled",
                                "path": clips[j].get("path")}})
        if failure is None:
            peer.send({"id": rid, "done": True, "ok": True, "clips": len(clips)})
        else:
            i, error = failure
            peer.send({"id": rid, "done": True, "ok": False, "clip": i, "clips": len(clips),
                       "error": dict(error, message=f"clip {i}: {error.get('message')}")})

    def outcome(self, peer: Peer, msg: Dict[str, Any], rid: Any) -> Tuple[Optional[Dict[str, Any]], Optional[int]]:
        """The reply (None: none) and block fd for one decode/probe request."""
        path = msg.get("path") or "/fake/fd"
        level = -1000
        mode = "ok"
        shape: Dict[str, Any] = {}
        for part in path.strip("/").split("/"):
            bits = part.split("-")
            if bits[0] == "delay":
                time.sleep(float(bits[1]))
            elif bits[0] == "error" and bits[1:] == ["invalid_request"]:
                # the request itself is wrong: refused before any worker, no path (docs/protocol.md)
                return ({"id": rid, "ok": False, "error": {
                    "reason": "invalid_request", "detail": "fsp",
                    "message": "invalid field 'fsp': unknown field"}}, None)
            elif bits[0] == "unfit":
                # the request does not fit this clip: a worker found it, the error names the clip
                return ({"id": rid, "ok": False, "elapsed_ms": 5, "error": {
                    "reason": "invalid_request", "path": path, "detail": "frames",
                    "message": f"{path}: 1 frame(s) in range give 4 frames to sample"}}, None)
            elif bits[0] == "error":
                reason = "-".join(bits[1:])
                return ({"id": rid, "ok": False, "elapsed_ms": 5,
                         "error": {"reason": reason, "message": f"{path}: fake {reason}", "path": path,
                                   "detail": "fake detail"}}, None)
            elif bits[0] == "overloaded":
                if self._count("overloaded:" + path) <= int(bits[1]):
                    return ({"id": rid, "ok": False, "error": {"reason": "overloaded", "message": f"{path}: queue full",
                                                                "path": path, "retry_after_ms": 10}}, None)
            elif bits[0] == "hang":
                while not peer.closed and rid not in peer.cancelled:
                    time.sleep(0.01)
                if peer.closed:
                    return None, None
                return ({"id": rid, "ok": False, "error": {"reason": "cancelled", "message": f"{path}: cancelled",
                                                            "path": path}}, None)
            elif bits[0] == "die":
                peer.close()
                return None, None
            elif bits[0] == "level":
                level = int(bits[1])
            elif bits[0] in ("unsealed", "tampered", "nofd", "partialseal"):
                mode = bits[0]
            elif bits[0] == "slab":
                mode = "slab-" + bits[1]
            elif bits[0] == "video":
                shape["video"] = (int(bits[1]), int(bits[2]), int(bits[3]), "THWC" if bits[-1] == "thwc" else "TCHW")
            elif bits[0] == "audio":
                shape["audio"] = (int(bits[1]), int(bits[2]))
            elif bits[0] == "clip":
                shape["video"] = (int(bits[1]), int(bits[2]), int(bits[3]), "TCHW")
                shape["audio"] = (int(bits[4]), int(bits[5]))
        if msg.get("op") == "probe":
            return {"id": rid, "ok": True, "probe": {"container": "fake", "path": path}}, None
        if not shape:
            shape["video"] = (2, 4, 6, "TCHW")
        tensors = []
        result: Dict[str, Any] = {"path": path, "source": {"container": "fake"}, "partial": False,
                                  "partial_detail": None, "warnings": [], "decode_seconds": 0.001}
        if "video" in shape:
            t, h, w, layout = shape["video"]
            frames = make_frames(t, h, w)
            if layout == "THWC":
                frames = np.ascontiguousarray(frames.transpose(0, 2, 3, 1))
            tensors.append(("video", frames, layout))
            result.update({k: v for k, v in video_result(frames, layout, path=path).items() if k == "video"})
        if "audio" in shape:
            c, n = shape["audio"]
            samples = make_audio(c, n)
            tensors.append(("audio", samples, "CN"))
            result["audio"] = {"shape": [c, n], "sample_rate": 16000, "channels": c, "start": 0.0,
                               "offset_from_first_frame": 0.0 if "video" in shape else None}
        blob = write_block(tensors, result, level=level)
        if mode == "tampered":
            b = bytearray(blob)
            b[len(b) // 2] ^= 0x10
            blob = bytes(b)
        if mode == "nofd":
            return {"id": rid, "ok": True, "result": result, "block_bytes": len(blob)}, None
        if mode.startswith("slab-"):
            answer = {"id": rid, "ok": True, "result": result, "block_bytes": len(blob), "elapsed_ms": 1}
            if mode == "slab-unknown":
                return dict(answer, slab={"index": 5, "attached": False}), None
            if mode == "slab-malformed":
                return dict(answer, slab={"index": "x", "attached": True}), memfd_with(blob, F_SEAL_SHRINK)
            if mode == "slab-unsealed":
                return dict(answer, slab={"index": 0, "attached": True}), memfd_with(blob, 0)
            granted = (peer.hello or {}).get("slabs", 0)
            with self.lock:
                if granted and not peer.slab_held:
                    peer.slab_held = True
                    peer.slab_uses += 1
                    first = peer.slab_fd is None
                    if first:
                        # Larger than the block, as a reused slab is: only block_bytes count.
                        peer.slab_fd = memfd_with(blob + b"\xa5" * 4096, F_SEAL_SHRINK)
                    else:
                        os.pwrite(peer.slab_fd, blob, 0)
                    attach = os.dup(peer.slab_fd) if first else None
                    return dict(answer, slab={"index": 0, "attached": first}), attach
        seals = {"unsealed": 0, "partialseal": F_SEAL_SHRINK | F_SEAL_GROW}.get(mode, ALL_SEALS)
        fd = memfd_with(blob, seals)
        return {"id": rid, "ok": True, "result": result, "block_bytes": len(blob), "elapsed_ms": 1}, fd


def main(argv: List[str]) -> int:
    """``fakeserver.py serve --socket PATH``: a stand-in supervisor process."""
    if len(argv) < 3 or argv[0] != "serve" or argv[1] != "--socket":
        sys.stderr.write("usage: fakeserver.py serve --socket PATH\n")
        return 64
    import signal

    server = FakeServer(argv[2])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    while not stop.wait(0.2):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
