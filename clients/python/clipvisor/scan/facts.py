"""Per-clip facts, measured through the supervisor: a probe, and with ``verify`` a decode of
every frame. A clip that hangs, crashes or is damaged becomes a row with its reason, never an
exception: the scan goes on, and the supervisor has written the skip log record.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional

from ..client import Client
from ..errors import ClipSkipped

__all__ = ["probe_clip", "verify_clip", "facts_of_probe", "VERIFY_MAX_FRAMES"]

# The worker's per-request frame limit (docs/protocol.md `frames` ≤ 10 000); longer clips are
# verified in several time ranges.
VERIFY_MAX_FRAMES = 10_000
_VERIFY_CHUNK = 9_000
_AUDIO_WINDOW_S = 1800.0
_VERIFY_SIDE = 16  # decoded frames are scaled to 16x16: the check is the decode, not the pixels


def _skip_text(skip: ClipSkipped) -> str:
    """The supervisor's message (it names the file) and FFmpeg's own words, when given."""
    if skip.detail and skip.detail not in skip.message:
        return f"{skip.message} ({skip.detail})"
    return skip.message


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> Optional[int]:
    v = _num(value)
    return int(v) if v is not None else None


def facts_of_probe(probe: Mapping[str, Any]) -> Dict[str, Any]:
    """The row fields of one probe (docs/scan.md lists them). Sizes are upright: a display matrix
    of ±90° swaps width and height, as decoders that apply it (and clipvisor) return frames."""
    streams: List[Mapping[str, Any]] = [s for s in probe.get("streams") or [] if isinstance(s, dict)]
    by_index = {s.get("index"): s for s in streams}
    video = by_index.get(probe.get("video_stream")) or {}
    audio = by_index.get(probe.get("audio_stream")) or {}
    row: Dict[str, Any] = {
        "container": probe.get("container"),
        "duration": _num(probe.get("duration")),
        "start_time": _num(probe.get("start_time")),
        "bit_rate": _int(probe.get("bit_rate")),
        "has_video": bool(video),
        "has_audio": bool(audio),
    }
    if video:
        w, h = _int(video.get("width")), _int(video.get("height"))
        rotation = _int(video.get("rotation")) or 0
        if rotation % 180 == 90 and w is not None and h is not None:
            w, h = h, w
        frames = _int(video.get("frame_count"))
        header = _int(video.get("container_frame_count"))
        fps = _num(video.get("avg_fps")) or _num((probe.get("source") or {}).get("fps"))
        row.update({
            "video_stream": _int(video.get("index")),
            "video_codec": video.get("codec"),
            "width": w, "height": h,
            "stored_width": _int(video.get("width")), "stored_height": _int(video.get("height")),
            "rotation": rotation,
            "pixel_format": video.get("pixel_format"),
            "fps": fps,
            "num_frames": frames,
            "frame_count_source": video.get("frame_count_source"),
            "header_frames": header,
            "frames_disagree": header is not None and frames is not None and header != frames,
            "video_duration": _num(video.get("duration")),
            "video_bit_rate": _int(video.get("bit_rate")),
        })
        note = video.get("frame_count_note") or video.get("rotation_note")
        if note:
            row["note"] = note
    if audio:
        row.update({
            "audio_codec": audio.get("codec"),
            "audio_sample_rate": _int(audio.get("sample_rate")),
            "audio_channels": _int(audio.get("channels")),
            "audio_duration": _num(audio.get("duration")),
        })
    return row


def probe_clip(client: Client, path: str, *, tag: Optional[str], deadline: Optional[float]) -> Dict[str, Any]:
    """One clip's row: ``status`` ``ok`` with the facts, or ``failed`` with ``reason``/``detail``
    (the supervisor's reason: ``timeout``, ``crashed``, ``decode_error``, ``not_found``...).
    A supervisor that cannot be reached raises :class:`~clipvisor.ClipvisorError`: the clip was
    not judged, so it must not be recorded as bad."""
    row: Dict[str, Any] = {"path": path}
    try:
        st = os.stat(path)
        row["size_bytes"] = st.st_size
        row["mtime"] = st.st_mtime
    except OSError:
        pass
    try:
        probe = client.probe(path, deadline=deadline, tag=tag)
    except ClipSkipped as skip:
        row.update(status="failed", reason=skip.reason, detail=_skip_text(skip))
        return row
    row.update(facts_of_probe(probe))
    if not row.get("has_video") and not row.get("has_audio"):
        row.update(status="failed", reason="unsupported", detail=f"{path}: no video or audio stream")
        return row
    row["status"] = "ok"
    return row


def _verify_ranges(row: Mapping[str, Any]) -> List[Optional[tuple]]:
    """Time ranges of at most ~9000 frames each (None: the whole clip in one request)."""
    frames = row.get("num_frames") or 0
    duration = row.get("video_duration") or row.get("duration")
    if frames <= VERIFY_MAX_FRAMES or not duration:
        return [None]
    parts = math.ceil(frames / _VERIFY_CHUNK)
    step = float(duration) / parts
    return [(i * step, (i + 1) * step if i + 1 < parts else None) for i in range(parts)]


def verify_clip(client: Client, row: Dict[str, Any], *, tag: Optional[str], deadline: Optional[float]) -> None:
    """Decodes every frame of the clip's video (scaled to 16x16) and records ``verify``:
    ``clean``; ``partial`` with ``verify_detail`` and ``verify_break_s`` (the time of the first
    frame that did not decode, or where the stream stops); or ``failed`` with the reason.
    Audio-only clips are verified by decoding their audio."""
    path = row["path"]
    if not row.get("has_video"):
        # Decoded to 1 kHz mono (the check is the decode; 1 h is 14 MB), in windows of 30 min.
        duration = row.get("audio_duration") or row.get("duration") or 0.0
        windows = max(1, math.ceil(float(duration) / _AUDIO_WINDOW_S))
        problems: List[str] = []
        for i in range(windows):
            bounds: Dict[str, Any] = {}
            if windows > 1:
                bounds["start"] = i * _AUDIO_WINDOW_S
                if i + 1 < windows:
                    bounds["end"] = (i + 1) * _AUDIO_WINDOW_S
            try:
                a = client.audio(path, sample_rate=1000, channels=1, deadline=deadline, tag=tag, **bounds)
            except ClipSkipped as skip:
                if i == 0:
                    row.update(verify="failed", verify_reason=skip.reason, verify_detail=_skip_text(skip))
                    return
                problems.append(_skip_text(skip))
                row["verify_break_s"] = bounds.get("start")
                break
            if a.partial:
                problems.append(a.partial_detail or "partial")
        row.update(verify="partial" if problems else "clean", verify_detail="; ".join(problems) or None)
        return
    decoded = 0
    last_pts: Optional[float] = None
    details: List[str] = []
    break_at: Optional[float] = None
    for rng in _verify_ranges(row):
        options: Dict[str, Any] = {"fps": 1000.0, "min_frames": 1, "max_frames": VERIFY_MAX_FRAMES, "frame_factor": 1,
                                   "width": _VERIFY_SIDE, "height": _VERIFY_SIDE}
        if rng is not None:
            options["start"] = rng[0]
            if rng[1] is not None:
                options["end"] = rng[1]
        try:
            v = client.video(path, deadline=deadline, tag=tag, **options)
        except ClipSkipped as skip:
            if decoded == 0:
                row.update(verify="failed", verify_reason=skip.reason, verify_detail=_skip_text(skip), verify_frames=0)
                return
            details.append(_skip_text(skip))
            break_at = last_pts
            break
        pts = [float(p) for p in v.pts]
        indices = [int(i) for i in v.indices]
        decoded += len(pts)
        if pts:
            last_pts = pts[-1]
        if v.partial:
            details.append(v.partial_detail or "partial")
            if break_at is None:
                # The first frame that did not decode (a gap in the returned indices), else the
                # end of what decoded: its time, one frame after the last good one.
                missing = next((k for k, i in enumerate(indices) if i != indices[0] + k), None)
                if missing is not None and missing > 0:
                    row["verify_break_frame"] = indices[missing - 1] + 1
                    step = 1.0 / float(row["fps"]) if row.get("fps") else 0.0
                    break_at = pts[missing - 1] + step
                elif missing == 0 or not pts:
                    break_at = 0.0
                else:
                    row["verify_break_frame"] = indices[-1] + 1
                    break_at = last_pts
    expected = row.get("num_frames")
    row["verify_frames"] = decoded
    if expected is not None and decoded < expected and not details:
        details.append(f"{decoded} of {expected} counted frames decoded")
        break_at = last_pts
    if details:
        row.update(verify="partial", verify_detail="; ".join(details), verify_break_s=break_at)
    else:
        row["verify"] = "clean"
