"""Test-only block writer (docs/block-format.md), independent of the reader under test.

Writes what the Swift BlockWriter writes: a header frame, one zstd frame per video frame or
one-second audio chunk (per channel), and a seek table. Also makes sealed memfds of blocks.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import zstandard

F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
ALL_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL


def zstd_frame_header_size(frame: bytes) -> int:
    d = frame[4]
    single = bool(d & 0x20)
    return 5 + (0 if single else 1) + (0, 1, 2, 4)[d & 3] + ((1 if single else 0), 2, 4, 8)[d >> 6]


def split_frames(name: str, array: np.ndarray, chunk: Optional[int]) -> List[bytes]:
    """Raw bytes of each data frame: video one per frame (axis 0), audio one per `chunk`
    samples per channel, channel-major."""
    if name == "audio":
        channels, samples = array.shape
        step = chunk or samples or 1
        out = []
        for c in range(channels):
            for s in range(0, samples, step):
                out.append(array[c, s:s + step].tobytes())
        return out
    return [array[t].tobytes() for t in range(array.shape[0])]


def write_block(
    tensors: Sequence[Tuple[str, np.ndarray, str]],
    result: Optional[Dict[str, Any]] = None,
    *,
    level: int = -1000,
    audio_chunk: Optional[int] = 16000,
    pad: int = 0,
    extra_header: Optional[Dict[str, Any]] = None,
    frame_options: Optional[Dict[str, bool]] = None,
) -> bytes:
    """A block holding `tensors` = [(name, array, layout)], in that order. `frame_options`
    overrides the zstd frame flags (``write_checksum``, ``write_content_size``: both required)."""
    flags: Dict[str, Any] = {"write_checksum": True, "write_content_size": True, **(frame_options or {})}
    cctx = zstandard.ZstdCompressor(level=level, **flags)
    described = []
    frames: List[bytes] = []
    sizes: List[int] = []
    for name, array, layout in tensors:
        raw = split_frames(name, np.ascontiguousarray(array), audio_chunk)
        described.append({
            "name": name,
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "layout": layout,
            "frame_sizes": [len(r) for r in raw],
        })
        for r in raw:
            frames.append(cctx.compress(r))
            sizes.append(len(r))
    crc = 0
    for f in frames:
        crc = zlib.crc32(f[:zstd_frame_header_size(f)], crc)
    header: Dict[str, Any] = {
        "format": "clipvisor-block",
        "version": 1,
        "tensors": described,
        "frame_headers_crc32": crc,
        "result": result if result is not None else {"path": "/test"},
    }
    if extra_header:
        header.update(extra_header)
    js = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    head = struct.pack("<II", 0x184D2A50, 8 + len(js)) + b"CVB1" + struct.pack("<I", zlib.crc32(js)) + js
    n = len(frames) + 1
    table = struct.pack("<II", 0x184D2A5E, 12 * n + 9) + struct.pack("<III", len(head), 0, 0)
    for f, s in zip(frames, sizes):
        table += struct.pack("<III", len(f), s, struct.unpack_from("<I", f, len(f) - 4)[0])
    table += struct.pack("<IBI", n, 0x80, 0x8F92EAB1)
    return head + b"".join(frames) + table


def video_result(frames: np.ndarray, layout: str = "TCHW", fps: float = 2.0, path: str = "/test.mp4") -> Dict[str, Any]:
    t = frames.shape[0]
    h, w = (frames.shape[2], frames.shape[3]) if layout == "TCHW" else (frames.shape[1], frames.shape[2])
    return {
        "path": path,
        "video": {
            "shape": list(frames.shape), "layout": layout,
            "pts": [i / fps for i in range(t)], "indices": [i * 15 for i in range(t)],
            "sample_fps": fps, "width": w, "height": h, "rotation_applied": 0,
            "frames_in_range": t * 15, "access": "sequential",
        },
        "source": {"container": "mov,mp4,m4a,3gp,3g2,mj2", "duration": t / fps, "fps": 30.0,
                   "width": w * 2, "height": h * 2, "video_codec": "h264"},
        "partial": False, "partial_detail": None, "warnings": [], "decode_seconds": 0.01,
    }


def memfd_with(data: bytes, seals: int = ALL_SEALS, name: str = "test-block") -> int:
    """A memfd holding `data`, with `seals` added (0 for none)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    if seals:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    return fd


def natural_frames(t: int, h: int = 252, w: int = 448, seed: int = 0, noise: float = 4.0) -> np.ndarray:
    """THWC uint8 frames that compress like decoded natural video (zstd ratio ~1.0 at level -5,
    ~1.2 at 3, as measured on real decoded frames): smooth moving gradients, a few soft blobs,
    sensor-like noise in the textured part; not flat synthetic patterns."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    centers = rng.random((4, 2)).astype(np.float32)
    cut = int(h * 0.35)
    for i in range(t):
        phase = i * 0.07
        base = np.empty((h, w, 3), dtype=np.float32)
        for c in range(3):
            base[..., c] = 110 + 60 * np.sin(6.0 * x + 3.0 * y + phase + c) + 30 * np.cos(4.0 * y - phase * (c + 1))
        for cy, cx in centers:
            base += (70 * np.exp(-(((y - cy - 0.01 * i) ** 2) + ((x - cx) ** 2)) * 40))[..., None]
        # Textured lower part with sensor-like noise; a smooth, slightly banded "sky" on top.
        base[cut:] += rng.normal(0, noise, size=base[cut:].shape).astype(np.float32)
        base[:cut] = np.round(base[:cut] / 4) * 4
        out[i] = np.clip(base, 0, 255).astype(np.uint8)
    return out
